"""Chunk-boundary states shared by the linear and hybrid ops (flash-linear-attention style).

Forward:  h[n] = S0 + sum_{j < min(nC, L)} fk_j v_j^T   (one (F, Dv) matrix per kv head and boundary)
          zh[n] = z0 + sum_{j < min(nC, L)} fk_j        n = 0..NS, NS = cdiv(L, C); h[NS] is the final state.
          The recurrence runs in fp32; h is stored in bf16 for bf16 inputs (the consumers feed it to a bf16
          tensor-core dot anyway, so this only halves its traffic) and fp32 otherwise; the final state is
          also written separately in fp32.
Backward: the gradient w.r.t. the state read by query chunk n is beta * fq_n^T dN_n (dN = do / den).
          Query chunk n reads the state at boundary max(0, n - d) (d = 0 for plain linear attention,
          d = ceil((W-1)/C) for the hybrid), so key chunk c receives the sum over query chunks n >= c + d + 1.
          The reverse recurrence over n stores that sum as dh[c] and ends with the initial-state gradient.
Each program owns one (BK, BV) tile of one kv head and walks the chunks sequentially; GQA query heads
of a group are summed inside the program (no atomics, no repeated kv heads).

Decay (HAS_DECAY, log_decay lam (Hkv,) <= 0, g = exp(lam)): h[n] sits at position p_n = min(nC, L) - 1 and holds
sum_{j <= p_n} g^(p_n - j) fk_j v_j^T + g^(p_n + 1) S0, so h[n+1] = g^l h[n] + sum_r g^(l-1-r) fk_r v_r^T with l
the length of key chunk n (C, or what is left of L for the last one) and h[NS] is the final state (at L-1).
A query i of chunk n reads h[b], b = max(0, n - d), with the factor g^(i - bC + 1). The backward stores in dh[c]
the whole gradient G_{c+1} of h[c+1] (reads of every later boundary propagated back through the g^C factors, and
the final-state gradient g^(L - (c+1)C) dfinal); key j of chunk c then gets it times g^(p_{c+1} - j).
Every factor is g^e with e >= 0: nothing overflows whatever the length.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..utils import next_pow2


@triton.jit
def chunk_state_fwd_kernel(
    fk, v, S0, z0, h, zh, ST, zT, ld,
    T, L, NS, HKV,
    F: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_S0: tl.constexpr, PREC: tl.constexpr, HAS_DECAY: tl.constexpr = False, HAS_GATE: tl.constexpr = False,
):
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh64 = i_bh.to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < F, o_v < DV
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * DV + o_v[None, :]

    if HAS_S0:
        b_S = tl.load(S0 + i_bh64 * F * DV + o_kv, mask=m_kv, other=0.0).to(tl.float32)
        b_z = tl.load(z0 + i_bh64 * F + o_k, mask=m_k, other=0.0).to(tl.float32)
    else:
        b_S = tl.zeros([BK, BV], dtype=tl.float32)
        b_z = tl.zeros([BK], dtype=tl.float32)
    p_fk = fk + i_bh64 * T * F
    p_v = v + i_bh64 * T * DV
    p_h = h + i_bh64 * (NS + 1) * F * DV
    p_zh = zh + i_bh64 * (NS + 1) * F
    m_z = m_k & ((o_k * 0 + i_v) == 0)  # only one V-tile program writes z
    if HAS_DECAY:
        lam = tl.load(ld + i_bh % HKV)
    for n in range(NS):
        tl.store(p_h + n * F * DV + o_kv, b_S.to(h.dtype.element_ty), mask=m_kv)
        tl.store(p_zh + n * F + o_k, b_z, mask=m_z)
        o_t = n * BT + tl.arange(0, BT)
        m_t = o_t < L
        b_k = tl.load(p_fk + o_t[:, None] * F + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_v = tl.load(p_v + o_t[:, None] * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        if HAS_DECAY or HAS_GATE:
            # this chunk's keys, decayed to its last key (position min((n+1)C, L) - 1); the state moves there too
            n_len = tl.minimum(L - n * BT, BT)
            if HAS_GATE:  # ld: the chunk-local cumulative log gates cl (B*Hkv, T)
                b_cl = tl.load(ld + i_bh64 * T + o_t, mask=m_t, other=0.0)
                cl_last = tl.sum(tl.where(tl.arange(0, BT) == n_len - 1, b_cl, 0.0), 0)
                w = tl.exp(tl.where(m_t, cl_last - b_cl, 0.0))
                g_len = tl.exp(cl_last)
            else:
                w = tl.exp(lam * tl.maximum(n_len - 1 - tl.arange(0, BT), 0).to(tl.float32))
                g_len = tl.exp(lam * n_len)
            b_kw = b_k.to(tl.float32) * w[:, None]
            b_hi = b_kw.to(b_k.dtype)
            b_S = b_S * g_len + tl.dot(tl.trans(b_hi), b_v, input_precision=PREC)
            if b_k.dtype != tl.float32:
                # 16-bit inputs: fk * w is not a 16-bit number; its rounding remainder goes through a second
                # tensor-core dot (hi + lo keeps ~16 bits: the state stays as exact as without decay)
                b_lo = (b_kw - b_hi.to(tl.float32)).to(b_k.dtype)
                b_S += tl.dot(tl.trans(b_lo), b_v, input_precision=PREC)
            b_z = b_z * g_len + tl.sum(b_kw, 0)
        else:
            b_S += tl.dot(tl.trans(b_k), b_v, input_precision=PREC)
            b_z += tl.sum(b_k.to(tl.float32), 0)
    tl.store(p_h + NS * F * DV + o_kv, b_S.to(h.dtype.element_ty), mask=m_kv)
    tl.store(p_zh + NS * F + o_k, b_z, mask=m_z)
    tl.store(ST + i_bh64 * F * DV + o_kv, b_S, mask=m_kv)
    tl.store(zT + i_bh64 * F + o_k, b_z, mask=m_z)


@triton.jit
def chunk_state_bwd_kernel(
    fq, do, rden, dden, beta, dST, dzT, dh, dzh, dS0, dz0, ld,
    T, G, H, NT, D_OFF, L,
    F: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_BETA: tl.constexpr, HAS_DFINAL: tl.constexpr, PREC: tl.constexpr,
    HAS_DECAY: tl.constexpr = False, HAS_GATE: tl.constexpr = False,
):
    i_k, i_v, i_bk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    Hkv = H // G
    i_b, i_hk = i_bk // Hkv, i_bk % Hkv
    i_bk64 = i_bk.to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < F, o_v < DV
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * DV + o_v[None, :]
    m_z = m_k & ((o_k * 0 + i_v) == 0)

    if HAS_DFINAL:
        b_dS = tl.load(dST + i_bk64 * F * DV + o_kv, mask=m_kv, other=0.0).to(tl.float32)
        b_dz = tl.load(dzT + i_bk64 * F + o_k, mask=m_k, other=0.0).to(tl.float32)
    else:
        b_dS = tl.zeros([BK, BV], dtype=tl.float32)
        b_dz = tl.zeros([BK], dtype=tl.float32)
    p_dh = dh + i_bk64 * NT * F * DV
    p_dzh = dzh + i_bk64 * NT * F
    # the last d + 1 key chunks feed no state that any query reads: only the final-state gradient
    if HAS_GATE:  # linear attention only (d = 0): ld holds the chunk-local cumulative log gates cl (B*Hkv, T)
        tl.store(p_dh + (NT - 1) * F * DV + o_kv, b_dS.to(dh.dtype.element_ty), mask=m_kv)
        tl.store(p_dzh + (NT - 1) * F + o_k, b_dz, mask=m_z)
        f = tl.exp(tl.load(ld + i_bk64 * T + L - 1))  # back through the last chunk to its boundary
        b_dS = b_dS * f
        b_dz = b_dz * f
    elif HAS_DECAY:
        lam = tl.load(ld + i_hk)
        for c in range(tl.maximum(NT - 1 - D_OFF, 0), NT):
            # h[c+1] sits at (c+1)C - 1 (the final state h[NS] at L - 1): g^(L - (c+1)C) dfinal (chunks past L: unused)
            f = tl.exp(lam * tl.maximum(L - (c + 1) * BT, 0))
            tl.store(p_dh + c * F * DV + o_kv, (b_dS * f).to(dh.dtype.element_ty), mask=m_kv)
            tl.store(p_dzh + c * F + o_k, b_dz * f, mask=m_z)
        # gradient of the last boundary any query reads, (NT-1-d)C <= L
        f = tl.exp(lam * (L - tl.maximum(NT - 1 - D_OFF, 0) * BT))
        b_dS = b_dS * f
        b_dz = b_dz * f
    else:
        for c in range(tl.maximum(NT - 1 - D_OFF, 0), NT):
            tl.store(p_dh + c * F * DV + o_kv, b_dS.to(dh.dtype.element_ty), mask=m_kv)
            tl.store(p_dzh + c * F + o_k, b_dz, mask=m_z)
    for nn in range(NT):
        n = NT - 1 - nn
        o_t = n * BT + tl.arange(0, BT)
        m_t = o_t < T
        for g in range(G):
            i_h = i_hk * G + g
            i_bh64 = (i_b * H + i_h).to(tl.int64)
            b_q = tl.load(fq + i_bh64 * T * F + o_t[:, None] * F + o_k[None, :],
                          mask=m_t[:, None] & m_k[None, :], other=0.0)
            b_dn = tl.load(do + i_bh64 * T * DV + o_t[:, None] * DV + o_v[None, :],
                           mask=m_t[:, None] & m_v[None, :], other=0.0).to(tl.float32)
            if NORMALIZE:
                b_r = tl.load(rden + i_bh64 * T + o_t, mask=m_t, other=0.0)
                b_dd = tl.load(dden + i_bh64 * T + o_t, mask=m_t, other=0.0)
                b_dn = b_dn * b_r[:, None]
            if HAS_BETA:
                b_beta = tl.load(beta + i_h)
                b_dn = b_dn * b_beta
                if NORMALIZE:
                    b_dd = b_dd * b_beta
            if HAS_GATE:  # query i reads boundary n with exp(cl_i)
                rf = tl.exp(tl.load(ld + i_bk64 * T + o_t, mask=m_t, other=0.0))
                b_dn = b_dn * rf[:, None]
                if NORMALIZE:
                    b_dd = b_dd * rf
            elif HAS_DECAY:  # query i reads boundary b = max(n - d, 0) with g^(i - bC + 1)
                rf = tl.exp(lam * (o_t - tl.maximum(n - D_OFF, 0) * BT + 1).to(tl.float32))
                b_dn = b_dn * rf[:, None]
                if NORMALIZE:
                    b_dd = b_dd * rf
            b_dS += tl.dot(tl.trans(b_q), b_dn.to(b_q.dtype), input_precision=PREC)
            if NORMALIZE:
                b_dz += tl.sum(b_q.to(tl.float32) * b_dd[:, None], 0)
        c = n - D_OFF - 1
        if c >= 0:
            tl.store(p_dh + c * F * DV + o_kv, b_dS.to(dh.dtype.element_ty), mask=m_kv)
            tl.store(p_dzh + c * F + o_k, b_dz, mask=m_z)
            if HAS_GATE:  # back to boundary c through chunk c (full): its last cumulative gate
                g_c = tl.exp(tl.load(ld + i_bk64 * T + c * BT + BT - 1))
                b_dS = b_dS * g_c
                b_dz = b_dz * g_c
            elif HAS_DECAY:  # back to boundary c (key chunk c is full: (c+1)C <= (NT-1-d)C <= L)
                g_c = tl.exp(lam * BT)
                b_dS = b_dS * g_c
                b_dz = b_dz * g_c
    tl.store(dS0 + i_bk64 * F * DV + o_kv, b_dS, mask=m_kv)
    tl.store(dz0 + i_bk64 * F + o_k, b_dz, mask=m_z)


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs: three tf32 tensor-core products (about fp32 accuracy; "ieee" FMA dots spill and can
    # exceed shared memory on Hopper); 16-bit inputs: plain tensor-core dots with fp32 accumulation
    return "tf32x3" if dtype == torch.float32 else "tf32"


def chunk_size(dtype: torch.dtype) -> int:
    # fp32 tiles take twice the shared memory and registers: 64-row fp32 tiles overflow Hopper's shared
    # memory at head dim 128, so fp32 (the accuracy path, not the fast one) uses 32-token chunks
    return 32 if dtype == torch.float32 else 64


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16 has fp32's range, so chunk states can be kept in it; fp16 could overflow on long sequences
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def kernel_config(name: str, num_warps: int, num_stages: int) -> dict:
    """Launch options, overridable for tuning sweeps: EFFCONV_KCFG="hyb_fwd=8,2;lin_dkv=4,1"."""
    spec = os.environ.get("EFFCONV_KCFG", "")
    for item in spec.split(";"):
        if item.startswith(name + "="):
            w, s = item.split("=", 1)[1].split(",")
            return dict(num_warps=int(w), num_stages=int(s))
    return dict(num_warps=num_warps, num_stages=num_stages)


def _state_tiles(F: int, DV: int, programs_per_tile: int) -> tuple[int, int]:
    # the state recurrence is sequential over chunks: split (F, Dv) into tiles until the GPU is busy
    BK = min(64, max(16, next_pow2(F)))
    BV = min(64, max(16, next_pow2(DV)))
    n_sm = 132
    if torch.cuda.is_available():
        n_sm = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    while programs_per_tile * triton.cdiv(F, BK) * triton.cdiv(DV, BV) < n_sm and (BK > 32 or BV > 32):
        if BK >= BV:
            BK //= 2
        else:
            BV //= 2
    return BK, BV


def chunk_state_fwd(fk, v, initial_state, L: int, chunk: int, log_decay=None, gate_cumsum=None):
    """h (B, Hkv, NS+1, F, Dv), zh (B, Hkv, NS+1, F) and the fp32 state after L keys (ST, zT).
    log_decay: fp32 contiguous (Hkv,) or None. gate_cumsum: per-token gates as chunk-local cumulative log gates
    (fp32 (B, Hkv, T), chunk_cumsum), linear attention only (L = T)."""
    B, Hkv, T, F = fk.shape
    DV = v.shape[-1]
    NS = triton.cdiv(L, chunk)
    h = fk.new_empty(B, Hkv, NS + 1, F, DV, dtype=state_dtype(fk.dtype))
    zh = fk.new_empty(B, Hkv, NS + 1, F, dtype=torch.float32)
    ST = fk.new_empty(B, Hkv, F, DV, dtype=torch.float32)
    zT = fk.new_empty(B, Hkv, F, dtype=torch.float32)
    BK, BV = _state_tiles(F, DV, B * Hkv)
    S0, z0 = (initial_state[0].float().contiguous(), initial_state[1].float().contiguous()) \
        if initial_state is not None else (h, zh)
    grid = (triton.cdiv(F, BK), triton.cdiv(DV, BV), B * Hkv)
    factors = gate_cumsum if gate_cumsum is not None else (log_decay if log_decay is not None else zh)
    chunk_state_fwd_kernel[grid](
        fk, v, S0, z0, h, zh, ST, zT, factors, T, L, NS, Hkv,
        F=F, DV=DV, BT=chunk, BK=BK, BV=BV, HAS_S0=initial_state is not None, PREC=_prec(fk.dtype),
        HAS_DECAY=log_decay is not None, HAS_GATE=gate_cumsum is not None, **kernel_config("state_fwd", 4, 2),
    )
    return h, zh, ST, zT


def chunk_state_bwd(fq, do, rden, dden, beta, dfinal, Hkv: int, d: int, chunk: int, normalize: bool, L=None,
                    log_decay=None, gate_cumsum=None):
    """dh, dzh (B, Hkv, NT, F, Dv)/(B, Hkv, NT, F) per key chunk, and the initial-state grads (dS0, dz0).
    With log_decay (fp32 (Hkv,)) L, the number of keys in the state, is needed (T for linear attention)."""
    B, H, T, F = fq.shape
    DV = do.shape[-1]
    G = H // Hkv
    NT = triton.cdiv(T, chunk)
    dh = fq.new_empty(B, Hkv, NT, F, DV, dtype=state_dtype(fq.dtype))
    dzh = fq.new_empty(B, Hkv, NT, F, dtype=torch.float32)
    dS0 = fq.new_empty(B, Hkv, F, DV, dtype=torch.float32)
    dz0 = fq.new_empty(B, Hkv, F, dtype=torch.float32)
    has_df = dfinal is not None
    dST, dzT = (dfinal[0].float().contiguous(), dfinal[1].float().contiguous()) if has_df else (dS0, dz0)
    BK, BV = _state_tiles(F, DV, B * Hkv)
    grid = (triton.cdiv(F, BK), triton.cdiv(DV, BV), B * Hkv)
    chunk_state_bwd_kernel[grid](
        fq, do, rden if normalize else do, dden if normalize else do, beta if beta is not None else do,
        dST, dzT, dh, dzh, dS0, dz0,
        gate_cumsum if gate_cumsum is not None else (log_decay if log_decay is not None else dz0), T, G, H, NT, d,
        T if L is None else L,
        F=F, DV=DV, BT=chunk, BK=BK, BV=BV, NORMALIZE=normalize, HAS_BETA=beta is not None,
        HAS_DFINAL=has_df, PREC=_prec(fq.dtype), HAS_DECAY=log_decay is not None, HAS_GATE=gate_cumsum is not None,
        **kernel_config("state_bwd", 4, 2),
    )
    return dh, dzh, dS0, dz0


def chunk_cumsum(log_gate: torch.Tensor, chunk: int) -> torch.Tensor:
    """Chunk-local inclusive cumulative sums of per-token log gates (B, Hkv, T) -> fp32 (B, Hkv, T): every
    factor the gated kernels form is exp of a difference of two of them within a chunk (or of one of them),
    never of sums over the whole sequence, so long sequences lose no precision."""
    B, Hkv, T = log_gate.shape
    n = -(-T // chunk)
    padded = torch.nn.functional.pad(log_gate.float(), (0, n * chunk - T))
    return padded.view(B, Hkv, n, chunk).cumsum(-1).view(B, Hkv, n * chunk)[..., :T].contiguous()


def chunk_cumsum_backward(grad_cumsum: torch.Tensor, chunk: int) -> torch.Tensor:
    """The gradient of chunk_cumsum: a reverse cumulative sum within each chunk."""
    B, Hkv, T = grad_cumsum.shape
    n = -(-T // chunk)
    padded = torch.nn.functional.pad(grad_cumsum, (0, n * chunk - T)).view(B, Hkv, n, chunk)
    return padded.flip(-1).cumsum(-1).flip(-1).view(B, Hkv, n * chunk)[..., :T]
