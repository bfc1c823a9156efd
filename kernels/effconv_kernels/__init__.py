"""effconv_kernels: attention kernels for converted (linear / hybrid) models.

Public entry points (all take backend="auto" | "triton" | "reference" | "naive"):
    linear_attention(fq, fk, v, *, normalize, eps, initial_state, output_final_state, log_decay, log_gate)
        -> (o, final_state)
    hybrid_attention(q, k, v, fq, fk, mix, *, window, scale, eps, initial_state, output_final_state, log_decay)
        -> (o, final_state)
    linear_decode_step(fq_t, fk_t, v_t, state, *, normalize, eps, log_decay, log_gate) -> (o_t, state)  # in place
    hybrid_decode_step(q_t, k_t, v_t, fq_t, fk_t, mix, cache, *, window, scale, eps, log_decay, log_gate,
                       sink_queries) -> o_t  # cache too
    HybridDecodeCache
    hedgehog_feature_map(x, weight, bias=None, *, out_dtype=None) -> [softmax(xW+b), softmax(-(xW+b))]
    moe_experts(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj) -> (N,D)  # Mixtral layout
Shapes and semantics: docs/kernels.md.

Backends of the parallel linear / hybrid attention: "triton" (CUDA; "auto" picks it when every tensor is on
CUDA and triton imports) and "naive", the O(T^2) fp32 oracle ("auto" everywhere else). The chunked, O(T*C)-memory
PyTorch formulation exists once, in effconv/modeling/attention_ops.py (it ships inside every exported model and is
what the model runs off the kernel path); it is not duplicated here, so backend="reference" is an error for these
two ops. The decode steps have a single PyTorch implementation (naive.py): "reference" and "naive" both run it.

`log_decay` (fp32 (Hkv,), values <= 0; None = no decay and no decay code at all): per-kv-head decay
g = exp(log_decay) of the linear terms, retention style: weight g^(i-j) for a linear pair, g^(i+1) for the
initial state (which sits at position -1); the (final) state is decayed to the last token it holds
(S_L = g^L S0 + sum_{j<L} g^(L-1-j) fk_j v_j^T), so chaining segments through the state equals one run, and the
decode caches hold the same state. Gradients flow to log_decay.

`log_gate`: data-dependent log gates, GLA style: (B, Hkv, T) for `linear_attention` (the Triton chunk kernels and
the O(T^2) oracle take them; the hybrid's parallel form with gates is attention_ops' `log_gate`), (B, Hkv) for the
decode steps (the new token's), which both Triton decode kernels take (the hybrid one a cache's attention sinks
too).
"""
from __future__ import annotations

import torch

from .hybrid_attn.cache import HybridDecodeCache
from .utils import check_gqa, float_dtype_ok, resolve_attention_backend, resolve_backend

__all__ = ["linear_attention", "hybrid_attention", "linear_decode_step", "hybrid_decode_step", "HybridDecodeCache",
           "hedgehog_feature_map"]


def _same_dtype(*tensors):
    # the Triton kernels feed every operand to the tensor cores in one dtype (fp32 accumulation inside)
    dts = {t.dtype for t in tensors}
    if len(dts) > 1:
        raise TypeError(f"backend='triton' needs all operands in one dtype, got {sorted(map(str, dts))}; "
                        "cast the feature maps to the value dtype (e.g. fq.to(v.dtype))")


def _check_state(initial_state):
    if initial_state is not None and (not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2):
        raise ValueError("initial_state must be a pair (S, z)")


def _check_gate(log_gate, log_decay, batch: int, num_kv_heads: int) -> None:
    """A decode step's per-token gate: (B, Hkv), and not beside a decay (both Triton steps take it)."""
    if log_gate is None:
        return
    if log_decay is not None:
        raise ValueError("pass log_decay or log_gate, not both")
    if not isinstance(log_gate, torch.Tensor) or tuple(log_gate.shape) != (batch, num_kv_heads):
        raise ValueError(f"log_gate must be a tensor of shape ({batch}, {num_kv_heads}), got "
                         f"{tuple(log_gate.shape) if isinstance(log_gate, torch.Tensor) else type(log_gate)}")


def _check_decay(log_decay, num_kv_heads: int):
    # shape and dtype only: checking log_decay <= 0 would cost a device sync on every call
    if log_decay is None:
        return
    if not isinstance(log_decay, torch.Tensor) or tuple(log_decay.shape) != (num_kv_heads,):
        raise ValueError(f"log_decay must be a tensor of shape ({num_kv_heads},) (one per kv head), got "
                         f"{tuple(log_decay.shape) if isinstance(log_decay, torch.Tensor) else type(log_decay)}")
    if not log_decay.is_floating_point():
        raise TypeError(f"log_decay must be a float tensor, got {log_decay.dtype}")


def linear_attention(fq, fk, v, *, normalize: bool = True, eps: float = 1e-6, initial_state=None,
                     output_final_state: bool = False, log_decay=None, log_gate=None, backend: str = "auto"):
    """Causal linear attention. fq (B,H,T,F), fk (B,Hkv,T,F), v (B,Hkv,T,Dv) -> o (B,H,T,Dv), (S, z) or None.

    o_i = sum_{j<=i} g^(i-j) (fq_i.fk_j) v_j / (sum_{j<=i} g^(i-j) fq_i.fk_j + eps) (no division when
    normalize=False; g = exp(log_decay[kv head]), 1 without log_decay); initial_state (S0 (B,Hkv,F,Dv),
    z0 (B,Hkv,F)) enters query i with g^(i+1); final state S_T = g^T S0 + sum_j g^(T-1-j) fk_j v_j^T.
    `log_gate` (B, Hkv, T), values <= 0, instead of log_decay: per-token gates, GLA style: key j reaches query i
    with exp(C_i - C_j), C its cumulative sum (the chunk kernels form only chunk-local differences); gradients
    reach it. Backends "triton" and "naive" ("auto": triton on CUDA, naive otherwise; see the module docstring).
    """
    float_dtype_ok(fq, fk, v)
    check_gqa(fq.shape[1], fk.shape[1])
    _check_state(initial_state)
    _check_decay(log_decay, fk.shape[1])
    if log_gate is not None:
        if log_decay is not None:
            raise ValueError("pass log_decay or log_gate, not both")
        B, _, T, _ = fq.shape
        if not isinstance(log_gate, torch.Tensor) or tuple(log_gate.shape) != (B, fk.shape[1], T):
            raise ValueError(f"log_gate must be a tensor of shape {(B, fk.shape[1], T)}, got "
                             f"{tuple(log_gate.shape) if isinstance(log_gate, torch.Tensor) else type(log_gate)}")
    kw = dict(normalize=normalize, eps=eps, initial_state=initial_state, output_final_state=output_final_state)
    be = resolve_attention_backend(backend, "linear_attention", fq, fk, v)
    if be == "triton":
        _same_dtype(fq, fk, v)
        from .linear_attn.chunk import chunk_linear_attention
        return chunk_linear_attention(fq, fk, v, log_decay=log_decay, log_gate=log_gate, **kw)
    if log_gate is not None:
        from .linear_attn.naive import naive_gated_linear_attention
        return naive_gated_linear_attention(fq, fk, v, log_gate, **kw)
    from .linear_attn.naive import naive_linear_attention
    return naive_linear_attention(fq, fk, v, log_decay=log_decay, **kw)


def hybrid_attention(q, k, v, fq, fk, mix, *, window: int, scale: float, eps: float = 1e-6, initial_state=None,
                     output_final_state: bool = False, log_decay=None, backend: str = "auto"):
    """LoLCATs sliding-window softmax + linear attention under one normaliser.

    q (B,H,T,D), k (B,Hkv,T,D), v (B,Hkv,T,Dv), fq (B,H,T,F), fk (B,Hkv,T,F), mix (H,) -> o (B,H,T,Dv).
    Keys i-W < j <= i use exp(scale q.k - m_i) with weight sigmoid(mix); older keys use g^(i-j) fq.fk with weight
    1 - sigmoid(mix) (g = exp(log_decay[kv head]), 1 without log_decay). final_state = linear state of the
    L = max(0, T-W) tokens j <= T-1-W: g^L S0 + sum_{j<L} g^(L-1-j) fk_j v_j^T. initial_state enters query i
    with g^(i+1). Backends "triton" and "naive" ("auto": triton on CUDA, naive otherwise).
    """
    float_dtype_ok(q, k, v, fq, fk)
    check_gqa(q.shape[1], k.shape[1])
    _check_state(initial_state)
    _check_decay(log_decay, k.shape[1])
    if int(window) < 1:
        raise ValueError("window must be >= 1")
    kw = dict(window=int(window), scale=float(scale), eps=eps, initial_state=initial_state,
              output_final_state=output_final_state, log_decay=log_decay)
    be = resolve_attention_backend(backend, "hybrid_attention", q, k, v, fq, fk)
    if be == "triton":
        _same_dtype(q, k, v, fq, fk)
        from .hybrid_attn.fused import fused_hybrid_attention
        return fused_hybrid_attention(q, k, v, fq, fk, mix, **kw)
    from .hybrid_attn.naive import naive_hybrid_attention
    return naive_hybrid_attention(q, k, v, fq, fk, mix, **kw)


@torch.no_grad()
def linear_decode_step(fq_t, fk_t, v_t, state, *, normalize: bool = True, eps: float = 1e-6, log_decay=None,
                       backend: str = "auto", log_gate=None):
    """One decode token: fq_t (B,H,F), fk_t (B,Hkv,F), v_t (B,Hkv,Dv); state (S, z) fp32, updated IN PLACE:
    S = g S + fk_t v_t^T, z = g z + fk_t (g = exp(log_decay[kv head]) or exp(log_gate[row, kv head]), 1 without
    either).

    Returns (o_t (B,H,Dv), state) where state is the same tensor pair. Inference only (no autograd).
    """
    _check_decay(log_decay, fk_t.shape[1])
    _check_gate(log_gate, log_decay, fk_t.shape[0], fk_t.shape[1])
    be = resolve_backend(backend, fq_t, fk_t, v_t, *state)
    if be == "triton":
        _same_dtype(fq_t, fk_t, v_t)
        from .linear_attn.recurrent import triton_linear_decode_step
        return triton_linear_decode_step(fq_t, fk_t, v_t, state, normalize=normalize, eps=eps, log_decay=log_decay,
                                         log_gate=log_gate)
    from .linear_attn.naive import linear_decode_step_ref
    return linear_decode_step_ref(fq_t, fk_t, v_t, state, normalize=normalize, eps=eps, log_decay=log_decay,
                                  log_gate=log_gate)


@torch.no_grad()
def hybrid_decode_step(q_t, k_t, v_t, fq_t, fk_t, mix, cache: HybridDecodeCache, *, window: int, scale: float,
                       eps: float = 1e-6, log_decay=None, backend: str = "auto", position: torch.Tensor | None = None,
                       first: torch.Tensor | None = None, log_gate=None, sink_queries=None, separate: bool = False):
    """Append one token per sequence to `cache` (IN PLACE) and return its hybrid-attention output (B,H,Dv).

    Equals `hybrid_attention` (same log_decay) on the whole sequence at that position. Inference only (no autograd).
    With log_decay an eviction is S = g S + fk v^T (z alike) and the query reads the state with g^min(W, t+1)
    (HybridDecodeCache: the state sits at the last token that left the window).
    `position`: optional 1-element integer tensor on the cache's device holding the token index (replaces
    `cache.seen`, which is then left alone; the caller advances it), so the step can be captured in a CUDA graph.
    `first`: optional (B,) integer tensor, row b's left padding: tokens before index first[b] are left out of its
    window (keep their fk and v zero in the cache, so that evicting them adds nothing to the state).
    `sink_queries` (B, H, D): the query that reads a cache's sinks, when not q_t.
    `separate`: each branch normalised on its own (PyTorch only: backend "triton" refuses it, "auto" picks the
    reference).
    """
    if position is not None and position.numel() != 1:
        raise ValueError("position must hold one integer (tokens seen)")
    _check_decay(log_decay, k_t.shape[1])
    _check_gate(log_gate, log_decay, k_t.shape[0], k_t.shape[1])  # the steps check that the cache keeps gates
    if sink_queries is not None and tuple(sink_queries.shape) != tuple(q_t.shape):
        raise ValueError(f"sink_queries must have q_t's shape {tuple(q_t.shape)}, got {tuple(sink_queries.shape)}")
    if separate and backend == "triton":
        raise ValueError("the Triton decode step shares one normaliser; separate normalisers run backend='reference'")
    be = "reference" if separate else resolve_backend(backend, q_t, k_t, v_t, fq_t, fk_t, cache.S)
    kw = dict(window=window, scale=scale, eps=eps, log_decay=log_decay, first=first, log_gate=log_gate,
              sink_queries=sink_queries, position=position)
    if be == "triton":
        _same_dtype(q_t, k_t, v_t, fq_t, fk_t)
        from .hybrid_attn.recurrent import triton_hybrid_decode_step
        return triton_hybrid_decode_step(q_t, k_t, v_t, fq_t, fk_t, mix, cache, **kw)
    from .hybrid_attn.naive import hybrid_decode_step_ref
    return hybrid_decode_step_ref(q_t, k_t, v_t, fq_t, fk_t, mix, cache, separate=separate, **kw)


def hedgehog_feature_map(x, weight, bias=None, *, out_dtype=None, backend: str = "auto"):
    """Hedgehog feature map per head: x (B,H,T,D), weight (H,D,P), bias (H,P) or None -> (B,H,T,2P)
    [softmax(z), softmax(-z)] over the features, z = x W_h + b_h, fp32 math, output in `out_dtype`
    (default x.dtype). Gradients for x, weight and bias. "naive" and "reference" are the same PyTorch op.
    """
    float_dtype_ok(x, weight, bias)
    if x.dim() != 4 or weight.dim() != 3 or weight.shape[0] != x.shape[1] or weight.shape[1] != x.shape[3]:
        raise ValueError(f"expected x (B,H,T,D) and weight (H,D,P), got {tuple(x.shape)} and {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0], weight.shape[2]):
        raise ValueError(f"bias must be (H,P) = {(weight.shape[0], weight.shape[2])}, got {tuple(bias.shape)}")
    be = resolve_backend(backend, x, weight, bias)
    if be == "triton":
        from .feature_map.hedgehog import triton_hedgehog_feature_map
        return triton_hedgehog_feature_map(x, weight, bias, out_dtype)
    from .feature_map.naive import hedgehog_feature_map_ref
    return hedgehog_feature_map_ref(x, weight, bias, out_dtype)


# --- sparse attention (sparse_window/, block_sparse/; shared Triton engine common/block_list_attn.py) ---
__all__ += ["sliding_window_attention", "block_sparse_attention"]


def _check_sparse(q, k, v):
    float_dtype_ok(q, k, v)
    check_gqa(q.shape[1], k.shape[1])
    if q.dim() != 4 or k.shape != v.shape or k.shape[-1] != q.shape[-1] or k.shape[2] != q.shape[2]:
        raise ValueError(f"expected q (B,H,T,D), k and v (B,Hkv,T,D), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")


def sliding_window_attention(q, k, v, *, window: int, sinks: int = 0, scale: float, backend: str = "auto"):
    """Causal softmax attention of query i over keys j with i - j < window or j < sinks (attention sinks /
    global tokens). q (B,H,T,D), k and v (B,Hkv,T,D) -> (B,H,T,D). "reference" is the O(T^2) oracle."""
    _check_sparse(q, k, v)
    if int(window) < 1 or int(sinks) < 0:
        raise ValueError(f"window must be >= 1 and sinks >= 0, got window={window}, sinks={sinks}")
    if resolve_backend(backend, q, k, v) == "triton":
        _same_dtype(q, k, v)
        from .sparse_window.triton import triton_sliding_window_attention
        return triton_sliding_window_attention(q, k, v, window=int(window), sinks=int(sinks), scale=float(scale))
    from .sparse_window.naive import naive_sliding_window_attention
    return naive_sliding_window_attention(q, k, v, window=int(window), sinks=int(sinks), scale=float(scale))


def block_sparse_attention(q, k, v, *, block_size: int, topk: int, scale: float, idx=None, backend: str = "auto"):
    """Dynamic top-k block-sparse causal attention: query block m attends to the `topk` earlier key blocks
    whose mean-pooled key best matches its first query, plus itself (block_sparse/naive.py). `idx`: a
    precomputed selection (B,H,nblocks,topk+1). "reference" is the O(T^2) oracle."""
    _check_sparse(q, k, v)
    if int(topk) < 0:
        raise ValueError(f"topk must be >= 0, got {topk}")
    be = resolve_backend(backend, q, k, v)
    if be == "triton":
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16 for the Triton kernel, got {block_size}")
        _same_dtype(q, k, v)
        from .block_sparse.triton import triton_block_sparse_attention
        return triton_block_sparse_attention(q, k, v, block_size=int(block_size), topk=int(topk), scale=float(scale),
                                             idx=idx)
    if int(block_size) < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    from .block_sparse.naive import naive_block_sparse_attention
    return naive_block_sparse_attention(q, k, v, block_size=int(block_size), topk=int(topk), scale=float(scale),
                                        idx=idx)


# --- mixture-of-experts SwiGLU experts (moe/) ---
__all__ += ["moe_experts"]


def moe_experts(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, *, backend: str = "auto"):
    """Routed SwiGLU experts in transformers' MixtralExperts layout.

    hidden (N,D), top_k_index (N,k) int, top_k_weights (N,k), gate_up_proj (E,2I,D) (rows [0,I) gate, [I,2I) up),
    down_proj (E,D,I) -> (N,D) = sum_j w[:, j] * down_e(silu(gate_e x) * up_e x), e = top_k_index[:, j].
    "triton": token sort/permute + grouped GEMMs (fp32 accumulation, autograd for hidden, top_k_weights and both
    weights); "reference": sorted PyTorch (one host sync); "naive": transformers' per-expert loop.
    """
    float_dtype_ok(hidden, top_k_weights, gate_up_proj, down_proj)
    if hidden.dim() != 2 or top_k_index.dim() != 2 or top_k_index.shape[0] != hidden.shape[0]:
        raise ValueError(f"expected hidden (N,D) and top_k_index (N,k), got {tuple(hidden.shape)} and "
                         f"{tuple(top_k_index.shape)}")
    if tuple(top_k_weights.shape) != tuple(top_k_index.shape):
        raise ValueError(f"top_k_weights {tuple(top_k_weights.shape)} must match top_k_index "
                         f"{tuple(top_k_index.shape)}")
    if top_k_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"top_k_index must be int64/int32, got {top_k_index.dtype}")
    e, two_i, d = gate_up_proj.shape if gate_up_proj.dim() == 3 else (None, None, None)
    if (e is None or two_i % 2 or d != hidden.shape[1] or down_proj.dim() != 3
            or tuple(down_proj.shape) != (e, d, two_i // 2)):
        raise ValueError(f"expected gate_up_proj (E,2I,D={hidden.shape[1]}) and down_proj (E,D,I), got "
                         f"{tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)}")
    be = resolve_backend(backend, hidden, top_k_index, top_k_weights, gate_up_proj, down_proj)
    if be == "triton":
        _same_dtype(hidden, gate_up_proj, down_proj)
        from .moe.triton import triton_moe_experts
        return triton_moe_experts(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj)
    if be == "naive":
        from .moe.naive import naive_moe_experts
        return naive_moe_experts(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj)
    from .moe.naive import sorted_moe_experts
    return sorted_moe_experts(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj)
