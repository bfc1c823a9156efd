"""Oracles for causal linear attention: O(T^2) masked einsum and a token-by-token recurrence.

Everything is computed in fp32 and is differentiable with plain autograd. GQA is handled by
viewing the query heads as (Hkv, G) groups, so kv heads are never copied.
"""
from __future__ import annotations

import torch


def _split_state(initial_state):
    if initial_state is None:
        return None, None
    S0, z0 = initial_state
    return S0.float(), z0.float()


def naive_linear_attention(fq, fk, v, *, normalize=True, eps=1e-6, initial_state=None, output_final_state=False):
    B, H, T, F = fq.shape
    Hkv, Dv = fk.shape[1], v.shape[-1]
    G = H // Hkv
    q = fq.float().reshape(B, Hkv, G, T, F)
    k, vv = fk.float(), v.float()
    mask = torch.ones(T, T, dtype=torch.bool, device=fq.device).tril()
    A = torch.einsum("bhgif,bhjf->bhgij", q, k).masked_fill(~mask, 0.0)
    num = torch.einsum("bhgij,bhjd->bhgid", A, vv)
    den = A.sum(-1)
    S0, z0 = _split_state(initial_state)
    if S0 is not None:
        num = num + torch.einsum("bhgif,bhfd->bhgid", q, S0)
        den = den + torch.einsum("bhgif,bhf->bhgi", q, z0)
    o = num / (den + eps).unsqueeze(-1) if normalize else num
    final = None
    if output_final_state:
        S = torch.einsum("bhjf,bhjd->bhfd", k, vv)
        z = k.sum(2)
        if S0 is not None:
            S, z = S + S0, z + z0
        final = (S, z)
    return o.reshape(B, H, T, Dv).to(fq.dtype), final


def linear_decode_step_ref(fq_t, fk_t, v_t, state, *, normalize=True, eps=1e-6):
    """One decode step. `state=(S, z)` (fp32) is updated IN PLACE: S += fk_t v_t^T, z += fk_t."""
    S, z = state
    B, H, F = fq_t.shape
    Hkv = fk_t.shape[1]
    G = H // Hkv
    k, vv = fk_t.float(), v_t.float()
    S.add_(k.unsqueeze(-1) * vv.unsqueeze(-2))
    z.add_(k)
    q = fq_t.float().reshape(B, Hkv, G, F)
    o = torch.einsum("bhgf,bhfd->bhgd", q, S)
    if normalize:
        o = o / (torch.einsum("bhgf,bhf->bhg", q, z) + eps).unsqueeze(-1)
    return o.reshape(B, H, -1).to(fq_t.dtype), (S, z)


def recurrent_linear_attention_ref(fq, fk, v, *, normalize=True, eps=1e-6, initial_state=None):
    """Token-by-token loop over `linear_decode_step_ref` (the decode oracle). Returns (o, (S, z))."""
    B, H, T, F = fq.shape
    Hkv, Dv = fk.shape[1], v.shape[-1]
    if initial_state is None:
        S = fq.new_zeros(B, Hkv, F, Dv, dtype=torch.float32)
        z = fq.new_zeros(B, Hkv, F, dtype=torch.float32)
    else:
        S, z = initial_state[0].float().clone(), initial_state[1].float().clone()
    outs = []
    for t in range(T):
        o_t, _ = linear_decode_step_ref(fq[:, :, t], fk[:, :, t], v[:, :, t], (S, z), normalize=normalize, eps=eps)
        outs.append(o_t)
    return torch.stack(outs, 2), (S, z)
