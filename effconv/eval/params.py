"""Parameters a model holds and parameters one token runs through (a mixture of experts runs only its top-k routed
experts), for effconv models and transformers' Llama / Mixtral / Qwen2-MoE / Qwen3-MoE alike."""

from __future__ import annotations

import torch


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(model: torch.nn.Module) -> dict:
    """{parameters, active_parameters, ffn_parameters, active_ffn_parameters, active_ffn_fraction}.

    The FFN of a decoder layer is its `mlp` child (router, routed experts and shared expert of an MoE layer). Routed
    experts are a module `experts` holding (E, ., .) weights; of them a token runs num_experts_per_tok / E (router
    and shared expert always run). Embedding and output head count once each as stored (tied: once)."""
    total = _numel(model)
    top_k = getattr(model.config, "num_experts_per_tok", None)
    ffn = inactive = 0
    for name, module in model.named_modules():
        if not name.endswith(".mlp"):
            continue
        ffn += _numel(module)
        experts = getattr(module, "experts", None)
        weights = list(experts.parameters()) if isinstance(experts, torch.nn.Module) else []
        if top_k and weights and weights[0].dim() == 3:
            num_experts = weights[0].shape[0]
            inactive += round(_numel(experts) * (1 - top_k / num_experts))
    return {"parameters": total, "active_parameters": total - inactive, "ffn_parameters": ffn,
            "active_ffn_parameters": ffn - inactive, "active_ffn_fraction": (ffn - inactive) / ffn if ffn else None}
