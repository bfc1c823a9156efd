"""Quality measurements shared by the conversions and eval: next-token loss on packed blocks, and perplexity of
documents by a strided sliding window."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from ..console import quiet_transformers
from ..errors import EffconvError
from ..generation.decoding import accepts_argument



LOSS_TOKENS = 16384


@torch.no_grad()
def next_token_loss(model, blocks: torch.Tensor, *, batch_size: int = 8, device=None) -> float:
    """Mean next-token cross-entropy (nats) over packed blocks [N, T]; every block is scored independently.
    A model sharded by FSDP is run through its root (every process scores all blocks)."""
    from ..training.fsdp import call

    return call(model, lambda: _next_token_loss(model, blocks, batch_size=batch_size, device=device))


def _next_token_loss(model, blocks: torch.Tensor, *, batch_size: int, device, first_target: int = 1) -> float:
    """Mean cross-entropy of the targets at positions first_target..T-1 of each block."""
    device = device or next(model.parameters()).device
    # at most LOSS_TOKENS positions per forward: the logits of 8 x 8K positions alone would be 13 GB in fp32
    rows = max(1, min(batch_size, LOSS_TOKENS // max(blocks.shape[1], 1)))
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], rows):
        batch = blocks[start : start + rows].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, first_target - 1 : -1]
        targets = batch[:, first_target:]
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum"))
        count += targets.numel()
    return total / max(count, 1)


def repeated_halves(blocks: torch.Tensor) -> torch.Tensor:
    """Each block's first half written twice, [x, x] (length 2 * (T // 2)): a copying probe over T // 2 tokens."""
    half = blocks[:, : blocks.shape[1] // 2]
    return torch.cat([half, half], dim=1)


@torch.no_grad()
def copy_loss(model, blocks: torch.Tensor, *, batch_size: int = 8, device=None) -> float:
    """Mean next-token cross-entropy on the second copy of `repeated_halves(blocks)` blocks (targets from the
    copy's second token on): near zero for a model that retrieves the earlier copy, T // 2 tokens back."""
    from ..training.fsdp import call

    return call(model, lambda: _next_token_loss(model, blocks, batch_size=batch_size, device=device,
                                                first_target=blocks.shape[1] // 2 + 1))


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def window_spans(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(window_begin, first_target, end) for Hugging Face's strided perplexity over `n` tokens.

    Windows start every `stride` tokens and are at most `context` long; each window scores the tokens not
    scored before (from the previous window's end to its own), so every token but the first is scored exactly
    once, with at most context - 1 tokens of left context (at least context - stride after the first window)."""
    spans, prev_end = [], 0
    for begin in range(0, max(n - 1, 1), stride):
        end = min(begin + context, n)
        first = max(prev_end, begin + 1)
        if first < end:
            spans.append((begin, first, end))
        prev_end = end
        if end == n:
            break
    return spans


@torch.inference_mode()
def sequence_nll(model, ids: Sequence[int] | torch.Tensor, *, context: int, stride: int, on_window=None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) of one token sequence and the number of tokens scored."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    device = next(model.parameters()).device
    keep_logits = accepts_argument(model, "logits_to_keep")
    total, count = 0.0, 0
    for begin, first, end in window_spans(ids.numel(), context, stride):
        n_targets = end - first
        window = ids[begin:end].to(device)[None]
        kwargs = {"logits_to_keep": n_targets + 1} if keep_logits else {}
        logits = model(input_ids=window, use_cache=False, **kwargs).logits
        predictions = logits[0, -(n_targets + 1) : -1].float()  # positions first-1 .. end-2 predict first .. end-1
        total += float(F.cross_entropy(predictions, ids[first:end].to(device), reduction="sum"))
        count += n_targets
        if on_window is not None:
            on_window()
    return total, count


def document_ids(tokenizer, documents: Sequence[str], *, add_bos: bool = True) -> list[list[int]]:
    """Each document as [BOS] tokens (BOS only when the tokenizer has one, the text lacks it and add_bos); no EOS.
    transformers' "longer than the maximum" warnings are silenced: effconv cuts its own windows."""
    bos = tokenizer.bos_token_id if add_bos else None
    with quiet_transformers():
        encoded = tokenizer(list(documents), add_special_tokens=False)["input_ids"]
    out = []
    for ids in encoded:
        ids = list(ids)
        if bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        out.append(ids)
    return out


def perplexity_report(model, sequences: Sequence[Sequence[int]], *, context: int, stride: int,
                      text_bytes: int | None = None, progress=None, label: str = "") -> dict:
    """Token-weighted perplexity over `sequences` (lists of token ids), each scored with `sequence_nll`."""
    total_windows = sum(len(window_spans(len(s), context, stride)) for s in sequences)
    task = progress.add_task(f"perplexity {label}", total=total_windows) if progress is not None else None
    advance = (lambda: progress.advance(task)) if progress is not None else None
    nll, tokens = 0.0, 0
    for seq in sequences:
        a, b = sequence_nll(model, seq, context=context, stride=stride, on_window=advance)
        nll, tokens = nll + a, tokens + b
    if tokens == 0:
        raise EffconvError("not enough text for perplexity: every document is shorter than 2 tokens")
    loss = nll / tokens
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens, "documents": len(sequences),
              "windows": total_windows}
    if text_bytes:
        result["bits_per_byte"] = nll / math.log(2) / text_bytes
    return result
