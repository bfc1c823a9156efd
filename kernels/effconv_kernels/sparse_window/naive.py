"""Sliding-window softmax attention with sink (global) tokens: the O(T^2) PyTorch oracle.

Query i attends to keys j <= i with i - j < window (its last `window` tokens, itself included) or j < sinks
(the first `sinks` tokens of the sequence, StreamingLLM-style attention sinks / Longformer global keys).
"""
from __future__ import annotations

import torch


def sliding_window_mask(t: int, window: int, sinks: int, device=None) -> torch.Tensor:
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    return (j <= i) & ((i - j < window) | (j < sinks))


def masked_attention_ref(q, k, v, allowed, scale: float) -> torch.Tensor:
    """fp32 softmax attention under a boolean mask `allowed` (broadcastable to (B, H, T, T)); GQA by grouping
    query heads (no repeated K/V). Output in q's dtype."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    qg = q.float().reshape(b, hkv, h // hkv, t, d)
    s = torch.einsum("bkgid,bkjd->bkgij", qg, k.float()) * scale
    allowed = allowed.expand(b, h, t, t).reshape(b, hkv, h // hkv, t, t)
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    return torch.einsum("bkgij,bkjd->bkgid", p, v.float()).reshape(b, h, t, -1).to(q.dtype)


def naive_sliding_window_attention(q, k, v, *, window: int, sinks: int = 0, scale: float) -> torch.Tensor:
    return masked_attention_ref(q, k, v, sliding_window_mask(q.shape[2], window, sinks, q.device), scale)


def sliding_window_block_list(t: int, block: int, window: int, sinks: int, device=None) -> torch.Tensor:
    """(1, 1, ceil(T/block), NSEL) int32 key blocks each query block visits: the blocks its windows reach,
    then the sink blocks that lie before them (-1 = none). Same for every batch row and head."""
    nq = -(-t // block)
    n_win = -(-max(window - 1, 0) // block) + 1  # window blocks of one query block, its own included
    n_sink = -(-sinks // block)
    m = torch.arange(nq, device=device)[:, None]
    win = m - torch.arange(n_win - 1, -1, -1, device=device)[None, :]
    first_win = (m - n_win + 1).clamp_min(0)
    sink = torch.arange(n_sink, device=device)[None, :].expand(nq, -1)
    sink = torch.where(sink < first_win, sink, torch.full_like(sink, -1))
    idx = torch.cat([sink, torch.where(win >= 0, win, torch.full_like(win, -1))], dim=1)
    return idx.to(torch.int32)[None, None]
