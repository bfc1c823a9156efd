"""Oracles for causal linear attention: O(T^2) masked einsum and a token-by-token recurrence.

Everything is computed in fp32 and is differentiable with plain autograd. GQA is handled by
viewing the query heads as (Hkv, G) groups, so kv heads are never copied.

Decay (`log_decay`, (Hkv,) values <= 0, g = exp(log_decay)): the pair (i, j <= i) gets weight g^(i-j), the
initial state g^(i+1) at query i (it sits at position -1), and the state after T tokens is
S_T = g^T S0 + sum_{j<T} g^(T-1-j) fk_j v_j^T ("decayed to the last token it holds"), so the decode
recurrence is S <- g S + fk_t v_t^T, o_t = fq_t S.
"""
from __future__ import annotations

import torch


def _split_state(initial_state):
    if initial_state is None:
        return None, None
    S0, z0 = initial_state
    return S0.float(), z0.float()


def decay_pow(log_decay, exponent, shape):
    """g^exponent = exp(log_decay * exponent) in fp32, log_decay (Hkv,) viewed as `shape` (Hkv where it is -1);
    negative exponents (masked entries) are clamped to 0 so nothing overflows."""
    lam = log_decay.float().reshape(shape)
    return torch.exp(lam * exponent.clamp(min=0).to(lam.device, torch.float32))


def naive_linear_attention(fq, fk, v, *, normalize=True, eps=1e-6, initial_state=None, output_final_state=False,
                           log_decay=None):
    B, H, T, F = fq.shape
    Hkv, Dv = fk.shape[1], v.shape[-1]
    G = H // Hkv
    q = fq.float().reshape(B, Hkv, G, T, F)
    k, vv = fk.float(), v.float()
    pos = torch.arange(T, device=fq.device)
    mask = torch.ones(T, T, dtype=torch.bool, device=fq.device).tril()
    A = torch.einsum("bhgif,bhjf->bhgij", q, k)
    if log_decay is not None:
        A = A * decay_pow(log_decay, pos[:, None] - pos[None, :], (1, Hkv, 1, 1, 1))
    A = A.masked_fill(~mask, 0.0)
    num = torch.einsum("bhgij,bhjd->bhgid", A, vv)
    den = A.sum(-1)
    S0, z0 = _split_state(initial_state)
    if S0 is not None:
        s_num = torch.einsum("bhgif,bhfd->bhgid", q, S0)
        s_den = torch.einsum("bhgif,bhf->bhgi", q, z0)
        if log_decay is not None:
            qd = decay_pow(log_decay, pos + 1, (1, Hkv, 1, 1))  # (1, Hkv, 1, T)
            s_num, s_den = s_num * qd[..., None], s_den * qd
        num, den = num + s_num, den + s_den
    o = num / (den + eps).unsqueeze(-1) if normalize else num
    final = linear_state(k, vv, T, initial_state, log_decay) if output_final_state else None
    return o.reshape(B, H, T, Dv).to(fq.dtype), final


def linear_state(fk, v, L: int, initial_state=None, log_decay=None):
    """(S, z) after the first L tokens of fk (B,Hkv,T,F), v: g^L S0 + sum_{j<L} g^(L-1-j) fk_j v_j^T (fp32)."""
    kk, vv = fk[:, :, :L].float(), v[:, :, :L].float()
    Hkv = fk.shape[1]
    if log_decay is not None:
        kk = kk * decay_pow(log_decay, L - 1 - torch.arange(L, device=fk.device), (1, Hkv, 1))[..., None]
    S = torch.einsum("bhjf,bhjd->bhfd", kk, vv)
    z = kk.sum(2)
    if initial_state is not None:
        S0, z0 = initial_state[0].float(), initial_state[1].float()
        if log_decay is not None:
            gL = decay_pow(log_decay, torch.tensor(L), (1, Hkv))
            S0, z0 = S0 * gL[..., None, None], z0 * gL[..., None]
        S, z = S + S0, z + z0
    return S, z


def linear_decode_step_ref(fq_t, fk_t, v_t, state, *, normalize=True, eps=1e-6, log_decay=None, log_gate=None):
    """One decode step. `state=(S, z)` (fp32) is updated IN PLACE: S = g S + fk_t v_t^T, z = g z + fk_t
    (g = exp(log_decay) per kv head, exp(log_gate) (B, Hkv) per row and kv head, 1 without either)."""
    S, z = state
    B, H, F = fq_t.shape
    Hkv = fk_t.shape[1]
    G = H // Hkv
    k, vv = fk_t.float(), v_t.float()
    if log_decay is not None or log_gate is not None:
        g = torch.exp(log_gate.float()) if log_gate is not None else torch.exp(log_decay.float()).view(1, Hkv)
        S.mul_(g[..., None, None])
        z.mul_(g[..., None])
    S.add_(k.unsqueeze(-1) * vv.unsqueeze(-2))
    z.add_(k)
    q = fq_t.float().reshape(B, Hkv, G, F)
    o = torch.einsum("bhgf,bhfd->bhgd", q, S)
    if normalize:
        o = o / (torch.einsum("bhgf,bhf->bhg", q, z) + eps).unsqueeze(-1)
    return o.reshape(B, H, -1).to(fq_t.dtype), (S, z)


def recurrent_linear_attention_ref(fq, fk, v, *, normalize=True, eps=1e-6, initial_state=None, log_decay=None):
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
        o_t, _ = linear_decode_step_ref(fq[:, :, t], fk[:, :, t], v[:, :, t], (S, z), normalize=normalize, eps=eps,
                                        log_decay=log_decay)
        outs.append(o_t)
    return torch.stack(outs, 2), (S, z)


def naive_gated_linear_attention(fq, fk, v, log_gate, *, normalize=True, eps=1e-6, initial_state=None,
                                 output_final_state=False):
    """O(T^2) fp32 oracle of linear attention with per-token gates (log_gate (B, Hkv, T), values <= 0): key j
    reaches query i >= j with exp(C_i - C_j), C the cumulative log gate; the initial state enters query i with
    exp(C_i); the final state is exp(C_{T-1}) S0 + sum_j exp(C_{T-1} - C_j) fk_j v_j^T. Differentiable."""
    B, H, T, F = fq.shape
    Hkv = fk.shape[1]
    G = H // Hkv
    C = log_gate.float().cumsum(-1)  # (B, Hkv, T)
    Cq = C.repeat_interleave(G, 1)
    w = torch.exp((Cq[..., :, None] - Cq[..., None, :]).masked_fill(
        ~torch.ones(T, T, dtype=torch.bool, device=fq.device).tril(), float("-inf")))
    kk, vv = fk.float().repeat_interleave(G, 1), v.float().repeat_interleave(G, 1)
    A = (fq.float() @ kk.transpose(-1, -2)) * w
    num, den = A @ vv, A.sum(-1)
    if initial_state is not None:
        S0, z0 = (x.float().repeat_interleave(G, 1) for x in initial_state)
        qf = torch.exp(Cq)[..., None]
        num = num + (fq.float() @ S0) * qf
        den = den + (fq.float() @ z0[..., None])[..., 0] * qf[..., 0]
    o = num / (den + eps)[..., None] if normalize else num
    final = None
    if output_final_state:
        last = torch.exp(C[..., -1:] - C)  # (B, Hkv, T)
        S = torch.einsum("bhtf,bhtd->bhfd", fk.float() * last[..., None], v.float())
        z = (fk.float() * last[..., None]).sum(2)
        if initial_state is not None:
            gT = torch.exp(C[..., -1])
            S = S + initial_state[0].float() * gT[..., None, None]
            z = z + initial_state[1].float() * gT[..., None]
        final = (S, z)
    return o.to(v.dtype), final
