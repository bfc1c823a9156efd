"""Chunked causal linear attention in pure PyTorch: the memory-friendly reference for CPU training.

Memory is O(T*C) for the intra-chunk scores plus one (F, Dv) state per chunk, instead of the
O(T^2) score matrix of naive.py. Computed in fp32 with autograd doing the backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn


def _exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    # state *before* each chunk; built by concatenation (not cumsum - x) so no cancellation error
    c = x.cumsum(dim)
    zero = torch.zeros_like(x.narrow(dim, 0, 1))
    return torch.cat([zero, c.narrow(dim, 0, x.shape[dim] - 1)], dim)


def chunk_linear_attention_ref(fq, fk, v, *, normalize=True, eps=1e-6, initial_state=None,
                               output_final_state=False, chunk_size: int = 64):
    B, H, T, F = fq.shape
    Hkv, Dv = fk.shape[1], v.shape[-1]
    G = H // Hkv
    C = chunk_size
    NT = -(-T // C)
    pad = NT * C - T
    # zero padding at the end: padded keys add nothing, padded query rows are sliced off
    q = Fn.pad(fq.float(), (0, 0, 0, pad)).reshape(B, Hkv, G, NT, C, F)
    k = Fn.pad(fk.float(), (0, 0, 0, pad)).reshape(B, Hkv, NT, C, F)
    vv = Fn.pad(v.float(), (0, 0, 0, pad)).reshape(B, Hkv, NT, C, Dv)

    kv = torch.einsum("bhncf,bhncd->bhnfd", k, vv)
    S = _exclusive_cumsum(kv, 2)
    z = _exclusive_cumsum(k.sum(3), 2)
    if initial_state is not None:
        S = S + initial_state[0].float().unsqueeze(2)
        z = z + initial_state[1].float().unsqueeze(2)

    tril = torch.ones(C, C, dtype=torch.bool, device=fq.device).tril()
    A = torch.einsum("bhgncf,bhnsf->bhgncs", q, k).masked_fill(~tril, 0.0)
    num = torch.einsum("bhgncf,bhnfd->bhgncd", q, S) + torch.einsum("bhgncs,bhnsd->bhgncd", A, vv)
    if normalize:
        den = torch.einsum("bhgncf,bhnf->bhgnc", q, z) + A.sum(-1)
        num = num / (den + eps).unsqueeze(-1)
    o = num.reshape(B, H, NT * C, Dv)[:, :, :T].to(fq.dtype)

    final = None
    if output_final_state:
        final = (S[:, :, -1] + kv[:, :, -1], z[:, :, -1] + k[:, :, -1].sum(2))
    return o, final
