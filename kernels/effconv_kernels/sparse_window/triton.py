"""Sliding-window + sink attention in Triton: each query block visits only the key blocks its window
reaches plus the sink blocks (common/block_list_attn.py), so the cost is O(T (window + sinks)).

The block list and its inverse (for the dk/dv backward: the query blocks that see each key block, a
contiguous range plus, for a sink key block, every later query block) depend only on (T, block, window,
sinks), so they are built once per device and cached: a call launches only the attention kernels. The
sink key blocks' lists (all later query blocks) are split over several dk/dv programs (plan_split, decided
once on the host) so that they do not run as one long serial tail."""
from __future__ import annotations

from ..common.block_list_attn import block_list_attention, compact_block_lists, invert_block_lists, plan_split
from .naive import sliding_window_block_list

_LISTS: dict = {}
_MAX_CACHED = 64


def block_for(t: int) -> int:
    return 64 if t > 32 else 16


def cached_block_lists(t: int, block: int, window: int, sinks: int, device):
    """(idx (1, 1, nq, NSEL) int32 left-compacted, nsel (1, 1, nq), inverse CSR lists + split plan) for these
    settings, built on `device` once."""
    key = (t, block, window, sinks, str(device))
    hit = _LISTS.get(key)
    if hit is None:
        if len(_LISTS) >= _MAX_CACHED:
            _LISTS.pop(next(iter(_LISTS)))
        idx, nsel = compact_block_lists(sliding_window_block_list(t, block, window, sinks, device))
        hit = (idx, nsel, plan_split(invert_block_lists(idx, idx.shape[2], 1)))
        _LISTS[key] = hit
    return hit


def triton_sliding_window_attention(q, k, v, *, window: int, sinks: int = 0, scale: float, block: int | None = None):
    t = q.shape[2]
    block = block or block_for(t)
    idx, nsel, inverse = cached_block_lists(t, block, window, sinks, q.device)
    return block_list_attention(q, k, v, idx, block=block, window=window, sinks=sinks, scale=scale, nsel=nsel,
                                inverse=inverse)
