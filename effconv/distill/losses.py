"""Distillation losses on next-token distributions.

Stage 2 at long sequence lengths cannot hold the logits: 16 x 8192 positions x 49152 vocabulary in fp32 is 26 GB
per model. `next_token_distill_loss` therefore forms the logits from the final hidden states a chunk of positions
at a time and recomputes each chunk in the backward pass (activation checkpointing), so only one chunk's logits
exist at once; the arithmetic per position is the unchunked one (the head in the model's dtype, then fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .pieces import over_pieces
from .transfer import attention_mode

LOSS_CHUNK = 2048  # positions per chunk of logits (x 49152 vocabulary x 4 bytes: 0.4 GB in fp32)


def kl_to_teacher_logits(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position, averaged over positions, from (..., V) logits (fp32 math)."""
    return F.kl_div(F.log_softmax(logits.float(), -1).flatten(0, -2), F.log_softmax(teacher_logits.float(), -1).flatten(0, -2),
                    log_target=True, reduction="batchmean")


def _chunk_sums(hidden, weight, targets, has_target, teacher_hidden, ce_weight: float, kl_weight: float):
    logp = F.log_softmax(F.linear(hidden, weight).float(), -1)
    total = logp.new_zeros(())
    if ce_weight > 0:
        nll = -logp.gather(-1, targets.clamp_min(0)[:, None])[:, 0]
        total = total + ce_weight * (nll * has_target).sum()
    if kl_weight > 0:
        with torch.no_grad():
            teacher_logp = F.log_softmax(F.linear(teacher_hidden, weight).float(), -1)
        kl = (teacher_logp.exp() * (teacher_logp - logp)).sum()
        total = total + kl_weight * kl
    return total


def next_token_distill_loss(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                            teacher_hidden: torch.Tensor | None = None, *, ce_weight: float = 1.0,
                            kl_weight: float = 0.0, chunk_size: int = LOSS_CHUNK,
                            counts: tuple[int, int] | None = None) -> torch.Tensor:
    """ce_weight x mean next-token cross-entropy of ids (B, T) (over the B (T-1) predicted positions) +
    kl_weight x mean KL(teacher || student) over all B T positions, from final hidden states (B, T, D) and the
    output head `weight` (V, D), one chunk of positions at a time (module docstring).

    ids may also be (B, T + 1): the token after the last position is then known and that position is scored too.
    `counts` = (cross-entropy positions, KL positions) to average over instead of this call's own (a piece of a
    longer block: the pieces' losses then add up to the block's)."""
    b, t, d = hidden.shape
    flat = hidden.reshape(b * t, d)
    if ids.shape[1] == t + 1:
        targets = ids[:, 1:].reshape(-1)
    else:  # position t predicts token t + 1; the last one has no target
        targets = torch.cat([ids[:, 1:], ids.new_full((b, 1), -1)], 1).reshape(-1)
    has_target = (targets >= 0).to(torch.float32)
    teacher_flat = None if teacher_hidden is None else teacher_hidden.reshape(b * t, d)
    total = flat.new_zeros((), dtype=torch.float32)
    ce_count, kl_count = counts if counts is not None else (b * t if ids.shape[1] == t + 1 else max(b * (t - 1), 1), b * t)
    for start in range(0, b * t, chunk_size):
        part = slice(start, start + chunk_size)
        args = (flat[part], weight, targets[part], has_target[part],
                None if teacher_flat is None else teacher_flat[part])
        # per-position weights folded in so one sum serves both terms
        total = total + checkpoint(_chunk_sums, *args, ce_weight / ce_count, kl_weight / kl_count,
                                   use_reentrant=False)
    return total


def _teacher_hidden(peft_model, student, batch: torch.Tensor) -> torch.Tensor:
    """The teacher's final hidden states: the same weights, adapters off, softmax attention."""
    with torch.no_grad(), peft_model.disable_adapter(), attention_mode(student, "teacher"):
        return student.model(input_ids=batch, use_cache=False).last_hidden_state


def finetune_loss(peft_model, student, batch: torch.Tensor, kl_weight: float, ce_weight: float = 1.0) -> torch.Tensor:
    """Stage 2: ce_weight x next-token loss on the text + kl_weight x KL(teacher || student) on every position's
    next-token distribution (the teacher: the same weights, adapters off, softmax attention). The next-token term
    fits the text, which for teacher-generated text is the teacher's *sampled* distribution; the KL term fits the
    teacher's own distribution. Logits are formed chunk by chunk (next_token_distill_loss)."""
    hidden = student.model(input_ids=batch, use_cache=False).last_hidden_state  # LoRA active through peft_model
    teacher_hidden = _teacher_hidden(peft_model, student, batch) if kl_weight > 0 else None
    return next_token_distill_loss(hidden, student.lm_head.weight, batch, teacher_hidden, ce_weight=ce_weight,
                                   kl_weight=kl_weight)


def tbptt_finetune_loss(peft_model, student, batch: torch.Tensor, kl_weight: float, ce_weight: float,
                        piece: int) -> torch.Tensor:
    """Stage 2 by truncated backpropagation through time: the same loss as finetune_loss over the whole (B, T)
    block, but the student runs the block in pieces of `piece` tokens, each continuing from the previous piece's
    cache (recurrent state, window, sinks; softmax layers' keys) with the gradient cut between pieces, and each
    piece's loss is backpropagated at once. Activation memory is one piece's while every position is scored with
    the state it has at its true depth in the block; the teacher reads the whole block. Leaves the gradients (sum
    over pieces = this block's loss's, up to the cut) and returns the loss without a graph."""
    b, t = batch.shape
    teacher_hidden = _teacher_hidden(peft_model, student, batch) if kl_weight > 0 else None
    counts = (b * (t - 1), b * t)

    def piece_loss(start: int, stop: int, cache) -> torch.Tensor:
        hidden = student.model(input_ids=batch[:, start:stop], cache=cache, use_cache=True).last_hidden_state
        return next_token_distill_loss(
            hidden, student.lm_head.weight, batch[:, start : stop + 1],
            None if teacher_hidden is None else teacher_hidden[:, start:stop],
            ce_weight=ce_weight, kl_weight=kl_weight, counts=counts)

    return over_pieces(student.config.num_hidden_layers, t, piece, piece_loss, device=batch.device)
