"""Sliding-window + sink attention in Triton: each query block visits only the key blocks its window
reaches plus the sink blocks (common/block_list_attn.py), so the cost is O(T (window + sinks))."""
from __future__ import annotations

from ..common.block_list_attn import block_list_attention
from .naive import sliding_window_block_list


def block_for(t: int) -> int:
    return 64 if t > 32 else 16


def triton_sliding_window_attention(q, k, v, *, window: int, sinks: int = 0, scale: float, block: int | None = None):
    t = q.shape[2]
    block = block or block_for(t)
    idx = sliding_window_block_list(t, block, window, sinks, q.device)
    return block_list_attention(q, k, v, idx, block=block, window=window, sinks=sinks, scale=scale)
