"""Linear-attention decode step in Triton: one new token per sequence, state updated in place.

One program per (batch, kv head) owns that head's state, so the in-place update needs no atomics and
the GQA query heads of the group read the updated state after a CTA barrier.
With a decay (HAS_DECAY, log_decay (Hkv,)): S = g S + fk_t v_t^T, z = g z + fk_t, g = exp(log_decay[kv head]);
with per-token gates (HAS_GATE, log_gate (B, Hkv)) the same with g = exp(log_gate[row, kv head]).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import check_gqa, next_pow2


@triton.jit
def linear_decode_kernel(
    fq, fk, v, S, z, o, ld, G, H, eps,
    F: tl.constexpr, DV: tl.constexpr, BF: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_DECAY: tl.constexpr = False, HAS_GATE: tl.constexpr = False,
):
    i_bk = tl.program_id(0)
    Hkv = H // G
    i_b, i_hk = i_bk // Hkv, i_bk % Hkv
    i_bk64 = i_bk.to(tl.int64)
    o_f = tl.arange(0, BF)
    o_v = tl.arange(0, BV)
    m_f, m_v = o_f < F, o_v < DV
    b_v = tl.load(v + i_bk64 * DV + o_v, mask=m_v, other=0.0).to(tl.float32)
    if HAS_DECAY or HAS_GATE:
        if HAS_GATE:
            g_t = tl.exp(tl.load(ld + i_bk64))
        else:
            g_t = tl.exp(tl.load(ld + i_hk))
        b_z = tl.load(z + i_bk64 * F + o_f, mask=m_f, other=0.0) * g_t \
            + tl.load(fk + i_bk64 * F + o_f, mask=m_f, other=0.0).to(tl.float32)
    else:
        b_z = tl.load(z + i_bk64 * F + o_f, mask=m_f, other=0.0) + tl.load(fk + i_bk64 * F + o_f, mask=m_f, other=0.0).to(tl.float32)
    tl.store(z + i_bk64 * F + o_f, b_z, mask=m_f)
    p_S = S + i_bk64 * F * DV
    for f0 in range(0, F, BKF):
        o_k = f0 + tl.arange(0, BKF)
        m_kv = (o_k < F)[:, None] & m_v[None, :]
        b_k = tl.load(fk + i_bk64 * F + o_k, mask=o_k < F, other=0.0).to(tl.float32)
        b_S = tl.load(p_S + o_k[:, None] * DV + o_v[None, :], mask=m_kv, other=0.0)
        if HAS_DECAY or HAS_GATE:
            b_S = b_S * g_t
        tl.store(p_S + o_k[:, None] * DV + o_v[None, :], b_S + b_k[:, None] * b_v[None, :], mask=m_kv)
    tl.debug_barrier()  # the state tiles written above are re-read by other threads below
    for g in range(G):
        i_bh64 = (i_b * H + i_hk * G + g).to(tl.int64)
        b_num = tl.zeros([BV], dtype=tl.float32)
        for f0 in range(0, F, BKF):
            o_k = f0 + tl.arange(0, BKF)
            m_kv = (o_k < F)[:, None] & m_v[None, :]
            b_q = tl.load(fq + i_bh64 * F + o_k, mask=o_k < F, other=0.0).to(tl.float32)
            b_S = tl.load(p_S + o_k[:, None] * DV + o_v[None, :], mask=m_kv, other=0.0)
            b_num += tl.sum(b_q[:, None] * b_S, 0)
        if NORMALIZE:
            b_qf = tl.load(fq + i_bh64 * F + o_f, mask=m_f, other=0.0).to(tl.float32)
            b_num = b_num / (tl.sum(b_qf * b_z, 0) + eps)
        tl.store(o + i_bh64 * DV + o_v, b_num.to(o.dtype.element_ty), mask=m_v)


def _check_state(S, z, B, Hkv, F, DV):
    if S.shape != (B, Hkv, F, DV) or z.shape != (B, Hkv, F):
        raise ValueError(f"state shapes {tuple(S.shape)}, {tuple(z.shape)} do not match ({B},{Hkv},{F},{DV})")
    if S.dtype != torch.float32 or z.dtype != torch.float32 or not (S.is_contiguous() and z.is_contiguous()):
        raise ValueError("decode state (S, z) must be contiguous fp32 tensors (they are updated in place)")


def triton_linear_decode_step(fq_t, fk_t, v_t, state, *, normalize=True, eps=1e-6, log_decay=None, log_gate=None):
    S, z = state
    B, H, F = fq_t.shape
    Hkv, DV = fk_t.shape[1], v_t.shape[-1]
    G = check_gqa(H, Hkv)
    _check_state(S, z, B, Hkv, F, DV)
    fq_t, fk_t, v_t = fq_t.contiguous(), fk_t.contiguous(), v_t.contiguous()
    o = torch.empty(B, H, DV, dtype=fq_t.dtype, device=fq_t.device)
    BF, BV = max(16, next_pow2(F)), max(16, next_pow2(DV))
    BKF = max(16, min(BF, 4096 // BV))
    if log_gate is not None:
        ld = log_gate.float().contiguous()
    else:
        ld = log_decay.float().contiguous() if log_decay is not None else z
    linear_decode_kernel[(B * Hkv,)](fq_t, fk_t, v_t, S, z, o, ld, G, H, float(eps),
                                     F=F, DV=DV, BF=BF, BKF=BKF, BV=BV, NORMALIZE=bool(normalize),
                                     HAS_DECAY=log_decay is not None, HAS_GATE=log_gate is not None, num_warps=4)
    return o, (S, z)
