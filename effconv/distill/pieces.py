"""Truncated backpropagation through time: a block run as consecutive pieces that carry the model's cache (linear
state, window, sinks, gates; softmax layers' keys), the gradient cut between pieces (--tbptt-piece)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..modeling.modeling_effconv import EffconvCache

PieceLoss = Callable[[int, int, EffconvCache], torch.Tensor]


def over_pieces(num_layers: int, length: int, piece: int, loss_of: PieceLoss, *, device: torch.device,
                backward: bool = True) -> torch.Tensor:
    """Sum of `loss_of(start, stop, cache)` over the pieces [start, stop) of a block of `length` tokens, each piece
    continuing from the cache the previous one left, as a constant. With `backward` each piece's loss is
    backpropagated at once, so activation memory is one piece's. Returns the sum without a graph."""
    cache = EffconvCache(num_layers)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for start in range(0, length, piece):
        loss = loss_of(start, min(start + piece, length), cache)
        if backward:
            loss.backward()
        total += loss.detach().float()
        cache.detach_()  # the next piece starts from this state, as a constant
    return total
