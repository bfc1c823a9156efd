"""Fused sliding-window softmax + linear attention (LoLCATs hybrid) in Triton, forward and backward.

Query chunk n (C = 64 rows) reads the raw keys of chunks n-d..n, d = ceil((W-1)/C), which hold its
whole window, plus the linear state at boundary max(0, n-d)*C for everything older (common/chunk_state.py,
summed over the first L = max(0, T-W) keys). Per key chunk it computes both the window scores
s = scale q k^T (online softmax with running max m) and the linear scores b = fq fk^T, masked by
i - j < W (window) or i - j >= W (linear). Memory is O(T): no T x T tensor; cost O(T (W + C)).

The output is not invariant to the window max m_i (the linear terms are not scaled by exp(-m_i)), so
the backward carries the gradient through m_i like autograd does on the reference:
    dm_i = -sum_j a_ij da_ij = -alpha dN_i.(u_i - l_i o_i)   and   ds_{i, j*_i} += dm_i,
with j*_i the argmax of the window scores, u_i = sum_j a_ij v_j and l_i = sum_j a_ij; the forward stores
u_i - l_i o_i (formed in fp32) because rebuilding it from the rounded output loses dmix to cancellation.
dmix_h = sum_i (-dm_i + alpha_h eps dden_i) follows from alpha dalpha + beta dbeta = (do.o) eps / den.

Decay (HAS_DECAY; log_decay lam (Hkv,) <= 0, g = exp(lam); states: common/chunk_state.py): linear pairs of the
raw key chunks get g^(i-j), the state read by query chunk n (boundary c0 = max(n-d, 0), position c0 C - 1)
g^(i - c0 C + 1), the state terms of key j g^(p - j) (p = min((c+1)C, L) - 1). The window part is unchanged (so
is dmix). d(lam) as in linear_attn/chunk.py: linear pairs (i-j) g^(i-j) b_ij beta dp_ij (dkv kernel), state
reads (dq kernel), state writes and the carried state (dkv kernel), one partial sum per program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common.chunk_state import _prec, chunk_state_bwd, chunk_size, chunk_state_fwd, kernel_config
from ..utils import check_gqa, next_pow2



@triton.jit
def hybrid_fwd_kernel(
    q, k, v, fq, fk, mix, h, zh, o, ywin, rden, mrow, jstar, ld,
    T, G, H, NS1, D_OFF, W, scale, eps,
    D: tl.constexpr, F: tl.constexpr, DV: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    HAS_DECAY: tl.constexpr = False,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    Hkv = H // G
    i_b, i_h = i_bh // H, i_bh % H
    i_bk64 = (i_b * Hkv + i_h // G).to(tl.int64)
    i_bh64 = i_bh.to(tl.int64)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_d = tl.arange(0, BD)
    o_f = tl.arange(0, BF)
    o_v = tl.arange(0, BV)
    m_d, m_f, m_v = o_d < D, o_f < F, o_v < DV

    b_mix = tl.load(mix + i_h).to(tl.float32)
    alpha = 1.0 / (1.0 + tl.exp(-b_mix))
    beta = 1.0 - alpha
    b_q = tl.load(q + i_bh64 * T * D + o_t[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
    b_fq = tl.load(fq + i_bh64 * T * F + o_t[:, None] * F + o_f[None, :], mask=m_t[:, None] & m_f[None, :], other=0.0)

    # linear part from the state at boundary c0 * BT (all keys older than every window of this chunk)
    c0 = tl.maximum(i_t - D_OFF, 0)
    b_h = tl.load(h + (i_bk64 * NS1 + c0) * F * DV + o_f[:, None] * DV + o_v[None, :],
                  mask=m_f[:, None] & m_v[None, :], other=0.0)
    b_z = tl.load(zh + (i_bk64 * NS1 + c0) * F + o_f, mask=m_f, other=0.0)
    acc_l = tl.dot(b_fq, b_h.to(b_fq.dtype), input_precision=PREC)
    l_l = tl.sum(b_fq.to(tl.float32) * b_z[None, :], 1)
    if HAS_DECAY:  # the state sits at position c0 * BT - 1
        lam = tl.load(ld + i_h // G)
        b_qf = tl.exp(lam * (o_t - c0 * BT + 1).to(tl.float32))
        acc_l = acc_l * b_qf[:, None]
        l_l = l_l * b_qf

    acc_w = tl.zeros([BT, BV], dtype=tl.float32)
    l_w = tl.zeros([BT], dtype=tl.float32)
    m_i = tl.full([BT], float("-inf"), dtype=tl.float32)
    js = tl.zeros([BT], dtype=tl.int32)
    for c in range(c0, i_t + 1):
        o_s = c * BT + tl.arange(0, BT)
        m_s = o_s < T
        b_k = tl.load(k + i_bk64 * T * D + o_s[:, None] * D + o_d[None, :], mask=m_s[:, None] & m_d[None, :], other=0.0)
        b_v = tl.load(v + i_bk64 * T * DV + o_s[:, None] * DV + o_v[None, :], mask=m_s[:, None] & m_v[None, :], other=0.0)
        delta = o_t[:, None] - o_s[None, :]  # i - j
        win = (delta >= 0) & (delta < W) & m_s[None, :]
        s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale
        s = tl.where(win, s, float("-inf"))
        m_blk = tl.max(s, 1)
        a_blk = tl.argmax(s, 1)
        js = tl.where(m_blk > m_i, c * BT + a_blk.to(tl.int32), js)
        m_new = tl.maximum(m_i, m_blk)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no window key yet
        corr = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_w = l_w * corr + tl.sum(p, 1)
        acc_w = acc_w * corr[:, None] + tl.dot(p.to(b_v.dtype), b_v, input_precision=PREC)
        m_i = m_new
        # some (i, j) of this block pair is older than the window: add the linear scores
        if (i_t + 1) * BT - 1 - c * BT >= W:
            b_fk = tl.load(fk + i_bk64 * T * F + o_s[:, None] * F + o_f[None, :],
                           mask=m_s[:, None] & m_f[None, :], other=0.0)
            b = tl.dot(b_fq, tl.trans(b_fk), input_precision=PREC)
            if HAS_DECAY:
                b = tl.where(delta >= W, b * tl.exp(lam * tl.maximum(delta, 0).to(tl.float32)), 0.0)
            else:
                b = tl.where(delta >= W, b, 0.0)
            l_l += tl.sum(b, 1)
            acc_l += tl.dot(b.to(b_v.dtype), b_v, input_precision=PREC)
    b_r = 1.0 / (alpha * l_w + beta * l_l + eps)
    b_o = (alpha * acc_w + beta * acc_l) * b_r[:, None]
    tl.store(o + i_bh64 * T * DV + o_t[:, None] * DV + o_v[None, :], b_o.to(o.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])
    # u - l o (window numerator minus window mass times output), formed here in fp32: the backward's
    # gradient w.r.t. the window max is dm = -alpha dN.(u - l o), a difference too cancelling to
    # rebuild from the rounded output
    b_y = acc_w - l_w[:, None] * b_o
    tl.store(ywin + i_bh64 * T * DV + o_t[:, None] * DV + o_v[None, :], b_y.to(ywin.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])
    tl.store(rden + i_bh64 * T + o_t, b_r, mask=m_t)
    tl.store(mrow + i_bh64 * T + o_t, m_i, mask=m_t)
    tl.store(jstar + i_bh64 * T + o_t, js, mask=m_t)


@triton.jit
def hybrid_bwd_pre_kernel(o, do, ywin, rden, mix, dden, dm, T, H,
                          DV: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):
    # dden_i = -(do_i . o_i) / den_i ;  dm_i = -alpha (do_i / den_i) . (u_i - l_i o_i)
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_bh64 = i_bh.to(tl.int64)
    alpha = 1.0 / (1.0 + tl.exp(-tl.load(mix + i_bh % H).to(tl.float32)))
    o_t = i_t * BT + tl.arange(0, BT)
    o_v = tl.arange(0, BV)
    m_t = o_t < T
    m = m_t[:, None] & (o_v < DV)[None, :]
    off = i_bh64 * T * DV + o_t[:, None] * DV + o_v[None, :]
    b_r = tl.load(rden + i_bh64 * T + o_t, mask=m_t, other=0.0)
    b_dn = tl.load(do + off, mask=m, other=0.0).to(tl.float32) * b_r[:, None]
    b_o = tl.load(o + off, mask=m, other=0.0).to(tl.float32)
    b_y = tl.load(ywin + off, mask=m, other=0.0).to(tl.float32)
    tl.store(dden + i_bh64 * T + o_t, -tl.sum(b_dn * b_o, 1), mask=m_t)
    tl.store(dm + i_bh64 * T + o_t, -alpha * tl.sum(b_dn * b_y, 1), mask=m_t)


@triton.jit
def hybrid_bwd_dq_kernel(
    q, k, v, fq, fk, mix, h, zh, do, rden, dden, mrow, jstar, dq, dfq, dm, ld, dld,
    T, G, H, NS1, D_OFF, W, scale,
    D: tl.constexpr, F: tl.constexpr, DV: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    NEED_QKV: tl.constexpr = True, HAS_DECAY: tl.constexpr = False,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    Hkv = H // G
    i_b, i_h = i_bh // H, i_bh % H
    i_bk64 = (i_b * Hkv + i_h // G).to(tl.int64)
    i_bh64 = i_bh.to(tl.int64)
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_d = tl.arange(0, BD)
    o_f = tl.arange(0, BF)
    o_v = tl.arange(0, BV)
    m_d, m_f, m_v = o_d < D, o_f < F, o_v < DV

    b_mix = tl.load(mix + i_h).to(tl.float32)
    alpha = 1.0 / (1.0 + tl.exp(-b_mix))
    beta = 1.0 - alpha
    b_q = tl.load(q + i_bh64 * T * D + o_t[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
    b_dn = tl.load(do + i_bh64 * T * DV + o_t[:, None] * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
    b_dn = (b_dn.to(tl.float32) * tl.load(rden + i_bh64 * T + o_t, mask=m_t, other=0.0)[:, None]).to(b_q.dtype)
    b_dd = tl.load(dden + i_bh64 * T + o_t, mask=m_t, other=0.0)
    b_m = tl.load(mrow + i_bh64 * T + o_t, mask=m_t, other=0.0)

    b_dq = tl.zeros([BT, BD], dtype=tl.float32)
    b_dfq = tl.zeros([BT, BF], dtype=tl.float32)
    c0 = tl.maximum(i_t - D_OFF, 0)
    if HAS_DECAY:
        lam = tl.load(ld + i_h // G)
    for c in range(c0, i_t + 1):
        o_s = c * BT + tl.arange(0, BT)
        m_s = o_s < T
        b_k = tl.load(k + i_bk64 * T * D + o_s[:, None] * D + o_d[None, :], mask=m_s[:, None] & m_d[None, :], other=0.0)
        b_v = tl.load(v + i_bk64 * T * DV + o_s[:, None] * DV + o_v[None, :], mask=m_s[:, None] & m_v[None, :], other=0.0)
        delta = o_t[:, None] - o_s[None, :]
        b_dp = tl.dot(b_dn, tl.trans(b_v), input_precision=PREC) + b_dd[:, None]  # dN_i . v_j + dden_i
        if NEED_QKV:  # attention transfer needs only dfq (q is made without grad)
            win = (delta >= 0) & (delta < W) & m_s[None, :]
            s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale
            p = tl.where(win, tl.exp(tl.where(win, s, 0.0) - b_m[:, None]), 0.0)
            ds = p * (alpha * b_dp)
            b_dq += tl.dot(ds.to(b_k.dtype), b_k, input_precision=PREC)
        if (i_t + 1) * BT - 1 - c * BT >= W:
            b_fk = tl.load(fk + i_bk64 * T * F + o_s[:, None] * F + o_f[None, :],
                           mask=m_s[:, None] & m_f[None, :], other=0.0)
            if HAS_DECAY:
                db = tl.where(delta >= W, beta * b_dp * tl.exp(lam * tl.maximum(delta, 0).to(tl.float32)), 0.0)
            else:
                db = tl.where(delta >= W, beta * b_dp, 0.0)
            b_dfq += tl.dot(db.to(b_fk.dtype), b_fk, input_precision=PREC)
    if NEED_QKV:
        # gradient through the window max: d s_{i, j*} += dm_i
        b_js = tl.load(jstar + i_bh64 * T + o_t, mask=m_t, other=0)
        b_dm = tl.load(dm + i_bh64 * T + o_t, mask=m_t, other=0.0)
        b_kst = tl.load(k + i_bk64 * T * D + b_js[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :],
                        other=0.0)
        b_dq = (b_dq + b_dm[:, None] * b_kst.to(tl.float32)) * scale
    # linear part through the state
    b_h = tl.load(h + (i_bk64 * NS1 + c0) * F * DV + o_f[:, None] * DV + o_v[None, :],
                  mask=m_f[:, None] & m_v[None, :], other=0.0)
    b_z = tl.load(zh + (i_bk64 * NS1 + c0) * F + o_f, mask=m_f, other=0.0)
    if HAS_DECAY:
        e_i = (o_t - c0 * BT + 1).to(tl.float32)  # query i is this many tokens after the state it reads
        b_dfs = beta * (tl.dot(b_dn, tl.trans(b_h.to(b_dn.dtype)), input_precision=PREC) + b_dd[:, None] * b_z[None, :])
        b_dfs = b_dfs * tl.exp(lam * e_i)[:, None]
        b_dfq += b_dfs
        # d(lam), state reads: sum_i e_i fq_i . dfq_i(state part)
        b_fq = tl.load(fq + i_bh64 * T * F + o_t[:, None] * F + o_f[None, :], mask=m_t[:, None] & m_f[None, :],
                       other=0.0).to(tl.float32)
        tl.store(dld + i_bh64 * tl.num_programs(0) + i_t, tl.sum(tl.sum(b_fq * b_dfs, 1) * e_i, 0))
    else:
        b_dfq += beta * (tl.dot(b_dn, tl.trans(b_h.to(b_dn.dtype)), input_precision=PREC) + b_dd[:, None] * b_z[None, :])
    if NEED_QKV:
        tl.store(dq + i_bh64 * T * D + o_t[:, None] * D + o_d[None, :], b_dq.to(dq.dtype.element_ty),
                 mask=m_t[:, None] & m_d[None, :])
    tl.store(dfq + i_bh64 * T * F + o_t[:, None] * F + o_f[None, :], b_dfq.to(dfq.dtype.element_ty),
             mask=m_t[:, None] & m_f[None, :])


@triton.jit
def hybrid_bwd_dkv_kernel(
    q, k, v, fq, fk, mix, dh, dzh, do, rden, dden, mrow, jstar, dm, dk, dv, dfk, h, zh, ld, dld,
    T, L, G, H, NT, D_OFF, W, scale, NS1,
    D: tl.constexpr, F: tl.constexpr, DV: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    NEED_QKV: tl.constexpr = True, HAS_DECAY: tl.constexpr = False,
):
    i_c, i_bk = tl.program_id(0), tl.program_id(1)
    Hkv = H // G
    i_b, i_hk = i_bk // Hkv, i_bk % Hkv
    i_bk64 = i_bk.to(tl.int64)
    o_s = i_c * BT + tl.arange(0, BT)  # key rows j
    m_s = o_s < T
    o_d = tl.arange(0, BD)
    o_f = tl.arange(0, BF)
    o_v = tl.arange(0, BV)
    m_d, m_f, m_v = o_d < D, o_f < F, o_v < DV
    b_k = tl.load(k + i_bk64 * T * D + o_s[:, None] * D + o_d[None, :], mask=m_s[:, None] & m_d[None, :], other=0.0)
    b_fk = tl.load(fk + i_bk64 * T * F + o_s[:, None] * F + o_f[None, :], mask=m_s[:, None] & m_f[None, :], other=0.0)
    b_v = tl.load(v + i_bk64 * T * DV + o_s[:, None] * DV + o_v[None, :], mask=m_s[:, None] & m_v[None, :], other=0.0)

    b_dk = tl.zeros([BT, BD], dtype=tl.float32)
    b_dfk = tl.zeros([BT, BF], dtype=tl.float32)
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    n_hi = tl.minimum(i_c + D_OFF, NT - 1)
    if HAS_DECAY:
        lam = tl.load(ld + i_hk)
        b_dld = tl.zeros([BT], dtype=tl.float32)
    for g in range(G):
        i_h = i_hk * G + g
        i_bh64 = (i_b * H + i_h).to(tl.int64)
        b_mix = tl.load(mix + i_h).to(tl.float32)
        alpha = 1.0 / (1.0 + tl.exp(-b_mix))
        beta = 1.0 - alpha
        for n in range(i_c, n_hi + 1):
            o_t = n * BT + tl.arange(0, BT)  # query columns i
            m_t = o_t < T
            b_q = tl.load(q + i_bh64 * T * D + o_t[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
            b_dn = tl.load(do + i_bh64 * T * DV + o_t[:, None] * DV + o_v[None, :],
                           mask=m_t[:, None] & m_v[None, :], other=0.0)
            b_dn = (b_dn.to(tl.float32) * tl.load(rden + i_bh64 * T + o_t, mask=m_t, other=0.0)[:, None]).to(b_k.dtype)
            b_dd = tl.load(dden + i_bh64 * T + o_t, mask=m_t, other=0.0)
            b_m = tl.load(mrow + i_bh64 * T + o_t, mask=m_t, other=0.0)
            b_dm = tl.load(dm + i_bh64 * T + o_t, mask=m_t, other=0.0)
            b_js = tl.load(jstar + i_bh64 * T + o_t, mask=m_t, other=-1)
            delta = o_t[None, :] - o_s[:, None]  # i - j
            b_dpt = tl.dot(b_v, tl.trans(b_dn), input_precision=PREC) + b_dd[None, :]
            if NEED_QKV:  # attention transfer needs only dfk (k and v are made without grad)
                win = (delta >= 0) & (delta < W) & m_t[None, :]
                st = tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * scale
                pt = tl.where(win, tl.exp(tl.where(win, st, 0.0) - b_m[None, :]), 0.0)
                dst = pt * (alpha * b_dpt)
                dst += tl.where(o_s[:, None] == b_js[None, :], b_dm[None, :], 0.0)
                b_dk += tl.dot(dst.to(b_q.dtype), b_q, input_precision=PREC)
                P = alpha * pt
            if (n + 1) * BT - 1 - i_c * BT >= W:
                b_fq = tl.load(fq + i_bh64 * T * F + o_t[:, None] * F + o_f[None, :],
                               mask=m_t[:, None] & m_f[None, :], other=0.0)
                lin = (delta >= W) & m_t[None, :]
                dbt = tl.where(lin, beta * b_dpt, 0.0)
                if HAS_DECAY:
                    fdelta = tl.maximum(delta, 0).to(tl.float32)
                    dmt = tl.exp(lam * fdelta)
                    bt = tl.where(lin, tl.dot(b_fk, tl.trans(b_fq), input_precision=PREC), 0.0) * dmt
                    b_dld += tl.sum(fdelta * bt * dbt, 1)  # d(lam), linear pairs of the raw chunks
                    b_dfk += tl.dot((dbt * dmt).to(b_fq.dtype), b_fq, input_precision=PREC)
                    if NEED_QKV:
                        P += beta * bt
                else:
                    b_dfk += tl.dot(dbt.to(b_fq.dtype), b_fq, input_precision=PREC)
                    if NEED_QKV:
                        bt = tl.where(lin, tl.dot(b_fk, tl.trans(b_fq), input_precision=PREC), 0.0)
                        P += beta * bt
            if NEED_QKV:
                b_dv += tl.dot(P.to(b_dn.dtype), b_dn, input_precision=PREC)
    # linear part through the states of later chunks (and the final-state gradient): keys j < L only
    m_l = o_s < L
    b_dh = tl.load(dh + (i_bk64 * NT + i_c) * F * DV + o_f[:, None] * DV + o_v[None, :],
                   mask=m_f[:, None] & m_v[None, :], other=0.0)
    b_dzh = tl.load(dzh + (i_bk64 * NT + i_c) * F + o_f, mask=m_f, other=0.0)
    if HAS_DECAY:
        # key j feeds h[c+1] (at p = min((c+1)C, L) - 1) with g^(p - j)
        kexp = tl.maximum(tl.minimum((i_c + 1) * BT, L) - 1 - o_s, 0)
        b_kf = tl.exp(lam * kexp.to(tl.float32))
        b_dfs = tl.where(m_l[:, None], tl.dot(b_v, tl.trans(b_dh.to(b_v.dtype)), input_precision=PREC)
                         + b_dzh[None, :], 0.0) * b_kf[:, None]
        b_dfk += b_dfs
        # d(lam), state writes: the chunk's keys (p - j) and the carried state l g^l <h[c], G_{c+1}> (c < NS)
        b_dld += tl.sum(b_fk.to(tl.float32) * b_dfs, 1) * kexp.to(tl.float32)
        c_h = tl.minimum(i_c, NS1 - 1)  # chunks at or past NS hold no key of the state: n_len = 0 below
        b_h = tl.load(h + (i_bk64 * NS1 + c_h) * F * DV + o_f[:, None] * DV + o_v[None, :],
                      mask=m_f[:, None] & m_v[None, :], other=0.0).to(tl.float32)
        b_zh = tl.load(zh + (i_bk64 * NS1 + c_h) * F + o_f, mask=m_f, other=0.0)
        n_len = tl.maximum(tl.minimum(L - i_c * BT, BT), 0)
        carry = tl.sum(tl.sum(b_h * b_dh.to(tl.float32), 1), 0) + tl.sum(b_zh * b_dzh, 0)
        tl.store(dld + i_bk64 * NT + i_c, tl.sum(b_dld, 0) + carry * n_len * tl.exp(lam * n_len))
    else:
        b_dfk += tl.where(m_l[:, None], tl.dot(b_v, tl.trans(b_dh.to(b_v.dtype)), input_precision=PREC)
                          + b_dzh[None, :], 0.0)
    tl.store(dfk + i_bk64 * T * F + o_s[:, None] * F + o_f[None, :], b_dfk.to(dfk.dtype.element_ty),
             mask=m_s[:, None] & m_f[None, :])
    if NEED_QKV:
        if HAS_DECAY:
            b_dv += tl.where(m_l[:, None], tl.dot(b_fk, b_dh.to(b_fk.dtype), input_precision=PREC), 0.0) * b_kf[:, None]
        else:
            b_dv += tl.where(m_l[:, None], tl.dot(b_fk, b_dh.to(b_fk.dtype), input_precision=PREC), 0.0)
        tl.store(dk + i_bk64 * T * D + o_s[:, None] * D + o_d[None, :], (b_dk * scale).to(dk.dtype.element_ty),
                 mask=m_s[:, None] & m_d[None, :])
        tl.store(dv + i_bk64 * T * DV + o_s[:, None] * DV + o_v[None, :], b_dv.to(dv.dtype.element_ty),
                 mask=m_s[:, None] & m_v[None, :])


def _blocks(D, F, DV):
    return max(16, next_pow2(D)), max(16, next_pow2(F)), max(16, next_pow2(DV))


def _d_off(W: int, NT: int, chunk: int) -> int:
    # number of earlier key chunks a query chunk must read raw; more than NT - 1 is pointless
    return min(triton.cdiv(W - 1, chunk), max(NT - 1, 0))


def hybrid_fwd(q, k, v, fq, fk, mix, W, scale, eps, initial_state, chunk=None, log_decay=None):
    chunk = chunk or chunk_size(q.dtype)
    B, H, T, D = q.shape
    Hkv, DV, F = k.shape[1], v.shape[-1], fq.shape[-1]
    G = H // Hkv
    NT = triton.cdiv(T, chunk)
    L = max(0, T - W)
    h, zh, ST, zT = chunk_state_fwd(fk, v, initial_state, L, chunk, log_decay)
    o = torch.empty(B, H, T, DV, dtype=v.dtype, device=v.device)
    ywin = torch.empty_like(o)  # u - l o, for the gradient through the window max
    rden = torch.empty(B, H, T, dtype=torch.float32, device=v.device)  # 1 / den, for the backward
    mrow = torch.empty(B, H, T, dtype=torch.float32, device=v.device)  # window max m_i
    jstar = torch.empty(B, H, T, dtype=torch.int32, device=v.device)
    BD, BF, BV = _blocks(D, F, DV)
    hybrid_fwd_kernel[(NT, B * H)](
        q, k, v, fq, fk, mix, h, zh, o, ywin, rden, mrow, jstar, log_decay if log_decay is not None else mix,
        T, G, H, h.shape[2], _d_off(W, NT, chunk), W, float(scale), float(eps),
        D=D, F=F, DV=DV, BT=chunk, BD=BD, BF=BF, BV=BV, PREC=_prec(q.dtype), HAS_DECAY=log_decay is not None,
        # two pipeline stages double the shared memory of the key-chunk loads: only for small heads
        **kernel_config("hyb_fwd", 8, 2 if BD + BF + BV <= 256 else 1),
    )
    return o, ywin, rden, mrow, jstar, h, zh, ST, zT


def hybrid_bwd(q, k, v, fq, fk, mix, o, ywin, rden, mrow, jstar, h, zh, do, W, scale, eps, dfinal, chunk=None,
               need_qkv=True, log_decay=None):
    """need_qkv=False skips dq, dk, dv (returned as None): attention transfer only trains the feature maps.
    Returns dq, dk, dv, dfq, dfk, dmix, dS0, dz0, d(log_decay) (fp32 (Hkv,), None without decay)."""
    chunk = chunk or chunk_size(q.dtype)
    B, H, T, D = q.shape
    Hkv, DV, F = k.shape[1], v.shape[-1], fq.shape[-1]
    G = H // Hkv
    NT = triton.cdiv(T, chunk)
    L = max(0, T - W)
    d = _d_off(W, NT, chunk)
    prec = _prec(q.dtype)
    dden = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    dm = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    BVp = max(16, next_pow2(DV))
    BTp = max(16, min(64, 2048 // BVp))
    hybrid_bwd_pre_kernel[(triton.cdiv(T, BTp), B * H)](o, do, ywin, rden, mix, dden, dm, T, H,
                                                         DV=DV, BT=BTp, BV=BVp, num_warps=4)
    alpha = torch.sigmoid(mix.float())
    beta = (1.0 - alpha).contiguous()
    dh, dzh, dS0, dz0 = chunk_state_bwd(fq, do, rden, dden, beta, dfinal, Hkv, d, chunk, True, L, log_decay)
    decay = log_decay is not None
    dld_q = q.new_empty(B * H, NT, dtype=torch.float32) if decay else dden
    dld_k = q.new_empty(B * Hkv, NT, dtype=torch.float32) if decay else dden
    ld = log_decay if decay else dden
    BD, BF, BV = _blocks(D, F, DV)
    dfq, dfk = torch.empty_like(fq), torch.empty_like(fk)
    if need_qkv:
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    else:  # never written (NEED_QKV=False): any valid pointer will do
        dq, dk, dv = dfq, dfk, dfk
    hybrid_bwd_dq_kernel[(NT, B * H)](
        q, k, v, fq, fk, mix, h, zh, do, rden, dden, mrow, jstar, dq, dfq, dm, ld, dld_q,
        T, G, H, h.shape[2], d, W, float(scale),
        D=D, F=F, DV=DV, BT=chunk, BD=BD, BF=BF, BV=BV, PREC=prec, NEED_QKV=need_qkv, HAS_DECAY=decay,
        **kernel_config("hyb_dq", 8, 1),
    )
    hybrid_bwd_dkv_kernel[(NT, B * Hkv)](
        q, k, v, fq, fk, mix, dh, dzh, do, rden, dden, mrow, jstar, dm, dk, dv, dfk, h, zh, ld, dld_k,
        T, L, G, H, NT, d, W, float(scale), h.shape[2],
        D=D, F=F, DV=DV, BT=chunk, BD=BD, BF=BF, BV=BV, PREC=prec, NEED_QKV=need_qkv, HAS_DECAY=decay,
        **kernel_config("hyb_dkv", 8, 1),
    )
    dmix = (alpha[None, :, None] * eps * dden - dm).sum((0, 2))
    if not need_qkv:
        dq = dk = dv = None
    dld = None
    if decay:
        dld = dld_q.view(B, Hkv, G * NT).sum((0, 2)) + dld_k.view(B, Hkv, NT).sum((0, 2))
    return dq, dk, dv, dfq, dfk, dmix, dS0, dz0, dld


class HybridAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, fq, fk, mix, S0, z0, log_decay, W, scale, eps, output_final_state):
        q, k, v, fq, fk = (x.contiguous() for x in (q, k, v, fq, fk))
        mix_f = mix.float().contiguous()
        init = (S0, z0) if S0 is not None else None
        ld = log_decay.float().contiguous() if log_decay is not None else None
        o, ywin, rden, mrow, jstar, h, zh, ST, zT = hybrid_fwd(q, k, v, fq, fk, mix_f, W, scale, eps, init,
                                                               log_decay=ld)
        if not output_final_state:
            ST = zT = None
        ctx.save_for_backward(q, k, v, fq, fk, mix_f, o, ywin, rden, mrow, jstar, h, zh, S0, z0, ld, log_decay)
        ctx.cfg = (W, scale, eps, mix.dtype)
        ctx.set_materialize_grads(False)
        return o, ST, zT

    @staticmethod
    def backward(ctx, do, dST, dzT):
        q, k, v, fq, fk, mix_f, o, ywin, rden, mrow, jstar, h, zh, S0, z0, ld, log_decay = ctx.saved_tensors
        W, scale, eps, mix_dtype = ctx.cfg
        do = torch.zeros_like(o) if do is None else do.contiguous()
        dfinal = None
        if dST is not None or dzT is not None:
            B, Hkv, _, F = fk.shape
            dfinal = (dST if dST is not None else fk.new_zeros(B, Hkv, F, v.shape[-1], dtype=torch.float32),
                      dzT if dzT is not None else fk.new_zeros(B, Hkv, F, dtype=torch.float32))
        dq, dk, dv, dfq, dfk, dmix, dS0, dz0, dld = hybrid_bwd(
            q, k, v, fq, fk, mix_f, o, ywin, rden, mrow, jstar, h, zh, do, W, scale, eps, dfinal,
            need_qkv=any(ctx.needs_input_grad[:3]), log_decay=ld)
        if S0 is None:
            dS0 = dz0 = None
        else:
            dS0, dz0 = dS0.to(S0.dtype), dz0.to(z0.dtype)
        if dld is not None:
            dld = dld.to(log_decay.dtype)
        return dq, dk, dv, dfq, dfk, dmix.to(mix_dtype), dS0, dz0, dld, None, None, None, None


def fused_hybrid_attention(q, k, v, fq, fk, mix, *, window: int, scale: float, eps=1e-6, initial_state=None,
                           output_final_state=False, log_decay=None):
    B, H, T, D = q.shape
    check_gqa(H, k.shape[1])
    if int(window) < 1:
        raise ValueError("window must be >= 1")
    if mix.shape != (H,):
        raise ValueError(f"mix must have shape ({H},), got {tuple(mix.shape)}")
    S0, z0 = initial_state if initial_state is not None else (None, None)
    o, ST, zT = HybridAttentionFunction.apply(q, k, v, fq, fk, mix, S0, z0, log_decay, int(window), float(scale),
                                              float(eps), bool(output_final_state))
    return o, ((ST, zT) if output_final_state else None)
