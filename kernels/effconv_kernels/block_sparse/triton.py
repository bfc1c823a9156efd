"""Top-k block-sparse attention in Triton: the selection (naive.select_key_blocks, a few small PyTorch ops)
feeds the block-list flash kernel (common/block_list_attn.py): each query block visits topk + 1 key blocks,
cost O(T block_size (topk + 1)) plus the O(T^2 / block_size^2 * D) scoring."""
from __future__ import annotations

from ..common.block_list_attn import block_list_attention
from .naive import select_key_blocks


def triton_block_sparse_attention(q, k, v, *, block_size: int, topk: int, scale: float, idx=None):
    if idx is None:
        idx = select_key_blocks(q, k, block_size=block_size, topk=topk)
    t = q.shape[2]
    return block_list_attention(q, k, v, idx, block=block_size, window=t + 1, sinks=0, scale=scale)
