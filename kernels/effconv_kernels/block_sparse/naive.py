"""Dynamic top-k block-sparse attention: block selection and the O(T^2) PyTorch oracle.

The sequence is cut into blocks of `block_size` tokens. Keys are mean-pooled per block. Query block m is
represented by its first query (its "anchor", position m * block_size) and attends to
  * the `topk` earlier key blocks j < m with the highest anchor . pooled-key score (all of them if m <= topk),
  * its own block m, causally (j <= i).
Scoring with the block's first query rather than the mean of its queries keeps the choice causal: it is
known when the block's first token arrives, so token-by-token decoding makes the same choice as the
parallel forward. Selection is per query head (GQA: against the pooled keys of its kv head) and is not
differentiated (gradients flow through the attention to the chosen keys, not through the choice).
"""
from __future__ import annotations

import torch

from ..sparse_window.naive import masked_attention_ref


@torch.no_grad()
def select_key_blocks(q, k, *, block_size: int, topk: int) -> torch.Tensor:
    """(B, H, nblocks, topk + 1) int32: the chosen earlier key blocks (-1 = none), then the block itself."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    nb = -(-t // block_size)
    pad = nb * block_size - t
    kp = torch.nn.functional.pad(k.float(), (0, 0, 0, pad)).reshape(b, hkv, nb, block_size, d)
    counts = torch.full((nb,), float(block_size), device=k.device)
    counts[-1] = block_size - pad
    pooled = kp.sum(3) / counts[:, None]  # (B, Hkv, nb, D); only complete blocks are ever candidates
    anchors = q[:, :, ::block_size].float().reshape(b, hkv, h // hkv, nb, d)
    scores = torch.einsum("bkgmd,bknd->bkgmn", anchors, pooled).reshape(b, h, nb, nb)
    m = torch.arange(nb, device=q.device)
    earlier = m[None, :] < m[:, None]
    scores = scores.masked_fill(~earlier, float("-inf"))
    kk = min(topk, max(nb - 1, 0))
    own = m.view(1, 1, nb, 1).expand(b, h, nb, 1)
    if kk == 0:
        return own.to(torch.int32).contiguous()
    top_scores, top_idx = scores.topk(kk, dim=-1)
    top_idx = torch.where(torch.isfinite(top_scores), top_idx, torch.full_like(top_idx, -1))
    return torch.cat([top_idx, own], dim=-1).to(torch.int32).contiguous()


def block_sparse_mask(idx: torch.Tensor, t: int, block_size: int) -> torch.Tensor:
    """(B, H, T, T) bool mask of a block selection `idx` (causal inside the own block)."""
    b, h, nb, _ = idx.shape
    chosen = torch.zeros(b, h, nb, nb + 1, dtype=torch.bool, device=idx.device)
    chosen.scatter_(-1, idx.long().clamp_min(-1) % (nb + 1), True)  # -1 lands in the spare column nb
    chosen = chosen[..., :nb]
    blk = torch.arange(t, device=idx.device) // block_size
    allowed = chosen[:, :, blk][:, :, :, blk]
    causal = torch.ones(t, t, dtype=torch.bool, device=idx.device).tril()
    return allowed & causal


def naive_block_sparse_attention(q, k, v, *, block_size: int, topk: int, scale: float, idx=None):
    if idx is None:
        idx = select_key_blocks(q, k, block_size=block_size, topk=topk)
    return masked_attention_ref(q, k, v, block_sparse_mask(idx, q.shape[2], block_size), scale)
