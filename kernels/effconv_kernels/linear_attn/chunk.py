"""Chunked causal linear attention in Triton (forward and backward).

Per chunk n of C tokens (64; 32 for fp32):  o_n = fq_n h[n] + tril(fq_n fk_n^T) v_n,  den_n = fq_n zh[n] + rowsum(tril(fq_n fk_n^T)),
with h[n] the state before the chunk (common/chunk_state.py). The state pass is sequential over chunks but
parallel over (kv head, F tile, Dv tile); everything else is parallel over (chunk, head).
Backward with dN = do / den and dden = -(do . o) / den (the normaliser's gradient):
    dA_ij = dN_i . v_j + dden_i   (j <= i, same chunk)
    dfq = dA fk + dN h[n]^T + dden zh[n]^T
    dfk = dA^T fq + v dh[n]^T + dzh[n]            (summed over the query heads of the GQA group)
    dv  = A^T dN + fk dh[n]

Decay (HAS_DECAY; log_decay lam (Hkv,) <= 0, g = exp(lam); common/chunk_state.py for the states): the intra-chunk
scores get g^(r-s) (r >= s, local rows), the state read by row r gets g^(r+1) (h[n] sits at position nC - 1),
the state terms of key s get g^(p - s) (p = min((n+1)C, T) - 1, where h[n+1] sits). d(lam) sums three parts,
each with small integer weights (no cancellation between large terms):
    (a) intra pairs        sum (r-s) g^(r-s) A_rs dA_rs                              (dkv kernel)
    (b) state reads        sum_r (r+1) fq_r . [g^(r+1) (dN_r h[n]^T + dden_r zh[n])]  (dq kernel)
    (c) state writes       sum_s (p-s) fk_s . [g^(p-s) (dh[n] v_s + dzh[n])]
                           + l g^l (<h[n], dh[n]> + <zh[n], dzh[n]>), l the chunk's length  (dkv kernel)
where dh[n] is the whole gradient of h[n+1]; every program writes one partial sum, added up on the host.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..common.chunk_state import (
    _prec, chunk_cumsum, chunk_cumsum_backward, chunk_size, chunk_state_bwd, chunk_state_fwd, kernel_config,
)
from ..utils import check_gqa, next_pow2



@triton.jit
def linear_fwd_o_kernel(
    fq, fk, v, h, zh, o, rden, ld,
    T, G, H, NS1, eps,
    F: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
    NORMALIZE: tl.constexpr, PREC: tl.constexpr, HAS_DECAY: tl.constexpr = False, HAS_GATE: tl.constexpr = False,
):
    # The whole feature dim is one tile (no loop over F tiles). A loop over F tiles gave wrong outputs
    # on the H100 with Triton 3.6 when it ran a single iteration (F = 64, bf16/fp16, normalize=True);
    # the loop-free structure is the one the hybrid forward uses, which passed there at the same shapes.
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    Hkv = H // G
    i_b, i_h = i_bh // H, i_bh % H
    i_bk64 = (i_b * Hkv + i_h // G).to(tl.int64)
    i_bh64 = i_bh.to(tl.int64)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_f = tl.arange(0, BF)
    o_v = tl.arange(0, BV)
    m_f, m_v = o_f < F, o_v < DV
    m_tf = m_t[:, None] & m_f[None, :]
    b_q = tl.load(fq + i_bh64 * T * F + o_t[:, None] * F + o_f[None, :], mask=m_tf, other=0.0)
    b_k = tl.load(fk + i_bk64 * T * F + o_t[:, None] * F + o_f[None, :], mask=m_tf, other=0.0)
    b_h = tl.load(h + (i_bk64 * NS1 + i_t) * F * DV + o_f[:, None] * DV + o_v[None, :],
                  mask=m_f[:, None] & m_v[None, :], other=0.0)
    b_v = tl.load(v + i_bk64 * T * DV + o_t[:, None] * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
    if HAS_DECAY or HAS_GATE:
        causal = o_t[:, None] >= o_t[None, :]
        if HAS_GATE:  # ld: chunk-local cumulative log gates (B*Hkv, T)
            b_cl = tl.load(ld + i_bk64 * T + o_t, mask=m_t, other=0.0)
            b_qf = tl.exp(b_cl)
            pair = tl.exp(tl.where(causal, b_cl[:, None] - b_cl[None, :], 0.0))
        else:
            lam = tl.load(ld + i_h // G)
            o_r = tl.arange(0, BT)
            b_qf = tl.exp(lam * (o_r + 1).to(tl.float32))  # the state sits just before the chunk
            pair = tl.exp(lam * tl.maximum(o_r[:, None] - o_r[None, :], 0).to(tl.float32))
        b_o = tl.dot(b_q, b_h.to(b_q.dtype), input_precision=PREC) * b_qf[:, None]
        b_A = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
        b_A = tl.where(causal, b_A * pair, 0.0)
        b_o += tl.dot(b_A.to(b_v.dtype), b_v, input_precision=PREC)
        if NORMALIZE:
            b_z = tl.load(zh + (i_bk64 * NS1 + i_t) * F + o_f, mask=m_f, other=0.0)
            b_r = 1.0 / (tl.sum(b_q.to(tl.float32) * b_z[None, :], 1) * b_qf + tl.sum(b_A, 1) + eps)
            b_o = b_o * b_r[:, None]
            tl.store(rden + i_bh64 * T + o_t, b_r, mask=m_t)
    else:
        b_o = tl.dot(b_q, b_h.to(b_q.dtype), input_precision=PREC)
        b_A = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
        b_A = tl.where(o_t[:, None] >= o_t[None, :], b_A, 0.0)
        b_o += tl.dot(b_A.to(b_v.dtype), b_v, input_precision=PREC)
        if NORMALIZE:
            b_z = tl.load(zh + (i_bk64 * NS1 + i_t) * F + o_f, mask=m_f, other=0.0)
            b_r = 1.0 / (tl.sum(b_q.to(tl.float32) * b_z[None, :], 1) + tl.sum(b_A, 1) + eps)
            b_o = b_o * b_r[:, None]
            tl.store(rden + i_bh64 * T + o_t, b_r, mask=m_t)
    tl.store(o + i_bh64 * T * DV + o_t[:, None] * DV + o_v[None, :], b_o.to(o.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


@triton.jit
def normalizer_bwd_kernel(o, do, rden, dden, T, DV: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):
    # dden_i = -(do_i . o_i) / den_i  (gradient w.r.t. the denominator; o already includes 1/den)
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_bh64 = i_bh.to(tl.int64)
    o_t = i_t * BT + tl.arange(0, BT)
    o_v = tl.arange(0, BV)
    m = (o_t < T)[:, None] & (o_v < DV)[None, :]
    off = i_bh64 * T * DV + o_t[:, None] * DV + o_v[None, :]
    b_o = tl.load(o + off, mask=m, other=0.0).to(tl.float32)
    b_do = tl.load(do + off, mask=m, other=0.0).to(tl.float32)
    b_r = tl.load(rden + i_bh64 * T + o_t, mask=o_t < T, other=0.0)
    tl.store(dden + i_bh64 * T + o_t, -tl.sum(b_o * b_do, 1) * b_r, mask=o_t < T)


@triton.jit
def linear_bwd_dq_kernel(
    fk, v, h, zh, do, rden, dden, dq, fq, ld, dld,
    T, G, H, NS1,
    F: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NORMALIZE: tl.constexpr, PREC: tl.constexpr, HAS_DECAY: tl.constexpr = False, HAS_GATE: tl.constexpr = False,
):
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    Hkv = H // G
    i_b, i_h = i_bh // H, i_bh % H
    i_bk64 = (i_b * Hkv + i_h // G).to(tl.int64)
    i_bh64 = i_bh.to(tl.int64)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_v = tl.arange(0, BV)
    m_v = o_v < DV
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < F
    m_tv = m_t[:, None] & m_v[None, :]

    b_dn = tl.load(do + i_bh64 * T * DV + o_t[:, None] * DV + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
    b_v = tl.load(v + i_bk64 * T * DV + o_t[:, None] * DV + o_v[None, :], mask=m_tv, other=0.0)
    if NORMALIZE:
        b_dn = b_dn * tl.load(rden + i_bh64 * T + o_t, mask=m_t, other=0.0)[:, None]
        b_dd = tl.load(dden + i_bh64 * T + o_t, mask=m_t, other=0.0)
    b_dn = b_dn.to(b_v.dtype)
    b_dA = tl.dot(b_dn, tl.trans(b_v), input_precision=PREC)
    if NORMALIZE:
        b_dA += b_dd[:, None]
    b_dA = tl.where(o_t[:, None] >= o_t[None, :], b_dA, 0.0)
    b_k = tl.load(fk + i_bk64 * T * F + o_t[:, None] * F + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
    b_h = tl.load(h + (i_bk64 * NS1 + i_t) * F * DV + o_k[:, None] * DV + o_v[None, :],
                  mask=m_k[:, None] & m_v[None, :], other=0.0)
    if HAS_GATE:
        b_cl = tl.load(ld + i_bk64 * T + o_t, mask=m_t, other=0.0)
        b_dA = b_dA * tl.exp(tl.where(o_t[:, None] >= o_t[None, :], b_cl[:, None] - b_cl[None, :], 0.0))
        b_dq = tl.dot(b_dA.to(b_k.dtype), b_k, input_precision=PREC)
        b_dqs = tl.dot(b_dn, tl.trans(b_h.to(b_dn.dtype)), input_precision=PREC)  # through the state
        if NORMALIZE:
            b_z = tl.load(zh + (i_bk64 * NS1 + i_t) * F + o_k, mask=m_k, other=0.0)
            b_dqs += b_dd[:, None] * b_z[None, :]
        b_dqs = b_dqs * tl.exp(b_cl)[:, None]
        b_dq += b_dqs
        # d(cl_i), state reads: fq_i . dfq_i(state part), this F tile (summed over tiles and heads on the host)
        b_q = tl.load(fq + i_bh64 * T * F + o_t[:, None] * F + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                      other=0.0).to(tl.float32)
        tl.store(dld + (i_bh64 * tl.num_programs(0) + i_k) * T + o_t, tl.sum(b_q * b_dqs, 1), mask=m_t)
    elif HAS_DECAY:
        lam = tl.load(ld + i_h // G)
        o_r = tl.arange(0, BT)
        b_dA = b_dA * tl.exp(lam * tl.maximum(o_r[:, None] - o_r[None, :], 0).to(tl.float32))
        b_dq = tl.dot(b_dA.to(b_k.dtype), b_k, input_precision=PREC)
        b_dqs = tl.dot(b_dn, tl.trans(b_h.to(b_dn.dtype)), input_precision=PREC)  # through the state
        if NORMALIZE:
            b_z = tl.load(zh + (i_bk64 * NS1 + i_t) * F + o_k, mask=m_k, other=0.0)
            b_dqs += b_dd[:, None] * b_z[None, :]
        b_qf = tl.exp(lam * (o_r + 1).to(tl.float32))
        b_dqs = b_dqs * b_qf[:, None]
        b_dq += b_dqs
        # d(lam), state reads: sum_r (r+1) fq_r . dfq_r(state part), this F tile
        b_q = tl.load(fq + i_bh64 * T * F + o_t[:, None] * F + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                      other=0.0).to(tl.float32)
        part = tl.sum(tl.sum(b_q * b_dqs, 1) * (o_r + 1).to(tl.float32), 0)
        tl.store(dld + (i_bh64 * tl.num_programs(1) + i_t) * tl.num_programs(0) + i_k, part)
    else:
        b_dq = tl.dot(b_dA.to(b_k.dtype), b_k, input_precision=PREC)
        b_dq += tl.dot(b_dn, tl.trans(b_h.to(b_dn.dtype)), input_precision=PREC)
        if NORMALIZE:
            b_z = tl.load(zh + (i_bk64 * NS1 + i_t) * F + o_k, mask=m_k, other=0.0)
            b_dq += b_dd[:, None] * b_z[None, :]
    tl.store(dq + i_bh64 * T * F + o_t[:, None] * F + o_k[None, :], b_dq.to(dq.dtype.element_ty),
             mask=m_t[:, None] & m_k[None, :])


@triton.jit
def linear_bwd_dkv_kernel(
    fq, fk, v, dh, dzh, do, rden, dden, dk, dv, h, zh, ld, dld,
    T, G, H, NT,
    F: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
    NORMALIZE: tl.constexpr, PREC: tl.constexpr, HAS_DECAY: tl.constexpr = False, HAS_GATE: tl.constexpr = False,
):
    i_t, i_bk = tl.program_id(0), tl.program_id(1)
    Hkv = H // G
    i_b, i_hk = i_bk // Hkv, i_bk % Hkv
    i_bk64 = i_bk.to(tl.int64)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_f = tl.arange(0, BF)
    m_f = o_f < F
    o_v = tl.arange(0, BV)
    m_v = o_v < DV
    m_tf = m_t[:, None] & m_f[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    b_k = tl.load(fk + i_bk64 * T * F + o_t[:, None] * F + o_f[None, :], mask=m_tf, other=0.0)
    b_v = tl.load(v + i_bk64 * T * DV + o_t[:, None] * DV + o_v[None, :], mask=m_tv, other=0.0)
    # rows are keys j, columns queries i: keep i >= j
    causal = o_t[:, None] <= o_t[None, :]
    b_dk = tl.zeros([BT, BF], dtype=tl.float32)
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    if HAS_GATE:
        b_cl = tl.load(ld + i_bk64 * T + o_t, mask=m_t, other=0.0)
        dmt = tl.exp(tl.where(causal, b_cl[None, :] - b_cl[:, None], 0.0))  # exp(cl_i - cl_j), rows keys j
        b_dcl = tl.zeros([BT], dtype=tl.float32)
    elif HAS_DECAY:
        lam = tl.load(ld + i_hk)
        o_r = tl.arange(0, BT)
        delta = tl.maximum(o_r[None, :] - o_r[:, None], 0).to(tl.float32)  # i - j (rows keys, columns queries)
        dmt = tl.exp(lam * delta)
        b_dld = tl.zeros([BT], dtype=tl.float32)
    for g in range(G):
        i_bh64 = (i_b * H + i_hk * G + g).to(tl.int64)
        b_q = tl.load(fq + i_bh64 * T * F + o_t[:, None] * F + o_f[None, :], mask=m_tf, other=0.0)
        b_dn = tl.load(do + i_bh64 * T * DV + o_t[:, None] * DV + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        if NORMALIZE:
            b_dn = b_dn * tl.load(rden + i_bh64 * T + o_t, mask=m_t, other=0.0)[:, None]
            b_dd = tl.load(dden + i_bh64 * T + o_t, mask=m_t, other=0.0)
        b_dn = b_dn.to(b_v.dtype)
        b_At = tl.where(causal, tl.dot(b_k, tl.trans(b_q), input_precision=PREC), 0.0)
        b_dAt = tl.dot(b_v, tl.trans(b_dn), input_precision=PREC)
        if NORMALIZE:
            b_dAt += b_dd[None, :]
        b_dAt = tl.where(causal, b_dAt, 0.0)
        if HAS_GATE:
            b_At = b_At * dmt
            pairs = b_At * b_dAt  # d(cl_i) += its column, d(cl_j) -= its row
            b_dcl += tl.sum(pairs, 0) - tl.sum(pairs, 1)
            b_dAt = b_dAt * dmt
        elif HAS_DECAY:
            b_At = b_At * dmt
            b_dld += tl.sum(delta * b_At * b_dAt, 1)  # d(lam), intra-chunk pairs
            b_dAt = b_dAt * dmt
        b_dk += tl.dot(b_dAt.to(b_q.dtype), b_q, input_precision=PREC)
        b_dv += tl.dot(b_At.to(b_dn.dtype), b_dn, input_precision=PREC)
    # state path: queries of later chunks (plus the final-state gradient)
    b_dh = tl.load(dh + (i_bk64 * NT + i_t) * F * DV + o_f[:, None] * DV + o_v[None, :],
                   mask=m_f[:, None] & m_v[None, :], other=0.0)
    b_dzh = tl.load(dzh + (i_bk64 * NT + i_t) * F + o_f, mask=m_f, other=0.0)
    if HAS_GATE:
        # key j feeds h[n+1] (at p, the chunk's last token) with exp(cl_p - cl_j); h[n] with exp(cl_p)
        n_len = tl.minimum(T - i_t * BT, BT)
        at_p = tl.arange(0, BT) == n_len - 1
        cl_p = tl.sum(tl.where(at_p, b_cl, 0.0), 0)
        b_kf = tl.exp(tl.where(m_t, cl_p - b_cl, 0.0))
        b_dks = (tl.dot(b_v, tl.trans(b_dh.to(b_v.dtype)), input_precision=PREC) + b_dzh[None, :]) * b_kf[:, None]
        b_dk += b_dks
        b_dv += tl.dot(b_k, b_dh.to(b_k.dtype), input_precision=PREC) * b_kf[:, None]
        writes = tl.sum(b_k.to(tl.float32) * b_dks, 1)  # d(cl_p) += each, d(cl_j) -= each
        NS1 = NT + 1
        b_h = tl.load(h + (i_bk64 * NS1 + i_t) * F * DV + o_f[:, None] * DV + o_v[None, :],
                      mask=m_f[:, None] & m_v[None, :], other=0.0).to(tl.float32)
        b_zh = tl.load(zh + (i_bk64 * NS1 + i_t) * F + o_f, mask=m_f, other=0.0)
        carry = (tl.sum(tl.sum(b_h * b_dh.to(tl.float32), 1), 0) + tl.sum(b_zh * b_dzh, 0)) * tl.exp(cl_p)
        b_dcl += tl.where(at_p, tl.sum(writes, 0) + carry, 0.0) - writes
        tl.store(dld + i_bk64 * T + o_t, b_dcl, mask=m_t)
    elif HAS_DECAY:
        # key s feeds h[n+1] (at p = min((n+1)C, T) - 1) with g^(p - s)
        p_end = tl.minimum((i_t + 1) * BT, T) - 1
        kexp = tl.maximum(p_end - o_t, 0)
        b_kf = tl.exp(lam * kexp.to(tl.float32))
        b_dks = (tl.dot(b_v, tl.trans(b_dh.to(b_v.dtype)), input_precision=PREC) + b_dzh[None, :]) * b_kf[:, None]
        b_dk += b_dks
        b_dv += tl.dot(b_k, b_dh.to(b_k.dtype), input_precision=PREC) * b_kf[:, None]
        # d(lam), state writes: the chunk's keys (p - s) and the carried state l g^l <h[n], G_{n+1}>
        b_dld += tl.sum(b_k.to(tl.float32) * b_dks, 1) * kexp.to(tl.float32)
        NS1 = NT + 1
        b_h = tl.load(h + (i_bk64 * NS1 + i_t) * F * DV + o_f[:, None] * DV + o_v[None, :],
                      mask=m_f[:, None] & m_v[None, :], other=0.0).to(tl.float32)
        b_zh = tl.load(zh + (i_bk64 * NS1 + i_t) * F + o_f, mask=m_f, other=0.0)
        n_len = tl.minimum(T - i_t * BT, BT)
        carry = tl.sum(tl.sum(b_h * b_dh.to(tl.float32), 1), 0) + tl.sum(b_zh * b_dzh, 0)
        tl.store(dld + i_bk64 * NT + i_t, tl.sum(b_dld, 0) + carry * n_len * tl.exp(lam * n_len))
    else:
        b_dk += tl.dot(b_v, tl.trans(b_dh.to(b_v.dtype)), input_precision=PREC) + b_dzh[None, :]
        b_dv += tl.dot(b_k, b_dh.to(b_k.dtype), input_precision=PREC)
    tl.store(dk + i_bk64 * T * F + o_t[:, None] * F + o_f[None, :], b_dk.to(dk.dtype.element_ty), mask=m_tf)
    tl.store(dv + i_bk64 * T * DV + o_t[:, None] * DV + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)


def _warps(*sizes: int) -> int:
    return 8 if max(sizes) >= 128 * 128 else 4


def normalizer_bwd(o, do, rden):
    B, H, T, DV = o.shape
    dden = torch.empty(B, H, T, dtype=torch.float32, device=o.device)
    BV = max(16, next_pow2(DV))
    BT = max(16, min(64, 2048 // BV))  # small tiles: one row reduction per program row, no dots
    normalizer_bwd_kernel[(triton.cdiv(T, BT), B * H)](o, do, rden, dden, T, DV=DV, BT=BT, BV=BV, num_warps=4)
    return dden


def linear_fwd(fq, fk, v, initial_state, normalize, eps, chunk=None, log_decay=None, gate_cumsum=None):
    """gate_cumsum: chunk_cumsum of per-token log gates, made with this chunk size."""
    chunk = chunk or chunk_size(fq.dtype)
    B, H, T, F = fq.shape
    Hkv, DV = fk.shape[1], v.shape[-1]
    G = H // Hkv
    h, zh, ST, zT = chunk_state_fwd(fk, v, initial_state, T, chunk, log_decay, gate_cumsum)
    NT = triton.cdiv(T, chunk)
    o = torch.empty(B, H, T, DV, dtype=v.dtype, device=v.device)
    rden = torch.empty(B, H, T, dtype=torch.float32, device=v.device) if normalize else None
    BF = max(16, next_pow2(F))
    BV = max(16, next_pow2(DV))
    linear_fwd_o_kernel[(NT, B * H)](
        fq, fk, v, h, zh, o, rden if normalize else o,
        gate_cumsum if gate_cumsum is not None else (log_decay if log_decay is not None else zh),
        T, G, H, h.shape[2], eps,
        F=F, DV=DV, BT=chunk, BF=BF, BV=BV, NORMALIZE=normalize, PREC=_prec(fq.dtype),
        HAS_DECAY=log_decay is not None, HAS_GATE=gate_cumsum is not None,
        **kernel_config("lin_fwd", 8 if BF + BV > 256 else 4, 1),
    )
    return o, rden, h, zh, ST, zT


def linear_bwd(fq, fk, v, o, rden, h, zh, do, dfinal, normalize, chunk=None, log_decay=None, gate_cumsum=None):
    """Returns dfq, dfk, dv, dS0, dz0 and d(log_decay) (fp32 (Hkv,)) or, with gate_cumsum, the gradient of
    gate_cumsum (fp32 (B, Hkv, T); None with neither)."""
    chunk = chunk or chunk_size(fq.dtype)
    B, H, T, F = fq.shape
    Hkv, DV = fk.shape[1], v.shape[-1]
    G = H // Hkv
    NT = triton.cdiv(T, chunk)
    dden = normalizer_bwd(o, do, rden) if normalize else None
    dh, dzh, dS0, dz0 = chunk_state_bwd(fq, do, rden, dden, None, dfinal, Hkv, 0, chunk, normalize, T, log_decay,
                                        gate_cumsum)
    prec = _prec(fq.dtype)
    dfq = torch.empty_like(fq)
    dfk = torch.empty_like(fk)
    dv = torch.empty_like(v)
    BK = min(64, max(16, next_pow2(F)))
    BF = max(16, next_pow2(F))
    BV = max(16, next_pow2(DV))
    rd = rden if normalize else do
    dd = dden if normalize else do
    decay = log_decay is not None
    gated = gate_cumsum is not None
    NK = triton.cdiv(F, BK)
    # d(log_decay) partial sums, one per program (summed below; deterministic, no atomics); with gates, per token:
    # the queries' state reads per (head, F tile), the keys' pairs, writes and carries per kv head
    if gated:
        dld_q = fq.new_empty(B * H, NK, T, dtype=torch.float32)
        dld_k = fq.new_empty(B * Hkv, T, dtype=torch.float32)
    else:
        dld_q = fq.new_empty(B * H, NT, NK, dtype=torch.float32) if decay else dd
        dld_k = fq.new_empty(B * Hkv, NT, dtype=torch.float32) if decay else dd
    ld = gate_cumsum if gated else (log_decay if decay else dd)
    linear_bwd_dq_kernel[(NK, NT, B * H)](
        fk, v, h, zh, do, rd, dd, dfq, fq, ld, dld_q, T, G, H, h.shape[2],
        F=F, DV=DV, BT=chunk, BK=BK, BV=BV, NORMALIZE=normalize, PREC=prec, HAS_DECAY=decay, HAS_GATE=gated,
        **kernel_config("lin_dq", _warps(chunk * BV, chunk * BK), 1),
    )
    linear_bwd_dkv_kernel[(NT, B * Hkv)](
        fq, fk, v, dh, dzh, do, rd, dd, dfk, dv, h, zh, ld, dld_k, T, G, H, NT,
        F=F, DV=DV, BT=chunk, BF=BF, BV=BV, NORMALIZE=normalize, PREC=prec, HAS_DECAY=decay, HAS_GATE=gated,
        **kernel_config("lin_dkv", 8 if BF + BV >= 192 else 4, 1),
    )
    dld = None
    if gated:
        dld = dld_q.view(B, Hkv, G * NK, T).sum(2) + dld_k.view(B, Hkv, T)
    elif decay:
        dld = dld_q.view(B, Hkv, G * NT * NK).sum((0, 2)) + dld_k.view(B, Hkv, NT).sum((0, 2))
    return dfq, dfk, dv, dS0, dz0, dld


class LinearAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fq, fk, v, S0, z0, log_decay, normalize, eps, output_final_state, log_gate=None):
        fq, fk, v = fq.contiguous(), fk.contiguous(), v.contiguous()
        init = (S0, z0) if S0 is not None else None
        ld = log_decay.float().contiguous() if log_decay is not None else None
        chunk = chunk_size(fq.dtype)
        cl = chunk_cumsum(log_gate, chunk) if log_gate is not None else None
        o, rden, h, zh, ST, zT = linear_fwd(fq, fk, v, init, normalize, eps, chunk=chunk, log_decay=ld,
                                            gate_cumsum=cl)
        if not output_final_state:
            ST = zT = None
        # the chunk states are kept for the backward (bf16 for bf16 inputs): O(T F Dv / C) memory
        ctx.save_for_backward(fq, fk, v, o, rden, h, zh, S0, z0, ld, log_decay, cl, log_gate)
        ctx.normalize, ctx.chunk = normalize, chunk
        ctx.set_materialize_grads(False)
        return o, ST, zT

    @staticmethod
    def backward(ctx, do, dST, dzT):
        fq, fk, v, o, rden, h, zh, S0, z0, ld, log_decay, cl, log_gate = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        do = do.contiguous()
        dfinal = None
        if dST is not None or dzT is not None:
            B, Hkv, _, F = fk.shape
            dfinal = (dST if dST is not None else fk.new_zeros(B, Hkv, F, v.shape[-1], dtype=torch.float32),
                      dzT if dzT is not None else fk.new_zeros(B, Hkv, F, dtype=torch.float32))
        dfq, dfk, dv, dS0, dz0, dld = linear_bwd(fq, fk, v, o, rden, h, zh, do, dfinal, ctx.normalize,
                                                 chunk=ctx.chunk, log_decay=ld, gate_cumsum=cl)
        if S0 is None:
            dS0 = dz0 = None
        else:
            dS0, dz0 = dS0.to(S0.dtype), dz0.to(z0.dtype)
        dlg = None
        if cl is not None:
            dlg, dld = chunk_cumsum_backward(dld, ctx.chunk).to(log_gate.dtype), None
        elif dld is not None:
            dld = dld.to(log_decay.dtype)
        return dfq, dfk, dv, dS0, dz0, dld, None, None, None, dlg


_CHECKED: dict = {}


def _self_check(fq, fk, v, normalize: bool, gated: bool = False, force: bool = False) -> None:
    """Once per (device, dtype, F, Dv, G, normalize, gated) on CUDA: forward and backward against the O(T^2) oracle
    (for the gated kernels the gates' gradient too).

    The current forward kernel has not yet run on a GPU (its predecessor failed two GPU tests, see
    docs/kernels.md), and the gated kernels were written without one, so rather than risk silently wrong training
    each checks itself on a small problem of the same class and raises if it disagrees. Disable with
    EFFCONV_KERNELS_SELFCHECK=0.
    """
    if not force and (not fq.is_cuda or os.environ.get("EFFCONV_KERNELS_SELFCHECK", "1") == "0"):
        return
    B, H, T, F = fq.shape
    Hkv, DV = fk.shape[1], v.shape[-1]
    key = (fq.device, fq.dtype, F, DV, H // Hkv, normalize) + (("gated",) if gated else ())
    if key in _CHECKED:
        return
    # The first call may come from evaluation under torch.inference_mode: the check builds its own autograd graph,
    # which tensors made in inference mode cannot join.
    with torch.inference_mode(False), torch.enable_grad():
        _CHECKED[key] = _check_against_reference(fq, normalize, F, DV, H // Hkv, key, gated)


def _check_against_reference(fq, normalize: bool, F: int, DV: int, G: int, key, gated: bool) -> list[float]:
    from .naive import naive_gated_linear_attention, naive_linear_attention
    g = torch.Generator(device=fq.device).manual_seed(0)
    Tc = 200 if gated else 256  # gated: a partial last chunk too
    x = [torch.randn(1, n, Tc, d, generator=g, device=fq.device) for n, d in ((G, F), (1, F), (1, DV), (G, DV))]
    xq, xk = x[0].softmax(-1).to(fq.dtype), x[1].softmax(-1).to(fq.dtype)
    xv, do = x[2].to(fq.dtype), x[3].to(fq.dtype)
    inputs = (xq, xk, xv) + ((-torch.rand(1, 1, Tc, generator=g, device=fq.device) * 0.2,) if gated else ())

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        o = fn(*leaves)
        o.float().backward(do.float())
        return [o.detach()] + [t.grad for t in leaves]

    def kernel(a, b, c, lg=None):
        return LinearAttentionFunction.apply(a, b, c, None, None, None, normalize, 1e-6, False, lg)[0]

    def oracle(a, b, c, lg=None):
        if lg is not None:
            return naive_gated_linear_attention(a, b, c, lg, normalize=normalize)[0]
        return naive_linear_attention(a, b, c, normalize=normalize)[0]

    got, ref = run(kernel), run(oracle)
    errs = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, ref)]
    # interpreter at this size: fp32 <= 3e-7; bf16 output 2.6e-3, gradients <= 6e-3
    tol = [1e-3] * len(errs) if fq.dtype == torch.float32 else [1e-2, 3e-2, 3e-2, 3e-2, 5e-2][: len(errs)]
    if not all(e < t for e, t in zip(errs, tol)):
        raise RuntimeError(f"effconv_kernels: Triton {'gated ' if gated else ''}linear attention disagrees with the "
                           f"reference on this GPU (relative errors o/dfq/dfk/dv{'/dgate' if gated else ''} "
                           f"{[f'{e:.3g}' for e in errs]} for {key}); use effconv's PyTorch path "
                           "(attention_backend='reference') and report it")
    return errs


def chunk_linear_attention(fq, fk, v, *, normalize=True, eps=1e-6, initial_state=None, output_final_state=False,
                           log_decay=None, log_gate=None):
    B, H, T, F = fq.shape
    check_gqa(H, fk.shape[1])
    _self_check(fq, fk, v, bool(normalize), gated=log_gate is not None)
    S0, z0 = initial_state if initial_state is not None else (None, None)
    o, ST, zT = LinearAttentionFunction.apply(fq, fk, v, S0, z0, log_decay, bool(normalize), float(eps),
                                              bool(output_final_state), log_gate)
    return o, ((ST, zT) if output_final_state else None)
