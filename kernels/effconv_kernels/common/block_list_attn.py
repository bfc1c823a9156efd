"""Flash attention over a list of key blocks per query block (Triton, forward and backward).

The shared engine of the sparse ops: sparse_window/ (sliding window + sink tokens) and block_sparse/
(dynamic top-k blocks). Each (batch, query head, query block m) visits the nsel[b, h, m] key blocks
idx[b, h, m, :nsel] (lists are left-compacted: valid entries first, -1 after) with the element mask
    j <= i  and  j < T  and  (i - j < window  or  j < sinks),
so block_sparse passes window = T + 1, sinks = 0 (whole selected blocks, causal in the local one).
GQA: query head h reads kv head h // G; K/V are never repeated. Scores, softmax statistics and
accumulators are fp32; the forward saves the row log-sum-exp for the backward.

Backward (FlashAttention-2 layout, no atomics, bitwise deterministic):
  * delta = rowsum(dO * O) once (bla_delta_kernel, fp32);
  * dq: one program per query block walks the same key-block list as the forward (dq in registers);
  * dk/dv: one program per (key block, batch, kv head) walks the *inverse* list, the (query head of the
    group, query block) pairs whose list holds that key block, with dk/dv in registers (fp32), stored once.
The inverse list is CSR, built on the GPU without a host sync (bla_invert_kernel: count, cumsum, fill;
entries in (head, query block) order, so the summation order is fixed). A list shared by every batch row
and head (the sliding window's) is inverted once and each dk/dv program loops over the G query heads of
its kv head. dk/dv programs run longest-list first (a sink key block is seen by every later query block);
for a list built once (plan_split) the longest lists are split over several programs whose fp32 partials
bla_reduce_split_kernel adds in a fixed order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import interpreting, next_pow2


def _patch_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a scalar into a Python int with int(data) on a 1-element array, which
    numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted"), so any `range(n)` over a runtime n
    fails. Triton 3.9 squeezes first; do the same (interpreter only, CPU tests and smoke runs)."""
    try:
        from triton.runtime import interpreter as interp
    except Exception:  # pragma: no cover
        return
    orig = getattr(interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_effconv_index_patch", False):
        return

    def patched(tensor, scope, *a, **kw):
        out = orig(tensor, scope, *a, **kw)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
        return out

    patched._effconv_index_patch = True
    interp._patch_lang_tensor = patched


if interpreting():
    _patch_interpreter_index()


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs: tf32x3 (about fp32 accuracy on tensor cores); 16-bit: plain tensor-core dots, fp32 accumulation
    return "tf32x3" if dtype == torch.float32 else "tf32"


@triton.jit
def block_list_attn_fwd_kernel(
    q, k, v, idx, nsel, o, lse,
    T, H, G, window, sinks, scale,
    s_ib, s_ih, s_im, c_b, c_h,
    D: tl.constexpr, BLOCK: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    Hkv = H // G
    q_base = i_bh.to(tl.int64) * T * D
    kv_base = (i_b * Hkv + i_h // G).to(tl.int64) * T * D
    o_i = i_m * BLOCK + tl.arange(0, BLOCK)
    o_d = tl.arange(0, BD)
    m_i_ok = o_i < T
    m_d = o_d < D
    b_q = tl.load(q + q_base + o_i[:, None] * D + o_d[None, :], mask=m_i_ok[:, None] & m_d[None, :], other=0.0)

    m_run = tl.full([BLOCK], -1e30, dtype=tl.float32)  # finite start: fully masked tiles give p = 0, not NaN
    l_run = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, BD], dtype=tl.float32)
    idx_base = idx + i_b.to(tl.int64) * s_ib + i_h.to(tl.int64) * s_ih + i_m.to(tl.int64) * s_im
    n_sel = tl.load(nsel + i_b.to(tl.int64) * c_b + i_h.to(tl.int64) * c_h + i_m)  # valid entries come first
    for s in range(0, n_sel):
        kb = tl.load(idx_base + s)
        o_j = kb * BLOCK + tl.arange(0, BLOCK)
        m_j_ok = o_j < T
        kv_mask = m_j_ok[:, None] & m_d[None, :]
        b_k = tl.load(k + kv_base + o_j[:, None] * D + o_d[None, :], mask=kv_mask, other=0.0)
        b_v = tl.load(v + kv_base + o_j[:, None] * D + o_d[None, :], mask=kv_mask, other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale
        dist = o_i[:, None] - o_j[None, :]
        allowed = (dist >= 0) & m_j_ok[None, :] & ((dist < window) | (o_j[None, :] < sinks))
        b_s = tl.where(allowed, b_s, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(b_s, 1))
        b_p = tl.exp(b_s - m_new[:, None])
        corr = tl.exp(m_run - m_new)
        l_run = l_run * corr + tl.sum(b_p, 1)
        acc = acc * corr[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
        m_run = m_new
    l_safe = tl.where(l_run > 0, l_run, 1.0)
    b_o = acc / l_safe[:, None]
    tl.store(o + q_base + o_i[:, None] * D + o_d[None, :], b_o.to(o.dtype.element_ty), mask=m_i_ok[:, None] & m_d[None, :])
    tl.store(lse + i_bh.to(tl.int64) * T + o_i, m_run + tl.log(l_safe), mask=m_i_ok)


@triton.jit
def bla_delta_kernel(o, do, delta, T, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """delta[bh, i] = sum_d dO[bh, i, d] * O[bh, i, d] in fp32."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    o_i = i_t * BT + tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    mask = (o_i < T)[:, None] & (o_d < D)[None, :]
    ptr = i_bh.to(tl.int64) * T * D + o_i[:, None] * D + o_d[None, :]
    b_o = tl.load(o + ptr, mask=mask, other=0.0).to(tl.float32)
    b_do = tl.load(do + ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta + i_bh.to(tl.int64) * T + o_i, tl.sum(b_o * b_do, 1), mask=o_i < T)


@triton.jit
def block_list_attn_bwd_dq_kernel(
    q, k, v, do, lse, delta, idx, nsel, dq,
    T, H, G, window, sinks, scale,
    s_ib, s_ih, s_im, c_b, c_h,
    D: tl.constexpr, BLOCK: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    Hkv = H // G
    q_base = i_bh.to(tl.int64) * T * D
    kv_base = (i_b * Hkv + i_h // G).to(tl.int64) * T * D
    o_i = i_m * BLOCK + tl.arange(0, BLOCK)
    o_d = tl.arange(0, BD)
    m_i_ok = o_i < T
    m_d = o_d < D
    q_mask = m_i_ok[:, None] & m_d[None, :]
    b_q = tl.load(q + q_base + o_i[:, None] * D + o_d[None, :], mask=q_mask, other=0.0)
    b_do = tl.load(do + q_base + o_i[:, None] * D + o_d[None, :], mask=q_mask, other=0.0)
    b_lse = tl.load(lse + i_bh.to(tl.int64) * T + o_i, mask=m_i_ok, other=0.0)
    b_delta = tl.load(delta + i_bh.to(tl.int64) * T + o_i, mask=m_i_ok, other=0.0)
    b_dq = tl.zeros([BLOCK, BD], dtype=tl.float32)
    idx_base = idx + i_b.to(tl.int64) * s_ib + i_h.to(tl.int64) * s_ih + i_m.to(tl.int64) * s_im
    n_sel = tl.load(nsel + i_b.to(tl.int64) * c_b + i_h.to(tl.int64) * c_h + i_m)  # valid entries come first
    for s in range(0, n_sel):
        kb = tl.load(idx_base + s)
        o_j = kb * BLOCK + tl.arange(0, BLOCK)
        m_j_ok = o_j < T
        kv_mask = m_j_ok[:, None] & m_d[None, :]
        kv_ptr = kv_base + o_j[:, None] * D + o_d[None, :]
        b_k = tl.load(k + kv_ptr, mask=kv_mask, other=0.0)
        b_v = tl.load(v + kv_ptr, mask=kv_mask, other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale
        dist = o_i[:, None] - o_j[None, :]
        allowed = (dist >= 0) & m_j_ok[None, :] & m_i_ok[:, None] & ((dist < window) | (o_j[None, :] < sinks))
        b_p = tl.where(allowed, tl.exp(b_s - b_lse[:, None]), 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)
    tl.store(dq + q_base + o_i[:, None] * D + o_d[None, :], (b_dq * scale).to(dq.dtype.element_ty), mask=q_mask)


@triton.jit
def block_list_attn_bwd_dkdv_kernel(
    q, k, v, do, lse, delta, inv_end, inv_cnt, inv_ent, order, dk, dv, part_dk, part_dv,
    T, H, G, NQ, NK, BHKV, NSPLIT, window, sinks, scale,
    SHARED: tl.constexpr, SPLIT: tl.constexpr,
    D: tl.constexpr, BLOCK: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):
    """One program per (key block, batch, kv head), longest inverse list first (`order`). SHARED: one list
    for all batch rows and heads (entries = query blocks; loop over the G query heads), else per (b, kv head)
    lists (entries = g * NQ + query block). SPLIT (SHARED only): program (i, s, bhkv) takes every NSPLIT-th
    iteration, from s, of the list of row order[i] and stores its unscaled fp32 dk/dv partial sums in
    part_dk/part_dv[(i * NSPLIT + s) * BHKV + bhkv] (bla_reduce_split_kernel adds them in a fixed order):
    a sink key block's list (every later query block) would otherwise be one long serial program."""
    pid = tl.program_id(0)
    i_s = 0
    if SPLIT:
        bhkv = pid % BHKV
        i_s = (pid // BHKV) % NSPLIT
        i_row = pid // BHKV // NSPLIT
        row = tl.load(order + i_row).to(tl.int32)
        n = row
    elif SHARED:
        row = tl.load(order + pid // BHKV).to(tl.int32)
        bhkv = pid % BHKV
        n = row
    else:
        row = tl.load(order + pid).to(tl.int32)
        bhkv = row // NK
        n = row % NK
    Hkv = H // G
    i_b = bhkv // Hkv
    i_hkv = bhkv % Hkv
    kv_base = bhkv.to(tl.int64) * T * D
    o_j = n * BLOCK + tl.arange(0, BLOCK)
    o_d = tl.arange(0, BD)
    m_j_ok = o_j < T
    m_d = o_d < D
    kv_mask = m_j_ok[:, None] & m_d[None, :]
    kv_ptr = kv_base + o_j[:, None] * D + o_d[None, :]
    b_k = tl.load(k + kv_ptr, mask=kv_mask, other=0.0)
    b_v = tl.load(v + kv_ptr, mask=kv_mask, other=0.0)
    b_dk = tl.zeros([BLOCK, BD], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK, BD], dtype=tl.float32)
    cnt = tl.load(inv_cnt + row)
    start = tl.load(inv_end + row) - cnt
    if SHARED:
        n_iter = cnt * G
    else:
        n_iter = cnt
    if SPLIT:
        it_step = NSPLIT
    else:
        it_step = 1
    for it in range(i_s, n_iter, it_step):
        if SHARED:
            g = it // cnt
            m = tl.load(inv_ent + start + it % cnt)
        else:
            ent = tl.load(inv_ent + start + it)
            g = ent // NQ
            m = ent % NQ
        i_bh = i_b * H + i_hkv * G + g
        q_base = i_bh.to(tl.int64) * T * D
        o_i = m * BLOCK + tl.arange(0, BLOCK)
        m_i_ok = o_i < T
        q_mask = m_i_ok[:, None] & m_d[None, :]
        q_ptr = q_base + o_i[:, None] * D + o_d[None, :]
        b_q = tl.load(q + q_ptr, mask=q_mask, other=0.0)
        b_do = tl.load(do + q_ptr, mask=q_mask, other=0.0)
        b_lse = tl.load(lse + i_bh.to(tl.int64) * T + o_i, mask=m_i_ok, other=0.0)
        b_delta = tl.load(delta + i_bh.to(tl.int64) * T + o_i, mask=m_i_ok, other=0.0)
        # transposed tiles (keys x queries): no transpose of P / dS before the dk/dv dots
        b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * scale
        dist = o_i[None, :] - o_j[:, None]
        allowed = (dist >= 0) & m_j_ok[:, None] & m_i_ok[None, :] & ((dist < window) | (o_j[:, None] < sinks))
        b_pt = tl.where(allowed, tl.exp(b_st - b_lse[None, :]), 0.0)
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PREC)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PREC)
    if SPLIT:
        o_r = tl.arange(0, BLOCK)
        p_ptr = (pid.to(tl.int64) * BLOCK + o_r[:, None]) * BD + o_d[None, :]
        tl.store(part_dk + p_ptr, b_dk)
        tl.store(part_dv + p_ptr, b_dv)
    else:
        tl.store(dk + kv_ptr, (b_dk * scale).to(dk.dtype.element_ty), mask=kv_mask)
        tl.store(dv + kv_ptr, b_dv.to(dv.dtype.element_ty), mask=kv_mask)


@triton.jit
def bla_reduce_split_kernel(part_dk, part_dv, order, dk, dv, T, BHKV, NSPLIT, scale,
                            D: tl.constexpr, BLOCK: tl.constexpr, BD: tl.constexpr):
    """dk/dv of key block order[i] = the sum over s = 0 .. NSPLIT-1 (in this order) of its split partials."""
    i_row, bhkv = tl.program_id(0), tl.program_id(1)
    n = tl.load(order + i_row).to(tl.int32)
    o_r = tl.arange(0, BLOCK)
    o_d = tl.arange(0, BD)
    b_dk = tl.zeros([BLOCK, BD], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK, BD], dtype=tl.float32)
    for s in range(0, NSPLIT):
        pid = (i_row * NSPLIT + s) * BHKV + bhkv
        p_ptr = (pid.to(tl.int64) * BLOCK + o_r[:, None]) * BD + o_d[None, :]
        b_dk += tl.load(part_dk + p_ptr)
        b_dv += tl.load(part_dv + p_ptr)
    o_j = n * BLOCK + o_r
    kv_mask = (o_j < T)[:, None] & (o_d < D)[None, :]
    kv_ptr = bhkv.to(tl.int64) * T * D + o_j[:, None] * D + o_d[None, :]
    tl.store(dk + kv_ptr, (b_dk * scale).to(dk.dtype.element_ty), mask=kv_mask)
    tl.store(dv + kv_ptr, b_dv.to(dv.dtype.element_ty), mask=kv_mask)


@triton.jit
def bla_invert_kernel(
    idx, cnt, end, ent, NQ, NK, GL, NSEL,
    SP: tl.constexpr, BN: tl.constexpr, BE: tl.constexpr, FILL: tl.constexpr,
):
    """Inverse of the block lists idx (BL, HKVL * GL, NQ, NSEL) contiguous: for key block n of list group
    (bl, hkv) (row r = (bl * HKVL + hkv) * NK + n), the entries g * NQ + m of the (g, m) whose list holds n,
    in increasing (g, m). Pass 1 (FILL=False) writes cnt[r]; pass 2 writes ent[end[r] - cnt[r] + ...] where
    end = cumsum(cnt). A key block n is only ever reached from query blocks m >= n (causal lists; a block
    after m would be fully masked anyway), so the scan starts at m = n."""
    i_n, i_grp = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BN + tl.arange(0, BN)
    n_ok = o_n < NK
    o_s = tl.arange(0, SP)
    if FILL:
        base = tl.load(end + i_grp * NK + o_n, mask=n_ok, other=0) - tl.load(cnt + i_grp * NK + o_n, mask=n_ok,
                                                                               other=0)
    else:
        base = tl.zeros([BN], dtype=tl.int32)
    m0 = i_n * BN
    for g in range(0, GL):
        lst = idx + ((i_grp * GL + g).to(tl.int64) * NQ) * NSEL
        for e0 in range(m0, NQ, BE):
            o_m = e0 + tl.arange(0, BE)
            vals = tl.load(lst + o_m[:, None] * NSEL + o_s[None, :], mask=(o_m < NQ)[:, None] & (o_s < NSEL)[None, :],
                           other=-1)
            hit = tl.max((vals[None, :, :] == o_n[:, None, None]).to(tl.int32), 2)  # (BN, BE)
            hit = tl.where(n_ok[:, None], hit, 0)
            if FILL:
                pos = base[:, None] + tl.cumsum(hit, 1) - 1
                val = g * NQ + o_m
                tl.store(ent + pos, tl.broadcast_to(val[None, :], [BN, BE]), mask=hit > 0)
            base += tl.sum(hit, 1)
    if not FILL:
        tl.store(cnt + i_grp * NK + o_n, base, mask=n_ok)


def invert_block_lists(idx: torch.Tensor, nk: int, gl: int):
    """CSR inverse of int32 block lists idx (BL, HKVL * gl, NQ, NSEL) -> (end, cnt, ent, order) with rows
    r = (bl * HKVL + hkv) * nk + n (see bla_invert_kernel) and order = rows by decreasing count (stable).
    No host sync: ent is sized for the worst case (every entry valid)."""
    idx = idx.contiguous()
    bl, hl, nq, nsel = idx.shape
    groups = bl * (hl // gl)
    rows = groups * nk
    cnt = torch.empty(rows, dtype=torch.int32, device=idx.device)
    ent = torch.empty(max(idx.numel(), 1), dtype=torch.int32, device=idx.device)
    sp = max(2, next_pow2(nsel))
    bn = 16
    be = max(1, min(64, 4096 // (bn * sp)))
    grid = (triton.cdiv(nk, bn), groups)
    meta = dict(SP=sp, BN=bn, BE=be, num_warps=4)
    bla_invert_kernel[grid](idx, cnt, cnt, ent, nq, nk, gl, nsel, FILL=False, **meta)
    end = torch.cumsum(cnt, 0, dtype=torch.int32)
    bla_invert_kernel[grid](idx, cnt, end, ent, nq, nk, gl, nsel, FILL=True, **meta)
    order = torch.argsort(cnt, descending=True, stable=True)
    return end, cnt, ent, order, 0, 1


def plan_split(inverse, min_iters: int = 16):
    """For a list built once (host sync allowed): split the rows whose list is over twice the typical length
    (max(min_iters, median count)) into NSPLIT programs each. Returns the inverse with (n_split_rows, NSPLIT);
    the split rows are the first of `order` (the longest lists)."""
    end, cnt, ent, order = inverse[:4]
    c = cnt.cpu().to(torch.int64)
    if c.numel() == 0:
        return end, cnt, ent, order, 0, 1
    ref = max(int(min_iters), int(c.median()))
    nsr = int((c > 2 * ref).sum())
    nsplit = -(-int(c.max()) // ref) if nsr else 1
    return end, cnt, ent, order, nsr, nsplit


def _num_warps(block: int) -> int:
    return 4 if block <= 64 else 8


class BlockListAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, nsel, block, window, sinks, scale, inverse):
        B, H, T, D = q.shape
        G = H // k.shape[1]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        nq = triton.cdiv(T, block)
        assert idx.shape[-2] == nq, (idx.shape, nq)
        o = torch.empty_like(q)
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        idx_full = idx.expand(B, H, *idx.shape[2:])  # stride-0 broadcast, no copy
        s_ib, s_ih, s_im, _ = idx_full.stride()
        c_b, c_h, _ = nsel.expand(B, H, nq).stride()
        grid = (nq, B * H)
        block_list_attn_fwd_kernel[grid](
            q, k, v, idx_full, nsel, o, lse, T, H, G, window, sinks, scale, s_ib, s_ih, s_im, c_b, c_h,
            D=D, BLOCK=block, BD=max(16, next_pow2(D)), PREC=_prec(q.dtype),
            num_warps=_num_warps(block),
        )
        ctx.save_for_backward(q, k, v, o, lse, idx, nsel)
        ctx.cfg = (block, window, sinks, scale)
        ctx.inverse = inverse
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, idx, nsel = ctx.saved_tensors
        block, window, sinks, scale = ctx.cfg
        B, H, T, D = q.shape
        Hkv = k.shape[1]
        G = H // Hkv
        nq = triton.cdiv(T, block)
        BD = max(16, next_pow2(D))
        meta = dict(D=D, BLOCK=block, BD=BD, PREC=_prec(q.dtype), num_warps=_num_warps(block))
        do = do.contiguous().to(q.dtype)
        delta = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        bt = max(16, min(128, 8192 // BD))
        bla_delta_kernel[(triton.cdiv(T, bt), B * H)](o, do, delta, T, D=D, BT=bt, BD=BD, num_warps=4)

        dq = torch.empty_like(q)
        idx_full = idx.expand(B, H, *idx.shape[2:])
        s_ib, s_ih, s_im, _ = idx_full.stride()
        c_b, c_h, _ = nsel.expand(B, H, nq).stride()
        block_list_attn_bwd_dq_kernel[(nq, B * H)](
            q, k, v, do, lse, delta, idx_full, nsel, dq, T, H, G, window, sinks, scale, s_ib, s_ih, s_im, c_b, c_h,
            **meta,
        )

        shared = idx.shape[0] == 1 and idx.shape[1] == 1
        if shared:
            inv = ctx.inverse if ctx.inverse is not None else invert_block_lists(idx, nq, 1)
        else:
            inv = invert_block_lists(idx_full, nq, G)
        end, cnt, ent, order, nsr, nsplit = inv
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        bhkv = B * Hkv
        args = (T, H, G, nq, nq, bhkv)
        if nsr:  # the longest shared lists (sink key blocks), split over nsplit programs each
            part_dk = torch.empty(nsr * nsplit * bhkv, block, BD, dtype=torch.float32, device=q.device)
            part_dv = torch.empty_like(part_dk)
            block_list_attn_bwd_dkdv_kernel[(nsr * nsplit * bhkv,)](
                q, k, v, do, lse, delta, end, cnt, ent, order, dk, dv, part_dk, part_dv, *args, nsplit,
                window, sinks, scale, SHARED=True, SPLIT=True, **meta,
            )
            bla_reduce_split_kernel[(nsr, bhkv)](part_dk, part_dv, order, dk, dv, T, bhkv, nsplit, scale,
                                                 D=D, BLOCK=block, BD=BD, num_warps=4)
        block_list_attn_bwd_dkdv_kernel[((nq - nsr) * bhkv,)](
            q, k, v, do, lse, delta, end, cnt, ent, order[nsr:], dk, dv, dk, dv, *args, 1, window, sinks, scale,
            SHARED=shared, SPLIT=False, **meta,
        )
        return dq, dk, dv, None, None, None, None, None, None, None


def compact_block_lists(idx: torch.Tensor):
    """(idx with its valid entries first, in decreasing block order, -1 after; int32 count of valid entries per
    list). The forward and dq kernels loop over exactly count entries, with no branch in the loop (so Triton
    can pipeline its loads)."""
    idx = idx.to(torch.int32)
    nsel = (idx >= 0).sum(-1, dtype=torch.int32)
    return idx.sort(-1, descending=True).values.contiguous(), nsel.contiguous()


def block_list_attention(q, k, v, idx, *, block: int, window: int, sinks: int, scale: float, nsel=None,
                         inverse=None):
    """q (B,H,T,D), k/v (B,Hkv,T,D), idx (B|1, H|1, ceil(T/block), NSEL) int32 key blocks (-1 = none, any order,
    no block twice in a list).
    nsel: (B|1, H|1, ceil(T/block)) int32 number of valid entries per list when idx is already left-compacted
    (valid entries first), else None (compact_block_lists is applied).
    inverse: invert_block_lists(idx, nq, 1) (optionally through plan_split) of a (1, 1, ...) idx, to reuse
    across calls (the sliding window's)."""
    if v.shape[-1] != q.shape[-1]:
        raise ValueError("the sparse kernels need value head dim == query head dim")
    if idx.shape[0] not in (1, q.shape[0]) or idx.shape[1] not in (1, q.shape[1]):
        raise ValueError(f"idx {tuple(idx.shape)} does not broadcast to (B={q.shape[0]}, H={q.shape[1]}, ...)")
    if nsel is None:
        idx, nsel = compact_block_lists(idx)
    elif idx.dtype != torch.int32:
        idx = idx.to(torch.int32)
    return BlockListAttention.apply(q, k, v, idx, nsel, int(block), int(window), int(sinks), float(scale), inverse)
