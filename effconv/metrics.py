"""Quality measurements shared by the conversions and eval."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def next_token_loss(model, blocks: torch.Tensor, *, batch_size: int = 8, device=None) -> float:
    """Mean next-token cross-entropy (nats) over packed blocks [N, T]; every block is scored independently.
    A model sharded by FSDP is run through its root (every process scores all blocks)."""
    from .fsdp import call

    return call(model, lambda: _next_token_loss(model, blocks, batch_size=batch_size, device=device))


def _next_token_loss(model, blocks: torch.Tensor, *, batch_size: int, device) -> float:
    device = device or next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
        total += float(losses)
        count += batch[:, 1:].numel()
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
