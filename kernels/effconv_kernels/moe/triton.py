"""Triton MoE SwiGLU experts, forward and backward: fused token routing + grouped GEMMs.

Layout (transformers' MixtralExperts): gate_up_proj (E, 2I, D) with gate rows [0, I) and up rows [I, 2I),
down_proj (E, D, I). The M = N*k (token, slot) assignments are counting-sorted by expert on the GPU by two
Triton launches (`route`): per-chunk expert histograms, then (every chunk at once) the exclusive prefix over
experts and earlier chunks, the stable rank of each assignment within its expert (one-hot cumsum), the
expert row offsets (E+1) and the block table. Rows of the sorted order are cut into row blocks of BM that
never straddle two experts; the table (expert, first row, end row) has the fixed size cdiv(M, BM) + E
(padding rows hold E), so nothing syncs with the host and the programs of padding rows exit at once.

Forward (two grouped GEMMs over the sorted rows, x rows gathered by token inside the kernel):
    gu = x[tok] W_gu[e]^T          -> h = w * silu(g) * u        (gate and up tiles share the x tile)
    y  = h W_d[e]^T                -> for k = 2 added into the zeroed out[token] by atomics; else stored at
                                      the row's (token, slot) position, out = y.sum(slot)
Backward:
    dA = dout[tok] W_d[e]; dw partial = <dA, silu(g) u> per column block; dh = w dA -> dg, du (SwiGLU)
    dx = dgu W_gu[e] added into the zeroed d_hidden[token] like y (k = 2), or stored at (token, slot) and
         summed over slots; the same kernel sums the dw partials
    dW_gu[e] = dgu_e^T x_e,  dW_d[e] = dout[tok]_e^T h_e          (per-expert weight-gradient GEMMs, on CUDA
                                                                   on a side stream beside down_bwd / dx)
All dots accumulate in fp32; sums over column blocks (dw), row splits (weight grads) and k > 2 slots are done in
a fixed order, and the only atomics are the k = 2 slot adds: two adds into zero give a + b in either order, so
results are deterministic.

Tiles: BM (rows per block) is chosen per call from the mean rows per expert (128 from 512 rows, else 64; 16
under TRITON_INTERPRET); on CUDA `triton.autotune` picks BN/BK/warps/stages per kernel from a short list
(keyed on the dims, a rows bucket and BM) once M >= AUTOTUNE_MIN_ROWS, else a fixed default config; keys with a
config pinned for the GPU in configs/<gpu>.json launch that one instead (`pinned_config`). The row-block GEMMs
specialize on EVEN_K / EVEN_N (K % BK, N % BN == 0: unmasked weight loads) and load clamped rows (past a block's
end its last row again; those output rows stay masked), so their k loops carry no masks when EVEN_K. The
autotuner's repeated runs are safe: the kernels only write their outputs, except the slot-add down / dx kernels,
whose outputs it zeroes before every run (RESET). `tuned_configs()` lists the choices and where each came from.
"""
from __future__ import annotations

import functools
import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path

import torch
import triton
import triton.language as tl

from ..utils import interpreting, next_pow2

MAX_EXPERTS = 128  # the routing kernels hold [rows, next_pow2(E)] one-hot tiles in registers
AUTOTUNE_MIN_ROWS = 4096  # below: the fixed default config (no tuning runs for small calls)
FORCE_CONFIG: int | None = None  # tests: run config FORCE_CONFIG (mod list length) of every kernel, no tuning
LAUNCHES: Counter = Counter()  # Triton launches per kernel name (bench/moe.py --count-launches)


# ----------------------------------------------------------------------------------------------------------
# routing: counting sort of the flat expert ids (two launches)
# ----------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M", "ITERS"])
def moe_route_hist_kernel(expert_ids, hist, M, E, ITERS, E_P: tl.constexpr, SUB: tl.constexpr):
    """hist[c, e] = number of assignments of expert e among chunk c (ITERS sub-tiles of SUB ids)."""
    c = tl.program_id(0)
    ar_e = tl.arange(0, E_P)
    cnt = tl.zeros([E_P], dtype=tl.int32)
    for it in range(ITERS):
        idx = (c * ITERS + it) * SUB + tl.arange(0, SUB)
        e = tl.load(expert_ids + idx, mask=idx < M, other=-1).to(tl.int32)
        oh = (e[:, None] == ar_e[None, :]) & (ar_e[None, :] < E)
        cnt += tl.sum(oh.to(tl.int32), 0)
    tl.store(hist + c * E_P + ar_e, cnt)


@triton.jit(do_not_specialize=["M", "ITERS", "NCHUNK", "NBLK"])
def moe_route_scatter_kernel(expert_ids, hist, order, offsets, table, M, E, ITERS, NCHUNK, NBLK,
                             E_P: tl.constexpr, SUB: tl.constexpr, CB: tl.constexpr, TB: tl.constexpr,
                             BM: tl.constexpr):
    """order[offsets[e] + rank] = flat index (stable counting sort); chunk 0 writes offsets; every chunk
    writes its share of the block table rows (expert, start, end), padding rows (E, E, E)."""
    c = tl.program_id(0)
    nprog = tl.num_programs(0)
    ar_e = tl.arange(0, E_P)
    m_e = ar_e < E
    total = tl.zeros([E_P], dtype=tl.int32)
    before = tl.zeros([E_P], dtype=tl.int32)
    for r0 in range(0, NCHUNK, CB):  # expert totals and the counts of the chunks before this one
        rr = r0 + tl.arange(0, CB)
        hc = tl.load(hist + rr[:, None] * E_P + ar_e[None, :], mask=(rr < NCHUNK)[:, None], other=0)
        total += tl.sum(hc, 0)
        before += tl.sum(tl.where((rr < c)[:, None], hc, 0), 0)
    start_e = tl.cumsum(total, 0) - total  # exclusive prefix over experts = offsets[:E]
    run = start_e + before
    for it in range(ITERS):
        idx = (c * ITERS + it) * SUB + tl.arange(0, SUB)
        e = tl.load(expert_ids + idx, mask=idx < M, other=-1).to(tl.int32)
        oh = ((e[:, None] == ar_e[None, :]) & m_e[None, :]).to(tl.int32)
        rank = tl.cumsum(oh, 0)  # inclusive rank within the expert, in index order (stable)
        dest = tl.sum(oh * (rank - 1 + run[None, :]), 1)
        tl.store(order + dest, idx, mask=(idx < M) & (e >= 0) & (e < E))
        run += tl.sum(oh, 0)
    if c == 0:
        tl.store(offsets + ar_e, start_e, mask=m_e)
        tl.store(offsets + E, tl.sum(total, 0))
    nb = (total + BM - 1) // BM  # row blocks per expert
    bend = tl.cumsum(nb, 0)
    bstart = bend - nb
    end_e = start_e + total
    for r0 in range(c * TB, NBLK, nprog * TB):
        ids = r0 + tl.arange(0, TB)
        ex = tl.sum(((bend[None, :] <= ids[:, None]) & m_e[None, :]).to(tl.int32), 1)  # searchsorted right
        sel = (ex[:, None] == ar_e[None, :]) & m_e[None, :]
        st = tl.sum(tl.where(sel, start_e[None, :] + (ids[:, None] - bstart[None, :]) * BM, 0), 1)
        en = tl.sum(tl.where(sel, end_e[None, :], 0), 1)
        valid = ex < E
        m_t = ids < NBLK
        tl.store(table + ids * 3, ex, mask=m_t)
        tl.store(table + ids * 3 + 1, tl.where(valid, st, E), mask=m_t)
        tl.store(table + ids * 3 + 2, tl.where(valid, en, E), mask=m_t)


def _num_blocks(m: int, num_experts: int, bm: int) -> int:
    # an upper bound on sum_e cdiv(count_e, bm), known without a host sync
    return min(triton.cdiv(m, bm) + num_experts, max(1, m))


def _check_experts(num_experts: int) -> None:
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"backend='triton' supports 1..{MAX_EXPERTS} experts (the routing kernels keep a "
                         f"[rows, next_pow2(E)] one-hot tile in registers), got E={num_experts}; use "
                         "backend='reference'")


def route(top_k_index: torch.Tensor, num_experts: int, bm: int):
    """Fused routing: (order (M,) int32, offsets (E+1,) int32, table (nblk, 3) int32), equal to
    `route_reference`. Two Triton launches, no host sync; ids must lie in [0, E)."""
    _check_experts(num_experts)
    flat = top_k_index.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    m = flat.numel()
    if m >= 2 ** 31:
        raise ValueError(f"N*k = {m} assignments: int32 row indices overflow")
    e_p = max(2, next_pow2(num_experts))
    if interpreting():
        sub, target = 32, 4  # several chunks and sub-tiles on the tests' small shapes
    else:
        sub, target = max(16, min(256, 8192 // e_p)), 256  # 256 ids: 1.9 us less scatter than 1024 (H200)
    forced = _env_int("EFFCONV_MOE_ROUTE_SUB", (64, 128, 256, 512, 1024))  # a tuning knob (ids per sub-tile)
    if forced is not None:
        sub = min(forced, max(16, 8192 // e_p))  # the one-hot tile [sub, E_P] stays within 8192 entries
    tiles = triton.cdiv(m, sub)
    iters = triton.cdiv(tiles, target)
    nchunk = triton.cdiv(tiles, iters)
    nblk = _num_blocks(m, num_experts, bm)
    # one int32 workspace; every piece starts on a 64-byte boundary (the kernels' pointer specialization)
    sizes = (nchunk * e_p, m, num_experts + 1, 3 * nblk)
    starts = [0]
    for sz in sizes:
        starts.append(starts[-1] + -(-sz // 16) * 16)
    ws = torch.empty(starts[-1], dtype=torch.int32, device=flat.device)
    hist, order, offsets, table = (ws[s:s + sz] for s, sz in zip(starts, sizes))
    table = table.view(nblk, 3)
    warps = 8 if sub * e_p >= 4096 else 4
    LAUNCHES["route_hist"] += 1
    moe_route_hist_kernel[(nchunk,)](flat, hist, m, num_experts, iters, E_P=e_p, SUB=sub, num_warps=warps)
    cb = max(16, min(1024, 8192 // e_p))
    tb = max(16, min(256, 8192 // e_p))
    LAUNCHES["route_scatter"] += 1
    moe_route_scatter_kernel[(nchunk,)](flat, hist, order, offsets, table, m, num_experts, iters, nchunk, nblk,
                                        E_P=e_p, SUB=sub, CB=cb, TB=tb, BM=bm, num_warps=warps)
    return order, offsets, table


def route_reference(top_k_index: torch.Tensor, num_experts: int, bm: int):
    """The torch op chain the fused routing replaces (~30 launches on CUDA, no host sync): the oracle."""
    flat_expert = top_k_index.reshape(-1)
    m = flat_expert.numel()
    order = torch.argsort(flat_expert, stable=True).to(torch.int32)
    # scatter_add, not bincount: bincount on CUDA reads the max back to the host (a sync per call)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat_expert.device)
    counts.scatter_add_(0, flat_expert.long(), torch.ones_like(flat_expert, dtype=torch.int64))
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat_expert.device)
    offsets[1:] = torch.cumsum(counts, 0)
    blocks = (counts + bm - 1) // bm
    block_end = torch.cumsum(blocks, 0)
    ids = torch.arange(_num_blocks(m, num_experts, bm), device=flat_expert.device)
    expert = torch.searchsorted(block_end, ids, right=True)
    valid = expert < num_experts
    e_c = expert.clamp(max=num_experts - 1)
    start = offsets[e_c] + (ids - (block_end[e_c] - blocks[e_c])) * bm
    table = torch.stack([expert, start, offsets[e_c + 1]], 1)
    table = torch.where(valid[:, None], table, torch.full_like(table, num_experts)).to(torch.int32).contiguous()
    return order, offsets.to(torch.int32), table


# ----------------------------------------------------------------------------------------------------------
# grouped GEMMs (1-D grids, column blocks fastest: a row block's A tile is reused from L2 by all its
# column blocks, and one expert's weight tiles by the ~SMs/n_col row blocks of a wave)
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _block_rows(table, pid_m, BM: tl.constexpr):
    """(expert, rows, row mask, load rows): the load rows repeat the block's last row past its end, so operand
    loads need no row mask (a row only feeds its own output row, and those are masked at the store)."""
    e = tl.load(table + pid_m * 3)
    start = tl.load(table + pid_m * 3 + 1)
    end = tl.load(table + pid_m * 3 + 2)
    rows = start + tl.arange(0, BM)
    return e, rows, rows < end, tl.minimum(rows, end - 1)


@triton.jit
def _rows_times_weight(a_ptr, a_row_off, w_ptr, stride_wk, stride_wn, cols, col_mask, K,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                       EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
    """acc[BM, BN] = sum_k A[rows, k] * W[k, cols] in fp32; A rows (all in bounds) contiguous in k at a_ptr +
    a_row_off. EVEN_K (K % BK == 0) / EVEN_N (N % BN == 0): the loop's loads carry no k / column masks."""
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    o_k = tl.arange(0, BK)
    a_ptrs = a_ptr + a_row_off[:, None] + o_k[None, :]
    w_ptrs = w_ptr + o_k[:, None].to(tl.int64) * stride_wk + cols[None, :].to(tl.int64) * stride_wn
    for k0 in range(0, K, BK):
        if EVEN_K:
            a = tl.load(a_ptrs)
            if EVEN_N:
                w = tl.load(w_ptrs)
            else:
                w = tl.load(w_ptrs, mask=col_mask[None, :], other=0.0)
        else:
            m_k = (k0 + o_k) < K
            a = tl.load(a_ptrs, mask=m_k[None, :], other=0.0)
            if EVEN_N:
                w = tl.load(w_ptrs, mask=m_k[:, None], other=0.0)
            else:
                w = tl.load(w_ptrs, mask=m_k[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PREC)
        a_ptrs += BK
        w_ptrs += BK * stride_wk
    return acc


@triton.jit
def _store_rows(out, flat, cols, val, mask, D, K_SLOTS, SLOT_ADD: tl.constexpr):
    """Store a tile of (token, slot) rows: at the row's own position flat (a later slot sum adds the k rows of
    a token), or with SLOT_ADD atomically added into the zeroed token row flat // K_SLOTS (k <= 2 only: two
    adds into zero give a + b in either order, so the result stays deterministic)."""
    if SLOT_ADD:
        tok = flat // K_SLOTS
        tl.atomic_add(out + tok[:, None].to(tl.int64) * D + cols[None, :], val.to(out.dtype.element_ty),
                      mask=mask, sem="relaxed")
    else:
        tl.store(out + flat[:, None].to(tl.int64) * D + cols[None, :], val.to(out.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["ROWS_KEY"])
def moe_up_kernel(x, order, table, w_gu, topw, h, gu_out, D, I, K_SLOTS, E, ROWS_KEY,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SAVE_GU: tl.constexpr,
                  PREC: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
    """h[r, cols] = w_r * silu(x[tok_r] Wg[e]^T) * (x[tok_r] Wu[e]^T) for one row block and one column block
    (the routing weight applied here, so the down GEMM and dW_d need no scaling)."""
    pid = tl.program_id(0)
    n_col = tl.cdiv(I, BN)
    pid_m, pid_n = pid // n_col, pid % n_col
    e, rows, m_r, rows_ld = _block_rows(table, pid_m, BM)
    if e >= E:
        return
    flat = tl.load(order + rows_ld)
    tok = flat // K_SLOTS
    cols = pid_n * BN + tl.arange(0, BN)
    m_c = cols < I
    o_k = tl.arange(0, BK)
    # W_gu[e] is (2I, D): W^T[k, n] = W[n, k] (k contiguous); gate row n, up row I + n
    a_ptrs = x + tok.to(tl.int64)[:, None] * D + o_k[None, :]
    wg_ptrs = w_gu + e.to(tl.int64) * 2 * I * D + cols[None, :].to(tl.int64) * D + o_k[:, None]
    g = tl.zeros([BM, BN], dtype=tl.float32)
    u = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, D, BK):  # one x tile feeds both the gate and the up dot
        if EVEN_K:
            a = tl.load(a_ptrs)
            if EVEN_N:
                wg = tl.load(wg_ptrs)
                wu = tl.load(wg_ptrs + I * D)
            else:
                wg = tl.load(wg_ptrs, mask=m_c[None, :], other=0.0)
                wu = tl.load(wg_ptrs + I * D, mask=m_c[None, :], other=0.0)
        else:
            m_k = (k0 + o_k) < D
            a = tl.load(a_ptrs, mask=m_k[None, :], other=0.0)
            m_w = m_k[:, None] & m_c[None, :]
            wg = tl.load(wg_ptrs, mask=m_w, other=0.0)
            wu = tl.load(wg_ptrs + I * D, mask=m_w, other=0.0)
        g = tl.dot(a, wg, g, input_precision=PREC)
        u = tl.dot(a, wu, u, input_precision=PREC)
        a_ptrs += BK
        wg_ptrs += BK
    wr = tl.load(topw + flat).to(tl.float32)
    hv = g * tl.sigmoid(g) * u * wr[:, None]
    out_off = rows[:, None].to(tl.int64) * I + cols[None, :]
    m_o = m_r[:, None] & m_c[None, :]
    tl.store(h + out_off, hv.to(h.dtype.element_ty), mask=m_o)
    if SAVE_GU:
        gu_off = rows[:, None].to(tl.int64) * 2 * I + cols[None, :]
        tl.store(gu_out + gu_off, g.to(gu_out.dtype.element_ty), mask=m_o)
        tl.store(gu_out + gu_off + I, u.to(gu_out.dtype.element_ty), mask=m_o)


@triton.jit(do_not_specialize=["ROWS_KEY"])
def moe_down_kernel(h, order, table, w_d, y, D, I, K_SLOTS, E, ROWS_KEY,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                    SLOT_ADD: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
    """y[flat_r, cols] = (h[r] W_d[e]^T)[cols] (h already carries w_r), written at the row's (token, slot)
    position flat_r, or with SLOT_ADD added into the token's row of the zeroed (N, D) output."""
    pid = tl.program_id(0)
    n_col = tl.cdiv(D, BN)
    pid_m, pid_n = pid // n_col, pid % n_col
    e, rows, m_r, rows_ld = _block_rows(table, pid_m, BM)
    if e >= E:
        return
    flat = tl.load(order + rows, mask=m_r, other=0)
    cols = pid_n * BN + tl.arange(0, BN)
    m_c = cols < D
    # W_d[e] is (D, I): W^T[k, n] = W[n, k]
    acc = _rows_times_weight(h, rows_ld.to(tl.int64) * I, w_d + e.to(tl.int64) * D * I, 1, I, cols, m_c, I,
                             BM, BN, BK, PREC, EVEN_K, EVEN_N)
    _store_rows(y, flat, cols, acc, m_r[:, None] & m_c[None, :], D, K_SLOTS, SLOT_ADD)


@triton.jit(do_not_specialize=["ROWS_KEY"])
def moe_down_bwd_kernel(dout, order, table, w_d, topw, gu, dgu, dw_part, D, I, K_SLOTS, E, M, ROWS_KEY,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                        PREFETCH: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
    """dA = dout[tok] W_d[e] (cols of I); dw_part[col block, flat] = <dA, h>; dgu = SwiGLU bwd of w * dA.
    PREFETCH issues the epilogue's g / u / w loads before the k loop (clamped rows, no row mask), so their
    latency hides behind the GEMM instead of following it."""
    pid = tl.program_id(0)
    n_col = tl.cdiv(I, BN)
    pid_m, pid_n = pid // n_col, pid % n_col
    e, rows, m_r, rows_ld = _block_rows(table, pid_m, BM)
    if e >= E:
        return
    flat = tl.load(order + rows_ld)
    tok = flat // K_SLOTS
    cols = pid_n * BN + tl.arange(0, BN)
    m_c = cols < I
    gu_off = rows[:, None].to(tl.int64) * 2 * I + cols[None, :]
    m_o = m_r[:, None] & m_c[None, :]
    if PREFETCH:
        ld_off = rows_ld[:, None].to(tl.int64) * 2 * I + cols[None, :]
        if EVEN_N:
            g_raw = tl.load(gu + ld_off)
            u_raw = tl.load(gu + ld_off + I)
        else:
            g_raw = tl.load(gu + ld_off, mask=m_c[None, :], other=0.0)
            u_raw = tl.load(gu + ld_off + I, mask=m_c[None, :], other=0.0)
        wr = tl.load(topw + flat).to(tl.float32)
    # W_d[e] is (D, I): used untransposed, stride_wk = I, stride_wn = 1
    da = _rows_times_weight(dout, tok.to(tl.int64) * D, w_d + e.to(tl.int64) * D * I, I, 1, cols, m_c, D,
                            BM, BN, BK, PREC, EVEN_K, EVEN_N)
    if not PREFETCH:
        g_raw = tl.load(gu + gu_off, mask=m_o, other=0.0)
        u_raw = tl.load(gu + gu_off + I, mask=m_o, other=0.0)
        wr = tl.load(topw + flat).to(tl.float32)
    g = g_raw.to(tl.float32)
    u = u_raw.to(tl.float32)
    sg = tl.sigmoid(g)
    silu = g * sg
    tl.store(dw_part + pid_n.to(tl.int64) * M + flat, tl.sum(da * silu * u, 1), mask=m_r)
    dh = da * wr[:, None]
    dg = dh * u * sg * (1.0 + g * (1.0 - sg))
    du = dh * silu
    tl.store(dgu + gu_off, dg.to(dgu.dtype.element_ty), mask=m_o)
    tl.store(dgu + gu_off + I, du.to(dgu.dtype.element_ty), mask=m_o)


@triton.jit(do_not_specialize=["N_PART", "ROWS_KEY"])
def moe_dx_kernel(dgu, order, table, w_gu, dx, dw_part, d_topw, D, I, K_SLOTS, E, M, N_PART, ROWS_KEY,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, DW: tl.constexpr,
                  SLOT_ADD: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
    """dx[flat_r, cols] = dgu[r] W_gu[e] (K = 2I), written at the row's (token, slot) position or with SLOT_ADD
    added into the token's row of the zeroed (N, D) d_hidden; with DW the column-block-0 programs also write
    d_topw[flat_r] = sum_j dw_part[j, flat_r] (fixed order)."""
    pid = tl.program_id(0)
    n_col = tl.cdiv(D, BN)
    pid_m, pid_n = pid // n_col, pid % n_col
    e, rows, m_r, rows_ld = _block_rows(table, pid_m, BM)
    if e >= E:
        return
    flat = tl.load(order + rows, mask=m_r, other=0)
    cols = pid_n * BN + tl.arange(0, BN)
    m_c = cols < D
    # W_gu[e] is (2I, D): used untransposed, stride_wk = D, stride_wn = 1
    acc = _rows_times_weight(dgu, rows_ld.to(tl.int64) * 2 * I, w_gu + e.to(tl.int64) * 2 * I * D, D, 1,
                             cols, m_c, 2 * I, BM, BN, BK, PREC, EVEN_K, EVEN_N)
    _store_rows(dx, flat, cols, acc, m_r[:, None] & m_c[None, :], D, K_SLOTS, SLOT_ADD)
    if DW:
        if pid_n == 0:
            s = tl.zeros([BM], dtype=tl.float32)
            for j in range(N_PART):
                s += tl.load(dw_part + j * M + flat, mask=m_r, other=0.0)
            tl.store(d_topw + flat, s.to(d_topw.dtype.element_ty), mask=m_r)


@triton.jit(do_not_specialize=["ROWS_KEY"])
def moe_weight_grad_kernel(a, b, order, offsets, dw, P, Q, K_SLOTS, SPLITS, ROWS_KEY,
                           A_GATHER: tl.constexpr, B_GATHER: tl.constexpr,
                           BP: tl.constexpr, BQ: tl.constexpr, BR: tl.constexpr, PREC: tl.constexpr):
    """dw[s, e, p, q] = sum over split s's rows r of expert e of A[ra, p] * B[rb, q]; the A tile is loaded
    [BR, BP] and fed transposed (a shared-memory descriptor, no data movement).

    A is (rows, P), B is (rows, Q); a row is read at its sorted index r or, when *_GATHER, at its token
    order[r] // K_SLOTS. Split s takes the s-th contiguous share of the expert's rows; with SPLITS == 1, dw
    is the (E, P, Q) result in the weights' dtype, else fp32 partials (SPLITS, E, P, Q) that
    moe_split_sum_kernel sums.
    """
    pid_pq, pid_e, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_q = tl.cdiv(Q, BQ)
    pp = (pid_pq // n_q) * BP + tl.arange(0, BP)
    qq = (pid_pq % n_q) * BQ + tl.arange(0, BQ)
    m_p, m_q = pp < P, qq < Q
    start = tl.load(offsets + pid_e)
    end = tl.load(offsets + pid_e + 1)
    share = tl.cdiv(tl.cdiv(end - start, SPLITS), BR) * BR
    lo = start + pid_s * share
    hi = tl.minimum(lo + share, end)
    acc = tl.zeros([BP, BQ], dtype=tl.float32)
    o_r = tl.arange(0, BR)
    for r0 in range(lo, hi, BR):
        rows = r0 + o_r
        m_r = rows < hi
        flat = tl.load(order + rows, mask=m_r, other=0)
        ra = flat // K_SLOTS if A_GATHER else rows
        rb = flat // K_SLOTS if B_GATHER else rows
        at = tl.load(a + ra[:, None].to(tl.int64) * P + pp[None, :], mask=m_r[:, None] & m_p[None, :], other=0.0)
        bt = tl.load(b + rb[:, None].to(tl.int64) * Q + qq[None, :], mask=m_r[:, None] & m_q[None, :], other=0.0)
        acc = tl.dot(tl.trans(at), bt, acc, input_precision=PREC)
    out = dw + (pid_s.to(tl.int64) * tl.num_programs(1) + pid_e) * P * Q
    tl.store(out + pp[:, None].to(tl.int64) * Q + qq[None, :], acc.to(dw.dtype.element_ty),
             mask=m_p[:, None] & m_q[None, :])


@triton.jit(do_not_specialize=["N"])
def moe_slot_sum_kernel(y, out, N, D, K_SLOTS: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """out[n, :] = sum_j y[n * K_SLOTS + j, :] in fp32 (slots in order: deterministic), stored in out's dtype."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    m = (rows < N)[:, None] & (cols < D)[None, :]
    base = rows.to(tl.int64)[:, None] * K_SLOTS * D + cols[None, :]
    acc = tl.zeros([BR, BD], dtype=tl.float32)
    for j in tl.static_range(K_SLOTS):
        acc += tl.load(y + base + j * D, mask=m, other=0.0).to(tl.float32)
    tl.store(out + rows.to(tl.int64)[:, None] * D + cols[None, :], acc.to(out.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["NUMEL"])
def moe_split_sum_kernel(part, out, NUMEL, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = sum_s part[s, i] (fp32, splits in order: deterministic), stored in out's dtype: the weight-grad
    row splits' reduction and cast in one pass (torch's sum + to read the partials once and the fp32 sum twice)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < NUMEL
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(part + s * NUMEL + offs, mask=m, other=0.0)
    tl.store(out + offs, acc.to(out.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["M"])
def moe_swiglu_bwd_kernel(da, gu, order, topw, dgu, d_topw, M, I, BM: tl.constexpr, BN: tl.constexpr,
                          DW: tl.constexpr):
    """SwiGLU backward over the sorted rows, given dA = dL/dh (dout[tok] W_d[e], from a grouped GEMM) where
    h = w * silu(g) * u: dgu = (dg, du) of w * dA, and with DW d_topw[flat_r] = <dA, silu(g) u>, each row's sum
    over all I columns taken inside one program (fixed order, no partials)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    m_r = rows < M
    flat = tl.load(order + rows, mask=m_r, other=0)
    wr = tl.load(topw + flat, mask=m_r, other=0.0).to(tl.float32)
    s = tl.zeros([BM], dtype=tl.float32)
    for c0 in range(0, I, BN):
        cols = c0 + tl.arange(0, BN)
        m = m_r[:, None] & (cols < I)[None, :]
        off = rows.to(tl.int64)[:, None] * 2 * I + cols[None, :]
        a = tl.load(da + rows.to(tl.int64)[:, None] * I + cols[None, :], mask=m, other=0.0).to(tl.float32)
        g = tl.load(gu + off, mask=m, other=0.0).to(tl.float32)
        u = tl.load(gu + off + I, mask=m, other=0.0).to(tl.float32)
        sg = tl.sigmoid(g)
        silu = g * sg
        if DW:
            s += tl.sum(a * silu * u, 1)
        dh = a * wr[:, None]
        tl.store(dgu + off, (dh * u * sg * (1.0 + g * (1.0 - sg))).to(dgu.dtype.element_ty), mask=m)
        tl.store(dgu + off + I, (dh * silu).to(dgu.dtype.element_ty), mask=m)
    if DW:
        tl.store(d_topw + flat, s.to(d_topw.dtype.element_ty), mask=m_r)


# ----------------------------------------------------------------------------------------------------------
# configs and launching
# ----------------------------------------------------------------------------------------------------------
def _cfg(n, k, warps, stages, names=("BN", "BK")):
    return triton.Config({names[0]: n, names[1]: k}, num_warps=warps, num_stages=stages)


def _wg(p, q, r, warps, stages):
    return triton.Config({"BP": p, "BQ": q, "BR": r}, num_warps=warps, num_stages=stages)


# The autotuner's candidates: short lists for sm_90 (227 KB shared memory; configs over ~200 KB for the dtype at
# hand are pruned), the configs the benchmark shapes chose on an H200 and deeper pipelines of them (docs/kernels.md).
# The up kernel holds two fp32 accumulators (gate, up): BN 128 needs 8 warps at BM 128 (2 x 64 registers/thread).
CONFIGS = {
    "up": [_cfg(128, 64, 8, 3), _cfg(128, 64, 8, 4), _cfg(64, 64, 4, 4), _cfg(64, 128, 4, 3), _cfg(128, 32, 8, 5),
           _cfg(64, 32, 4, 5)],
    "down": [_cfg(128, 64, 8, 3), _cfg(256, 64, 8, 3), _cfg(256, 64, 8, 4), _cfg(64, 64, 4, 4), _cfg(128, 64, 8, 4),
             _cfg(128, 32, 8, 4)],
    "down_bwd": [_cfg(128, 64, 8, 3), _cfg(128, 64, 8, 4), _cfg(64, 64, 4, 4), _cfg(64, 128, 4, 3), _cfg(64, 64, 8, 4)],
    "dx": [_cfg(128, 64, 8, 3), _cfg(256, 64, 8, 3), _cfg(256, 64, 8, 4), _cfg(128, 64, 8, 4), _cfg(64, 64, 4, 4),
           _cfg(128, 32, 8, 5)],
    "wgrad": [_wg(128, 128, 64, 8, 3), _wg(128, 256, 64, 8, 3), _wg(128, 128, 64, 8, 4), _wg(256, 128, 64, 8, 3),
              _wg(64, 64, 64, 4, 4), _wg(64, 64, 128, 4, 3), _wg(64, 64, 64, 4, 5), _wg(128, 128, 32, 8, 5),
              _wg(64, 64, 32, 4, 6)],
}
DEFAULTS = {  # CUDA, small calls (M < AUTOTUNE_MIN_ROWS) or EFFCONV_MOE_AUTOTUNE=0
    "up": _cfg(64, 64, 4, 3), "down": _cfg(64, 64, 4, 3), "down_bwd": _cfg(64, 64, 4, 3), "dx": _cfg(64, 64, 4, 3),
    "wgrad": _wg(64, 64, 64, 4, 3),
}
INTERP = {  # the CPU interpreter is slow on big tiles
    "up": _cfg(32, 16, 4, 1), "down": _cfg(32, 16, 4, 1), "down_bwd": _cfg(32, 16, 4, 1), "dx": _cfg(32, 16, 4, 1),
    "wgrad": _wg(16, 32, 16, 4, 1),
}
KEYS = {
    "up": ["D", "I", "ROWS_KEY", "BM", "SAVE_GU"], "down": ["D", "I", "ROWS_KEY", "BM", "SLOT_ADD"],
    "down_bwd": ["D", "I", "ROWS_KEY", "BM", "PREFETCH"], "dx": ["D", "I", "ROWS_KEY", "BM", "DW", "SLOT_ADD"],
    "wgrad": ["P", "Q", "ROWS_KEY", "SPLITS", "A_GATHER"],
}
# the slot-add kernels accumulate into their output: the autotuner zeroes it before each timed run and before
# the launch that keeps the result (the non-adding variants only write it, so the zeroing is harmless there)
RESET = {"down": ["y"], "dx": ["dx"]}
SMEM_LIMIT = 200 * 1024


def _smem_bytes(name, cfg, bm, elem):
    kw = cfg.kwargs
    if name == "wgrad":
        return cfg.num_stages * kw["BR"] * (kw["BP"] + kw["BQ"]) * elem
    n_w = 2 if name == "up" else 1
    return cfg.num_stages * kw["BK"] * (bm + n_w * kw["BN"]) * elem


def _prune(name):
    def prune(configs, nargs, **kwargs):
        elem = next(v.element_size() for v in nargs.values() if torch.is_tensor(v) and v.is_floating_point())
        bm = kwargs.get("BM", 128)
        ok = [c for c in configs if _smem_bytes(name, c, bm, elem) <= SMEM_LIMIT]
        return ok or [min(configs, key=lambda c: _smem_bytes(name, c, bm, elem))]
    return prune


def _tune_bench(fn, quantiles):
    """The autotuner's timer: triton's do_bench (L2 flushed before each run)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def autotuned(name, fn, do_bench):
    """triton.autotune over CONFIGS[name] with our keys, pruning and output zeroing (tests pass a fake do_bench)."""
    return triton.autotune(CONFIGS[name], key=KEYS[name], prune_configs_by={"early_config_prune": _prune(name)},
                           do_bench=do_bench, reset_to_zero=RESET.get(name))(fn)


# Launch configs pinned per GPU (configs/<gpu>.json, bf16 data only), used instead of the autotuner for the keys
# measured there: its choices for these short kernels, each timed alone with L2 flushed, vary from process to
# process, so each pinned config is that of the fastest whole fwd+bwd graph among autotuned processes
# (docs/kernels.md). EFFCONV_MOE_PINNED=0 autotunes those keys too.
PINNED_DIR = Path(__file__).with_name("configs")


def pinned_file(gpu: str) -> Path:
    """The pinned-config file of a GPU, named from torch.cuda.get_device_name: "NVIDIA H200" -> nvidia-h200.json."""
    return PINNED_DIR / (re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") + ".json")


@functools.lru_cache(maxsize=None)
def pinned_table(gpu: str) -> dict:
    """{(kernel, key values in KEYS order): triton.Config} from the GPU's file; {} for a GPU without one (or "")."""
    path = pinned_file(gpu) if gpu else None
    if path is None or not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
        table = {}
        for row in doc["configs"]:
            name = row["kernel"]
            if set(row["key"]) != set(KEYS[name]):
                raise ValueError(f"key names {sorted(row['key'])}, expected {KEYS[name]}")
            names = ("BP", "BQ", "BR") if name == "wgrad" else ("BN", "BK")
            if set(row["config"]) != set(names):
                raise ValueError(f"config names {sorted(row['config'])}, expected {list(names)}")
            key = tuple(row["key"][k] for k in KEYS[name])
            table[(name, key)] = triton.Config(dict(row["config"]), num_warps=int(row["num_warps"]),
                                               num_stages=int(row["num_stages"]))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"bad pinned MoE launch configs in {path}: {type(error).__name__}: {error}") from error
    return table


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(t: torch.Tensor) -> str:
    """The GPU's name as torch reports it, which names its pinned-config file ("" off CUDA)."""
    return _cuda_name(t.device.index if t.device.index is not None else 0) if t.device.type == "cuda" else ""


def pinned_config(name: str, key_values: tuple, dtype: torch.dtype, gpu: str) -> triton.Config | None:
    """The pinned config of kernel `name` for these key values on GPU `gpu` (bf16 data only), else None."""
    if _env_int("EFFCONV_MOE_PINNED", (0, 1)) == 0 or dtype != torch.bfloat16:
        return None
    return pinned_table(gpu).get((name, tuple(key_values)))


class _Kernel:
    def __init__(self, name, fn):
        self.name, self.fn = name, fn
        self.tuned = None
        self.chosen: dict = {}  # our key -> the config used: repeats skip Autotuner.run's per-call work
        self.source: dict = {}  # our key -> "pinned", "autotuned" or "default" (tuning failed)
        names = list(fn.arg_names)
        self.key_pos = [names.index(n) for n in KEYS[name]]  # positional, or passed by keyword (constexprs)
        self.reset_pos = [names.index(n) for n in RESET.get(name, [])]
        if not interpreting():
            self.tuned = autotuned(name, fn, _tune_bench)

    def __call__(self, grid, *args, autotune: bool, **kw) -> triton.Config:
        """Launch; returns the config used (the autotuner's choice when tuning)."""
        LAUNCHES[self.name] += 1
        if interpreting():
            cfg = INTERP[self.name]
        elif FORCE_CONFIG is not None:
            cfg = CONFIGS[self.name][FORCE_CONFIG % len(CONFIGS[self.name])]
        elif autotune and self.tuned is not None:
            key = tuple(args[i] if i < len(args) else kw[n] for i, n in zip(self.key_pos, KEYS[self.name])) + tuple(
                a.dtype for a in args if isinstance(a, torch.Tensor))
            cfg = self.chosen.get(key)
            if cfg is None:
                data = next(a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
                cfg = pinned_config(self.name, key[:len(KEYS[self.name])], data.dtype, device_name(data))
                if cfg is not None:
                    self.chosen[key], self.source[key] = cfg, "pinned"
            if cfg is None:  # first call for this key: the autotuner times its configs, then launches
                try:
                    self.tuned[grid](*args, **kw)
                except Exception as e:  # noqa: BLE001 - a config that does not compile: keep going on the default
                    warnings.warn(f"moe_experts: autotuning {self.name} failed ({type(e).__name__}: "
                                  f"{str(e)[:200]}); using its default config for key {key[:len(KEYS[self.name])]}")
                    cfg = self.chosen[key] = DEFAULTS[self.name]
                    self.source[key] = "default"
                    for i in self.reset_pos:  # runs of the failed tuning may have added into the output
                        args[i].zero_()
                else:
                    self.chosen[key], self.source[key] = self.tuned.best_config, "autotuned"
                    return self.tuned.best_config
        else:
            cfg = DEFAULTS[self.name]
        self.fn[grid](*args, **kw, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return cfg


# (K, N) of each row-block GEMM: EVEN_K = K % BK == 0, EVEN_N = N % BN == 0 (their loops' loads go unmasked)
EVEN_DIMS = {"up": ("D", "I"), "down": ("I", "D"), "down_bwd": ("D", "I"), "dx": ("2I", "D")}


def _dim(args, name):
    return 2 * args["I"] if name == "2I" else args[name]


def even_flags(name, dims, bk, bn) -> tuple[bool, bool]:
    k, n = EVEN_DIMS[name]
    return _dim(dims, k) % bk == 0, _dim(dims, n) % bn == 0


def _with_even(name, fn):
    if name not in EVEN_DIMS:
        return fn
    return triton.heuristics({"EVEN_K": lambda a: even_flags(name, a, a["BK"], a["BN"])[0],
                              "EVEN_N": lambda a: even_flags(name, a, a["BK"], a["BN"])[1]})(fn)


KERNELS = {n: _Kernel(n, _with_even(n, f)) for n, f in (("up", moe_up_kernel), ("down", moe_down_kernel),
                                                        ("down_bwd", moe_down_bwd_kernel), ("dx", moe_dx_kernel),
                                                        ("wgrad", moe_weight_grad_kernel))}


def tuned_configs() -> list[dict]:
    """The configs chosen so far on the tuned path: one entry per (kernel, key) (key = the KEYS values, then the
    tensor arguments' dtypes), with its source: "pinned" (configs/<gpu>.json), "autotuned" or "default" (tuning
    failed)."""
    out = []
    for name, k in KERNELS.items():
        for key, cfg in k.chosen.items():
            out.append(dict(kernel=name, key_names=KEYS[name], key=[str(v) for v in key], config=dict(
                cfg.kwargs), num_warps=cfg.num_warps, num_stages=cfg.num_stages, source=k.source.get(key)))
    return out


def _autotune_on(m: int) -> bool:
    """Whether a call takes the tuned path (pinned or autotuned configs): from AUTOTUNE_MIN_ROWS rows on;
    EFFCONV_MOE_AUTOTUNE=0 / 1 force the fixed default configs / the tuned path for every call."""
    forced = _env_int("EFFCONV_MOE_AUTOTUNE", (0, 1))
    return m >= AUTOTUNE_MIN_ROWS if forced is None else forced == 1


def _env_int(name: str, allowed) -> int | None:
    raw = os.environ.get(name, "")
    if not raw:
        return None
    if not raw.isdigit() or int(raw) not in allowed:
        raise ValueError(f"{name}={raw!r}: expected one of {', '.join(map(str, allowed))}")
    return int(raw)


def block_rows(m: int, num_experts: int) -> int:
    """Rows per block of the sorted order (BM); EFFCONV_MOE_BM overrides it on CUDA (a tuning knob)."""
    if interpreting():
        return 16
    forced = _env_int("EFFCONV_MOE_BM", (32, 64, 128, 256))
    if forced is not None:
        return forced
    return 128 if m >= 512 * num_experts else 64


def _rows_key(m: int, num_experts: int) -> int:
    return min(1 << 14, max(16, next_pow2(triton.cdiv(m, num_experts))))  # power of two: one specialization


def _prec(t: torch.Tensor) -> str:
    # fp32 inputs get fp32 (`ieee`) dots like torch's default matmul; bf16/fp16 use the tensor cores anyway
    return "ieee" if t.dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _weight_grad_splits(num_experts: int, p: int, q: int, m: int, device: torch.device) -> int:
    """Row splits of the weight-grad GEMMs: only when E x (64 x 64 tiles) is under four waves of programs and
    every split keeps >= 2048 rows (a split costs an fp32 partial buffer and a split-sum launch; on the H200 at
    smol_split two splits won with 4096 rows per expert and lost with 1024, docs/kernels.md)."""
    forced = _env_int("EFFCONV_MOE_WGRAD_SPLITS", (1, 2, 3, 4, 6, 8))  # a tuning knob
    if forced is not None:
        return forced
    rows = m // num_experts
    if interpreting() or device.type != "cuda":
        return 2 if rows >= 64 else 1  # the tests exercise both the split and the direct path
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    tiles = num_experts * triton.cdiv(p, 64) * triton.cdiv(q, 64)
    waves = _env_int("EFFCONV_MOE_WGRAD_WAVES", (1, 2, 4, 8, 16)) or 4  # tuning knobs of the rule
    min_rows = _env_int("EFFCONV_MOE_WGRAD_MIN_ROWS", (256, 512, 1024, 2048, 4096)) or 2048
    if tiles >= waves * sms:
        return 1
    return max(1, min(8, triton.cdiv(waves * sms, tiles), rows // min_rows))


def prefetch_on() -> bool:
    """down_bwd loads its epilogue operands before the k loop; EFFCONV_MOE_PREFETCH=0 turns it off (an ablation)."""
    return _env_int("EFFCONV_MOE_PREFETCH", (0, 1)) != 0


SLOT_MODES = ("auto", "sum")


def slot_add_on(k: int, dtype: torch.dtype) -> bool:
    """Whether the down / dx kernels add each (token, slot) row straight into the token's zeroed output row
    (atomics) instead of writing M rows for a slot-sum launch. Only for k == 2, where two adds into zero are
    order-independent (a + b = b + a exactly), so results stay deterministic; the CPU interpreter has no bf16
    atomics, so bf16 there takes the slot sum. EFFCONV_MOE_SLOT=sum turns the adds off (the ablation)."""
    mode = os.environ.get("EFFCONV_MOE_SLOT", "auto") or "auto"
    if mode not in SLOT_MODES:
        raise ValueError(f"EFFCONV_MOE_SLOT={mode!r}: expected one of {', '.join(SLOT_MODES)}")
    if k != 2 or mode == "sum" or (interpreting() and dtype == torch.bfloat16):
        return False
    return True


_SIDE_STREAMS: dict = {}


def side_stream(device: torch.device, role: str) -> torch.cuda.Stream:
    """One lasting side stream per (device, role): "zero" for the slot adds' fills, "wgrad" for the weight grads
    (separate, so joining a fill never waits for a weight-grad GEMM)."""
    key = (device.index, role)
    side = _SIDE_STREAMS.get(key)
    if side is None:
        side = _SIDE_STREAMS[key] = torch.cuda.Stream(device)
    return side


WGRAD_STREAM_MODES = (0, 1, 2)


def wgrad_stream_mode(device: torch.device) -> int:
    """How many of the two Triton weight-grad GEMMs run on a side stream, beside the dgrad kernels: 0 none, 1 dW_d
    (it needs only dout and h, so it starts with the backward, beside down_bwd), 2 (CUDA's default) also dW_gu
    (after down_bwd, beside dx). The overlap fills the SMs each kernel's last wave and the launch gaps leave
    idle (faster fwd+bwd on the H200, docs/kernels.md). EFFCONV_MOE_WGRAD_STREAM=0 / 1 are the ablations."""
    mode = _env_int("EFFCONV_MOE_WGRAD_STREAM", WGRAD_STREAM_MODES)
    return 0 if device.type != "cuda" else (2 if mode is None else mode)


class _SideWork:
    """Work queued on the side stream of `role` from the current one: each `with self:` block first waits for what
    the current stream has queued so far; join() makes the current stream wait for the side's work and hands the
    side's outputs (allocated there) to the current stream (record_stream, so the allocator does not reuse their
    memory early)."""

    def __init__(self, device: torch.device, role: str):
        self.main = torch.cuda.current_stream(device)
        self.side = side_stream(device, role)
        self.outputs: list = []

    def __enter__(self):
        self.side.wait_stream(self.main)
        self.ctx = torch.cuda.stream(self.side)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)

    def join(self):
        self.main.wait_stream(self.side)
        for t in self.outputs:
            t.record_stream(self.main)


def zeroed(n: int, d: int, dtype: torch.dtype, device: torch.device):
    """(zeroed (n, d) buffer, join): the slot adds' output. On CUDA the fill runs on a side stream, so it overlaps
    the routing / up (forward) or down_bwd (backward) kernels instead of standing between them; join() makes the
    current stream wait for it (call it before the first kernel that adds into the buffer). The side stream
    first waits for the current one, since the buffer's memory may have been freed by work still queued there."""
    if device.type != "cuda":
        return torch.zeros(n, d, dtype=dtype, device=device), lambda: None
    work = _SideWork(device, "zero")
    buf = torch.empty(n, d, dtype=dtype, device=device)  # allocated on the current stream: no record_stream needed
    with work:
        buf.zero_()
    return buf, work.join


def slot_sum(y: torch.Tensor, n: int, k: int, d: int) -> torch.Tensor:
    """(N, D) sums of the k (token, slot) rows of y (N*k, D): one Triton launch (fp32, slots in order)."""
    if k == 1:
        return y.view(n, d)
    out = torch.empty(n, d, dtype=y.dtype, device=y.device)
    br, bd = (16, 32) if interpreting() else (32, 128)
    LAUNCHES["slot_sum"] += 1
    moe_slot_sum_kernel[(triton.cdiv(n, br), triton.cdiv(d, bd))](y, out, n, d, K_SLOTS=k, BR=br, BD=bd,
                                                                  num_warps=4)
    return out


BACKWARD_MODES = {"EFFCONV_MOE_WGRAD": ("auto", "triton", "grouped_mm"),
                  "EFFCONV_MOE_DGRAD": ("auto", "fused", "grouped_mm")}


GROUPED_MIN_INTER = 512  # measured on the H200 (docs/kernels.md): I 1024 / 1536 gain 17-38 %, I 192 none


def grouped_mm_suits(x: torch.Tensor, d: int, inter: int) -> bool:
    """Where torch's grouped GEMM (CUTLASS on sm_90) is the default for the backward GEMMs: CUDA bf16 on a
    Hopper GPU, every row stride a multiple of 16 bytes (its TMA alignment), and experts wide enough
    (I >= GROUPED_MIN_INTER) to pay for the two gathered copies it reads."""
    return (hasattr(torch, "_grouped_mm") and x.device.type == "cuda" and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device)[0] == 9 and d % 8 == 0 and inter % 8 == 0
            and inter >= GROUPED_MIN_INTER)


def backward_plan(x: torch.Tensor, d: int, inter: int) -> tuple[str, str]:
    """(weight-grad GEMMs, dA GEMM + SwiGLU backward): "triton" / "fused" are this file's kernels, "grouped_mm"
    torch._grouped_mm on the expert-sorted rows. EFFCONV_MOE_WGRAD / EFFCONV_MOE_DGRAD override "auto"."""
    plan = []
    for var, choices in BACKWARD_MODES.items():
        mode = os.environ.get(var, "auto") or "auto"
        if mode not in choices:
            raise ValueError(f"{var}={mode!r}: expected one of {', '.join(choices)}")
        if mode == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
            raise ValueError(f"{var}=grouped_mm needs torch._grouped_mm (torch >= 2.8)")
        if mode == "auto":
            mode = "grouped_mm" if grouped_mm_suits(x, d, inter) else choices[1]
        plan.append(mode)
    return plan[0], plan[1]


class MoEExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, top_k_index, top_k_weights, gate_up_proj, down_proj):
        n, d = hidden.shape
        k = top_k_index.shape[1]
        num_experts, two_i, _ = gate_up_proj.shape
        inter = two_i // 2
        m = n * k
        ctx.empty = m == 0
        if m == 0:
            return hidden.new_zeros(n, d)
        x = hidden.contiguous()  # no copies when already contiguous
        w_gu, w_d = gate_up_proj.contiguous(), down_proj.contiguous()
        topw = top_k_weights.contiguous().view(-1)
        bm = block_rows(m, num_experts)
        order, offsets, table = route(top_k_index, num_experts, bm)
        nblk = table.shape[0]
        tune, rk, prec = _autotune_on(m), _rows_key(m, num_experts), _prec(x)
        need_grad = any(ctx.needs_input_grad)
        h = torch.empty(m, inter, dtype=x.dtype, device=x.device)
        gu = torch.empty(m, two_i, dtype=x.dtype, device=x.device) if need_grad else h
        add = slot_add_on(k, x.dtype)
        # with slot adds the down kernel adds into out, filled with zeros beside the up kernel (zeroed(); zeroing
        # inside the up kernel's programs measured slower, docs/kernels.md); else it writes the M rows of y
        y, join = zeroed(n, d, x.dtype, x.device) if add else (torch.empty(m, d, dtype=x.dtype, device=x.device),
                                                               None)
        KERNELS["up"](lambda meta: (nblk * triton.cdiv(inter, meta["BN"]),), x, order, table, w_gu, topw, h, gu, d,
                      inter, k, num_experts, rk, autotune=tune, BM=bm, SAVE_GU=need_grad, PREC=prec)
        if add:
            join()
        KERNELS["down"](lambda meta: (nblk * triton.cdiv(d, meta["BN"]),), h, order, table, w_d, y, d, inter, k,
                        num_experts, rk, autotune=tune, BM=bm, PREC=prec, SLOT_ADD=add)
        out = y if add else slot_sum(y, n, k, d)
        if need_grad:
            ctx.save_for_backward(x, topw, w_gu, w_d, order, offsets, table, h, gu)
            ctx.shape = (n, d, k, num_experts, inter, bm)
            ctx.weights_dtype = top_k_weights.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        if ctx.empty:
            return None, None, None, None, None
        x, topw, w_gu, w_d, order, offsets, table, h, gu = ctx.saved_tensors
        n, d, k, num_experts, inter, bm = ctx.shape
        m, nblk = n * k, table.shape[0]
        tune, rk, prec = _autotune_on(m), _rows_key(m, num_experts), _prec(x)
        wgrad, dgrad = backward_plan(x, d, inter)
        dout = dout.contiguous().to(x.dtype)
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        need_dgu_w, need_dd_w = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        ends = offsets[1:]  # cumulative row ends per expert: torch._grouped_mm's offs
        # token of each sorted row (only the grouped GEMMs read gathered copies; the Triton kernels gather)
        tok = (order // k if k > 1 else order) if "grouped_mm" in (wgrad, dgrad) else None
        # dout rows in sorted order, for the grouped GEMMs (dA and dW_d) that read them
        ds = dout.index_select(0, tok) if dgrad == "grouped_mm" or (wgrad == "grouped_mm" and need_dd_w) else None
        dgu = torch.empty_like(gu)
        d_hidden = d_topw = d_gu = d_down = None

        def grad_down():  # dW_d[e] (D, I) = dout[tok]_e^T (w h)_e
            if wgrad == "grouped_mm":  # per-expert GEMMs over each expert's rows: offs along the contraction
                return torch._grouped_mm(ds.t(), h, offs=ends)
            return _weight_grad(dout, h, order, offsets, d, inter, k, num_experts, m, w_d.dtype, tune, rk,
                                a_gather=True, b_gather=False)

        def grad_gate_up():  # dW_gu[e] (2I, D) = dgu_e^T x[tok]_e
            if wgrad == "grouped_mm":
                return torch._grouped_mm(dgu.t(), x.index_select(0, tok), offs=ends)
            return _weight_grad(dgu, x, order, offsets, 2 * inter, d, k, num_experts, m, w_gu.dtype, tune, rk,
                                a_gather=False, b_gather=True)

        side_mode = wgrad_stream_mode(x.device)
        side = _SideWork(x.device, "wgrad") if side_mode and (need_dd_w or need_dgu_w) else None
        if side is not None and need_dd_w:  # dW_d reads only dout and h: it starts now, beside down_bwd
            with side:
                d_down = grad_down()
            side.outputs.append(d_down)
        add = need_dx and slot_add_on(k, x.dtype)
        if need_dx:  # with slot adds dx is d_hidden itself, zeroed; else the M (token, slot) rows
            dx, join_dx = zeroed(n, d, x.dtype, x.device) if add else (
                torch.empty(m, d, dtype=x.dtype, device=x.device), None)
        if dgrad == "grouped_mm":  # dA = dout[tok] W_d[e] by the grouped GEMM, then the SwiGLU backward kernel
            da = torch._grouped_mm(ds, w_d, offs=ends)
            d_topw = torch.empty(m, dtype=ctx.weights_dtype, device=x.device) if need_dw else dgu
            bm_s, bn_s = (16, 32) if interpreting() else (32, 128 if inter % 128 == 0 else 64)
            LAUNCHES["swiglu_bwd"] += 1
            moe_swiglu_bwd_kernel[(triton.cdiv(m, bm_s),)](da, gu, order, topw, dgu, d_topw, m, inter, BM=bm_s,
                                                           BN=bn_s, DW=need_dw, num_warps=4)
            del da
            d_topw = d_topw.view(n, k) if need_dw else None
            dw_part, n_part, dx_dw = dgu, 0, False
        else:
            dw_part = torch.empty(triton.cdiv(inter, 16), m, dtype=torch.float32, device=x.device)  # BN >= 16
            cfg = KERNELS["down_bwd"](lambda meta: (nblk * triton.cdiv(inter, meta["BN"]),), dout, order, table, w_d,
                                      topw, gu, dgu, dw_part, d, inter, k, num_experts, m, rk, autotune=tune, BM=bm,
                                      PREC=prec, PREFETCH=prefetch_on())
            n_part = triton.cdiv(inter, cfg.kwargs["BN"])  # rows of dw_part written (the chosen BN)
            dx_dw = need_dw
            if need_dw and not need_dx:
                d_topw = dw_part[:n_part].sum(0).view(n, k).to(ctx.weights_dtype)
        if side is not None and side_mode == 2 and need_dgu_w:  # dgu is queued: dW_gu beside dx
            with side:
                d_gu = grad_gate_up()
            side.outputs.append(d_gu)
        if need_dx:
            dtw = torch.empty(m, dtype=ctx.weights_dtype, device=x.device) if dx_dw else dx
            if add:
                join_dx()
            KERNELS["dx"](lambda meta: (nblk * triton.cdiv(d, meta["BN"]),), dgu, order, table, w_gu, dx, dw_part,
                          dtw, d, inter, k, num_experts, m, n_part, rk, autotune=tune, BM=bm, PREC=prec, DW=dx_dw,
                          SLOT_ADD=add)
            d_hidden = dx if add else slot_sum(dx, n, k, d)
            if dx_dw:
                d_topw = dtw.view(n, k)
        if need_dgu_w and d_gu is None:
            d_gu = grad_gate_up()
        if need_dd_w and d_down is None:
            d_down = grad_down()
        if side is not None:
            side.join()
        return d_hidden, None, d_topw, d_gu, d_down


def _weight_grad(a, b, order, offsets, p, q, k, num_experts, m, out_dtype, tune, rk, *, a_gather, b_gather):
    splits = _weight_grad_splits(num_experts, p, q, m, a.device)
    if splits == 1:  # the kernel writes the result in the weights' dtype: no partials, no cast
        out = torch.empty(num_experts, p, q, dtype=out_dtype, device=a.device)
    else:
        out = torch.empty(splits, num_experts, p, q, dtype=torch.float32, device=a.device)
    KERNELS["wgrad"](lambda meta: (triton.cdiv(p, meta["BP"]) * triton.cdiv(q, meta["BQ"]), num_experts, splits),
                     a, b, order, offsets, out, p, q, k, splits, rk, autotune=tune, A_GATHER=a_gather,
                     B_GATHER=b_gather, PREC=_prec(a))
    if splits == 1:
        return out
    res = torch.empty(num_experts, p, q, dtype=out_dtype, device=a.device)
    block = 1024
    LAUNCHES["split_sum"] += 1
    moe_split_sum_kernel[(triton.cdiv(res.numel(), block),)](out, res, res.numel(), SPLITS=splits, BLOCK=block,
                                                             num_warps=4)
    return res


def triton_moe_experts(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj):
    return MoEExpertsFunction.apply(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj)
