"""Attention surgery: an effconv model built from a loaded teacher, with the chosen layers converted and only the
new attention parameters trainable."""

from __future__ import annotations

import torch

from ..errors import EffconvError
from ..io.sources import check_supported
from ..modeling import EffconvConfig, EffconvForCausalLM
from ..modeling.modeling_effconv import decay_logit_init
from .gqa import merge_kv_heads


def _teacher_sliding_layers(config) -> tuple[int | None, list[bool]]:
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None, [False] * n
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window, [t == "sliding_attention" for t in layer_types]
    return window, [True] * n  # Mistral: one window for every layer


def effconv_config_from_teacher(
    teacher_config,
    *,
    attention_types: list[str] | None = None,
    feature_map: str = "hedgehog",
    feature_dim: int | None = None,
    window_size: int = 64,
    attention_backend: str = "auto",
) -> EffconvConfig:
    """An EffconvConfig with the teacher's shapes; `attention_types` says which layers are converted."""
    check_supported(teacher_config)
    c = teacher_config
    model_type = c.model_type
    if model_type == "effconv":  # keep everything (MoE FFNs included), change only the attention settings
        values = {k: v for k, v in c.to_dict().items() if k not in ("auto_map", "architectures", "model_type", "transformers_version")}
        values.update(attention_types=attention_types or ["linear"] * c.num_hidden_layers, feature_map=feature_map,
                      feature_dim=feature_dim, window_size=window_size, attention_backend=attention_backend)
        return EffconvConfig(**values)
    n = c.num_hidden_layers
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    attention_bias = bool(getattr(c, "attention_bias", False)) or model_type == "qwen2"
    o_proj_bias = bool(getattr(c, "attention_bias", False)) and model_type in ("llama", "qwen3")
    sliding_window, sliding_layers = _teacher_sliding_layers(c)
    rope = dict(getattr(c, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(c, "rope_theta", 10000.0)})
    return EffconvConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=n,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        head_dim=head_dim,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=rope,
        attention_bias=attention_bias,
        o_proj_bias=o_proj_bias,
        mlp_bias=bool(getattr(c, "mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        sliding_window=sliding_window,
        teacher_sliding_layers=sliding_layers,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        base_model_type=model_type,
        attention_types=attention_types or ["linear"] * n,
        feature_map=feature_map,
        feature_dim=feature_dim,
        window_size=window_size,
        attention_backend=attention_backend,
        bos_token_id=getattr(c, "bos_token_id", None),
        eos_token_id=getattr(c, "eos_token_id", None),
        pad_token_id=getattr(c, "pad_token_id", None),
    )


def build_student(teacher, config: EffconvConfig) -> EffconvForCausalLM:
    """Attention-layer surgery: an effconv model carrying every teacher weight, new attention parameters
    initialised (feature maps identity-like, window mix 0.5). Teacher and student share no storage."""
    with torch.device("meta"):
        student = EffconvForCausalLM(config)
    state = teacher.state_dict()
    student_keys = set(student.state_dict())
    missing_from_teacher = [k for k in student_keys if k not in state and not _is_new_attention_param(k)]
    if config.tie_word_embeddings:
        missing_from_teacher = [k for k in missing_from_teacher if k != "lm_head.weight"]
    if missing_from_teacher:
        raise EffconvError(f"teacher weights do not match the {config.base_model_type} layout: missing {missing_from_teacher[:3]}")
    student.to_empty(device=next(teacher.parameters()).device)
    dtype = next(teacher.parameters()).dtype
    student.to(dtype)
    unexpected = [k for k in state if k not in student_keys]
    if unexpected:
        raise EffconvError(f"teacher has weights effconv does not know how to place: {unexpected[:3]}")
    student.load_state_dict({k: v.clone() for k, v in state.items()}, strict=False)
    for module in student.modules():
        if hasattr(module, "reset_parameters") and type(module).__name__ == "FeatureMap":
            module.reset_parameters()
        if hasattr(module, "window_mix"):
            torch.nn.init.zeros_(module.window_mix)
        if hasattr(module, "decay_logit"):
            with torch.no_grad():
                module.decay_logit.copy_(decay_logit_init(module.num_kv_heads, config.decay_memory))
        if hasattr(module, "forget_gate"):
            torch.nn.init.zeros_(module.forget_gate.weight)
    if config.tie_word_embeddings:
        student.tie_weights()
    # rotary inv_freq buffers are not in the state dict: recompute them on the real device
    rotary = type(student.model.rotary_emb)(config=config).to(next(teacher.parameters()).device)
    student.model.rotary_emb = rotary
    return student.eval()


def _is_new_attention_param(key: str) -> bool:
    return ".feature_map_" in key or key.endswith((".window_mix", ".decay_logit", ".forget_gate.weight"))


def converted_layer_indices(num_layers: int, layers: list[int] | None) -> list[int]:
    if layers is None:
        return list(range(num_layers))
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise EffconvError(f"layer indices {bad} are out of range for a model with {num_layers} layers")
    return sorted(set(layers))


def make_student(teacher, cfg, device: torch.device):
    """Surgery on a loaded teacher: effconv model with the chosen layers converted, only new parameters trainable."""
    n = teacher.config.num_hidden_layers
    convert = set(converted_layer_indices(n, cfg.layers))
    # gqa layers are built as softmax with the teacher's heads, then their K/V heads are merged
    kind = "softmax" if cfg.attention == "gqa" else cfg.attention
    attention_types = [kind if i in convert else "softmax" for i in range(n)]
    config = effconv_config_from_teacher(
        teacher.config,
        attention_types=attention_types,
        feature_map=cfg.feature_map,
        feature_dim=cfg.feature_dim,
        window_size=cfg.window,
        attention_backend="auto" if cfg.kernel == "auto" else cfg.kernel,
    )
    config.sparse_block_size, config.sparse_topk = cfg.block_size, cfg.topk
    sinks = cfg.effective_sinks()
    config.sink_tokens = sinks if cfg.attention == "sliding" else 0
    config.linear_sinks = sinks if cfg.attention == "linear" else 0
    config.linear_decay, config.decay_memory = cfg.decay, float(cfg.decay_memory)
    config.linear_gate = cfg.effective_gate()
    config.linear_rope = cfg.linear_rope
    config.linear_normalizer = cfg.normalizer if cfg.attention == "linear" and cfg.window > 0 else "shared"
    student = build_student(teacher, config).to(device)
    if cfg.attention == "gqa":
        merge_kv_heads(student, sorted(convert), cfg.kv_heads, method=cfg.kv_merge)
    student.requires_grad_(False)
    for attn in student.converted_attentions():
        for name, p in attn.named_parameters():
            if name.startswith(("feature_map_", "forget_gate.")) or name in ("window_mix", "decay_logit"):
                p.data = p.data.float()  # small trainable maps stay fp32 even in a bf16 model
                p.requires_grad_(True)
            elif attn.layer_type == "gqa" and name.split(".")[0] in ("k_proj", "v_proj"):
                p.requires_grad_(True)  # the merged K/V projections are what attention transfer recovers
    # sliding / block_sparse layers have no new parameters: attention transfer has nothing to train there
    return student
