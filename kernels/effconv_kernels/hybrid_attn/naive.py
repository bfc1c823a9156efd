"""Oracles for the LoLCATs sliding-window + linear hybrid attention.

`naive_hybrid_attention` is the O(T^2) masked formulation in fp32 (autograd gives the backward,
including the gradient through the window max m_i, exactly as the LoLCATs reference code does).
`hybrid_decode_step_ref` / `recurrent_hybrid_attention_ref` are the token-by-token decode oracles.

Decay (`log_decay`, (Hkv,) values <= 0, g = exp(log_decay)) applies to the linear part only: linear key
j <= i - W gets g^(i-j), the initial state g^(i+1) (it sits at position -1). The final state holds the
L = max(0, T-W) tokens that have left the window, decayed to the last of them:
S = g^L S0 + sum_{j<L} g^(L-1-j) fk_j v_j^T (the linear op's state after L tokens). The decode cache holds
the same state, so query t reads it with g^min(W, t+1) and an eviction is S <- g S + fk_{t-W} v_{t-W}^T.
"""
from __future__ import annotations

import torch

from ..linear_attn.naive import decay_pow, linear_state
from .cache import HybridDecodeCache


def naive_hybrid_attention(q, k, v, fq, fk, mix, *, window: int, scale: float, eps=1e-6,
                           initial_state=None, output_final_state=False, log_decay=None):
    B, H, T, D = q.shape
    Hkv, Dv, F = k.shape[1], v.shape[-1], fq.shape[-1]
    G = H // Hkv
    W = int(window)
    qq = q.float().reshape(B, Hkv, G, T, D)
    fqq = fq.float().reshape(B, Hkv, G, T, F)
    kk, vv, ffk = k.float(), v.float(), fk.float()
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    win = (j <= i) & (j > i - W)
    lin = j <= i - W

    s = torch.einsum("bhgid,bhjd->bhgij", qq, kk) * scale
    s = s.masked_fill(~win, float("-inf"))
    m = s.amax(-1, keepdim=True)  # finite: j = i is always in the window
    a = torch.exp(s - m)
    b = torch.einsum("bhgif,bhjf->bhgij", fqq, ffk)
    if log_decay is not None:
        b = b * decay_pow(log_decay, i - j, (1, Hkv, 1, 1, 1))
    b = b.masked_fill(~lin, 0.0)

    alpha = torch.sigmoid(mix.float()).reshape(1, Hkv, G, 1)
    beta = 1.0 - alpha
    lin_num = torch.einsum("bhgij,bhjd->bhgid", b, vv)
    lin_den = b.sum(-1)
    if initial_state is not None:
        S0, z0 = initial_state[0].float(), initial_state[1].float()
        s_num = torch.einsum("bhgif,bhfd->bhgid", fqq, S0)
        s_den = torch.einsum("bhgif,bhf->bhgi", fqq, z0)
        if log_decay is not None:
            qd = decay_pow(log_decay, torch.arange(1, T + 1, device=q.device), (1, Hkv, 1, 1))
            s_num, s_den = s_num * qd[..., None], s_den * qd
        lin_num, lin_den = lin_num + s_num, lin_den + s_den
    num = alpha.unsqueeze(-1) * torch.einsum("bhgij,bhjd->bhgid", a, vv) + beta.unsqueeze(-1) * lin_num
    den = alpha * a.sum(-1) + beta * lin_den + eps
    o = (num / den.unsqueeze(-1)).reshape(B, H, T, Dv).to(q.dtype)

    final = None
    if output_final_state:
        final = linear_state(ffk, vv, max(0, T - W), initial_state, log_decay)
    return o, final


def hybrid_decode_step_ref(q_t, k_t, v_t, fq_t, fk_t, mix, cache: HybridDecodeCache, *, window: int,
                           scale: float, eps=1e-6, log_decay=None, log_gate=None, first=None, position=None,
                           sink_queries=None, separate: bool = False):
    """Append one token per sequence to `cache` (in place) and return its output (B, H, Dv).
    `first` (B,) int: row b's tokens before index first[b] are left padding, left out of the window (the caller
    keeps their fk and v zero, so their eviction adds nothing to the state). `log_gate` (B, Hkv): the new token's
    log gate (a gated layer; the cache keeps the window's gates in `cache.lg`). `position`: a 1-element device
    tensor holding the token index instead of `cache.seen` (then left alone): no host value is read, so the step
    can be captured in a CUDA graph. A cache with sinks (`cache.sk`) makes token first + s sink s (cache
    docstring); `sink_queries` (B, H, D, default q_t): the query that reads them. `separate`: the softmax branch
    (window and sinks) and the linear branch are each normalised on their own, then mixed; a row whose linear
    branch is still empty is the softmax branch alone."""
    W = cache.window
    if int(window) != W:
        raise ValueError(f"window={window} but the cache holds {W} slots")
    if log_gate is not None and cache.lg is None:
        raise ValueError("a gated decode step needs a cache that keeps gates (HybridDecodeCache.empty(..., "
                         "gated=True) or from_prefill(..., key_gates=...))")
    B, H, D = q_t.shape
    Hkv = k_t.shape[1]
    G = H // Hkv
    dev = cache.S.device
    t = torch.tensor(cache.seen, device=dev) if position is None else position.reshape(()).to(dev, torch.long)
    slot = (t % W).reshape(1)
    evict = (t >= W).float()  # token t - W leaves the window: fold it into the linear state first
    old_fk = cache.fk.index_select(2, slot)[:, :, 0].float()
    old_v = cache.v.index_select(2, slot)[:, :, 0].float()
    if cache.lg is not None and log_gate is not None:  # the state moves to the evicted token: its own gate
        g = torch.exp(cache.lg.index_select(2, slot)[:, :, 0])
    elif log_decay is not None:
        g = torch.exp(log_decay.float()).view(1, Hkv).expand(B, Hkv)
    else:
        g = torch.ones(B, Hkv, device=dev)
    keep = 1.0 + evict * (g - 1.0)
    cache.S.mul_(keep[..., None, None]).add_(evict * old_fk.unsqueeze(-1) * old_v.unsqueeze(-2))
    cache.z.mul_(keep[..., None]).add_(evict * old_fk)
    start = torch.zeros(B, dtype=torch.long, device=dev) if first is None else first.to(dev, torch.long)
    if cache.sk is not None:  # token start + s is sink s: kept apart, never in the linear state
        rank = t - start  # (B,)
        is_sink = (rank >= 0) & (rank < cache.sk.shape[2])
        into = (is_sink[:, None] & (torch.arange(cache.sk.shape[2], device=dev)[None, :] == rank[:, None]))
        into = into[:, None, :, None]
        cache.sk.copy_(torch.where(into, k_t[:, :, None].to(cache.sk.dtype), cache.sk))
        cache.sv.copy_(torch.where(into, v_t[:, :, None].to(cache.sv.dtype), cache.sv))
        fk_t = fk_t * (~is_sink).to(fk_t.dtype)[:, None, None]
    cache.k.index_copy_(2, slot, k_t[:, :, None].to(cache.k.dtype))
    cache.v.index_copy_(2, slot, v_t[:, :, None].to(cache.v.dtype))
    cache.fk.index_copy_(2, slot, fk_t[:, :, None].to(cache.fk.dtype))
    if log_gate is not None:
        cache.lg.index_copy_(2, slot, log_gate.float()[:, :, None])
    if position is None:
        cache.seen += 1

    slots = torch.arange(W, device=dev)
    valid = (slots <= t)[None, :]  # (1, W): slots that hold a token
    if first is not None or cache.sk is not None:  # slot j holds token t - ((t - j) mod W)
        token = t - (t - slots) % W
        lowest = start if cache.sk is None else start + cache.sk.shape[2]  # sinks are read from sk, not the ring
        valid = valid & (token[None, :] >= lowest[:, None])
    qq = q_t.float().reshape(B, Hkv, G, D)
    fqq = fq_t.float().reshape(B, Hkv, G, -1)
    s = torch.einsum("bhgd,bhjd->bhgj", qq, cache.k.float()) * scale
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    row_max = s.amax(-1, keepdim=True)
    if cache.sk is not None:
        filled = start[:, None] + torch.arange(cache.sk.shape[2], device=dev)[None, :] <= t  # (B, S)
        qs = qq if sink_queries is None else sink_queries.float().reshape(B, Hkv, G, D)
        sink_s = torch.einsum("bhgd,bhsd->bhgs", qs, cache.sk.float()) * scale
        sink_s = sink_s.masked_fill(~filled[:, None, None, :], float("-inf"))
        row_max = torch.maximum(row_max, sink_s.amax(-1, keepdim=True))
    row_max = row_max.clamp_min(torch.finfo(torch.float32).min)
    a = torch.exp(s - row_max)
    alpha = torch.sigmoid(mix.float()).reshape(1, Hkv, G, 1)
    beta = 1.0 - alpha
    lin_num = torch.einsum("bhgf,bhfd->bhgd", fqq, cache.S)
    lin_den = torch.einsum("bhgf,bhf->bhg", fqq, cache.z)
    # the state sits at token max(t - W, -1): it reaches the query through the gates of the tokens in the window
    if log_gate is not None:
        qd = torch.exp((cache.lg * (slots <= t)).sum(-1))[..., None]  # (B, Hkv, 1)
    elif log_decay is not None:
        qd = torch.exp(log_decay.float().view(1, Hkv, 1) * torch.clamp(t + 1, max=W).float())
    if log_gate is not None or log_decay is not None:
        lin_num, lin_den = lin_num * qd[..., None], lin_den * qd
    win_num = torch.einsum("bhgj,bhjd->bhgd", a, cache.v.float())
    win_den = a.sum(-1, keepdim=True)
    lin_den = lin_den[..., None]
    if cache.sk is not None:
        sink_a = torch.exp(sink_s - row_max)
        sink_num = torch.einsum("bhgs,bhsd->bhgd", sink_a, cache.sv.float())
        sink_den = sink_a.sum(-1, keepdim=True)
    if separate:  # the model's attention_ops.separate_mix, restated here: the kernels do not import effconv
        if cache.sk is not None:
            win_num, win_den = win_num + sink_num, win_den + sink_den
        linear = beta * (lin_den > 0).float()
        o = (alpha * win_num / (win_den + eps) + linear * lin_num / (lin_den + eps)) / (alpha + linear)
    else:
        num = alpha * win_num + beta * lin_num
        den = alpha * win_den + beta * lin_den + eps
        if cache.sk is not None:
            num, den = num + alpha * sink_num, den + alpha * sink_den
        o = num / den
    return o.reshape(B, H, -1).to(q_t.dtype)


def recurrent_hybrid_attention_ref(q, k, v, fq, fk, mix, *, window: int, scale: float, eps=1e-6,
                                   initial_state=None, log_decay=None, log_gate=None, sinks: int = 0,
                                   separate: bool = False):
    """Token-by-token loop over `hybrid_decode_step_ref` (`log_gate` (B, Hkv, T): per-token gates; `sinks`: the
    first tokens are attention sinks; `separate`: each branch normalised on its own). Returns (o, cache)."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    cache = HybridDecodeCache.empty(B, Hkv, window, D, fk.shape[-1], v.shape[-1], dtype=k.dtype,
                                    device=k.device, initial_state=initial_state, gated=log_gate is not None,
                                    sinks=sinks)
    outs = [hybrid_decode_step_ref(q[:, :, t], k[:, :, t], v[:, :, t], fq[:, :, t], fk[:, :, t], mix, cache,
                                   window=window, scale=scale, eps=eps, log_decay=log_decay,
                                   log_gate=None if log_gate is None else log_gate[:, :, t], separate=separate)
            for t in range(T)]
    return torch.stack(outs, 2), cache
