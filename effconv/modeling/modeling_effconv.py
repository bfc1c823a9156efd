"""effconv models: a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3 weights load unchanged) whose layers
each keep softmax attention or use learned-feature-map linear attention with an optional sliding window.

This file ships inside every exported model, so it imports only torch, transformers and its two siblings.
Triton kernels from the `effconv_kernels` package are chosen once, in backend.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as hf_init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb, rotate_half
from transformers.utils import logging

from .attention_ops import (
    FeatureMap,
    attention_scale,
    hybrid_attention,
    linear_attention,
    select_key_blocks,
    NO_SINK,
    Sinks,
    softmax_attention,
    take_sinks,
)
from .attention_ops import block_sparse_attention as block_sparse_attention_ref
from .attention_ops import sliding_window_attention as sliding_window_attention_ref
from .backend import kernels as _kernels
from .backend import use_kernels
from .configuration_effconv import EffconvConfig
from .fast_generate import FastGenerationMixin, freeze, thaw
from .moe import MoeExperts, MoeMLP

logger = logging.get_logger(__name__)


def _say_uses_pytorch(what: str, decoding: str = "one-token decoding uses the Triton step") -> None:
    logger.warning_once(f"effconv: {what} run their chunked (prompt and training) path on PyTorch: the chunked "
                        f"Triton kernels do not take them yet (slower, same results); {decoding}")


def decay_logit_init(num_kv_heads: int, memory: float) -> torch.Tensor:
    """Decay logits whose decays g = 1 - 1/tau keep a memory of tau tokens, tau log-spaced from memory / 4 to
    memory * 4 over the kv heads (one tau for one head): long memory at the start, several time scales."""
    if num_kv_heads == 1:
        tau = torch.tensor([float(memory)])
    else:
        tau = float(memory) * torch.logspace(-2, 2, num_kv_heads, base=2.0)
    tau = tau.clamp_min(2.0)
    return torch.log(tau - 1.0)  # logit of 1 - 1/tau


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the teacher's (Llama) norm: normalised in fp32, rounded to x's dtype, then scaled; F.rms_norm computes
        # the first two in one fused kernel on CUDA (the composite ops elsewhere) instead of six elementwise ones,
        # which a one-token decode step, bound by its kernel count, feels
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.variance_epsilon)


class GatedMLP(nn.Module):
    def __init__(self, config: EffconvConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class RotaryTables(tuple):
    """(cos, sin) of the tokens' positions, and in `capped` those of the positions capped at
    max_position_embeddings - 1: hybrid layers read their sinks with queries rotated there, so a sink is never
    further from a query than the teacher's positions reach (the window is never that far; the linear part has no
    RoPE when it reads unrotated features). Below the cap both are the same."""

    capped: tuple[torch.Tensor, torch.Tensor] | None = None


class LayerCache:
    """Per-layer generation state. Softmax layers keep all keys/values; linear layers keep the linear state
    (S, z) of tokens older than the window plus the last `window` keys, values and feature-mapped keys."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    key_features: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None  # (B, tokens held) True for real tokens; None when nothing is padded
    key_gates: torch.Tensor | None = None  # gated hybrid layers: (B, Hkv, tokens held) log gates of the held keys
    state: tuple[torch.Tensor, torch.Tensor] | None = None
    sinks: object | None = None  # hybrid layers with sinks: attention_ops.Sinks of the tokens so far
    key_sinks: torch.Tensor | None = None  # ... and (B, tokens held) which of the held keys are sinks
    seen: int = 0  # hybrid layers with sinks: tokens so far (the ring numbers its tokens absolutely)
    key_positions: torch.Tensor | None = None  # sliding layers: absolute positions of the held keys (sinks + window)
    block_selection: torch.Tensor | None = None  # block_sparse layers: (B, H, blocks so far, topk + 1) chosen blocks
    # One-token decoding of a hybrid layer keeps the window in a ring buffer (effconv_kernels.HybridDecodeCache,
    # which then also owns the state); `ring_position` (a 1-element device tensor = tokens seen) replaces its
    # Python counter for CUDA-graph decoding (effconv/fast_decode.py).
    ring: object | None = None
    ring_position: torch.Tensor | None = None
    # Static decoding (fast_generate.py): fixed buffers that outlive a generate call, and while they are in use
    # (`static` set) the shared device counter and padding. Softmax layers write key t into slot t.
    static: object | None = None
    static_keys: torch.Tensor | None = None
    static_values: torch.Tensor | None = None
    static_state: tuple[torch.Tensor, torch.Tensor] | None = None
    static_ring: object | None = None

    def nbytes(self) -> int:
        ring = [self.ring.S, self.ring.z, self.ring.k, self.ring.v, self.ring.fk, self.ring.lg, self.ring.sk,
                self.ring.sv] if self.ring is not None else []
        sinks = [self.sinks.keys, self.sinks.values] if self.sinks is not None else []
        tensors = [self.keys, self.values, self.key_features, self.key_gates, *(self.state or ()), *ring, *sinks]
        if self.static is not None:
            tensors += [self.static_keys, self.static_values]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def clear(self) -> None:
        """Forget the tokens; keep the static buffers (a graph captured on them stays valid)."""
        self.keys = self.values = self.key_features = self.key_mask = self.key_gates = self.state = None
        self.sinks = self.key_sinks = None
        self.seen = 0
        self.key_positions = self.block_selection = self.ring = self.ring_position = self.static = None


class EffconvCache(Cache):
    """Cache for effconv models: KV for softmax layers, recurrent state + window KV for linear layers.

    `static=True` (what `model.generate` uses on CUDA, fast_generate.py): from the first one-token step on, the
    layers decode from fixed buffers, softmax layers from a KV cache of `max_cache_len` slots."""

    def __init__(self, num_layers: int, *, static: bool = False, max_cache_len: int = 0):
        super().__init__(layers=[])
        self.layer_caches = [LayerCache() for _ in range(num_layers)]
        self.seen_tokens = 0
        self.static = static
        self.max_cache_len = max_cache_len
        self.frozen = False  # the static buffers hold the tokens so far
        self.static_context = None
        self.graph = None  # fast_generate.DecodeGraphs' captured step on these buffers
        self.graph_warm = False

    # Some transformers releases (5.17) define `max_cache_len` on Cache as a read-only property: own it here.
    @property
    def max_cache_len(self) -> int:
        return self._max_cache_len

    @max_cache_len.setter
    def max_cache_len(self, value: int) -> None:
        self._max_cache_len = value

    def reset_for_generation(self) -> None:
        for c in self.layer_caches:
            c.clear()
        self.seen_tokens = 0
        self.static = True
        self.frozen = False
        self.graph_warm = self.graph is not None

    def has_room(self, tokens: int) -> bool:
        """Whether the static KV buffers take `tokens` more tokens (always, for a model without softmax layers)."""
        return not any(c.static_keys is not None for c in self.layer_caches) or (
            self.seen_tokens + tokens <= self.max_cache_len)

    def __len__(self) -> int:
        return len(self.layer_caches)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.seen_tokens > 0

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layer_caches)

    def _map(self, fn) -> None:
        for c in self.layer_caches:
            for name in ("keys", "values", "key_features", "key_mask", "key_gates", "key_sinks", "block_selection"):
                t = getattr(c, name)
                if t is not None:
                    setattr(c, name, fn(t))
            if c.state is not None:
                c.state = tuple(fn(t) for t in c.state)
            if c.sinks is not None:
                c.sinks = Sinks(*(None if t is None else fn(t) for t in c.sinks))
            if c.ring is not None:
                for name in ("S", "z", "k", "v", "fk", "lg", "sk", "sv"):
                    if getattr(c.ring, name) is not None:
                        setattr(c.ring, name, fn(getattr(c.ring, name)).contiguous())

    def detach_(self) -> None:
        """Cut the autograd graph at the tokens so far (truncated backpropagation through time)."""
        self._map(lambda t: t.detach())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a recurrent state cannot be cropped")


def _append(old: torch.Tensor | None, new: torch.Tensor, dim: int = 2) -> torch.Tensor:
    return new if old is None else torch.cat([old, new], dim=dim)


class EffconvAttention(nn.Module):
    def __init__(self, config: EffconvConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.layer_type = config.attention_types[layer_idx]
        self.num_heads = config.num_attention_heads
        # "gqa" layers (effconv/gqa.py) have their own, merged, number of key/value heads
        self.num_kv_heads = config.gqa_kv_heads if self.layer_type == "gqa" else config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = attention_scale(self.head_dim)
        self.teacher_window = config.sliding_window if config.teacher_sliding_layers[layer_idx] else None
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.window = config.window_size if self.layer_type == "linear" else 0
        self.sinks = getattr(config, "linear_sinks", 0) if self.window > 0 else 0
        self.separate = self.window > 0 and getattr(config, "linear_normalizer", "shared") == "separate"
        if self.layer_type == "linear":
            fm, fd = config.feature_map, config.feature_dim
            self.feature_map_q = FeatureMap(fm, self.num_heads, self.head_dim, fd)
            self.feature_map_k = FeatureMap(fm, self.num_kv_heads, self.head_dim, fd)
            if self.window > 0:
                # sigmoid(0) = 0.5: window and linear terms start with equal weight
                self.window_mix = nn.Parameter(torch.zeros(self.num_heads))
            gated = getattr(config, "linear_gate", False)
            if config.linear_decay or gated:
                # per kv head: g = sigmoid(decay_logit), the weight of the linear state per token of age
                self.decay_logit = nn.Parameter(decay_logit_init(self.num_kv_heads, config.decay_memory))
            if gated:
                # per kv head and token: g_t = sigmoid(decay_logit + forget_gate(x_t)); zero weights start it as the
                # plain decay (long memory), training makes it data-dependent
                self.forget_gate = nn.Linear(h, self.num_kv_heads, bias=False)
                nn.init.zeros_(self.forget_gate.weight)

    @property
    def is_gated(self) -> bool:
        return hasattr(self, "forget_gate")

    def log_decay(self) -> torch.Tensor | None:
        """log g per kv head (fp32), or None for a layer without decay (and for a gated layer, whose decay is per
        token: log_gate)."""
        logit = getattr(self, "decay_logit", None)
        return None if logit is None or self.is_gated else F.logsigmoid(logit.float())

    def log_gate(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """log g_t (B, Hkv, T) fp32 of a gated layer from its input (B, T, hidden), else None."""
        if not self.is_gated:
            return None
        w = self.forget_gate.weight  # fp32 while trained (the new parameters stay fp32 in a bf16 model)
        logits = F.linear(hidden_states.to(w.dtype), w).float() + self.decay_logit.float()
        return F.logsigmoid(logits).transpose(1, 2)

    @property
    def is_converted(self) -> bool:
        return self.layer_type != "softmax"  # linear, sliding or block_sparse

    @property
    def is_sparse(self) -> bool:
        return self.layer_type in ("sliding", "block_sparse")

    def project(self, x: torch.Tensor, position_embeddings, *, unrotated: bool = False):
        """q (B,H,T,D), k, v (B,Hkv,T,D) of the layer's input, RoPE applied; with `unrotated` also q and k before
        RoPE (what the feature maps read when config.linear_rope is off)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = position_embeddings
        q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
        return (q_rot, k_rot, v, q, k) if unrotated else (q_rot, k_rot, v)

    @property
    def features_unrotated(self) -> bool:
        """The feature maps read queries and keys before RoPE: the linear part then carries no absolute position,
        so positions past the training length are no new input to it (the window keeps RoPE)."""
        return self.layer_type == "linear" and not self.config.linear_rope

    def merge_heads(self, o: torch.Tensor) -> torch.Tensor:
        """Per-head outputs (B,H,T,Dv) through o_proj."""
        b, _, t, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

    def softmax(self, q, k, v, cache: LayerCache | None, key_mask):
        """Exact causal softmax attention (the teacher's, sliding where the teacher's layer is)."""
        if cache is not None and cache.static is not None:
            return self._static_softmax_step(q, k, v, cache)
        if cache is not None:
            cache.keys, cache.values = _append(cache.keys, k), _append(cache.values, v)
            k, v = cache.keys, cache.values
        return softmax_attention(q, k, v, scale=self.scale, key_padding_mask=key_mask, sliding_window=self.teacher_window)

    def _static_softmax_step(self, q, k, v, cache: LayerCache):
        """One token per row into slot `position` of the preallocated KV cache, attending to the slots before it
        (no host sync: CUDA-graph safe). Left padding and the teacher's window are masked per slot."""
        ctx = cache.static
        cache.static_keys.index_copy_(2, ctx.position, k)
        cache.static_values.index_copy_(2, ctx.position, v)
        allowed = ctx.slots <= ctx.position
        if self.teacher_window is not None:
            allowed = allowed & (ctx.slots > ctx.position - self.teacher_window)
        mask = allowed[None, :] & (ctx.slots[None, :] >= ctx.first_token[:, None])
        return F.scaled_dot_product_attention(q, cache.static_keys, cache.static_values, attn_mask=mask[:, None, None],
                                              scale=self.scale, enable_gqa=q.shape[1] != k.shape[1])

    def _sparse(self, q, k, v, cache: LayerCache | None, key_mask):
        """Sliding-window (+ sinks) or top-k block-sparse softmax attention of the new tokens. The cache holds
        keys/values (sliding: only the sinks and the last window; block_sparse: all, plus the block choices)."""
        cfg, t_new = self.config, q.shape[2]
        kernels = self._use_kernels(q) and key_mask is None and cache is None
        if self.layer_type == "sliding":
            window, sinks = cfg.window_size, cfg.sink_tokens
            if kernels:
                return _kernels.sliding_window_attention(q, k, v, window=window, sinks=sinks, scale=self.scale,
                                                         backend="triton")
            start = 0 if cache is None or cache.key_positions is None else int(cache.key_positions[-1]) + 1
            q_pos = torch.arange(start, start + t_new, device=q.device)
            k_pos = q_pos
            if cache is not None and cache.keys is not None:
                k, v = torch.cat([cache.keys, k], 2), torch.cat([cache.values, v], 2)
                k_pos = torch.cat([cache.key_positions, q_pos])
            mask = None if key_mask is None else key_mask[:, k_pos]
            o = sliding_window_attention_ref(q, k, v, scale=self.scale, window=window, sinks=sinks, q_positions=q_pos,
                                             k_positions=k_pos, key_padding_mask=mask)
            if cache is not None:  # the next query (position end) needs the sinks and keys after end - window (one spare kept)
                keep = (k_pos < sinks) | (k_pos >= start + t_new - window)
                cache.keys, cache.values, cache.key_positions = k[:, :, keep], v[:, :, keep], k_pos[keep]
            return o
        bs, topk = cfg.sparse_block_size, cfg.sparse_topk
        past = 0 if cache is None or cache.keys is None else cache.keys.shape[2]
        if cache is not None:
            cache.keys, cache.values = _append(cache.keys, k), _append(cache.values, v)
            k, v = cache.keys, cache.values
        selection = select_key_blocks(q, k, block_size=bs, topk=topk, q_start=past,
                                      selection=None if cache is None else cache.block_selection)
        if cache is not None:
            cache.block_selection = selection
        if kernels and bs >= 16 and bs & (bs - 1) == 0:
            return _kernels.block_sparse_attention(q, k, v, block_size=bs, topk=topk, scale=self.scale, idx=selection,
                                                   backend="triton")
        mask = None if key_mask is None else key_mask[:, : k.shape[2]]
        return block_sparse_attention_ref(q, k, v, selection, scale=self.scale, block_size=bs, key_padding_mask=mask)

    def _use_kernels(self, x: torch.Tensor) -> bool:
        return use_kernels(self.config.attention_backend, x)

    def _decode_step(self, q, k, v, cache: LayerCache, feature_q, feature_k, log_gate=None, sink_queries=None):
        """One new token per sequence with a filled cache: O(1) recurrent update of the state (and of the window's
        ring buffer for the hybrid) with the decode-step ops, instead of a chunked pass over the window prefix.
        Gated layers (`log_gate` (B, Hkv, 1)) and layers with sinks run the Triton steps too."""
        gate = None if log_gate is None else log_gate[:, :, 0]
        backend = "triton" if self._use_kernels(q) else "reference"
        fm_kernel = None
        if backend == "triton" and hasattr(_kernels, "hedgehog_feature_map"):
            def fm_kernel(x, w, b):
                return _kernels.hedgehog_feature_map(x, w, b, out_dtype=v.dtype, backend="triton")
        fq = self.feature_map_q(feature_q, fm_kernel)[:, :, 0].to(v.dtype)
        fk = self.feature_map_k(feature_k, fm_kernel)[:, :, 0].to(v.dtype)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
        eps = self.config.linear_eps
        if self.window == 0:
            S, z = cache.state
            if S.dtype != torch.float32 or z.dtype != torch.float32 or not (S.is_contiguous() and z.is_contiguous()):
                cache.state = (S.float().contiguous(), z.float().contiguous())  # the op updates it in place
            o, _ = _kernels.linear_decode_step(fq, fk, v, cache.state, eps=eps, log_decay=self.log_decay(),
                                               backend=backend, log_gate=gate)
        else:
            if cache.ring is None:  # first decode step after a prefill: window tail + the prefill's final state
                cache.ring = _kernels.HybridDecodeCache.from_prefill(
                    cache.keys, cache.values, cache.key_features.to(cache.keys.dtype), window=self.window,
                    final_state=cache.state, log_decay=self.log_decay(), key_gates=cache.key_gates,
                    **self._ring_sinks(cache), seen=cache.seen if self.sinks else None,
                )
                cache.keys = cache.values = cache.key_features = cache.state = cache.key_gates = None
                cache.sinks = cache.key_sinks = None
            extra = {} if cache.ring_position is None else {"position": cache.ring_position}
            if cache.static is not None:
                extra["first"] = cache.static.first_token
            if sink_queries is not None:
                extra["sink_queries"] = sink_queries[:, :, 0]
            if self.separate:
                extra["separate"], backend = True, "reference"  # the Triton step shares one normaliser
            o = _kernels.hybrid_decode_step(
                q, k, v, fq, fk, self.window_mix, cache.ring, window=self.window, scale=self.scale, eps=eps,
                log_decay=self.log_decay(), backend=backend, log_gate=gate, **extra,
            )
        return o[:, :, None]

    def _ring_sinks(self, cache: LayerCache) -> dict:
        """from_prefill's sink arguments: the prefill's sinks (its first tokens; no padding on this path)."""
        if not self.sinks:
            return {}
        if cache.sinks is None:
            raise RuntimeError("a hybrid layer with sinks has a cache without them")
        return {"sink_keys": cache.sinks.keys, "sink_values": cache.sinks.values}

    @staticmethod
    def _unroll_ring(cache: LayerCache) -> None:
        """Back from the ring buffer to (state, window keys in token order) for a multi-token continuation."""
        ring = cache.ring
        seen = int(cache.ring_position) if cache.ring_position is not None else ring.seen
        w = ring.k.shape[2]
        held = min(seen, w)
        order = torch.tensor([(seen - held + i) % w for i in range(held)], device=ring.k.device)
        cache.keys, cache.values, cache.key_features = (x.index_select(2, order) for x in (ring.k, ring.v, ring.fk))
        cache.key_gates = None if ring.lg is None else ring.lg.index_select(2, order)
        if ring.sk is not None:  # tokens first..first+S-1 are the sinks (first: the static cache's left padding)
            count, b, dev = ring.sk.shape[2], ring.k.shape[0], ring.k.device
            first = (cache.static.first_token if cache.static is not None
                     else torch.zeros(b, dtype=torch.long, device=dev))[:, None]
            positions = torch.where(first + torch.arange(count, device=dev) < seen, -1, NO_SINK)
            token = seen - held + torch.arange(held, device=dev)
            cache.sinks = Sinks(None, ring.sk, ring.sv, positions)
            cache.key_sinks = (token >= first) & (token < first + count)
            cache.seen = seen
        cache.state, cache.ring, cache.ring_position = (ring.S, ring.z), None, None

    def _linear(self, q, k, v, cache: LayerCache | None, key_mask, features=None, log_gate=None, sink_queries=None):
        """Linear / hybrid attention over the new tokens, continuing from `cache` when it holds earlier ones.
        `features`: the (queries, keys) the feature maps read (default q and k); `log_gate` (B, Hkv, T): the new
        tokens' gates of a gated layer (the chunked linear kernel and the one-token hybrid step take them; the
        chunked hybrid path with gates is PyTorch)."""
        feature_q, feature_k = features if features is not None else (q, k)
        gated = log_gate is not None
        if gated and self.window > 0 and self._use_kernels(q):
            _say_uses_pytorch("gated hybrid layers (linear_gate with a window)")
        if self.sinks and self._use_kernels(q):
            _say_uses_pytorch("hybrid layers with attention sinks (linear_sinks)")
        if self.separate and self._use_kernels(q):
            _say_uses_pytorch("hybrid layers with separate normalisers (linear_normalizer)",
                              "one-token decoding too")
        if (
            cache is not None and q.shape[2] == 1 and key_mask is None and _kernels is not None
            and (cache.state is not None or cache.ring is not None) and not torch.is_grad_enabled()
        ):
            return self._decode_step(q, k, v, cache, feature_q, feature_k, log_gate, sink_queries)
        if cache is not None and cache.ring is not None:
            self._unroll_ring(cache)
        fm_kernel = None
        if self._use_kernels(q) and hasattr(_kernels, "hedgehog_feature_map") and (self.window == 0 or key_mask is None):
            # fused map, features come out in v's dtype (what the attention kernels get cast to anyway)
            def fm_kernel(x, w, b):
                return _kernels.hedgehog_feature_map(x, w, b, out_dtype=v.dtype, backend="triton")
        fq, fk = self.feature_map_q(feature_q, fm_kernel), self.feature_map_k(feature_k, fm_kernel)
        t_new = q.shape[2]
        initial_state = None
        if cache is not None and cache.state is not None:
            initial_state = cache.state
            if self.window > 0 and cache.keys is not None:
                # earlier tokens still inside the window lead the keys (the queries are the new tokens only)
                k, v, fk = (torch.cat([c, x], dim=2) for c, x in ((cache.keys, k), (cache.values, v), (cache.key_features, fk)))
                if gated:
                    log_gate = torch.cat([cache.key_gates, log_gate], dim=2)
        keep_state = cache is not None
        log_decay = self.log_decay()
        if key_mask is not None:
            key_mask = key_mask[:, -k.shape[2]:]
        sinks = self._take_sinks(k, v, t_new, cache, key_mask) if self.sinks else None
        if sinks is not None:  # sinks never enter the linear state (nor the cache's window features)
            fk = fk * (~sinks.key_is_sink)[:, None, :, None].to(fk.dtype)
        if self.window > 0:
            mix = self.window_mix
            if self._use_kernels(q) and key_mask is None and not gated and sinks is None and not self.separate:
                # the kernels take every operand in one dtype and accumulate in fp32 themselves, and one query row
                # per key: the earlier keys' rows are computed and dropped
                held = k.shape[2] - t_new
                q, fq = (F.pad(x, (0, 0, held, 0)) for x in (q, fq))
                o, state = _kernels.hybrid_attention(
                    q, k, v, fq.to(v.dtype), fk.to(v.dtype), mix, window=self.window, scale=self.scale, eps=self.config.linear_eps,
                    initial_state=initial_state, output_final_state=keep_state, log_decay=log_decay, backend="triton",
                )
            else:
                o, state = hybrid_attention(
                    q, k, v, fq, fk, mix, window=self.window, scale=self.scale, eps=self.config.linear_eps,
                    initial_state=initial_state, output_final_state=keep_state, key_padding_mask=key_mask,
                    log_decay=log_decay, log_gate=log_gate, sinks=sinks, sink_queries=sink_queries,
                    separate=self.separate,
                )
        else:
            if key_mask is not None:
                keep = key_mask[:, None, :, None].to(fk.dtype)
                fk, v = fk * keep, v * keep
            if self._use_kernels(q):  # gated too: the chunked kernels take per-token gates
                o, state = _kernels.linear_attention(
                    fq.to(v.dtype), fk.to(v.dtype), v, eps=self.config.linear_eps, initial_state=initial_state,
                    output_final_state=keep_state, log_decay=log_decay, log_gate=log_gate, backend="triton",
                )
            else:
                o, state = linear_attention(
                    fq, fk, v, eps=self.config.linear_eps, initial_state=initial_state, output_final_state=keep_state,
                    log_decay=log_decay, log_gate=log_gate,
                )
        if cache is not None:
            cache.state = state
            if self.window > 0:
                # clone: a slice would keep the whole prefill's k/v/fk storage alive (cache memory grows with the context)
                cache.keys, cache.values, cache.key_features = (x[:, :, -self.window:].clone() for x in (k, v, fk))
                cache.key_mask = None if key_mask is None else key_mask[:, -self.window:]
                if gated:
                    cache.key_gates = log_gate[:, :, -self.window:].clone()
                if sinks is not None:
                    cache.sinks, cache.key_sinks = sinks, sinks.key_is_sink[:, -self.window:].clone()
                    cache.seen = (cache.seen if initial_state is not None else 0) + t_new
        return o[:, :, -t_new:]

    def _take_sinks(self, k, v, t_new: int, cache: LayerCache | None, key_mask):
        """The sinks of a hybrid call over k, v (the held window keys, then the t_new new ones): the cache's, and
        the first real new tokens while there are free slots; held keys that are sinks stay out of the window."""
        held = k.shape[2] - t_new
        continuing = cache is not None and cache.sinks is not None and cache.state is not None
        new_real = (torch.ones(k.shape[0], t_new, dtype=torch.bool, device=k.device) if key_mask is None
                    else key_mask[:, -t_new:].bool())
        sinks = take_sinks(k, v, self.sinks, key_mask=F.pad(new_real, (held, 0), value=False),
                           earlier=cache.sinks if continuing else None)
        if continuing and held and cache.key_sinks is not None:
            sinks = sinks._replace(key_is_sink=sinks.key_is_sink | F.pad(cache.key_sinks, (0, t_new), value=False))
        return sinks

    def _sink_queries(self, q_raw, position_embeddings):
        """The queries a hybrid layer reads its sinks with: RoPE at the positions capped at
        max_position_embeddings - 1 (RotaryTables), or None (= the queries) when the tables are not capped."""
        capped = getattr(position_embeddings, "capped", None)
        if not self.sinks or capped is None:
            return None
        cos, sin = (x.unsqueeze(1) for x in capped)
        return q_raw * cos + rotate_half(q_raw) * sin

    def converted(self, q, k, v, cache: LayerCache | None, key_mask, features=None, log_gate=None, sink_queries=None):
        """The layer's converted attention (linear / hybrid, or sparse softmax) of q, k, v; `features`: the
        unrotated (q, k) when the feature maps read them (features_unrotated); `log_gate`: a gated layer's
        log_gate(hidden_states)."""
        if self.is_sparse:
            return self._sparse(q, k, v, cache, key_mask)
        return self._linear(q, k, v, cache, key_mask, features, log_gate, sink_queries)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: LayerCache | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        log_gate = self.log_gate(hidden_states)
        if self.features_unrotated or self.sinks:
            q, k, v, q_raw, k_raw = self.project(hidden_states, position_embeddings, unrotated=True)
            features = (q_raw, k_raw) if self.features_unrotated else None
            return self.merge_heads(self.converted(q, k, v, cache, key_mask, features, log_gate,
                                                   sink_queries=self._sink_queries(q_raw, position_embeddings)))
        q, k, v = self.project(hidden_states, position_embeddings)
        if self.is_converted and self.layer_type != "gqa":
            return self.merge_heads(self.converted(q, k, v, cache, key_mask, None, log_gate))
        return self.merge_heads(self.softmax(q, k, v, cache, key_mask))  # softmax and merged-KV (gqa) layers


class EffconvDecoderLayer(nn.Module):
    def __init__(self, config: EffconvConfig, layer_idx: int):
        super().__init__()
        self.self_attn = EffconvAttention(config, layer_idx)
        self.mlp = MoeMLP(config) if getattr(config, "num_experts", 0) else GatedMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, cache=None, key_mask=None):
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, cache, key_mask
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class EffconvPreTrainedModel(PreTrainedModel):
    config_class = EffconvConfig
    config: EffconvConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EffconvDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        # Linear, Embedding, RMSNorm and the rotary buffers are handled by transformers; its `init` functions
        # leave weights that were loaded from a checkpoint untouched.
        super()._init_weights(module)
        if isinstance(module, FeatureMap) and module.kind != "elu":
            eye = torch.eye(module.head_dim, module.proj_dim, dtype=module.weight.dtype, device=module.weight.device)
            hf_init.copy_(module.weight, eye.expand(module.num_heads, -1, -1))
            hf_init.zeros_(module.bias)
        elif isinstance(module, EffconvAttention) and hasattr(module, "window_mix"):
            hf_init.zeros_(module.window_mix)
        if isinstance(module, EffconvAttention) and hasattr(module, "decay_logit"):
            hf_init.copy_(module.decay_logit, decay_logit_init(module.num_kv_heads, self.config.decay_memory))
            if hasattr(module, "forget_gate"):
                hf_init.zeros_(module.forget_gate.weight)
        elif isinstance(module, MoeExperts):
            hf_init.normal_(module.gate_up_proj, std=self.config.initializer_range)
            hf_init.normal_(module.down_proj, std=self.config.initializer_range)
        elif isinstance(module, MoeMLP):
            hf_init.zeros_(module.router_bias)


class EffconvModel(EffconvPreTrainedModel):
    def __init__(self, config: EffconvConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([EffconvDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: EffconvCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        num_layers: int | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`num_layers` stops after that many layers (attention transfer needs nothing past the last one)."""
        past_key_values = _cache_argument(cache, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        b, t, _ = inputs_embeds.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = EffconvCache(self.config.num_hidden_layers)
        past = past_key_values.seen_tokens if past_key_values is not None else 0
        cache = past_key_values
        if cache is not None and getattr(cache, "frozen", False) and (t != 1 or torch.is_grad_enabled()):
            thaw(self, cache)  # the static buffers serve one-token inference steps only
        elif (cache is not None and getattr(cache, "static", False) and not cache.frozen and t == 1 and past > 0
              and not torch.is_grad_enabled()):
            freeze(self, cache, attention_mask, _kernels)  # the prompt is in: decode from fixed buffers
        static_step = cache is not None and getattr(cache, "frozen", False)
        if static_step and not cache.has_room(t):
            thaw(self, cache)
            static_step = False
        position_ids_given = position_ids is not None
        if position_ids is None:
            if static_step:  # from the device counter: a captured step never sees a host value
                position_ids = cache.static_context.position.view(1, 1).expand(b, 1)
            else:
                position_ids = torch.arange(past, past + t, device=inputs_embeds.device)[None].expand(b, -1)
        key_mask = None
        if static_step:
            pass  # the padding is in the static cache (first_token); no mask check, no host sync
        elif attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            key_mask = attention_mask.bool()
            if key_mask.shape[1] != past + t:
                raise ValueError(f"attention_mask covers {key_mask.shape[1]} tokens, expected {past + t}")

        hidden_states = inputs_embeds
        position_embeddings = RotaryTables(self.rotary_emb(hidden_states, position_ids))
        if getattr(self.config, "linear_sinks", 0):
            cap = self.config.max_position_embeddings - 1
            if _last_position_bound(past, t, cache, static_step, position_ids, position_ids_given) > cap:
                # device-side clamp: no host sync (CUDA-graph safe). Below the cap the sinks read the queries as they
                # are, and the second rotation (some 150 small kernels of a one-token step) is skipped
                position_embeddings.capped = self.rotary_emb(hidden_states, position_ids.clamp(max=cap))
        layers = self.layers[: num_layers or len(self.layers)]
        for i, layer in enumerate(layers):
            layer_cache = past_key_values.layer_caches[i] if past_key_values is not None else None
            if self.gradient_checkpointing and self.training:
                hidden_states = self._gradient_checkpointing_func(
                    layer.__call__, hidden_states, position_embeddings, layer_cache, key_mask
                )
            else:
                hidden_states = layer(hidden_states, position_embeddings, layer_cache, key_mask)
        if past_key_values is not None:
            past_key_values.seen_tokens += t
            if static_step:
                past_key_values.static_context.position.add_(t)
        if num_layers is None or num_layers >= len(self.layers):
            hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{_CACHE_FIELD: past_key_values})


def _last_position_bound(past: int, t: int, cache, static_step: bool, position_ids, given: bool) -> int:
    """The largest position a forward call can hold: a static step's is bounded by its cache's length (no host
    sync), a call without position ids by its token count, caller-given ids are read (one sync, prompt calls)."""
    if static_step:
        return cache.max_cache_len - 1
    if given:
        return int(position_ids.max()) if position_ids.numel() else -1
    return past + t - 1


# transformers >= 5.2x names the cache `cache` (the old name `past_key_values` still works, with a deprecation
# warning); earlier releases name it `past_key_values`. Outputs are built and read under the installed name.
_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _cache_argument(cache, kwargs: dict):
    """The cache under either name: transformers >= 5.2x passes `cache=`, earlier releases `past_key_values=`."""
    past_key_values = kwargs.pop("past_key_values", None)
    if past_key_values is not None and cache is not None and cache is not past_key_values:
        raise ValueError("pass the cache once, as `cache` or as `past_key_values`")
    return cache if cache is not None else past_key_values


class EffconvForCausalLM(FastGenerationMixin, EffconvPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: EffconvConfig):
        super().__init__(config)
        self.model = EffconvModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # linear layers keep a recurrent state: the model makes its own EffconvCache

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def converted_attentions(self) -> list[EffconvAttention]:
        return [layer.self_attn for layer in self.model.layers if layer.self_attn.is_converted]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: EffconvCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_cache_argument(cache, kwargs),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)})
