"""Plain-PyTorch attention ops of effconv models: feature maps, linear and window+linear hybrid attention.

This file ships inside every exported model (it must import nothing but torch), so it is the reference path
that runs anywhere. On CUDA the model dispatches to the Triton kernels of `effconv_kernels` when installed.

Shapes: q (B, H, T, D) after RoPE, k (B, Hkv, T, D), v (B, Hkv, T, Dv); query head h reads kv head h // (H // Hkv).
Feature-mapped fq (B, H, T, F), fk (B, Hkv, T, F). Sums accumulate in fp32; outputs come back in v's dtype.
Linear state per kv head: S = sum_j fk_j v_j^T (B, Hkv, F, Dv), z = sum_j fk_j (B, Hkv, F).

Hybrid (LoLCATs): for query i, Win(i) = {i-W < j <= i}, Lin(i) = {j <= i-W};
    o_i = (a * sum_Win exp(s_ij - m_i) v_j + (1-a) * sum_Lin fq_i.fk_j v_j)
          / (a * sum_Win exp(s_ij - m_i)   + (1-a) * sum_Lin fq_i.fk_j + eps),   a = sigmoid(mix_h),
with s_ij = scale * q_i.k_j and m_i the row max over the window.

Decay (`log_decay`, fp32 (Hkv,), values <= 0, g = exp(log_decay) per kv head; retention / simple-GLA style): the
linear terms get g^(i-j) (numerator and normaliser alike; the window terms are unchanged), the initial state
g^(i+1) (it sits at position -1), and the state after the first L tokens (L = T for linear attention,
L = max(0, T-W) for the hybrid: the tokens that have left the window) is
    S = g^L S0 + sum_{j<L} g^(L-1-j) fk_j v_j^T,   z likewise,
i.e. it is decayed to the last token it holds. Running a sequence in two pieces with the first piece's final state
as the second's initial state (the hybrid also re-reads the last W keys) equals one run. Positions are array
indices (padding included). Every factor is g^e with e >= 0: nothing can overflow.
`log_decay=None` runs the code without any decay arithmetic.

Gates (`log_gate`, fp32 (B, Hkv, T), values <= 0; data-dependent, GLA / Mamba-2 style with one scalar per kv head
and token): the state update is S_t = g_t S_{t-1} + fk_t v_t^T, so the linear term of key j read by query i gets
exp(C_i - C_j) with C the running sum of the log gates (a per-head decay is the case log g_t = log g). Numerator
and normaliser alike; the window terms are unchanged; the initial state gets exp(C_i), the final state after L
tokens is exp(C_{L-1}) S0 + sum_{j<L} exp(C_{L-1} - C_j) fk_j v_j^T. Sums are taken chunk by chunk (exponents of
differences that are never positive), so nothing overflows. A continuation's log_gate covers the same tokens as
its keys (the hybrid's re-read window included).

Sinks (StreamingLLM; hybrid only): the first `sinks` real tokens of a sequence leave the window and linear parts
(no feature in the state) and are read by softmax from every later query, for ever, under the window's row max and
the shared normaliser: o_i's softmax terms run over Win(i) and the sinks. The teacher puts a large share of its
attention on the first token in most layers at every position, which a window alone loses after W tokens and the
linear part can only smear out. `take_sinks` finds them and carries them across calls.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_MAPS = ("hedgehog", "t2r", "elu")


class FeatureMap(nn.Module):
    """Learned per-head feature map applied to queries or keys after RoPE.

    hedgehog: [softmax(xW + b), softmax(-(xW + b))] over the feature dim (Zhang et al. 2024), W starts as identity.
    t2r:      relu(xW + b) (Kasai et al. 2021), W starts as identity.
    elu:      elu(x) + 1 (Katharopoulos et al. 2020), no parameters.
    """

    def __init__(self, kind: str, num_heads: int, head_dim: int, feature_dim: int | None = None):
        super().__init__()
        if kind not in FEATURE_MAPS:
            raise ValueError(f"unknown feature map {kind!r}; choose one of {', '.join(FEATURE_MAPS)}")
        self.kind = kind
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.proj_dim = feature_dim or head_dim
        if kind != "elu":
            self.weight = nn.Parameter(torch.empty(num_heads, head_dim, self.proj_dim))
            self.bias = nn.Parameter(torch.empty(num_heads, self.proj_dim))
            self.reset_parameters()

    @property
    def output_dim(self) -> int:
        return {"hedgehog": 2 * self.proj_dim, "t2r": self.proj_dim, "elu": self.head_dim}[self.kind]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.kind == "elu":
            return
        eye = torch.eye(self.head_dim, self.proj_dim, dtype=self.weight.dtype, device=self.weight.device)
        self.weight.copy_(eye.expand(self.num_heads, -1, -1))
        self.bias.zero_()

    def forward(self, x: torch.Tensor, kernel=None) -> torch.Tensor:
        # x: (B, heads, T, head_dim); the map itself runs in fp32 (softmax over small dims is precision-sensitive).
        # `kernel(x, weight, bias)`: a fused hedgehog map (effconv_kernels), same fp32 math in one pass.
        if kernel is not None and self.kind == "hedgehog":
            return kernel(x, self.weight, self.bias)
        x = x.float()
        if self.kind == "elu":
            return F.elu(x) + 1.0
        z = torch.einsum("bhtd,hdf->bhtf", x, self.weight.float()) + self.bias.float()[None, :, None, :]
        if self.kind == "t2r":
            return F.relu(z)
        return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)

    def extra_repr(self) -> str:
        return f"{self.kind}, heads={self.num_heads}, head_dim={self.head_dim}, out={self.output_dim}"


def _group_queries(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(B, H, T, X) -> (B, Hkv, G, T, X): GQA without repeating keys or values."""
    b, h, t, d = x.shape
    return x.reshape(b, num_kv_heads, h // num_kv_heads, t, d)


def _pad_time(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-x.shape[-2]) % multiple
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def _decay(log_decay: torch.Tensor, exponent: torch.Tensor, shape) -> torch.Tensor:
    """g^exponent in fp32: log_decay (Hkv,) viewed as `shape`; exponents below 0 (masked entries) count as 0."""
    lam = log_decay.float().reshape(shape)
    return torch.exp(lam * exponent.clamp(min=0).to(device=lam.device, dtype=torch.float32))


def _chunk_prefix_states(chunk_s, chunk_z, log_decay, c: int, initial_state):
    """Decayed states entering each chunk: H_n = sum_{m<n} g^(C(n-1-m)) K_m + g^(nC) S0, with K_m the chunk's own
    contribution decayed to its last position. chunk_s (B, Hkv, n, F, Dv), chunk_z (B, Hkv, n, F). O(n^2) in the
    number of chunks (a small (n, n) matrix per head), no overflow (all exponents >= 0)."""
    hkv, n = chunk_s.shape[1], chunk_s.shape[2]
    idx = torch.arange(n, device=chunk_s.device)
    m = _decay(log_decay, c * (idx[:, None] - 1 - idx[None, :]), (hkv, 1, 1)) * (idx[None, :] < idx[:, None])
    prefix_s = torch.einsum("knm,bkmfd->bknfd", m, chunk_s)
    prefix_z = torch.einsum("knm,bkmf->bknf", m, chunk_z)
    if initial_state is not None:
        g0 = _decay(log_decay, c * idx, (1, hkv, 1))  # (1, Hkv, n)
        prefix_s = prefix_s + g0[..., None, None] * initial_state[0].float()[:, :, None]
        prefix_z = prefix_z + g0[..., None] * initial_state[1].float()[:, :, None]
    return prefix_s, prefix_z


def _final_state(fk32, v32, length: int, initial_state, log_decay):
    """State after the first `length` tokens: g^L S0 + sum_{j<L} g^(L-1-j) fk_j v_j^T (g = 1 without decay)."""
    fk32, v32 = fk32[:, :, :length], v32[:, :, :length]
    if log_decay is not None:
        pos = torch.arange(length, device=fk32.device)
        fk32 = fk32 * _decay(log_decay, length - 1 - pos, (1, -1, 1))[..., None]
    s = torch.einsum("bktf,bktd->bkfd", fk32, v32)
    z = fk32.sum(2)
    if initial_state is not None:
        s0, z0 = initial_state[0].float(), initial_state[1].float()
        if log_decay is not None:
            g = _decay(log_decay, torch.tensor(length), (1, -1))
            s0, z0 = s0 * g[..., None, None], z0 * g[..., None]
        s, z = s + s0, z + z0
    return s, z


def _chunk_gates(log_gate: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Running sums of the log gates inside each chunk (B, Hkv, n, C) and each chunk's total (B, Hkv, n); padded
    positions get gate 1."""
    lg = _pad_time(log_gate.float()[..., None], c)[..., 0]
    cum = lg.unflatten(2, (lg.shape[-1] // c, c)).cumsum(-1)
    return cum, cum[..., -1]


def _gated_prefix_states(chunk_s, chunk_z, totals, initial_state):
    """Gated states entering each chunk (at the position before it): H_n = sum_{m<n} exp(P_n - P_{m+1}) K_m
    + exp(P_n) S0, with P_n the log gates of all chunks before n and K_m chunk m's keys gated to its last position.
    chunk_s (B, Hkv, n, F, Dv), chunk_z (B, Hkv, n, F), totals (B, Hkv, n)."""
    n = totals.shape[-1]
    before = totals.cumsum(-1) - totals  # P_n
    idx = torch.arange(n, device=totals.device)
    earlier = idx[None, :] < idx[:, None]
    m = torch.exp((before[..., :, None] - (before + totals)[..., None, :]).clamp(max=0)) * earlier  # (B, Hkv, n, n)
    prefix_s = torch.einsum("bknm,bkmfd->bknfd", m, chunk_s)
    prefix_z = torch.einsum("bknm,bkmf->bknf", m, chunk_z)
    if initial_state is not None:
        g0 = torch.exp(before)
        prefix_s = prefix_s + g0[..., None, None] * initial_state[0].float()[:, :, None]
        prefix_z = prefix_z + g0[..., None] * initial_state[1].float()[:, :, None]
    return prefix_s, prefix_z


def _gated_final_state(fk32, v32, log_gate, length: int, initial_state):
    """State after the first `length` tokens under per-token gates (module docstring)."""
    fk32, v32 = fk32[:, :, :length], v32[:, :, :length]
    s0 = z0 = None
    if initial_state is not None:
        s0, z0 = initial_state[0].float(), initial_state[1].float()
    if length == 0:
        if s0 is None:
            return fk32.new_zeros(*fk32.shape[:2], fk32.shape[-1], v32.shape[-1]), fk32.new_zeros(*fk32.shape[:2], fk32.shape[-1])
        return s0, z0
    cum = log_gate.float()[:, :, :length].cumsum(-1)
    w = torch.exp((cum[..., -1:] - cum).clamp(max=0))[..., None]
    s = torch.einsum("bktf,bktd->bkfd", fk32 * w, v32)
    z = (fk32 * w).sum(2)
    if s0 is not None:
        g = torch.exp(cum[..., -1])
        s, z = s + g[..., None, None] * s0, z + g[..., None] * z0
    return s, z


def _linear_chunks(fq, fk, v, chunk_size: int):
    """The chunked operands of linear attention: chunk length c, chunk count n, fp32 padded fk and v, and the
    queries (B, Hkv, G, n, C, F), keys (B, Hkv, n, C, F) and values (B, Hkv, n, C, Dv) per chunk."""
    c = min(chunk_size, max(fq.shape[2], 1))
    fq32, fk32, v32 = (_pad_time(x.float(), c) for x in (fq, fk, v))
    n = fq32.shape[-2] // c
    qg = _group_queries(fq32, fk.shape[1]).unflatten(3, (n, c))
    return c, n, fk32, v32, qg, fk32.unflatten(2, (n, c)), v32.unflatten(2, (n, c))


def linear_attention(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    log_decay: torch.Tensor | None = None,
    log_gate: torch.Tensor | None = None,
):
    """Causal linear attention, chunked: O(T * chunk) memory. Returns (o, final_state or None).

    `log_decay` (Hkv,): per-head decay of the linear terms; `log_gate` (B, Hkv, T): per-token gates (module
    docstring); at most one of them.
    """
    if log_gate is not None:
        if log_decay is not None:
            raise ValueError("pass log_decay or log_gate, not both")
        return _linear_attention_gated(fq, fk, v, log_gate, normalize=normalize, eps=eps, initial_state=initial_state,
                                       output_final_state=output_final_state, chunk_size=chunk_size)
    if log_decay is not None:
        return _linear_attention_decay(fq, fk, v, log_decay, normalize=normalize, eps=eps, initial_state=initial_state,
                                       output_final_state=output_final_state, chunk_size=chunk_size)
    b, h, t, _ = fq.shape
    out_dtype = v.dtype
    c, n, fk32, v32, qg, kc, vc = _linear_chunks(fq, fk, v, chunk_size)

    # State entering each chunk: exclusive prefix sum of the per-chunk states.
    chunk_states = torch.einsum("bkncf,bkncd->bknfd", kc, vc)
    chunk_norms = kc.sum(3)
    prefix_s = torch.cumsum(chunk_states, 2) - chunk_states
    prefix_z = torch.cumsum(chunk_norms, 2) - chunk_norms
    if initial_state is not None:
        s0, z0 = initial_state
        prefix_s = prefix_s + s0.float()[:, :, None]
        prefix_z = prefix_z + z0.float()[:, :, None]

    causal = torch.ones(c, c, dtype=torch.bool, device=fq.device).tril()
    scores = torch.einsum("bkgncf,bknjf->bkgncj", qg, kc) * causal
    num = torch.einsum("bkgncj,bknjd->bkgncd", scores, vc) + torch.einsum("bkgncf,bknfd->bkgncd", qg, prefix_s)
    if normalize:
        den = scores.sum(-1) + torch.einsum("bkgncf,bknf->bkgnc", qg, prefix_z)
        num = num / (den[..., None] + eps)
    o = num.reshape(b, h, n * c, -1)[:, :, :t].to(out_dtype)

    final_state = None
    if output_final_state:
        s = chunk_states.sum(2)
        z = chunk_norms.sum(2)
        if initial_state is not None:
            s, z = s + initial_state[0].float(), z + initial_state[1].float()
        final_state = (s, z)
    return o, final_state


def _chunk_outputs(qg, vc, scores, qd, prefix_s, prefix_z, normalize: bool, eps: float):
    """Per-chunk outputs of (decayed or gated) linear attention: the chunk's own weighted scores plus the state
    entering it, read with the factor qd, over the normaliser built the same way. (B, Hkv, G, n, C, Dv)"""
    num = torch.einsum("bkgncj,bknjd->bkgncd", scores, vc) + qd[..., None] * torch.einsum(
        "bkgncf,bknfd->bkgncd", qg, prefix_s)
    if normalize:
        den = scores.sum(-1) + qd * torch.einsum("bkgncf,bknf->bkgnc", qg, prefix_z)
        num = num / (den[..., None] + eps)
    return num


def _linear_attention_decay(fq, fk, v, log_decay, *, normalize, eps, initial_state, output_final_state, chunk_size):
    """linear_attention with a per-kv-head decay g: weights g^(i-j), chunked like the plain one.

    Inside a chunk: scores * g^(r-s) (r >= s). State entering chunk n: H_n (_chunk_prefix_states, at position
    nC-1), read by row r with g^(r+1). Final state computed directly from the unpadded keys.
    """
    b, h, t, _ = fq.shape
    out_dtype = v.dtype
    c, n, fk32, v32, qg, kc, vc = _linear_chunks(fq, fk, v, chunk_size)
    hkv = fk.shape[1]
    r = torch.arange(c, device=fq.device)

    kw = kc * _decay(log_decay, (c - 1 - r)[:, None], (1, hkv, 1, 1, 1))  # keys decayed to the chunk's last position
    prefix_s, prefix_z = _chunk_prefix_states(torch.einsum("bkncf,bkncd->bknfd", kw, vc), kw.sum(3), log_decay, c,
                                              initial_state)

    causal = torch.ones(c, c, dtype=torch.bool, device=fq.device).tril()
    intra = _decay(log_decay, r[:, None] - r[None, :], (1, hkv, 1, 1, 1, 1)) * causal  # g^(r-s), s <= r
    scores = torch.einsum("bkgncf,bknjf->bkgncj", qg, kc) * intra
    qd = _decay(log_decay, r + 1, (1, hkv, 1, 1, 1))  # the state sits at the position before the chunk
    o = _chunk_outputs(qg, vc, scores, qd, prefix_s, prefix_z, normalize, eps).reshape(b, h, n * c, -1)
    o = o[:, :, :t].to(out_dtype)
    final_state = _final_state(fk32, v32, t, initial_state, log_decay) if output_final_state else None
    return o, final_state


def _linear_attention_gated(fq, fk, v, log_gate, *, normalize, eps, initial_state, output_final_state, chunk_size):
    """linear_attention with per-token gates: weights exp(C_i - C_j), chunked like the decayed one.

    Inside a chunk: scores * exp(c_r - c_s) (c the running sum within the chunk). State entering chunk n
    (_gated_prefix_states) is read by row r with exp(c_r)."""
    b, h, t, _ = fq.shape
    out_dtype = v.dtype
    c, n, fk32, v32, qg, kc, vc = _linear_chunks(fq, fk, v, chunk_size)
    cum, totals = _chunk_gates(log_gate, c)  # (B, Hkv, n, C), (B, Hkv, n)

    kw = kc * torch.exp(totals[..., None] - cum)[..., None]  # keys gated to the chunk's last position
    prefix_s, prefix_z = _gated_prefix_states(torch.einsum("bkncf,bkncd->bknfd", kw, vc), kw.sum(3), totals,
                                              initial_state)
    causal = torch.ones(c, c, dtype=torch.bool, device=fq.device).tril()
    intra = torch.exp((cum[..., :, None] - cum[..., None, :]).clamp(max=0)) * causal  # (B, Hkv, n, C, C)
    scores = torch.einsum("bkgncf,bknjf->bkgncj", qg, kc) * intra[:, :, None]
    qd = torch.exp(cum)[:, :, None]  # (B, Hkv, 1, n, C): gates from the chunk's start to row r
    o = _chunk_outputs(qg, vc, scores, qd, prefix_s, prefix_z, normalize, eps).reshape(b, h, n * c, -1)
    o = o[:, :, :t].to(out_dtype)
    final_state = _gated_final_state(fk32, v32, log_gate, t, initial_state) if output_final_state else None
    return o, final_state


class Sinks(NamedTuple):
    """The attention sinks one hybrid call reads (`take_sinks`).

    key_is_sink (B, T) bool: which of the call's keys are sinks; keys (B, Hkv, S, D), values (B, Hkv, S, Dv): sink s
    of each sequence; positions (B, S) long: its index among the call's keys, negative for a sink of an earlier call
    (read by every query), NO_SINK for a slot not filled yet (read by none)."""

    key_is_sink: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor


NO_SINK = torch.iinfo(torch.long).max


def take_sinks(k: torch.Tensor, v: torch.Tensor, count: int, *, key_mask: torch.Tensor | None = None,
               earlier: Sinks | None = None) -> Sinks:
    """The first `count` real tokens of each sequence as sinks: those of `earlier` calls (the cache; their
    positions become -1) and, while slots are free, this call's first real keys (k (B, Hkv, T, D), v; `key_mask`
    (B, T), True for real tokens). Gathered with a one-hot product: no host sync, gradients reach k and v."""
    b, hkv, t, _ = k.shape
    slot = torch.arange(count, device=k.device)
    if earlier is None:
        keys, values = k.new_zeros(b, hkv, count, k.shape[-1]), v.new_zeros(b, hkv, count, v.shape[-1])
        positions = torch.full((b, count), NO_SINK, dtype=torch.long, device=k.device)
    else:
        keys, values = earlier.keys.to(k.dtype), earlier.values.to(v.dtype)
        positions = torch.where(earlier.positions == NO_SINK, NO_SINK, -1)
    real = torch.ones(b, t, dtype=torch.bool, device=k.device) if key_mask is None else key_mask.bool()
    rank = (positions < 0).sum(-1, keepdim=True) + real.long().cumsum(-1) - 1  # (B, T)
    key_is_sink = real & (rank < count)
    onehot = key_is_sink[..., None] & (rank[..., None] == slot)  # (B, T, S)
    taken = onehot.any(1)  # (B, S)
    w = onehot.to(k.dtype)
    keys = torch.where(taken[:, None, :, None], torch.einsum("bts,bktd->bksd", w, k), keys)
    values = torch.where(taken[:, None, :, None], torch.einsum("bts,bktd->bksd", w.to(v.dtype), v), values)
    index = (onehot.long() * torch.arange(t, device=k.device)[None, :, None]).sum(1)
    return Sinks(key_is_sink, keys, values, torch.where(taken, index, positions))


def separate_mix(win_num, win_den, lin_num, lin_den, alpha, eps: float):
    """The hybrid's output with separate normalisers, from its softmax branch (window and sinks; weights
    exp(s - rowmax)) and its linear branch (numerators (..., Dv), denominators (..., 1)): each branch a weighted mean
    of its own (as Liger mixes a window and a gated linear branch), (a Nw/Dw + (1-a) Nl/Dl) / (a + (1-a)), where a
    row without any linear term (the first `window` tokens) is the softmax branch alone, as with the shared
    normaliser (LoLCATs: (a Nw + (1-a) Nl) / (a Dw + (1-a) Dl + eps))."""
    linear = (1 - alpha) * (lin_den > 0).to(lin_den.dtype)
    return (alpha * win_num / (win_den + eps) + linear * lin_num / (lin_den + eps)) / (alpha + linear)


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    mix: torch.Tensor,
    *,
    window: int,
    scale: float,
    eps: float = 1e-6,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int = 64,
    log_decay: torch.Tensor | None = None,
    log_gate: torch.Tensor | None = None,
    sinks: "Sinks | None" = None,
    sink_queries: torch.Tensor | None = None,
    separate: bool = False,
):
    """Sliding-window softmax + linear attention under one normaliser, chunked: O(T * chunk) memory.

    k, v, fk (and `key_padding_mask`, `log_gate`, `sinks`) may hold P = Tk - Tq more rows than q, fq: the first P
    keys come before the queries (a continuation's re-read window, P <= window) and get no query rows. Chunks are
    at least `window` long and the keys are laid out one chunk ahead of the queries (that chunk holds the P earlier
    keys, masked padding before them), so a query's window lies in its own chunk and the one before, and every chunk
    two or more back is entirely in its linear part. `key_padding_mask` (B, Tk), True for real tokens, removes
    padded keys from both parts. Returns (o, final_state or None); final_state is the linear state of all tokens
    that have left the window after the last key. `log_decay` (Hkv,): per-head decay of the linear part (run as
    per-token gates of that value); `log_gate` (B, Hkv, Tk): per-token gates (module docstring); at most one of
    them. `sinks` (`take_sinks` over the Tk keys): its sink keys leave the window and linear parts, and every query
    reads the sinks before it by softmax; `sink_queries` (B, H, Tq, D, default q): the queries that read them (the
    model's are rotated at positions capped where the teacher's RoPE ends). `separate`: each branch is normalised
    on its own and the two are mixed (`separate_mix`) instead of sharing one normaliser.
    """
    if log_decay is not None and log_gate is not None:
        raise ValueError("pass log_decay or log_gate, not both")
    b, h, t, _ = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    earlier = tk - t
    if not 0 <= earlier <= max(window, 0) or (earlier and window < 1):
        raise ValueError(f"k has {tk} rows for {t} queries: at most `window` ({window}) earlier keys may lead")
    if log_decay is not None:  # positions are array indices, padding included: a gate of log g at every key
        log_gate = log_decay.float().view(1, hkv, 1).expand(b, hkv, tk)
    if sinks is not None:
        local = ~sinks.key_is_sink
        key_padding_mask = local if key_padding_mask is None else key_padding_mask.bool() & local
    g = h // hkv
    out_dtype = v.dtype
    c = max(chunk_size, window) if earlier else min(max(chunk_size, window), max(t, 1))
    lead = c - earlier  # masked key slots before the earlier keys: the keys start one chunk before the queries
    q32, k32, v32, fq32, fk32 = (x.float() for x in (q, k, v, fq, fk))
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, :, None].to(torch.float32)
        fk32, v32 = fk32 * keep, v32 * keep
    q32, fq32 = _pad_time(q32, c), _pad_time(fq32, c)
    n = q32.shape[-2] // c

    def key_chunks(x):  # (B, Hkv, Tk, X) -> (B, Hkv, n + 1, C, X): chunk 0 before the queries' chunk 0
        return _pad_time(F.pad(x, (0, 0, lead, 0)), c)[:, :, : (n + 1) * c].unflatten(2, (n + 1, c))

    def with_previous(xc):  # key chunks -> (B, Hkv, n, 2C, X): each query chunk's previous and own key chunk
        return torch.cat([xc[:, :, :n], xc[:, :, 1:]], dim=3)

    kc, vc, fkc = (key_chunks(x) for x in (k32, v32, fk32))
    k_loc, v_loc, fk_loc = (with_previous(x) for x in (kc, vc, fkc))
    qg = _group_queries(q32, hkv).unflatten(3, (n, c))  # (B, Hkv, G, n, C, D)
    fqg = _group_queries(fq32, hkv).unflatten(3, (n, c))

    r = torch.arange(c, device=q.device)[:, None]
    jj = torch.arange(2 * c, device=q.device)[None, :]
    dist = c + r - jj  # i - j for query row r of a chunk and local key jj
    real = torch.ones(1, tk, dtype=torch.bool, device=q.device) if key_padding_mask is None else key_padding_mask.bool()
    real_loc = with_previous(key_chunks(real[:, None, :, None].float()))[:, 0, :, :, 0] > 0  # (B|1, n, 2C)
    real_key = real_loc[:, None, None, :, None, :]  # (B|1, 1, 1, n, 1, 2C)
    in_window = (dist >= 0) & (dist < window) & real_key
    in_linear = (dist >= window) & real_key

    scores = torch.einsum("bkgncd,bknjd->bkgncj", qg, k_loc) * scale
    scores = scores.masked_fill(~in_window, float("-inf"))
    row_max = scores.amax(-1, keepdim=True)
    if sinks is not None:
        qs = qg if sink_queries is None else _group_queries(_pad_time(sink_queries.float(), c), hkv).unflatten(3, (n, c))
        sink_scores = torch.einsum("bkgncd,bksd->bkgncs", qs, sinks.keys.float()) * scale
        rows = earlier + torch.arange(n * c, device=q.device).view(n, c)  # the queries' indices among the keys
        visible = sinks.positions[:, None, None, :] <= rows[None, :, :, None]  # (B, n, C, S)
        sink_scores = sink_scores.masked_fill(~visible[:, None, None], float("-inf"))
        row_max = torch.maximum(row_max, sink_scores.amax(-1, keepdim=True))
    row_max = row_max.clamp_min(torch.finfo(torch.float32).min)  # padded rows: no window
    win_w = torch.exp(scores - row_max)
    lin_w = torch.einsum("bkgncf,bknjf->bkgncj", fqg, fk_loc) * in_linear

    # Linear state of key chunks before each query chunk's previous one.
    if log_gate is not None:
        # running log-gate sums over (previous chunk, own chunk): key jj read by row r gets exp(loc_r - loc_jj);
        # query chunk i reads the state entering key chunk i (its previous chunk), gated since then by loc at row r
        steps = key_chunks(log_gate.float()[..., None])[..., 0]  # (B, Hkv, n + 1, C); slots without a key: 0
        cum = steps.cumsum(-1)
        totals = cum[..., -1]
        loc = with_previous(steps[..., None])[..., 0].cumsum(-1)  # (B, Hkv, n, 2C)
        rows_gate = loc[..., c:]
        lin_w = lin_w * torch.exp((rows_gate[..., :, None] - loc[..., None, :]).clamp(max=0))[:, :, None]
        kw = fkc * torch.exp(totals[..., None] - cum)[..., None]
        prefix_s, prefix_z = _gated_prefix_states(torch.einsum("bkncf,bkncd->bknfd", kw, vc), kw.sum(3), totals,
                                                  initial_state)
        old_s, old_z = prefix_s[:, :, :n], prefix_z[:, :, :n]
        qd = torch.exp(rows_gate)[:, :, None]  # (B, Hkv, 1, n, C)
    else:
        chunk_states = torch.einsum("bkncf,bkncd->bknfd", fkc, vc)[:, :, :n]
        chunk_norms = fkc.sum(3)[:, :, :n]
        old_s = torch.cumsum(chunk_states, 2) - chunk_states  # key chunks before chunk i
        old_z = torch.cumsum(chunk_norms, 2) - chunk_norms
        if initial_state is not None:
            old_s = old_s + initial_state[0].float()[:, :, None]
            old_z = old_z + initial_state[1].float()[:, :, None]

    alpha = torch.sigmoid(mix.float()).view(1, hkv, g, 1, 1, 1)
    state_num = torch.einsum("bkgncf,bknfd->bkgncd", fqg, old_s)
    state_den = torch.einsum("bkgncf,bknf->bkgnc", fqg, old_z)
    if log_gate is not None:
        state_num, state_den = state_num * qd[..., None], state_den * qd
    win_num = torch.einsum("bkgncj,bknjd->bkgncd", win_w, v_loc)
    win_den = win_w.sum(-1, keepdim=True)
    lin_num = torch.einsum("bkgncj,bknjd->bkgncd", lin_w, v_loc) + state_num
    lin_den = lin_w.sum(-1, keepdim=True) + state_den[..., None]
    if sinks is not None:
        sink_w = torch.exp(sink_scores - row_max)
        sink_num = torch.einsum("bkgncs,bksd->bkgncd", sink_w, sinks.values.float())
        sink_den = sink_w.sum(-1, keepdim=True)
    if separate:
        if sinks is not None:
            win_num, win_den = win_num + sink_num, win_den + sink_den
        o = separate_mix(win_num, win_den, lin_num, lin_den, alpha, eps)
    else:  # one normaliser over the window, linear and sink terms
        num = alpha * win_num + (1 - alpha) * lin_num
        den = alpha * win_den + (1 - alpha) * lin_den
        if sinks is not None:
            num, den = num + alpha * sink_num, den + alpha * sink_den
        o = num / (den + eps)
    o = o.reshape(b, h, n * c, -1)[:, :, :t].to(out_dtype)

    final_state = None
    if output_final_state:
        if log_gate is not None:
            final_state = _gated_final_state(fk32, v32, log_gate, max(tk - window, 0), initial_state)
        else:
            final_state = _final_state(fk32, v32, max(tk - window, 0), initial_state, None)
    return o, final_state


def hybrid_attention_weights(q, k, fq, fk, mix, *, window: int, scale: float, eps: float = 1e-6,
                             log_decay: torch.Tensor | None = None, log_gate: torch.Tensor | None = None,
                             sinks: int = 0, separate: bool = False):
    """The (B, H, T, T) attention weights of the hybrid (or pure linear when window == 0), O(T^2).

    Used for the optional attention-map cross-entropy of attention transfer, on short sequences only, and as the
    tests' oracle. `log_decay` (Hkv,): the linear weights get g^(i-j); `log_gate` (B, Hkv, T): exp(C_i - C_j)
    (module docstring); `sinks`: keys j < sinks are softmax terms of every query i >= j (no padding here).
    """
    hkv = k.shape[1]
    g = q.shape[1] // hkv
    t = q.shape[2]
    k_rep = k.float().repeat_interleave(g, 1)
    fk_rep = fk.float().repeat_interleave(g, 1)
    i = torch.arange(t, device=q.device)[:, None]
    j = torch.arange(t, device=q.device)[None, :]
    lin_w = (fq.float() @ fk_rep.transpose(-1, -2)) * ((j <= i - window) & (j >= sinks))
    if log_decay is not None:
        lin_w = lin_w * _decay(log_decay.float().repeat_interleave(g), i - j, (1, -1, 1, 1))
    if log_gate is not None:
        cum = log_gate.float().cumsum(-1).repeat_interleave(g, 1)  # (B, H, T)
        lin_w = lin_w * torch.exp((cum[..., :, None] - cum[..., None, :]).clamp(max=0))
    if window <= 0:
        return lin_w / (lin_w.sum(-1, keepdim=True) + eps)
    in_window = (j <= i) & ((j > i - window) | (j < sinks))
    scores = (q.float() @ k_rep.transpose(-1, -2) * scale).masked_fill(~in_window, float("-inf"))
    win_w = torch.exp(scores - scores.amax(-1, keepdim=True))
    alpha = torch.sigmoid(mix.float()).view(1, -1, 1, 1)
    if separate:  # the weights are the numerators of one-hot values
        return separate_mix(win_w, win_w.sum(-1, keepdim=True), lin_w, lin_w.sum(-1, keepdim=True), alpha, eps)
    w = alpha * win_w + (1 - alpha) * lin_w
    return w / (w.sum(-1, keepdim=True) + eps)


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    key_padding_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Exact causal softmax attention through SDPA; the last q.shape[2] keys are the queries' own positions."""
    tq, tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if key_padding_mask is None and sliding_window is None and tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    i = torch.arange(tk - tq, tk, device=q.device)[:, None]
    j = torch.arange(tk, device=q.device)[None, :]
    allowed = j <= i
    if sliding_window is not None:
        allowed = allowed & (j > i - sliding_window)
    mask = allowed[None, None]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask.bool()[:, None, None, :]
        mask = mask | ~mask.any(-1, keepdim=True)  # fully padded query rows: attend anywhere, output is unused
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def attention_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


# ---------------------------------------------------------------------------------------------------------------
# Sparse softmax attention ("sliding" and "block_sparse" layers). PyTorch path through SDPA with a boolean mask
# (O(Tq * Tk) mask); on CUDA the model uses effconv_kernels' Triton kernels for the parallel forward.
# ---------------------------------------------------------------------------------------------------------------


def sliding_window_attention(q, k, v, *, scale: float, window: int, sinks: int, q_positions, k_positions,
                             key_padding_mask=None):
    """Query at position p attends to held keys at positions j <= p with p - j < window or j < sinks."""
    qp, kp = q_positions[:, None], k_positions[None, :]
    allowed = (kp <= qp) & ((qp - kp < window) | (kp < sinks))
    mask = allowed[None, None]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask.bool()[:, None, None, :]
        mask = mask | ~mask.any(-1, keepdim=True)  # fully padded query rows: attend anywhere, output is unused
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


@torch.no_grad()
def select_key_blocks(q, k, *, block_size: int, topk: int, q_start: int, selection=None):
    """Top-k block choice of the query blocks whose first token lies in the new queries.

    k holds every key so far (positions 0..Tk-1), q the last Tq of them (q_start = Tk - Tq). Query block m is
    scored by its first query against the mean-pooled keys of each earlier (complete) block; its row of the
    result is [topk chosen blocks (-1 = none)..., m]. Rows of blocks that began before q_start come from
    `selection` (the cache). Returns the selection of all blocks so far, (B, H, ceil(Tk / block_size), topk + 1).
    """
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    first_new = -(-q_start // block_size)
    total = -(-tk // block_size)
    rows = [selection] if selection is not None and first_new > 0 else []
    if first_new < total:
        blocks = torch.arange(first_new, total, device=q.device)
        n_full = tk // block_size
        anchors = q[:, :, blocks * block_size - q_start].float()  # (B, H, n_new, D)
        cols = torch.full((b, h, blocks.numel(), topk), -1, dtype=torch.long, device=q.device)
        if n_full > 0 and topk > 0:
            pooled = k[:, :, : n_full * block_size].float().reshape(b, hkv, n_full, block_size, d).mean(3)
            scores = torch.einsum("bkgmd,bknd->bkgmn", anchors.reshape(b, hkv, h // hkv, -1, d), pooled)
            scores = scores.reshape(b, h, blocks.numel(), n_full)
            scores = scores.masked_fill(torch.arange(n_full, device=q.device)[None, :] >= blocks[:, None], float("-inf"))
            kk = min(topk, n_full)
            top_scores, top_idx = scores.topk(kk, dim=-1)
            cols[..., :kk] = torch.where(torch.isfinite(top_scores), top_idx, torch.full_like(top_idx, -1))
        rows.append(torch.cat([cols, blocks.view(1, 1, -1, 1).expand(b, h, -1, 1)], dim=-1).to(torch.int32))
    return torch.cat(rows, dim=2)


def block_sparse_attention(q, k, v, selection, *, scale: float, block_size: int, key_padding_mask=None):
    """Queries (the last Tq of the Tk keys) attend to their block's chosen key blocks and, causally, their own."""
    b, h, tq, _ = q.shape
    tk = k.shape[2]
    nb = selection.shape[2]
    chosen = torch.zeros(b, h, nb, nb + 1, dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, selection.long() % (nb + 1), True)  # -1 lands in the spare last column
    qpos = torch.arange(tk - tq, tk, device=q.device)
    kpos = torch.arange(tk, device=q.device)
    mask = chosen[:, :, qpos // block_size][..., kpos // block_size] & (kpos[None, :] <= qpos[:, None])
    if key_padding_mask is not None:
        mask = mask & key_padding_mask.bool()[:, None, None, :]
        mask = mask | ~mask.any(-1, keepdim=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=h != k.shape[1])
