"""Triton MoE SwiGLU experts, forward and backward: token sort/permute + grouped GEMMs.

Layout (transformers' MixtralExperts): gate_up_proj (E, 2I, D) with gate rows [0, I) and up rows [I, 2I),
down_proj (E, D, I). The N*k (token, slot) assignments are sorted by expert (stable argsort, on the GPU);
rows of the sorted order are cut into row blocks of BM that never straddle two experts, and a block table
(expert, first row, end row) is built with torch ops of fixed size cdiv(N*k, BM) + E, so nothing syncs with
the host and blocks past the last expert exit at once.

Forward (two grouped GEMMs over the sorted rows, x rows gathered by token inside the kernel):
    gu = x[tok] W_gu[e]^T          -> h = silu(g) * u            (gate and up tiles share the x tile)
    y  = w * (h W_d[e]^T)          -> stored at the row's (token, slot) position; out = y.sum(slot)
Backward:
    dA = dout[tok] W_d[e]; dw = <dA, h>; dh = w dA -> dg, du      (one kernel, SwiGLU derivative fused)
    dx = dgu W_gu[e] stored at (token, slot), summed over slots
    dW_gu[e] = dgu_e^T x_e,  dW_d[e] = (w dout[tok])_e^T h_e      (per-expert weight-gradient GEMMs)
All dots accumulate in fp32; sums over slots and over column blocks (dw) are done in a fixed order (no
atomics), so results are deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import interpreting


@triton.jit
def _rows_times_weight(a_ptr, a_row_off, row_mask, stride_ak, w_ptr, stride_wk, stride_wn, cols, col_mask, K,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """acc[BM, BN] = sum_k A[rows, k] * W[k, cols] in fp32; A rows at a_ptr + a_row_off (int64, elements)."""
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    o_k = tl.arange(0, BK)
    for k0 in range(0, K, BK):
        kk = k0 + o_k
        m_k = kk < K
        a = tl.load(a_ptr + a_row_off[:, None] + kk[None, :] * stride_ak, mask=row_mask[:, None] & m_k[None, :],
                    other=0.0)
        w = tl.load(w_ptr + kk[:, None].to(tl.int64) * stride_wk + cols[None, :].to(tl.int64) * stride_wn,
                    mask=m_k[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PREC)
    return acc


@triton.jit
def _block_rows(table, pid, BM: tl.constexpr):
    e = tl.load(table + pid * 3)
    start = tl.load(table + pid * 3 + 1)
    end = tl.load(table + pid * 3 + 2)
    rows = start + tl.arange(0, BM)
    return e, rows, rows < end


@triton.jit
def moe_up_kernel(x, order, table, w_gu, h, gu_out, D, I, K_SLOTS, E,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SAVE_GU: tl.constexpr,
                  PREC: tl.constexpr):
    """h[r, cols] = silu(x[tok_r] Wg[e]^T) * (x[tok_r] Wu[e]^T) for one row block and one column block."""
    pid, pid_n = tl.program_id(0), tl.program_id(1)
    e, rows, m_r = _block_rows(table, pid, BM)
    if e >= E:
        return
    tok = tl.load(order + rows, mask=m_r, other=0) // K_SLOTS
    cols = pid_n * BN + tl.arange(0, BN)
    m_c = cols < I
    x_off = tok.to(tl.int64) * D
    w_base = w_gu + e.to(tl.int64) * 2 * I * D
    # W_gu[e] is (2I, D): W^T[k, n] = W[n, k] -> stride_wk = 1, stride_wn = D
    g = tl.zeros([BM, BN], dtype=tl.float32)
    u = tl.zeros([BM, BN], dtype=tl.float32)
    o_k = tl.arange(0, BK)
    wg_ptr = w_base + cols[None, :].to(tl.int64) * D  # W_gu[e] is (2I, D): gate row n, up row I + n
    for k0 in range(0, D, BK):  # one x tile feeds both the gate and the up dot
        kk = k0 + o_k
        m_k = kk < D
        a = tl.load(x + x_off[:, None] + kk[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)
        m_w = m_k[:, None] & m_c[None, :]
        wg = tl.load(wg_ptr + kk[:, None], mask=m_w, other=0.0)
        wu = tl.load(wg_ptr + I * D + kk[:, None], mask=m_w, other=0.0)
        g = tl.dot(a, wg, g, input_precision=PREC)
        u = tl.dot(a, wu, u, input_precision=PREC)
    hv = g * tl.sigmoid(g) * u
    out_off = rows[:, None].to(tl.int64) * I + cols[None, :]
    m_o = m_r[:, None] & m_c[None, :]
    tl.store(h + out_off, hv.to(h.dtype.element_ty), mask=m_o)
    if SAVE_GU:
        gu_off = rows[:, None].to(tl.int64) * 2 * I + cols[None, :]
        tl.store(gu_out + gu_off, g.to(gu_out.dtype.element_ty), mask=m_o)
        tl.store(gu_out + gu_off + I, u.to(gu_out.dtype.element_ty), mask=m_o)


@triton.jit
def moe_down_kernel(h, order, table, w_d, topw, y, D, I, E,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """y[flat_r, cols] = w_r * (h[r] W_d[e]^T)[cols], written at the row's (token, slot) position flat_r."""
    pid, pid_n = tl.program_id(0), tl.program_id(1)
    e, rows, m_r = _block_rows(table, pid, BM)
    if e >= E:
        return
    flat = tl.load(order + rows, mask=m_r, other=0)
    cols = pid_n * BN + tl.arange(0, BN)
    m_c = cols < D
    # W_d[e] is (D, I): W^T[k, n] = W[n, k]
    acc = _rows_times_weight(h, rows.to(tl.int64) * I, m_r, 1, w_d + e.to(tl.int64) * D * I, 1, I, cols, m_c, I,
                             BM, BN, BK, PREC)
    wr = tl.load(topw + flat, mask=m_r, other=0.0).to(tl.float32)
    acc = acc * wr[:, None]
    tl.store(y + flat[:, None].to(tl.int64) * D + cols[None, :], acc.to(y.dtype.element_ty),
             mask=m_r[:, None] & m_c[None, :])


@triton.jit
def moe_down_bwd_kernel(dout, order, table, w_d, topw, gu, dgu, dw_part, D, I, K_SLOTS, E, M,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """dA = dout[tok] W_d[e] (cols of I); dw partial = <dA, h>; dgu = SwiGLU backward of w * dA."""
    pid, pid_n = tl.program_id(0), tl.program_id(1)
    e, rows, m_r = _block_rows(table, pid, BM)
    if e >= E:
        return
    flat = tl.load(order + rows, mask=m_r, other=0)
    tok = flat // K_SLOTS
    cols = pid_n * BN + tl.arange(0, BN)
    m_c = cols < I
    # W_d[e] is (D, I): used untransposed, stride_wk = I, stride_wn = 1
    da = _rows_times_weight(dout, tok.to(tl.int64) * D, m_r, 1, w_d + e.to(tl.int64) * D * I, I, 1, cols, m_c, D,
                            BM, BN, BK, PREC)
    gu_off = rows[:, None].to(tl.int64) * 2 * I + cols[None, :]
    m_o = m_r[:, None] & m_c[None, :]
    g = tl.load(gu + gu_off, mask=m_o, other=0.0).to(tl.float32)
    u = tl.load(gu + gu_off + I, mask=m_o, other=0.0).to(tl.float32)
    sg = tl.sigmoid(g)
    silu = g * sg
    tl.store(dw_part + pid_n.to(tl.int64) * M + rows, tl.sum(da * silu * u, 1), mask=m_r)
    wr = tl.load(topw + flat, mask=m_r, other=0.0).to(tl.float32)
    dh = da * wr[:, None]
    dg = dh * u * sg * (1.0 + g * (1.0 - sg))
    du = dh * silu
    tl.store(dgu + gu_off, dg.to(dgu.dtype.element_ty), mask=m_o)
    tl.store(dgu + gu_off + I, du.to(dgu.dtype.element_ty), mask=m_o)


@triton.jit
def moe_dx_kernel(dgu, order, table, w_gu, dx, D, I, E,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """dx[flat_r, cols] = dgu[r] W_gu[e] (K = 2I), written at the row's (token, slot) position."""
    pid, pid_n = tl.program_id(0), tl.program_id(1)
    e, rows, m_r = _block_rows(table, pid, BM)
    if e >= E:
        return
    flat = tl.load(order + rows, mask=m_r, other=0)
    cols = pid_n * BN + tl.arange(0, BN)
    m_c = cols < D
    # W_gu[e] is (2I, D): used untransposed, stride_wk = D, stride_wn = 1
    acc = _rows_times_weight(dgu, rows.to(tl.int64) * 2 * I, m_r, 1, w_gu + e.to(tl.int64) * 2 * I * D, D, 1,
                             cols, m_c, 2 * I, BM, BN, BK, PREC)
    tl.store(dx + flat[:, None].to(tl.int64) * D + cols[None, :], acc.to(dx.dtype.element_ty),
             mask=m_r[:, None] & m_c[None, :])


@triton.jit
def moe_weight_grad_kernel(a, b, order, offsets, topw, dw, P, Q, K_SLOTS, SPLITS,
                           A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, SCALE_A: tl.constexpr,
                           BP: tl.constexpr, BQ: tl.constexpr, BR: tl.constexpr, PREC: tl.constexpr):
    """dw[s, e, p, q] = sum over this split's rows r of expert e of A[ra, p] * (w_r) * B[rb, q].

    A is (rows, P), B is (rows, Q); a row is read at its sorted index r or, when *_GATHER, at its token
    order[r] // K_SLOTS. Split s walks the expert's row chunks s, s + SPLITS, ... (partials summed by torch).
    """
    pid_e, pid_pq, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_q = tl.cdiv(Q, BQ)
    pp = (pid_pq // n_q) * BP + tl.arange(0, BP)
    qq = (pid_pq % n_q) * BQ + tl.arange(0, BQ)
    m_p, m_q = pp < P, qq < Q
    start = tl.load(offsets + pid_e)
    end = tl.load(offsets + pid_e + 1)
    acc = tl.zeros([BP, BQ], dtype=tl.float32)
    for r0 in range(start + pid_s * BR, end, SPLITS * BR):
        rows = r0 + tl.arange(0, BR)
        m_r = rows < end
        flat = tl.load(order + rows, mask=m_r, other=0)
        ra = flat // K_SLOTS if A_GATHER else rows
        rb = flat // K_SLOTS if B_GATHER else rows
        at = tl.load(a + ra[:, None].to(tl.int64) * P + pp[None, :], mask=m_r[:, None] & m_p[None, :], other=0.0)
        if SCALE_A:
            wr = tl.load(topw + flat, mask=m_r, other=0.0).to(tl.float32)
            at = (at.to(tl.float32) * wr[:, None]).to(a.dtype.element_ty)
        bt = tl.load(b + rb[:, None].to(tl.int64) * Q + qq[None, :], mask=m_r[:, None] & m_q[None, :], other=0.0)
        acc = tl.dot(tl.trans(at), bt, acc, input_precision=PREC)
    out = dw + (pid_s.to(tl.int64) * tl.num_programs(0) + pid_e) * P * Q
    tl.store(out + pp[:, None].to(tl.int64) * Q + qq[None, :], acc, mask=m_p[:, None] & m_q[None, :])


# Tile sizes: BM rows of the sorted order per block (one expert per block), BN output columns, BK reduction.
BM, BN, BK, WARPS, STAGES = 64, 128, 64, 4, 3
WG_BP, WG_BQ, WG_BR, WG_WARPS = 64, 128, 64, 4
if interpreting():  # the CPU interpreter is slow on big tiles
    BM, BN, BK = 16, 32, 16
    WG_BP, WG_BQ, WG_BR = 16, 32, 16


def _routing(top_k_index: torch.Tensor, num_experts: int, bm: int):
    """Sorted order of the flat (token, slot) assignments, expert row offsets (E+1,) and the block table."""
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
    max_blocks = min(triton.cdiv(m, bm) + num_experts, max(1, m))  # an upper bound: no host sync
    ids = torch.arange(max_blocks, device=flat_expert.device)
    expert = torch.searchsorted(block_end, ids, right=True)
    valid = expert < num_experts
    e_c = expert.clamp(max=num_experts - 1)
    start = offsets[e_c] + (ids - (block_end[e_c] - blocks[e_c])) * bm
    table = torch.stack([expert, start, offsets[e_c + 1]], 1)
    table = torch.where(valid[:, None], table, torch.full_like(table, num_experts)).to(torch.int32).contiguous()
    return order, offsets.to(torch.int32), table


def _prec(t: torch.Tensor) -> str:
    # fp32 inputs get fp32 (`ieee`) dots like torch's default matmul; bf16/fp16 use the tensor cores anyway
    return "ieee" if t.dtype == torch.float32 else "tf32"


def _weight_grad_splits(num_experts: int, tiles: int, device: torch.device) -> int:
    if interpreting() or device.type != "cuda":
        return 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(16, -(-2 * sms // (num_experts * tiles))))


class MoEExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, top_k_index, top_k_weights, gate_up_proj, down_proj):
        n, d = hidden.shape
        k = top_k_index.shape[1]
        num_experts, two_i, _ = gate_up_proj.shape
        inter = two_i // 2
        m = n * k
        x = hidden.contiguous()
        w_gu, w_d = gate_up_proj.contiguous(), down_proj.contiguous()
        topw = top_k_weights.contiguous().reshape(-1)
        ctx.empty = m == 0
        if m == 0:
            return hidden.new_zeros(n, d)
        order, offsets, table = _routing(top_k_index, num_experts, BM)
        need_grad = any(ctx.needs_input_grad)
        h = torch.empty(m, inter, dtype=x.dtype, device=x.device)
        gu = torch.empty(m, two_i, dtype=x.dtype, device=x.device) if need_grad else h
        grid = (table.shape[0], triton.cdiv(inter, BN))
        moe_up_kernel[grid](x, order, table, w_gu, h, gu, d, inter, k, num_experts, BM=BM, BN=BN, BK=BK,
                            SAVE_GU=need_grad, PREC=_prec(x), num_warps=WARPS, num_stages=STAGES)
        y = torch.empty(m, d, dtype=x.dtype, device=x.device)
        grid = (table.shape[0], triton.cdiv(d, BN))
        moe_down_kernel[grid](h, order, table, w_d, topw, y, d, inter, num_experts, BM=BM, BN=BN, BK=BK,
                              PREC=_prec(x), num_warps=WARPS, num_stages=STAGES)
        out = y.view(n, k, d).sum(1) if k > 1 else y.view(n, d)  # fp32 accumulation inside torch's sum
        if need_grad:
            ctx.save_for_backward(x, topw, w_gu, w_d, order, offsets, table, h, gu)
            ctx.shape = (n, d, k, num_experts, inter)
            ctx.weights_dtype = top_k_weights.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        if ctx.empty:
            return None, None, None, None, None
        x, topw, w_gu, w_d, order, offsets, table, h, gu = ctx.saved_tensors
        n, d, k, num_experts, inter = ctx.shape
        m = n * k
        dout = dout.contiguous().to(x.dtype)
        n_iblk = triton.cdiv(inter, BN)
        dgu = torch.empty_like(gu)
        dw_part = torch.empty(n_iblk, m, dtype=torch.float32, device=x.device)
        moe_down_bwd_kernel[(table.shape[0], n_iblk)](dout, order, table, w_d, topw, gu, dgu, dw_part, d, inter, k,
                                                      num_experts, m, BM=BM, BN=BN, BK=BK, PREC=_prec(x), num_warps=WARPS,
                                                      num_stages=STAGES)
        d_hidden = d_topw = d_gu = d_down = None
        if ctx.needs_input_grad[2]:
            dw_sorted = dw_part.sum(0)
            d_topw = torch.empty_like(dw_sorted).index_copy_(0, order.long(), dw_sorted)
            d_topw = d_topw.view(n, k).to(ctx.weights_dtype)
        if ctx.needs_input_grad[0]:
            dx = torch.empty(m, d, dtype=x.dtype, device=x.device)
            moe_dx_kernel[(table.shape[0], triton.cdiv(d, BN))](dgu, order, table, w_gu, dx, d, inter, num_experts,
                                                                BM=BM, BN=BN, BK=BK, PREC=_prec(x), num_warps=WARPS,
                                                                num_stages=STAGES)
            d_hidden = dx.view(n, k, d).sum(1) if k > 1 else dx.view(n, d)
        if ctx.needs_input_grad[3]:  # dW_gu[e] (2I, D) = dgu_e^T x[tok]_e
            d_gu = _weight_grad(dgu, x, order, offsets, topw, 2 * inter, d, k, num_experts, a_gather=False,
                                b_gather=True, scale_a=False).to(w_gu.dtype)
        if ctx.needs_input_grad[4]:  # dW_d[e] (D, I) = (w dout[tok])_e^T h_e
            d_down = _weight_grad(dout, h, order, offsets, topw, d, inter, k, num_experts, a_gather=True,
                                  b_gather=False, scale_a=True).to(w_d.dtype)
        return d_hidden, None, d_topw, d_gu, d_down


def _weight_grad(a, b, order, offsets, topw, p, q, k, num_experts, *, a_gather, b_gather, scale_a):
    tiles = triton.cdiv(p, WG_BP) * triton.cdiv(q, WG_BQ)
    splits = _weight_grad_splits(num_experts, tiles, a.device)
    part = torch.empty(splits, num_experts, p, q, dtype=torch.float32, device=a.device)
    moe_weight_grad_kernel[(num_experts, tiles, splits)](a, b, order, offsets, topw, part, p, q, k, splits,
                                                         A_GATHER=a_gather, B_GATHER=b_gather, SCALE_A=scale_a,
                                                         BP=WG_BP, BQ=WG_BQ, BR=WG_BR, PREC=_prec(a), num_warps=WG_WARPS,
                                                         num_stages=STAGES)
    return part.sum(0) if splits > 1 else part[0]


def triton_moe_experts(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj):
    return MoEExpertsFunction.apply(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj)
