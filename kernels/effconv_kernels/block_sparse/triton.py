"""Top-k block-sparse attention in Triton: the selection feeds the block-list flash kernel
(common/block_list_attn.py): each query block visits topk + 1 key blocks, cost O(T block_size (topk + 1))
plus the O(T^2 / block_size^2 * D) scoring.

Selection (same choice as naive.select_key_blocks, 4 launches, no host sync): block sums of K in fp32
(one reduction; ranking by the sum = ranking by the mean, block_size being a power of two the division is
an exact rescale), anchors . sums as one fp32 batched matmul (all G heads of a kv head in one), then one
Triton program per (query-block tile, batch, head) masks the non-earlier blocks and takes the top-k by
repeated arg-max over the row (ties: lowest block), writing the int32 list left-compacted (chosen blocks, own
block, -1) and its length."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common.block_list_attn import block_list_attention
from ..utils import next_pow2


@triton.jit
def topk_block_select_kernel(scores, out, nsel, NB, NBF, KK, BM: tl.constexpr, NKP: tl.constexpr):
    """Row m: the KK best earlier blocks by score (repeated arg-max), then the own block m, then -1 padding
    (left-compacted: rows m < KK have only m earlier blocks); nsel[m] = the number of valid entries."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = tl.arange(0, NKP)
    m_ok = o_m < NB
    cand = m_ok[:, None] & (o_n < NBF)[None, :] & (o_n[None, :] < o_m[:, None])
    row = i_bh.to(tl.int64) * NB + o_m
    sc = tl.load(scores + row[:, None] * NBF + o_n[None, :], mask=cand, other=float("-inf"))
    sc = tl.where(cand, sc, float("-inf"))
    out_row = out + row * (KK + 1)
    n_ok = tl.zeros([BM], dtype=tl.int32)
    for s in range(KK):
        mx = tl.max(sc, 1)
        am = tl.min(tl.where(sc == mx[:, None], o_n[None, :], NKP), 1)
        ok = (mx > float("-inf")) & (am < NBF)  # once false, false for the rest of the row
        # each slot is written once: a chosen block, the own block in the first empty slot, else -1
        tl.store(out_row + s, tl.where(ok, am, tl.where(n_ok == s, o_m, -1)), mask=m_ok)
        n_ok += ok.to(tl.int32)
        sc = tl.where(o_n[None, :] == am[:, None], float("-inf"), sc)
    tl.store(out_row + KK, tl.where(n_ok == KK, o_m, -1), mask=m_ok)
    tl.store(nsel + row, n_ok + 1, mask=m_ok)


@torch.no_grad()
def triton_select_key_blocks(q, k, *, block_size: int, topk: int, with_counts: bool = False):
    """(B, H, nblocks, kk + 1) int32, kk = min(topk, nblocks - 1): the blocks naive.select_key_blocks chooses,
    left-compacted (chosen blocks by decreasing score, own block, then -1); with_counts: also (B, H, nblocks)
    int32 valid entries per list."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    bs = block_size
    nb = -(-t // bs)
    nbf = t // bs  # complete blocks: the only candidates (a partial block is the last, never "earlier")
    kk = min(topk, max(nb - 1, 0))
    if kk == 0:
        idx = torch.arange(nb, device=q.device, dtype=torch.int32).view(1, 1, nb, 1).expand(b, h, nb, 1).contiguous()
        return (idx, torch.ones(b, h, nb, dtype=torch.int32, device=q.device)) if with_counts else idx
    sums = k[:, :, : nbf * bs].reshape(b, hkv, nbf, bs, d).sum(3, dtype=torch.float32)  # (B, Hkv, nbf, D)
    anchors = q[:, :, ::bs].float().reshape(b, hkv, (h // hkv) * nb, d)                 # first query of each block
    scores = torch.matmul(anchors, sums.transpose(-1, -2))                              # (B, Hkv, G*nb, nbf) = (B,H,nb,nbf)
    out = torch.empty(b, h, nb, kk + 1, dtype=torch.int32, device=q.device)
    nsel = torch.empty(b, h, nb, dtype=torch.int32, device=q.device)
    nkp = max(16, next_pow2(nbf))
    bm = max(1, min(16, 4096 // nkp))
    topk_block_select_kernel[(triton.cdiv(nb, bm), b * h)](scores, out, nsel, nb, nbf, kk, BM=bm, NKP=nkp,
                                                          num_warps=4)
    return (out, nsel) if with_counts else out


def triton_block_sparse_attention(q, k, v, *, block_size: int, topk: int, scale: float, idx=None):
    nsel = None  # a given idx is compacted by block_list_attention
    if idx is None:
        idx, nsel = triton_select_key_blocks(q, k, block_size=block_size, topk=topk, with_counts=True)
    t = q.shape[2]
    return block_list_attention(q, k, v, idx, block=block_size, window=t + 1, sinks=0, scale=scale, nsel=nsel)
