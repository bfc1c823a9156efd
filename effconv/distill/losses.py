"""Distillation losses on next-token distributions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .transfer import attention_mode


def kl_to_teacher_logits(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position, averaged over positions, from (..., V) logits (fp32 math)."""
    return F.kl_div(F.log_softmax(logits.float(), -1).flatten(0, -2), F.log_softmax(teacher_logits.float(), -1).flatten(0, -2),
                    log_target=True, reduction="batchmean")


def finetune_loss(peft_model, student, batch: torch.Tensor, kl_weight: float, ce_weight: float = 1.0) -> torch.Tensor:
    """Stage 2: ce_weight x next-token loss on the text + kl_weight x KL(teacher || student) on every position's
    next-token distribution (the teacher: the same weights, adapters off, softmax attention). The next-token term
    fits the text, which for teacher-generated text is the teacher's *sampled* distribution; the KL term fits the
    teacher's own distribution."""
    logits = peft_model(input_ids=batch, use_cache=False).logits.float()
    loss = logits.new_zeros(())
    if ce_weight > 0:
        loss = ce_weight * F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
    if kl_weight > 0:
        with torch.no_grad(), peft_model.disable_adapter(), attention_mode(student, "teacher"):
            teacher_logits = student(input_ids=batch, use_cache=False).logits.float()
        loss = loss + kl_weight * kl_to_teacher_logits(logits, teacher_logits)
    return loss
