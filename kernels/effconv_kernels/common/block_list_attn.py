"""Flash attention over a list of key blocks per query block (Triton, forward and backward).

The shared engine of the sparse ops: sparse_window/ (sliding window + sink tokens) and block_sparse/
(dynamic top-k blocks). Each (batch, query head, query block m) visits the key blocks idx[b, h, m, :]
(-1 = skip) with the element mask
    j <= i  and  j < T  and  (i - j < window  or  j < sinks),
so block_sparse passes window = T + 1, sinks = 0 (whole selected blocks, causal in the local one).
GQA: query head h reads kv head h // G; K/V are never repeated. Scores, softmax statistics and
accumulators are fp32; the forward saves the row log-sum-exp for the backward.

Backward: one program per query block, like the forward: dq is accumulated in registers, dk/dv of each
visited key block are atomically added into fp32 buffers (a key block is reached from several query
blocks and, with GQA, from G heads), then cast to the input dtype. The atomics make dk/dv summation
order (and so their last bits) run-dependent.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import next_pow2


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs: tf32x3 (about fp32 accuracy on tensor cores); 16-bit: plain tensor-core dots, fp32 accumulation
    return "tf32x3" if dtype == torch.float32 else "tf32"


@triton.jit
def block_list_attn_fwd_kernel(
    q, k, v, idx, o, lse,
    T, H, G, NSEL, window, sinks, scale,
    s_ib, s_ih, s_im,
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
    for s in range(NSEL):
        kb = tl.load(idx_base + s)
        if kb >= 0:
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
def block_list_attn_bwd_kernel(
    q, k, v, do, lse, delta, idx, dq, dk, dv,
    T, H, G, NSEL, window, sinks, scale,
    s_ib, s_ih, s_im,
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
    for s in range(NSEL):
        kb = tl.load(idx_base + s)
        if kb >= 0:
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
            b_dv = tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision=PREC)
            b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
            b_ds = b_p * (b_dp - b_delta[:, None])
            b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)
            b_dk = tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q, input_precision=PREC) * scale
            tl.atomic_add(dv + kv_ptr, b_dv, mask=kv_mask)
            tl.atomic_add(dk + kv_ptr, b_dk, mask=kv_mask)
    tl.store(dq + q_base + o_i[:, None] * D + o_d[None, :], (b_dq * scale).to(dq.dtype.element_ty), mask=q_mask)


def _num_warps(block: int) -> int:
    return 4 if block <= 64 else 8


class BlockListAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, block, window, sinks, scale):
        B, H, T, D = q.shape
        G = H // k.shape[1]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        nq = triton.cdiv(T, block)
        assert idx.shape[-2] == nq, (idx.shape, nq)
        o = torch.empty_like(q)
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        s_ib, s_ih, s_im, _ = idx.stride()
        grid = (nq, B * H)
        block_list_attn_fwd_kernel[grid](
            q, k, v, idx, o, lse, T, H, G, idx.shape[-1], window, sinks, scale, s_ib, s_ih, s_im,
            D=D, BLOCK=block, BD=max(16, next_pow2(D)), PREC=_prec(q.dtype), num_warps=_num_warps(block),
        )
        ctx.save_for_backward(q, k, v, o, lse, idx)
        ctx.cfg = (block, window, sinks, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, idx = ctx.saved_tensors
        block, window, sinks, scale = ctx.cfg
        B, H, T, D = q.shape
        G = H // k.shape[1]
        do = do.contiguous().to(q.dtype)
        delta = (do.float() * o.float()).sum(-1).contiguous()  # rowsum(dO * O), fp32
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        s_ib, s_ih, s_im, _ = idx.stride()
        grid = (triton.cdiv(T, block), B * H)
        block_list_attn_bwd_kernel[grid](
            q, k, v, do, lse, delta, idx, dq, dk, dv, T, H, G, idx.shape[-1], window, sinks, scale,
            s_ib, s_ih, s_im,
            D=D, BLOCK=block, BD=max(16, next_pow2(D)), PREC=_prec(q.dtype), num_warps=_num_warps(block),
        )
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def block_list_attention(q, k, v, idx, *, block: int, window: int, sinks: int, scale: float):
    """q (B,H,T,D), k/v (B,Hkv,T,D), idx (B|1, H|1, ceil(T/block), NSEL) int32 key blocks (-1 = none)."""
    if v.shape[-1] != q.shape[-1]:
        raise ValueError("the sparse kernels need value head dim == query head dim")
    if idx.dtype != torch.int32:
        idx = idx.to(torch.int32)
    idx = idx.expand(q.shape[0], q.shape[1], *idx.shape[2:])  # stride-0 broadcast, no copy
    return BlockListAttention.apply(q, k, v, idx, int(block), int(window), int(sinks), float(scale))
