"""Configuration of effconv models: a Llama-family decoder whose layers each have their own attention type."""

from __future__ import annotations

from transformers import PretrainedConfig

# Attention types a layer can have. "softmax" is the teacher's exact attention (kept layers of a hybrid);
# "linear" is learned-feature-map linear attention, with a sliding softmax window when window_size > 0;
# "sliding" is softmax attention over the last window_size tokens plus the first sink_tokens tokens;
# "block_sparse" is softmax attention over the sparse_topk best earlier blocks of sparse_block_size tokens
# plus the own block (dynamic top-k). Sparse layers keep a KV cache (sliding: sinks + window only).
# "gqa" is softmax attention with gqa_kv_heads merged key/value heads (effconv/gqa.py).
ATTENTION_TYPES = ("softmax", "linear", "sliding", "block_sparse", "gqa")


class EffconvConfig(PretrainedConfig):
    model_type = "effconv"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        rms_norm_eps: float = 1e-6,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        o_proj_bias: bool = False,
        mlp_bias: bool = False,
        qk_norm: bool = False,
        sliding_window: int | None = None,
        teacher_sliding_layers: list[bool] | None = None,
        tie_word_embeddings: bool = False,
        base_model_type: str = "llama",
        attention_types: list[str] | None = None,
        feature_map: str = "hedgehog",
        feature_dim: int | None = None,
        window_size: int = 64,
        linear_eps: float = 1e-6,
        linear_decay: bool = False,
        linear_gate: bool = False,
        linear_rope: bool = True,
        linear_sinks: int = 0,
        linear_normalizer: str = "shared",
        decay_memory: float = 1024.0,
        attention_backend: str = "auto",
        sink_tokens: int = 0,
        sparse_block_size: int = 64,
        sparse_topk: int = 8,
        gqa_kv_heads: int | None = None,
        num_experts: int = 0,
        num_experts_per_tok: int = 2,
        moe_intermediate_size: int | None = None,
        shared_expert_intermediate_size: int = 0,
        norm_topk_prob: bool = True,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        self.attention_bias = attention_bias  # q/k/v projections
        self.o_proj_bias = o_proj_bias
        self.mlp_bias = mlp_bias
        self.qk_norm = qk_norm
        self.sliding_window = sliding_window
        self.teacher_sliding_layers = teacher_sliding_layers or [False] * num_hidden_layers
        self.base_model_type = base_model_type
        self.attention_types = attention_types or ["linear"] * num_hidden_layers
        self.feature_map = feature_map
        self.feature_dim = feature_dim
        self.window_size = window_size
        self.linear_eps = linear_eps
        # per-kv-head learned decay of the linear part (retention style), started at memories around decay_memory
        self.linear_decay = linear_decay
        # data-dependent forget gate per kv head and token, log g_t = logsigmoid(decay_logit + w . x_t) (the decay is
        # its bias): the linear state keeps what the token says to keep (GLA / Mamba-2 style, scalar per head)
        self.linear_gate = linear_gate
        # feature maps read RoPE-rotated queries and keys (True) or the unrotated ones (False)
        self.linear_rope = linear_rope
        # hybrid linear layers: the first linear_sinks tokens stay softmax terms of every later query (attention
        # sinks), outside the window and the linear state
        self.linear_sinks = linear_sinks
        # hybrid linear layers: "shared" (one normaliser over the window, sink and linear terms, LoLCATs) or
        # "separate" (each branch a weighted mean of its own, then mixed)
        self.linear_normalizer = linear_normalizer
        self.decay_memory = decay_memory
        self.attention_backend = attention_backend
        self.sink_tokens = sink_tokens  # "sliding" layers
        self.sparse_block_size = sparse_block_size  # "block_sparse" layers
        self.sparse_topk = sparse_topk
        self.gqa_kv_heads = gqa_kv_heads  # "gqa" layers
        # Mixture of experts (effconv moe-upcycle): num_experts 0 means every layer keeps its dense gated MLP.
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.norm_topk_prob = norm_topk_prob
        if num_experts and not 0 < num_experts_per_tok <= num_experts:
            raise ValueError(f"num_experts_per_tok must be in 1..{num_experts}, got {num_experts_per_tok}")
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        for name in ("attention_types", "teacher_sliding_layers"):
            if len(getattr(self, name)) != num_hidden_layers:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {num_hidden_layers} layers")
        unknown = sorted(set(self.attention_types) - set(ATTENTION_TYPES))
        if unknown:
            raise ValueError(f"unknown layer types {unknown}; known: {', '.join(ATTENTION_TYPES)}")
        if window_size < 0:
            raise ValueError(f"window_size must be >= 0, got {window_size}")
        if linear_sinks < 0 or (linear_sinks and window_size < 1):
            raise ValueError(f"linear_sinks needs window_size >= 1 (sinks are softmax terms of the window), got "
                             f"linear_sinks={linear_sinks}, window_size={window_size}")
        if linear_normalizer not in ("shared", "separate") or (linear_normalizer == "separate" and window_size < 1):
            raise ValueError(f"linear_normalizer must be shared or separate (separate needs window_size >= 1: two "
                             f"branches), got {linear_normalizer!r} with window_size={window_size}")
        if "sliding" in self.attention_types and (window_size < 1 or sink_tokens < 0):
            raise ValueError(f"sliding layers need window_size >= 1 and sink_tokens >= 0, got {window_size}, {sink_tokens}")
        if "gqa" in self.attention_types and (not gqa_kv_heads or self.num_key_value_heads % gqa_kv_heads):
            raise ValueError(f"gqa layers need gqa_kv_heads dividing {self.num_key_value_heads}, got {gqa_kv_heads}")
        if "block_sparse" in self.attention_types and (sparse_block_size < 1 or sparse_topk < 0):
            raise ValueError(f"block_sparse layers need sparse_block_size >= 1 and sparse_topk >= 0")
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )
