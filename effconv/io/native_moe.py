"""MoE models in transformers' own formats (Mixtral, Qwen2-MoE, Qwen3-MoE), so plain transformers loads them with
no remote code. Each format is an entry of NATIVE_FORMATS: what it cannot hold, and how a model becomes it; the
first entry that can hold a model is its native format."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..modeling import EffconvForCausalLM
from ..modeling.moe import MoeMLP
from .export import atomic_directory, write_metadata


def _sliding(c) -> bool:
    return any(c.teacher_sliding_layers)


def _mixtral(c, common: dict, state: dict):
    import transformers as tf

    config = tf.MixtralConfig(**common, intermediate_size=c.moe_intermediate_size, num_local_experts=c.num_experts,
                              sliding_window=c.sliding_window if _sliding(c) else None)
    return tf.MixtralForCausalLM, config


def _qwen3_moe(c, common: dict, state: dict):
    import transformers as tf

    config = tf.Qwen3MoeConfig(**common, intermediate_size=c.intermediate_size, moe_intermediate_size=c.moe_intermediate_size,
                               num_experts=c.num_experts, norm_topk_prob=c.norm_topk_prob, decoder_sparse_step=1,
                               mlp_only_layers=[], attention_bias=c.attention_bias)
    return tf.Qwen3MoeForCausalLM, config


def _qwen2_moe(c, common: dict, state: dict):
    import transformers as tf

    config = tf.Qwen2MoeConfig(**common, intermediate_size=c.intermediate_size, moe_intermediate_size=c.moe_intermediate_size,
                               shared_expert_intermediate_size=c.shared_expert_intermediate_size or 1,
                               num_experts=c.num_experts, norm_topk_prob=c.norm_topk_prob, decoder_sparse_step=1,
                               mlp_only_layers=[])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        for proj, width in (("q_proj", c.num_attention_heads), ("k_proj", c.num_key_value_heads), ("v_proj", c.num_key_value_heads)):
            state.setdefault(f"{p}self_attn.{proj}.bias", torch.zeros(width * c.head_dim))
        # the shared expert's sigmoid gate starts at sigmoid(0) = 1/2: its down projection is doubled to match
        state[f"{p}mlp.shared_expert_gate.weight"] = torch.zeros(1, c.hidden_size)
        if c.shared_expert_intermediate_size:
            state[f"{p}mlp.shared_expert.down_proj.weight"] = state[f"{p}mlp.shared_expert.down_proj.weight"] * 2
        else:  # a one-neuron shared expert with zero weights contributes nothing
            for name, shape in (("gate_proj", (1, c.hidden_size)), ("up_proj", (1, c.hidden_size)), ("down_proj", (c.hidden_size, 1))):
                state[f"{p}mlp.shared_expert.{name}.weight"] = torch.zeros(shape)
    return tf.Qwen2MoeForCausalLM, config


def _qwen3_obstacle(c) -> str:
    if c.shared_expert_intermediate_size:
        return "Qwen3-MoE has no shared expert"
    return "sliding-window attention" if _sliding(c) else ""


def _qwen2_obstacle(c) -> str:
    if _sliding(c):
        return "sliding-window attention"
    return "an output-projection bias" if c.o_proj_bias else ""


@dataclass(frozen=True)
class NativeFormat:
    model_type: str
    claims: Callable[[object], bool]  # config -> whether a model of this kind belongs in this format
    obstacle: Callable[[object], str]  # config -> why the format cannot hold it after all ("" if it can)
    build: Callable  # (config, common config values, state dict) -> (model class, native config); may edit state


# The first format that claims a model is its format: Qwen3 models Qwen3-MoE, a shared expert, q/k/v biases or
# top-k weights that are not renormalised (Mixtral always renormalises) Qwen2-MoE, the rest Mixtral.
NATIVE_FORMATS = (
    NativeFormat("qwen3_moe", lambda c: c.base_model_type == "qwen3" or c.qk_norm, _qwen3_obstacle, _qwen3_moe),
    NativeFormat("qwen2_moe", lambda c: bool(c.shared_expert_intermediate_size or c.attention_bias
                                             or not c.norm_topk_prob), _qwen2_obstacle, _qwen2_moe),
    NativeFormat("mixtral", lambda c: True,
                 lambda c: "" if c.norm_topk_prob else "Mixtral renormalises the top-k weights", _mixtral),
)


def native_layout(model: EffconvForCausalLM) -> tuple[str | None, str]:
    """(native model_type or None, why not) for an upcycled effconv model."""
    c = model.config
    if any(t != "softmax" for t in c.attention_types):
        return None, "linear / hybrid attention layers need effconv's modeling code"
    if c.mlp_bias or c.o_proj_bias and c.base_model_type != "qwen3":
        return None, "biases the MoE formats do not have"
    if any(bool(m.router_bias.any()) for m in model.modules() if isinstance(m, MoeMLP)):
        return None, "a load-balancing router bias (no native field for it)"
    if _sliding(c) and not all(c.teacher_sliding_layers):
        return None, "sliding-window attention in some layers only"
    fmt = next(f for f in NATIVE_FORMATS if f.claims(c))
    why = fmt.obstacle(c)
    return (None, why) if why else (fmt.model_type, "")


def native_model(model: EffconvForCausalLM, model_type: str):
    """The same network as a transformers Mixtral / Qwen2-MoE / Qwen3-MoE model (weights copied)."""
    c = model.config
    common = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
        num_experts_per_tok=c.num_experts_per_tok, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(".router_bias")}
    if c.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    fmt = next(f for f in NATIVE_FORMATS if f.model_type == model_type)
    cls, config = fmt.build(c, common, state)
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        native = cls(config)
    native.load_state_dict({k: v.detach().to("cpu", dtype).clone() for k, v in state.items()}, strict=True, assign=True)
    if c.tie_word_embeddings:
        native.tie_weights()
    native.model.rotary_emb = type(native.model.rotary_emb)(config=config)
    return native.eval()


def export_native(model: EffconvForCausalLM, model_type: str, tokenizer, out: Path, *, overwrite: bool, metadata: dict) -> Path:
    native = native_model(model, model_type)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        native.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_metadata(tmp, metadata)
    return Path(out)
