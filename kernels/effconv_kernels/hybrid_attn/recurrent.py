"""Hybrid-attention decode step in Triton: evict, append and attend in one launch.

One program per (batch, kv head): it folds the evicted token (t - W) into (S, z), writes the new token
into ring slot t % W, then serves the G query heads of its group (window softmax over the ring buffer
with an online max, plus fq (S, z) for the linear part) under the shared normaliser.
With a decay (HAS_DECAY, log_decay (Hkv,), g = exp(log_decay[kv head])) an eviction is S = g S + fk v^T (z alike)
and the query reads the state, which sits at token max(t - W, -1), with g^min(W, t + 1) = g^n_valid.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import check_gqa, next_pow2
from .cache import HybridDecodeCache


@triton.jit
def hybrid_decode_kernel(
    q, k, v, fq, fk, mix, S, z, kb, vb, fkb, o, ld, first,
    G, H, W, t, slot, n_valid, evict, scale, eps, pos,
    D: tl.constexpr, F: tl.constexpr, DV: tl.constexpr,
    BD: tl.constexpr, BF: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr, BW: tl.constexpr,
    POS_ON_DEVICE: tl.constexpr, HAS_DECAY: tl.constexpr = False, HAS_FIRST: tl.constexpr = False,
):
    if POS_ON_DEVICE:  # token index read from device memory (CUDA-graph replay: no host value changes)
        t = tl.load(pos).to(tl.int32)
        slot = t % W
        n_valid = tl.minimum(t + 1, W)
        evict = t >= W
    i_bk = tl.program_id(0)
    Hkv = H // G
    i_b, i_hk = i_bk // Hkv, i_bk % Hkv
    i_bk64 = i_bk.to(tl.int64)
    if HAS_FIRST:  # left padding: tokens before first[b] are not in row b's window
        b_first = tl.load(first + i_b).to(tl.int32)
    o_d, o_f, o_v = tl.arange(0, BD), tl.arange(0, BF), tl.arange(0, BV)
    m_d, m_f, m_v = o_d < D, o_f < F, o_v < DV
    p_S = S + i_bk64 * F * DV
    b_z = tl.load(z + i_bk64 * F + o_f, mask=m_f, other=0.0)
    if HAS_DECAY:
        lam = tl.load(ld + i_hk)
    if evict:  # token t - W leaves the window: add it to the linear state before its slot is reused
        b_fko = tl.load(fkb + (i_bk64 * W + slot) * F + o_f, mask=m_f, other=0.0).to(tl.float32)
        b_vo = tl.load(vb + (i_bk64 * W + slot) * DV + o_v, mask=m_v, other=0.0).to(tl.float32)
        if HAS_DECAY:
            b_z = b_z * tl.exp(lam)
        b_z += b_fko
        tl.store(z + i_bk64 * F + o_f, b_z, mask=m_f)
        for f0 in range(0, F, BKF):
            o_k = f0 + tl.arange(0, BKF)
            m_kv = (o_k < F)[:, None] & m_v[None, :]
            b_k = tl.load(fkb + (i_bk64 * W + slot) * F + o_k, mask=o_k < F, other=0.0).to(tl.float32)
            b_S = tl.load(p_S + o_k[:, None] * DV + o_v[None, :], mask=m_kv, other=0.0)
            if HAS_DECAY:
                b_S = b_S * tl.exp(lam)
            tl.store(p_S + o_k[:, None] * DV + o_v[None, :], b_S + b_k[:, None] * b_vo[None, :], mask=m_kv)
    tl.debug_barrier()  # old slot contents are read above before being overwritten below
    tl.store(kb + (i_bk64 * W + slot) * D + o_d, tl.load(k + i_bk64 * D + o_d, mask=m_d), mask=m_d)
    tl.store(vb + (i_bk64 * W + slot) * DV + o_v, tl.load(v + i_bk64 * DV + o_v, mask=m_v), mask=m_v)
    tl.store(fkb + (i_bk64 * W + slot) * F + o_f, tl.load(fk + i_bk64 * F + o_f, mask=m_f), mask=m_f)
    tl.debug_barrier()  # the new slot and the updated state are re-read by other threads below

    for g in range(G):
        i_h = i_hk * G + g
        i_bh64 = (i_b * H + i_h).to(tl.int64)
        b_mix = tl.load(mix + i_h).to(tl.float32)
        alpha = 1.0 / (1.0 + tl.exp(-b_mix))
        beta = 1.0 - alpha
        b_q = tl.load(q + i_bh64 * D + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_m = tl.full([1], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([1], dtype=tl.float32)
        b_acc = tl.zeros([BV], dtype=tl.float32)
        for w0 in range(0, W, BW):  # slots >= n_valid are masked (a fixed trip count also serves POS_ON_DEVICE)
            o_w = w0 + tl.arange(0, BW)
            m_w = o_w < n_valid
            if HAS_FIRST:  # slot j holds token t - ((t - j) mod W)
                m_w = m_w & (t - (t - o_w + W) % W >= b_first)
            b_kb = tl.load(kb + (i_bk64 * W + o_w[:, None]) * D + o_d[None, :], mask=m_w[:, None] & m_d[None, :], other=0.0)
            s = tl.sum(b_kb.to(tl.float32) * b_q[None, :], 1) * scale
            s = tl.where(m_w, s, float("-inf"))
            m_new = tl.maximum(b_m, tl.max(s, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully padded block so far: no NaN
            corr = tl.exp(b_m - m_safe)
            p = tl.exp(s - m_safe)
            b_vb = tl.load(vb + (i_bk64 * W + o_w[:, None]) * DV + o_v[None, :], mask=m_w[:, None] & m_v[None, :], other=0.0)
            b_l = b_l * corr + tl.sum(p, 0)
            b_acc = b_acc * corr + tl.sum(p[:, None] * b_vb.to(tl.float32), 0)
            b_m = m_new
        b_num = tl.zeros([BV], dtype=tl.float32)
        for f0 in range(0, F, BKF):
            o_k = f0 + tl.arange(0, BKF)
            m_kv = (o_k < F)[:, None] & m_v[None, :]
            b_fq = tl.load(fq + i_bh64 * F + o_k, mask=o_k < F, other=0.0).to(tl.float32)
            b_S = tl.load(p_S + o_k[:, None] * DV + o_v[None, :], mask=m_kv, other=0.0)
            b_num += tl.sum(b_fq[:, None] * b_S, 0)
        b_fqf = tl.load(fq + i_bh64 * F + o_f, mask=m_f, other=0.0).to(tl.float32)
        if HAS_DECAY:  # the state sits n_valid = min(W, t + 1) tokens before the query
            b_qf = tl.exp(lam * n_valid)
            b_num = b_num * b_qf
            b_den = alpha * b_l + beta * tl.sum(b_fqf * b_z, 0) * b_qf + eps
        else:
            b_den = alpha * b_l + beta * tl.sum(b_fqf * b_z, 0) + eps
        b_o = (alpha * b_acc + beta * b_num) / b_den
        tl.store(o + i_bh64 * DV + o_v, b_o.to(o.dtype.element_ty), mask=m_v)


def triton_hybrid_decode_step(q_t, k_t, v_t, fq_t, fk_t, mix, cache: HybridDecodeCache, *, window: int,
                              scale: float, eps=1e-6, position: torch.Tensor | None = None, log_decay=None,
                              first: torch.Tensor | None = None):
    W = cache.window
    if int(window) != W:
        raise ValueError(f"window={window} but the cache holds {W} slots")
    B, H, D = q_t.shape
    Hkv, DV, F = k_t.shape[1], v_t.shape[-1], fq_t.shape[-1]
    G = check_gqa(H, Hkv)
    for name, x in (("S", cache.S), ("z", cache.z)):
        if x.dtype != torch.float32 or not x.is_contiguous():
            raise ValueError(f"cache.{name} must be contiguous fp32")
    for name, x in (("k", cache.k), ("v", cache.v), ("fk", cache.fk)):
        if not x.is_contiguous():
            raise ValueError(f"cache.{name} must be contiguous")
    t = cache.seen
    q_t, k_t, v_t, fq_t, fk_t = (x.contiguous() for x in (q_t, k_t, v_t, fq_t, fk_t))
    mix_f = mix.float().contiguous()
    o = torch.empty(B, H, DV, dtype=q_t.dtype, device=q_t.device)
    BD, BF, BV = max(16, next_pow2(D)), max(16, next_pow2(F)), max(16, next_pow2(DV))
    BKF = max(16, min(BF, 4096 // BV))
    BW = max(16, min(64, next_pow2(W)))
    hybrid_decode_kernel[(B * Hkv,)](
        q_t, k_t.to(cache.k.dtype), v_t.to(cache.v.dtype), fq_t, fk_t.to(cache.fk.dtype), mix_f,
        cache.S, cache.z, cache.k, cache.v, cache.fk, o,
        log_decay.float().contiguous() if log_decay is not None else mix_f,
        first if first is not None else mix_f,
        G, H, W, t, t % W, min(t + 1, W), int(t >= W), float(scale), float(eps),
        position if position is not None else mix_f,
        D=D, F=F, DV=DV, BD=BD, BF=BF, BKF=BKF, BV=BV, BW=BW, POS_ON_DEVICE=position is not None,
        HAS_DECAY=log_decay is not None, HAS_FIRST=first is not None, num_warps=4,
    )
    if position is None:  # with a device position the caller advances it (once per model step)
        cache.seen = t + 1
    return o
