"""Hedgehog feature map in Triton, forward and backward: [softmax(z), softmax(-z)], z = x W_h + b_h per head.

Replaces a chain of PyTorch ops (fp32 upcast, einsum, bias add, two softmaxes, negation, cat, cast back),
each a full pass over a (B,H,T,P) fp32 tensor, by one read of x and one write of the features.

Forward: one program per (BT rows, batch*head). The projection is an fp32 `ieee` dot (what torch does for
fp32 matmuls with TF32 off), both softmaxes in fp32 registers, the output written in `out_dtype`.
Backward: the softmaxes are recomputed from x and W (cheaper than saving fp32 features, and exact), then
    dz = s1 * (g1 - <g1, s1>) - s2 * (g2 - <g2, s2>),  dx = dz W^T,  dW = sum x^T dz,  db = sum dz.
One program per (split, head) walks its share of the row blocks, so dW and db are summed in registers
and written once per program (fixed order, no atomics: deterministic); torch sums the few splits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import interpreting, next_pow2


@triton.jit
def _hedgehog_scores(x, w, b, i_b, i_h, rows, sxb, sxh, sxt, sxd, T,
                     D: tl.constexpr, P: tl.constexpr, BD: tl.constexpr, BP: tl.constexpr,
                     HAS_BIAS: tl.constexpr, PREC: tl.constexpr):
    """Load x rows and W_h, return (x fp32, W fp32, s1 = softmax(z), s2 = softmax(-z)) with masked tails."""
    o_d = tl.arange(0, BD)
    o_p = tl.arange(0, BP)
    m_t, m_d, m_p = rows < T, o_d < D, o_p < P
    x_ptr = x + i_b.to(tl.int64) * sxb + i_h.to(tl.int64) * sxh + rows[:, None].to(tl.int64) * sxt + o_d[None, :] * sxd
    b_x = tl.load(x_ptr, mask=m_t[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    b_w = tl.load(w + i_h * D * P + o_d[:, None] * P + o_p[None, :], mask=m_d[:, None] & m_p[None, :],
                  other=0.0).to(tl.float32)
    z = tl.dot(b_x, b_w, input_precision=PREC)
    if HAS_BIAS:
        z += tl.load(b + i_h * P + o_p, mask=m_p, other=0.0).to(tl.float32)[None, :]
    zp = tl.where(m_p[None, :], z, float("-inf"))
    zn = tl.where(m_p[None, :], -z, float("-inf"))
    e1 = tl.exp(zp - tl.max(zp, 1)[:, None])
    e2 = tl.exp(zn - tl.max(zn, 1)[:, None])
    s1 = e1 / tl.sum(e1, 1)[:, None]
    s2 = e2 / tl.sum(e2, 1)[:, None]
    return b_x, b_w, s1, s2


@triton.jit
def hedgehog_fwd_kernel(x, w, b, out, T, H, sxb, sxh, sxt, sxd,
                        D: tl.constexpr, P: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BP: tl.constexpr,
                        HAS_BIAS: tl.constexpr, PREC: tl.constexpr):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    rows = i_t * BT + tl.arange(0, BT)
    _, _, s1, s2 = _hedgehog_scores(x, w, b, i_b, i_h, rows, sxb, sxh, sxt, sxd, T, D, P, BD, BP, HAS_BIAS, PREC)
    o_p = tl.arange(0, BP)
    mask = (rows < T)[:, None] & (o_p < P)[None, :]
    o_ptr = out + (i_bh.to(tl.int64) * T + rows[:, None].to(tl.int64)) * (2 * P) + o_p[None, :]
    tl.store(o_ptr, s1.to(out.dtype.element_ty), mask=mask)
    tl.store(o_ptr + P, s2.to(out.dtype.element_ty), mask=mask)


@triton.jit
def hedgehog_bwd_kernel(x, w, b, dout, dx, dw_part, db_part, T, H, NT, NBLK, NSPLIT,
                        sxb, sxh, sxt, sxd,
                        D: tl.constexpr, P: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BP: tl.constexpr,
                        HAS_BIAS: tl.constexpr, STORE_DX: tl.constexpr, PREC: tl.constexpr):
    i_s, i_h = tl.program_id(0), tl.program_id(1)
    o_d = tl.arange(0, BD)
    o_p = tl.arange(0, BP)
    m_d, m_p = o_d < D, o_p < P
    acc_w = tl.zeros([BD, BP], dtype=tl.float32)
    acc_b = tl.zeros([BP], dtype=tl.float32)
    for blk in range(i_s, NBLK, NSPLIT):
        i_b = blk // NT
        rows = (blk % NT) * BT + tl.arange(0, BT)
        m_t = rows < T
        b_x, b_w, s1, s2 = _hedgehog_scores(x, w, b, i_b, i_h, rows, sxb, sxh, sxt, sxd, T, D, P, BD, BP, HAS_BIAS, PREC)
        row64 = (i_b.to(tl.int64) * H + i_h) * T + rows[:, None].to(tl.int64)
        g_ptr = dout + row64 * (2 * P) + o_p[None, :]
        g_mask = m_t[:, None] & m_p[None, :]
        g1 = tl.load(g_ptr, mask=g_mask, other=0.0).to(tl.float32)
        g2 = tl.load(g_ptr + P, mask=g_mask, other=0.0).to(tl.float32)
        # padded rows have g = 0 and padded columns s = 0, so dz is 0 there
        dz = s1 * (g1 - tl.sum(g1 * s1, 1)[:, None]) - s2 * (g2 - tl.sum(g2 * s2, 1)[:, None])
        if STORE_DX:  # attention transfer computes q and k without grad: no dx needed there
            b_dx = tl.dot(dz, tl.trans(b_w), input_precision=PREC)
            tl.store(dx + row64 * D + o_d[None, :], b_dx.to(dx.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])
        acc_w += tl.dot(tl.trans(b_x), dz, input_precision=PREC)
        acc_b += tl.sum(dz, 0)
    part = i_s * H + i_h
    tl.store(dw_part + part * D * P + o_d[:, None] * P + o_p[None, :], acc_w, mask=m_d[:, None] & m_p[None, :])
    if HAS_BIAS:
        tl.store(db_part + part * P + o_p, acc_b, mask=m_p)


def _block_sizes(d: int, p: int) -> tuple[int, int]:
    return max(16, next_pow2(d)), max(16, next_pow2(p))


# Row block, warps and dot precision from bench/stage1_throughput.py --feature-map-sweep on the H100 (q map of
# SmolLM2-135M, 32 x 1024 tokens, 9 heads, D = P = 64, bf16): forward 0.11 ms (64 rows/4 warps: 0.21 ms),
# backward 0.34 ms (64/8: 0.39 ms); tf32x3 dots were no faster than fp32 `ieee` ones, so the math stays fp32.
FWD_BT, FWD_WARPS = 32, 4
BWD_BT, BWD_WARPS = 16, 4
DOT_PREC = "ieee"


def _num_splits(n_blocks: int, heads: int, device: torch.device) -> int:
    if interpreting() or device.type != "cuda":
        return min(n_blocks, 3)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_blocks, -(-4 * sms // heads)))


class HedgehogFeatureMapFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, out_dtype):
        bsz, h, t, d = x.shape
        p = weight.shape[-1]
        bd, bp = _block_sizes(d, p)
        w = weight.contiguous()
        b = bias.contiguous() if bias is not None else w  # dummy pointer when there is no bias
        out = torch.empty(bsz, h, t, 2 * p, dtype=out_dtype, device=x.device)
        if t > 0 and bsz > 0:
            grid = (triton.cdiv(t, FWD_BT), bsz * h)
            hedgehog_fwd_kernel[grid](x, w, b, out, t, h, *x.stride(), D=d, P=p, BT=FWD_BT, BD=bd, BP=bp,
                                      HAS_BIAS=bias is not None, PREC=DOT_PREC, num_warps=FWD_WARPS)
        ctx.save_for_backward(x, w, bias)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w, bias = ctx.saved_tensors
        bsz, h, t, d = x.shape
        p = w.shape[-1]
        bd, bp = _block_sizes(d, p)
        dout = dout.contiguous()
        nt = triton.cdiv(t, BWD_BT)
        n_blocks = bsz * nt
        need_dx = ctx.needs_input_grad[0]
        dx = torch.empty(bsz, h, t, d, dtype=x.dtype, device=x.device) if need_dx else None
        if n_blocks == 0:
            dw = torch.zeros_like(w)
            db = torch.zeros_like(bias) if bias is not None else None
            return dx, dw, db, None
        splits = _num_splits(n_blocks, h, x.device)
        dw_part = torch.empty(splits, h, d, p, dtype=torch.float32, device=x.device)
        db_part = torch.empty(splits, h, p, dtype=torch.float32, device=x.device) if bias is not None else dw_part
        b = bias.contiguous() if bias is not None else w
        dx_arg = dx if need_dx else dw_part  # unused pointer when STORE_DX is off
        hedgehog_bwd_kernel[(splits, h)](x, w, b, dout, dx_arg, dw_part, db_part, t, h, nt, n_blocks, splits,
                                         *x.stride(), D=d, P=p, BT=BWD_BT, BD=bd, BP=bp,
                                         HAS_BIAS=bias is not None, STORE_DX=need_dx, PREC=DOT_PREC, num_warps=BWD_WARPS)
        dw = dw_part.sum(0).to(w.dtype)
        db = db_part.sum(0).to(bias.dtype) if bias is not None else None
        return dx, dw, db, None


def triton_hedgehog_feature_map(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    return HedgehogFeatureMapFunction.apply(x, weight, bias, out_dtype or x.dtype)
