"""Chunked sliding-window + linear hybrid attention in pure PyTorch (CPU training reference).

Query chunk n (positions nC..nC+C-1) sees the raw keys of chunks n-d..n with d = ceil((W-1)/C),
which covers its whole window; every older key is summed into the linear state S at boundary
(n-d)C. Memory is O(T*(W+C)) for the scores plus one (F, Dv) state per chunk; no T x T tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn

from ..linear_attn.torch_chunk import _exclusive_cumsum


def _context(x: torch.Tensor, d: int) -> torch.Tensor:
    """(B, Hkv, NT, C, X) -> (B, Hkv, NT, (d+1)C, X): chunk n followed by its d predecessors, oldest first."""
    B, Hkv, NT, C, X = x.shape
    xp = Fn.pad(x, (0, 0, 0, 0, d, 0))  # d zero chunks in front (masked out by j >= 0)
    return torch.cat([xp[:, :, o:o + NT] for o in range(d + 1)], dim=3)


def chunk_hybrid_attention_ref(q, k, v, fq, fk, mix, *, window: int, scale: float, eps=1e-6,
                               initial_state=None, output_final_state=False, chunk_size: int = 64):
    B, H, T, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = H // Hkv
    W = int(window)
    if W < 1:
        raise ValueError("window must be >= 1")
    C = chunk_size
    NT = -(-T // C)
    pad = NT * C - T
    d = min(-(-(W - 1) // C), NT - 1) if NT > 0 else 0  # more context than the sequence is pointless

    def chunks(x, heads_split):
        x = Fn.pad(x.float(), (0, 0, 0, pad))
        return x.reshape(B, Hkv, G, NT, C, x.shape[-1]) if heads_split else x.reshape(B, Hkv, NT, C, x.shape[-1])

    qq, fqq = chunks(q, True), chunks(fq, True)
    kk, vv, ffk = chunks(k, False), chunks(v, False), chunks(fk, False)
    kc, vc, fkc = _context(kk, d), _context(vv, d), _context(ffk, d)

    dev = q.device
    n = torch.arange(NT, device=dev)
    ipos = (n[:, None] * C + torch.arange(C, device=dev)[None, :])[:, :, None]  # (NT, C, 1)
    jpos = ((n[:, None] - d) * C + torch.arange((d + 1) * C, device=dev)[None, :])[:, None, :]  # (NT, 1, Lc)
    win = (jpos <= ipos) & (jpos > ipos - W) & (jpos >= 0)
    lin = (jpos >= 0) & (jpos <= ipos - W)

    s = torch.einsum("bhgncd,bhnjd->bhgncj", qq, kc) * scale
    s = s.masked_fill(~win, float("-inf"))
    m = s.amax(-1, keepdim=True)  # finite: key i itself is always in the context (padded rows too)
    a = torch.exp(s - m)
    b = torch.einsum("bhgncf,bhnjf->bhgncj", fqq, fkc).masked_fill(~lin, 0.0)

    # linear state at boundary max(0, n-d)*C for each query chunk
    Sx = _exclusive_cumsum(torch.einsum("bhncf,bhncd->bhnfd", ffk, vv), 2)
    zx = _exclusive_cumsum(ffk.sum(3), 2)
    if initial_state is not None:
        Sx = Sx + initial_state[0].float().unsqueeze(2)
        zx = zx + initial_state[1].float().unsqueeze(2)
    idx = (n - d).clamp(min=0)
    Sn, zn = Sx[:, :, idx], zx[:, :, idx]

    alpha = torch.sigmoid(mix.float()).reshape(1, Hkv, G, 1, 1)
    beta = 1.0 - alpha
    lin_num = torch.einsum("bhgncj,bhnjd->bhgncd", b, vc) + torch.einsum("bhgncf,bhnfd->bhgncd", fqq, Sn)
    lin_den = b.sum(-1) + torch.einsum("bhgncf,bhnf->bhgnc", fqq, zn)
    num = alpha.unsqueeze(-1) * torch.einsum("bhgncj,bhnjd->bhgncd", a, vc) + beta.unsqueeze(-1) * lin_num
    den = alpha * a.sum(-1) + beta * lin_den + eps
    o = (num / den.unsqueeze(-1)).reshape(B, H, NT * C, Dv)[:, :, :T].to(q.dtype)

    final = None
    if output_final_state:
        L = max(0, T - W)
        S = torch.einsum("bhjf,bhjd->bhfd", fk[:, :, :L].float(), v[:, :, :L].float())
        z = fk[:, :, :L].float().sum(2)
        if initial_state is not None:
            S, z = S + initial_state[0].float(), z + initial_state[1].float()
        final = (S, z)
    return o, final
