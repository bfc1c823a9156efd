"""LoRA adapters (peft) on the attention projections, the one way effconv attaches them."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def attach_lora(model, layers: Iterable[int], *, rank: int, alpha: float, seed: int):
    """A peft model with LoRA on the q/k/v/o projections of `layers`; the adapters are seeded (a resumed run builds
    the same ones) and kept in fp32 (the base may be bf16). peft freezes everything else."""
    from peft import LoraConfig, get_peft_model

    targets = [f"model.layers.{i}.self_attn.{proj}" for i in layers for proj in LORA_TARGETS]
    torch.manual_seed(seed + 1)
    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets)
    with warnings.catch_warnings():
        # peft (<= 0.21) reads transformers' deprecated `is_gradient_checkpointing` alias; effconv does not use
        # gradient checkpointing, so the FutureWarning it triggers says nothing about this run
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lora)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    return peft_model
