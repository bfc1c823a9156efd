"""Length evaluation: how a model's quality holds up as the context grows past the length it was trained on.

Three measurements, each for any Hugging Face causal LM (`model(input_ids=..., use_cache=False).logits`): the
softmax teacher and effconv exports alike.

1. `perplexity_by_context`: perplexity at several context lengths C in one run. Every document of at least C + 1
   tokens is cut into non-overlapping windows of C + 1 tokens (from its start, optionally capped per document);
   each window is one fresh forward pass, so every scored token sees only earlier tokens of its own window. Per
   context: mean NLL, perplexity, a bootstrap-over-documents standard error and 95% interval, and the same for
   the last half of each window (the predictions made with at least C/2 tokens of context).
2. `loss_by_position`: the mean NLL at each position 0..L-1 of one window of L + 1 tokens from the start of every
   document of at least L + 1 tokens, in log-spaced buckets.
3. `passkey_retrieval`: a 5-digit pass key hidden at a relative depth of a filler haystack of a target length,
   then asked for. Scored by greedy decoding (exact digits) and, decode-free, by whether the true key's
   teacher-forced log-likelihood beats that of `distractors` random other keys.

`evaluate_length` runs all three for several named models and adds ratios to a reference model;
`render_length_markdown` and `write_length_plots` turn its JSON-serialisable result into a report.

Per-token NLL is computed from the last hidden state in slices of positions (`lm_head` + log-softmax per slice),
so no (T, vocab) fp32 tensor exists even at 32K tokens; models where the hidden-state path does not reproduce the
logits (logit soft-capping or scaling, no separable head) fall back to the full logits, still reduced per slice.

A context above a model's `max_position_embeddings` is skipped for that model with the reason, unless the model
has no positional limit (effconv exports without full-softmax layers: linear attention with RoPE, sliding
windows) or the caller allows it (`allow_beyond_positions`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import re
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import EffconvError, is_oom, one_line
from ..generation.decoding import CacheStep, cache_kwargs, decode, output_cache, prefill
from .quality import document_ids

DEFAULT_CONTEXTS = (512, 1024, 2048, 4096, 8192)
DEFAULT_PASSKEY_CONTEXTS = (1024, 2048, 4096, 8192)
DEFAULT_PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
RESULT_VERSION = 1
Z_95 = 1.959963984540054

# Attention types of effconv layers that attend over the whole prefix with positions as trained (full softmax),
# so that positions beyond max_position_embeddings are out of distribution. "linear" and "sliding" layers only
# ever see a bounded window or a position-free running state.
_FULL_SOFTMAX_TYPES = ("softmax", "gqa", "block_sparse")

# Config attributes of architectures that transform the lm_head output (soft-capping, scaling): the hidden-state
# path would be wrong for them, so they use the full logits.
_LOGIT_TRANSFORM_ATTRIBUTES = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
CLASSIC_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                  "There and back again.")
SENTENCE_FILLER = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
    "The river runs past the old mill.", "A cat sleeps on the warm window sill.", "The train leaves at noon.",
    "Bread is baked early in the morning.", "The library closes at six.", "Rain fell softly on the roof.",
    "The children played in the park.", "A kettle whistled in the kitchen.", "The road winds up the hill.",
    "Leaves turn red in the autumn.", "The market is busy on Saturdays.", "A boat drifted across the lake.",
    "The clock on the tower struck three.", "Snow covered the quiet village.", "The garden needs water.",
    "Birds sang in the tall trees.", "The lamp lit the narrow street.", "A letter arrived in the post.",
    "The wind blew from the west.",
)
FILLERS = {"classic": CLASSIC_FILLER, "sentences": SENTENCE_FILLER}


# ---------------------------------------------------------------------------------------------------------------
# Model plumbing
# ---------------------------------------------------------------------------------------------------------------


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------
# Positional limits
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PositionLimit:
    """The longest forward pass (in tokens) a model is evaluated on; `tokens` None = no limit."""

    tokens: int | None
    reason: str

    def allows(self, length: int) -> bool:
        return self.tokens is None or length <= self.tokens

    def skip_reason(self, length: int) -> str:
        return (f"{length} tokens exceed the model's max_position_embeddings ({self.tokens}): {self.reason}; "
                "pass allow_beyond_positions=True to run it anyway")


def position_limit(model, allow_beyond_positions: bool | None = None) -> PositionLimit:
    """How long a forward pass may be for `model`.

    `allow_beyond_positions`: True = no limit, False = max_position_embeddings, None = decide: no limit for an
    effconv model none of whose layers is full softmax attention (linear / sliding-window layers never compare
    positions further apart than they were trained on, or not at all); otherwise max_position_embeddings."""
    config = getattr(model, "config", None)
    max_positions = getattr(config, "max_position_embeddings", None)
    if allow_beyond_positions:
        return PositionLimit(None, "allowed beyond max_position_embeddings by the caller")
    if max_positions is None:
        return PositionLimit(None, "the config has no max_position_embeddings")
    if allow_beyond_positions is None and getattr(config, "model_type", None) == "effconv":
        full_softmax = sorted({t for t in getattr(config, "attention_types", None) or [] if t in _FULL_SOFTMAX_TYPES})
        modes = {getattr(getattr(layer, "self_attn", None), "mode", "student")
                 for layer in getattr(getattr(model, "model", None), "layers", [])}
        if not full_softmax and "student" in modes and len(modes) == 1:
            return PositionLimit(None, "effconv model without full-softmax layers")
        what = f"{', '.join(full_softmax)} layers" if full_softmax else "layers in teacher (softmax) mode"
        return PositionLimit(int(max_positions), f"effconv model with {what}")
    how = "by the caller" if allow_beyond_positions is False else "softmax attention was trained up to it"
    return PositionLimit(int(max_positions), how)


def _resolve_allow(allow: bool | Mapping[str, bool | None] | None, name: str) -> bool | None:
    return allow.get(name) if isinstance(allow, Mapping) else allow


# ---------------------------------------------------------------------------------------------------------------
# Per-token NLL, memory-aware
# ---------------------------------------------------------------------------------------------------------------


_NLL_METHOD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _hidden_state_parts(model):
    """(backbone, lm_head) when the logits are lm_head(backbone(...).last_hidden_state), else None."""
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORM_ATTRIBUTES):
        return None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    backbone = getattr(model, "base_model", None)
    if not isinstance(head, torch.nn.Module) or not isinstance(backbone, torch.nn.Module) or backbone is model:
        return None
    return backbone, head


def _nll_from_logits(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Per-token NLL (fp32) of flat (N, V) logits, log-softmax taken over slices of `chunk_size` rows so that only
    a (chunk_size, V) fp32 tensor exists at a time."""
    out = torch.empty(targets.shape[0], dtype=torch.float32, device=targets.device)
    for start in range(0, targets.shape[0], chunk_size):
        stop = start + chunk_size
        out[start:stop] = F.cross_entropy(logits[start:stop].float(), targets[start:stop], reduction="none")
    return out


def _nll_chunked(model, parts, inputs: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    backbone, head = parts
    hidden = backbone(input_ids=inputs, use_cache=False).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    out = torch.empty(flat_targets.shape[0], dtype=torch.float32, device=flat_targets.device)
    for start in range(0, flat_targets.shape[0], chunk_size):
        stop = start + chunk_size
        logits = head(hidden[start:stop]).float()
        out[start:stop] = F.cross_entropy(logits, flat_targets[start:stop], reduction="none")
    return out.view(targets.shape)


def _nll_full(model, inputs: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    logits = model(input_ids=inputs, use_cache=False).logits  # model dtype; reduced in fp32 per slice
    return _nll_from_logits(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), chunk_size).view(targets.shape)


@torch.inference_mode()
def nll_method(model) -> str:
    """"chunked" when the per-token NLL can be computed from the last hidden state (checked once per model on a
    short probe against the full logits), else "full_logits"."""
    if model in _NLL_METHOD:
        return _NLL_METHOD[model]
    method = "full_logits"
    parts = _hidden_state_parts(model)
    if parts is not None:
        vocab = getattr(model.config, "vocab_size", None) or parts[1].weight.shape[0]
        probe = (torch.arange(33, device=_device(model)) * 7919 % vocab)[None]
        try:
            chunked = _nll_chunked(model, parts, probe[:, :-1], probe[:, 1:], 8)
            full = _nll_full(model, probe[:, :-1], probe[:, 1:], 8)
            dtype = next(model.parameters()).dtype
            tolerance = 1e-4 if dtype == torch.float32 else 3e-2
            if torch.allclose(chunked, full, rtol=tolerance, atol=tolerance):
                method = "chunked"
        except (TypeError, AttributeError, ValueError, RuntimeError):
            pass  # a backbone with another calling convention: the full logits are the safe path
    _NLL_METHOD[model] = method
    return method


@torch.inference_mode()
def token_nll(model, windows: torch.Tensor, *, chunk_size: int = 1024, method: str = "auto") -> torch.Tensor:
    """Next-token NLL (nats, fp32) of every token of each window given the window's earlier tokens only.

    windows: (B, T + 1) or (T + 1,) token ids; returns (B, T) or (T,): entry t is -log p(window[t + 1] |
    window[: t + 1]), one fresh forward pass over window[:-1] (no cache). method: "auto" (`nll_method`),
    "chunked" (last hidden state -> lm_head over slices of `chunk_size` positions) or "full_logits"."""
    squeeze = windows.dim() == 1
    windows = windows[None] if squeeze else windows
    windows = windows.to(_device(model))
    inputs, targets = windows[:, :-1], windows[:, 1:]
    chosen = nll_method(model) if method == "auto" else method
    if chosen == "chunked":
        parts = _hidden_state_parts(model)
        if parts is None:
            raise EffconvError(f"{type(model).__name__} has no separable lm_head: use method='full_logits'")
        nll = _nll_chunked(model, parts, inputs, targets, chunk_size)
    elif chosen == "full_logits":
        nll = _nll_full(model, inputs, targets, chunk_size)
    else:
        raise EffconvError(f"unknown NLL method {method!r}; choose auto, chunked or full_logits")
    return nll[0] if squeeze else nll


# ---------------------------------------------------------------------------------------------------------------
# Documents and windows
# ---------------------------------------------------------------------------------------------------------------


def context_windows(n_tokens: int, context: int, max_windows: int | None = None) -> list[tuple[int, int]]:
    """[begin, end) spans of the non-overlapping windows of context + 1 tokens of a document of n_tokens tokens:
    from its start, consecutive, at most max_windows; a shorter tail is dropped."""
    size = context + 1
    count = n_tokens // size
    if max_windows is not None:
        count = min(count, max_windows)
    return [(i * size, (i + 1) * size) for i in range(count)]


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _windows_per_batch(context: int, tokens_per_batch: int) -> int:
    return max(1, tokens_per_batch // context)


# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------


def _bootstrap_counts(n_documents: int, samples: int, seed: int):
    """(samples, n_documents) resampling counts: how often each document is drawn in each bootstrap replicate."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.multinomial(n_documents, [1.0 / n_documents] * n_documents, size=samples).astype(np.float64)


def bootstrap_se(nll_sums: Sequence[float], token_counts: Sequence[int], *, samples: int = 1000,
                 seed: int = 0) -> float | None:
    """Standard error of the token-weighted mean NLL (sum of NLL / sum of tokens) by resampling documents with
    replacement. None with fewer than two documents (no spread to estimate)."""
    import numpy as np

    if len(nll_sums) < 2 or samples < 2:
        return None
    counts = _bootstrap_counts(len(nll_sums), samples, seed)
    means = (counts @ np.asarray(nll_sums, dtype=np.float64)) / (counts @ np.asarray(token_counts, dtype=np.float64))
    return float(means.std(ddof=1))


def paired_bootstrap_se(a_sums: Sequence[float], a_tokens: Sequence[int], b_sums: Sequence[float],
                        b_tokens: Sequence[int], *, samples: int = 1000, seed: int = 0) -> float | None:
    """Standard error of mean NLL(a) - mean NLL(b) over the same documents, resampled together (the document-level
    noise both models share cancels)."""
    import numpy as np

    if len(a_sums) < 2 or samples < 2:
        return None
    counts = _bootstrap_counts(len(a_sums), samples, seed)

    def means(sums, tokens):
        return (counts @ np.asarray(sums, dtype=np.float64)) / (counts @ np.asarray(tokens, dtype=np.float64))

    return float((means(a_sums, a_tokens) - means(b_sums, b_tokens)).std(ddof=1))


def _exp(x: float) -> float:
    return math.exp(min(x, 700.0))


def _interval(center: float, se: float | None) -> list[float] | None:
    """95% interval of exp(center) from the standard error of `center` (normal approximation on the log scale)."""
    return None if se is None else [_exp(center - Z_95 * se), _exp(center + Z_95 * se)]


def _nll_summary(nll_sums: list[float], tokens: list[int], bootstrap_samples: int, seed: int) -> dict:
    total_tokens = sum(tokens)
    nll = sum(nll_sums) / total_tokens
    se = bootstrap_se(nll_sums, tokens, samples=bootstrap_samples, seed=seed)
    return {"nll": nll, "ppl": _exp(nll), "nll_se": se, "ppl_ci95": _interval(nll, se), "tokens": total_tokens}


# ---------------------------------------------------------------------------------------------------------------
# 1. Perplexity at several contexts
# ---------------------------------------------------------------------------------------------------------------


class _PositionSums:
    """Per-position NLL sums over first windows (the data of the loss-by-position curve)."""

    def __init__(self, length: int):
        self.length = length
        self.sums = torch.zeros(length, dtype=torch.float64)
        self.documents = 0

    def add(self, nll: torch.Tensor) -> None:
        self.sums += nll.double().cpu()
        self.documents += 1


def _progress_task(progress, description: str, total: int):
    if progress is None:
        return lambda n=1: None
    task = progress.add_task(description, total=total)
    return lambda n=1: progress.advance(task, n)


def _skipped(reason: str, **extra) -> dict:
    return {"status": "skipped", "reason": reason, **extra}


def _perplexity_pass(model, sequences: Sequence[Sequence[int]], contexts: Sequence[int], *,
                     max_windows_per_document: int | None, common_documents: bool, limit: PositionLimit,
                     bootstrap_samples: int, seed: int, chunk_size: int, tokens_per_batch: int,
                     record_positions_for: int | None, progress, label: str) -> tuple[list[dict], _PositionSums | None]:
    contexts = sorted(set(int(c) for c in contexts))
    lengths = [len(s) for s in sequences]
    longest = max(lengths, default=0)
    min_length_all = max(contexts) + 1 if common_documents and contexts else 0
    rows: list[dict] = []
    positions: _PositionSums | None = None
    for context in contexts:
        base = {"context": context, "window_tokens": context + 1}
        if not limit.allows(context):
            rows.append({**base, **_skipped(limit.skip_reason(context))})
            continue
        needed = max(context + 1, min_length_all)
        eligible = [d for d, n in enumerate(lengths) if n >= needed]
        if not eligible:
            rows.append({**base, **_skipped(f"no document has at least {needed} tokens (longest: {longest})")})
            continue
        # (document, window index, begin, end) in fixed document order
        windows = [(d, w, b, e) for d in eligible
                   for w, (b, e) in enumerate(context_windows(lengths[d], context, max_windows_per_document))]
        record = record_positions_for == context
        context_positions = _PositionSums(context) if record else None
        half = context // 2  # predictions made at input positions >= C/2: at least C/2 tokens of context
        per_doc_sum = {d: 0.0 for d in eligible}
        per_doc_half = {d: 0.0 for d in eligible}
        advance = _progress_task(progress, f"perplexity {label} @{context}", len(windows))
        try:
            for batch in _batches(windows, _windows_per_batch(context, tokens_per_batch)):
                ids = torch.tensor([sequences[d][b:e] for d, _, b, e in batch], dtype=torch.long)
                nll = token_nll(model, ids, chunk_size=chunk_size).cpu()
                for row, (d, w, _, _) in enumerate(batch):
                    per_doc_sum[d] += float(nll[row].double().sum())
                    per_doc_half[d] += float(nll[row, half:].double().sum())
                    if context_positions is not None and w == 0:
                        context_positions.add(nll[row])
                advance(len(batch))
        except Exception as error:  # noqa: BLE001 - out of memory is recorded for this context, anything else raised
            if not is_oom(error):
                raise
            rows.append({**base, "status": "oom", "reason": one_line(error)})
            continue
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if context_positions is not None:
            positions = context_positions
        windows_per_doc = {d: 0 for d in eligible}
        for d, _, _, _ in windows:
            windows_per_doc[d] += 1
        tokens = [windows_per_doc[d] * context for d in eligible]
        half_tokens = [windows_per_doc[d] * (context - half) for d in eligible]
        sums = [per_doc_sum[d] for d in eligible]
        half_sums = [per_doc_half[d] for d in eligible]
        rows.append({
            **base, "status": "ok", **_nll_summary(sums, tokens, bootstrap_samples, seed),
            "windows": len(windows), "documents": len(eligible),
            "last_half": {"from_position": half, **_nll_summary(half_sums, half_tokens, bootstrap_samples, seed)},
            "per_document": {"index": eligible, "nll_sum": sums, "tokens": tokens, "last_half_nll_sum": half_sums,
                             "last_half_tokens": half_tokens},
        })
    return rows, positions


def perplexity_by_context(model, sequences: Sequence[Sequence[int]], contexts: Sequence[int] = DEFAULT_CONTEXTS, *,
                          max_windows_per_document: int | None = None, common_documents: bool = False,
                          allow_beyond_positions: bool | None = None, bootstrap_samples: int = 1000, seed: int = 0,
                          chunk_size: int = 1024, tokens_per_batch: int = 8192, progress=None,
                          label: str = "") -> list[dict]:
    """Perplexity at each context C: every document (token-id list) of at least C + 1 tokens is cut into
    non-overlapping windows of C + 1 tokens (`context_windows`), each scored in a fresh forward pass.

    One row per context, sorted: status "ok" with nll, ppl, nll_se (bootstrap over documents), ppl_ci95, tokens,
    windows, documents, last_half (the same over predictions at input positions C/2..C-1) and per_document sums
    (for paired comparisons); or status "skipped" / "oom" with a reason. common_documents: score only the
    documents long enough for the largest context at every context, so that all contexts see the same text.
    Windows of small contexts are batched up to `tokens_per_batch` tokens per forward pass."""
    rows, _ = _perplexity_pass(
        model, sequences, contexts, max_windows_per_document=max_windows_per_document,
        common_documents=common_documents, limit=position_limit(model, allow_beyond_positions),
        bootstrap_samples=bootstrap_samples, seed=seed, chunk_size=chunk_size, tokens_per_batch=tokens_per_batch,
        record_positions_for=None, progress=progress, label=label)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# 2. Loss by position
# ---------------------------------------------------------------------------------------------------------------


def position_buckets(length: int, per_octave: int = 1) -> list[tuple[int, int]]:
    """Log-spaced [start, end) buckets covering positions 0..length-1: [0,1), [1,2), [2,4), [4,8), ... with
    `per_octave` buckets per doubling (bounds rounded to integers, empty buckets dropped); the last ends at
    length."""
    bounds = {0, 1}
    k = 0
    while True:
        bound = round(2 ** (k / per_octave))
        if bound >= length:
            break
        bounds.add(bound)
        k += 1
    edges = sorted(b for b in bounds if b < length) + [length]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def _bucket_label(start: int, end: int) -> str:
    def short(n: int) -> str:
        return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)

    return short(start) if end - start == 1 else f"{short(start)}-{short(end)}"


def _position_result(positions: _PositionSums | None, length: int, reason: str | None) -> dict:
    if positions is None or positions.documents == 0:
        return {"length": length, **_skipped(reason or "no documents")}
    mean = positions.sums / positions.documents

    def buckets(per_octave: int) -> list[dict]:
        out = []
        for start, end in position_buckets(length, per_octave):
            out.append({"start": start, "end": end, "label": _bucket_label(start, end),
                        "nll": float(mean[start:end].mean()), "tokens": positions.documents * (end - start)})
        return out

    return {"length": length, "status": "ok", "documents": positions.documents,
            "nll": float(positions.sums.sum() / (positions.documents * length)),
            "buckets": buckets(1), "curve": buckets(4)}


def loss_by_position(model, sequences: Sequence[Sequence[int]], length: int, *,
                     allow_beyond_positions: bool | None = None, chunk_size: int = 1024, tokens_per_batch: int = 8192,
                     progress=None, label: str = "") -> dict:
    """Mean NLL at each position 0..length-1 (the prediction made from position p, i.e. of token p + 1 with p + 1
    tokens of context) over one window of length + 1 tokens from the start of every document of at least
    length + 1 tokens. Reported in octave buckets (`buckets`: [0,1), [1,2), [2,4), ..., with token counts) and a
    finer `curve` (4 buckets per octave) for plots."""
    limit = position_limit(model, allow_beyond_positions)
    if not limit.allows(length):
        return {"length": length, **_skipped(limit.skip_reason(length))}
    eligible = [d for d, s in enumerate(sequences) if len(s) >= length + 1]
    if not eligible:
        longest = max((len(s) for s in sequences), default=0)
        return {"length": length, **_skipped(f"no document has at least {length + 1} tokens (longest: {longest})")}
    positions = _PositionSums(length)
    advance = _progress_task(progress, f"loss by position {label}", len(eligible))
    try:
        for batch in _batches(eligible, _windows_per_batch(length, tokens_per_batch)):
            ids = torch.tensor([sequences[d][: length + 1] for d in batch], dtype=torch.long)
            for row in token_nll(model, ids, chunk_size=chunk_size).cpu():
                positions.add(row)
            advance(len(batch))
    except Exception as error:  # noqa: BLE001
        if not is_oom(error):
            raise
        return {"length": length, "status": "oom", "reason": one_line(error)}
    return _position_result(positions, length, None)


# ---------------------------------------------------------------------------------------------------------------
# 3. Passkey retrieval
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PasskeyPrompt:
    """One passkey prompt: [BOS] intro, filler with the needle at `depth`, question. `input_ids` is what the model
    reads; positions are token offsets into it."""

    text: str
    input_ids: list[int]
    passkey: str
    depth: float  # requested relative depth of the needle in the haystack
    token_depth: float  # measured: (needle offset - haystack start) / (haystack tokens - needle tokens)
    needle_token_offset: int  # index in input_ids of the needle's first token
    needle_tokens: int
    haystack_tokens: tuple[int, int]  # [start, end) of filler + needle in input_ids
    target_tokens: int  # the length asked for; len(input_ids) <= target_tokens
    filler_units: int


def _filler_units(kind: str, count: int, seed: str) -> list[str]:
    """The first `count` filler sentences: the classic five cycled, or seeded draws from a built-in list (the same
    seed always gives the same sequence, so longer haystacks extend shorter ones)."""
    if kind not in FILLERS:
        raise EffconvError(f"unknown passkey filler {kind!r}; choose {', '.join(FILLERS)}")
    sentences = FILLERS[kind]
    if kind == "classic":
        return [sentences[i % len(sentences)] for i in range(count)]
    rng = random.Random(f"filler-{seed}")
    return [rng.choice(sentences) for _ in range(count)]


def _token_offset(tokenizer, text: str, char_index: int, offsets: list[tuple[int, int]] | None) -> int:
    """Index (without BOS) of the first token that ends after `char_index`."""
    if offsets is not None:
        for i, (_, end) in enumerate(offsets):
            if end > char_index:
                return i
        return len(offsets)
    return len(tokenizer(text[:char_index], add_special_tokens=False)["input_ids"])


def _tokenize(tokenizer, text: str, bos: int | None) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ([bos] + ids) if bos is not None else ids


def make_passkey_prompt(tokenizer, *, target_tokens: int, depth: float, seed: int | str = 0,
                        filler: str = "classic", passkey: str | None = None, add_bos: bool = True) -> PasskeyPrompt:
    """A passkey prompt of at most `target_tokens` tokens (as long as whole filler sentences allow: within one
    sentence of it), with the needle between filler sentences at relative `depth` (0: right after the intro, 1:
    right before the question). Deterministic in (tokenizer, target_tokens, depth, seed, filler); the key is a
    seeded 5-digit number unless given. Plain text, no chat template."""
    if not 0.0 <= depth <= 1.0:
        raise EffconvError(f"passkey depth must be in [0, 1], got {depth}")
    rng = random.Random(f"passkey-{seed}")
    key = passkey if passkey is not None else str(rng.randint(10000, 99999))
    needle = PASSKEY_NEEDLE.format(key=key)
    bos = tokenizer.bos_token_id if add_bos else None

    def build(n_units: int) -> tuple[str, int, int, int]:
        units = _filler_units(filler, n_units, str(seed))
        k = round(depth * n_units)
        before = " ".join(units[:k])
        after = " ".join(units[k:])
        haystack_start = len(PASSKEY_INTRO) + 1
        head = PASSKEY_INTRO + " " + (before + " " if before else "")
        needle_start = len(head)
        body = head + needle + (" " + after if after else "")
        question_start = len(body) + 1
        return body + " " + PASSKEY_QUESTION, haystack_start, needle_start, question_start

    def length(n_units: int) -> int:
        return len(_tokenize(tokenizer, build(n_units)[0], bos))

    if length(0) > target_tokens:
        raise EffconvError(f"a passkey prompt needs at least {length(0)} tokens with this tokenizer; "
                           f"{target_tokens} were asked for")
    low, high = 0, 1  # the largest unit count whose prompt fits: gallop, then bisect (length grows with units)
    while length(high) <= target_tokens:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if length(mid) <= target_tokens else (low, mid)
    text, haystack_char, needle_char, question_char = build(low)
    ids = _tokenize(tokenizer, text, bos)
    try:
        offsets = [tuple(o) for o in tokenizer(text, add_special_tokens=False,
                                               return_offsets_mapping=True)["offset_mapping"]]
    except (NotImplementedError, TypeError, KeyError, ValueError):
        offsets = None  # slow tokenizers: offsets by tokenizing prefixes
    shift = 1 if bos is not None else 0
    needle_at = _token_offset(tokenizer, text, needle_char, offsets) + shift
    needle_end = _token_offset(tokenizer, text, needle_char + len(needle), offsets) + shift
    hay_start = _token_offset(tokenizer, text, haystack_char, offsets) + shift
    hay_end = _token_offset(tokenizer, text, question_char, offsets) + shift
    movable = max(hay_end - hay_start - (needle_end - needle_at), 1)
    return PasskeyPrompt(text=text, input_ids=ids, passkey=key, depth=depth,
                         token_depth=(needle_at - hay_start) / movable, needle_token_offset=needle_at,
                         needle_tokens=needle_end - needle_at, haystack_tokens=(hay_start, hay_end),
                         target_tokens=target_tokens, filler_units=low)


def _continuation_ids(tokenizer, prompt: PasskeyPrompt, answer: str, bos: int | None) -> list[int]:
    """Tokens of `answer` as they follow the prompt (joint tokenization, when it keeps the prompt's tokens as a
    prefix; else the answer alone)."""
    joint = _tokenize(tokenizer, prompt.text + answer, bos)
    n = len(prompt.input_ids)
    if joint[:n] == prompt.input_ids and len(joint) > n:
        return joint[n:]
    return list(tokenizer(answer, add_special_tokens=False)["input_ids"])


@torch.inference_mode()
def _prefill(model, ids: list[int]):
    """(log-probabilities of the token after the prompt, the prompt's cache)."""
    out = prefill(model, torch.tensor([ids], dtype=torch.long, device=_device(model)))
    return out.logits[0, -1].float().log_softmax(-1), output_cache(out)


@torch.inference_mode()
def _continuation_logprob(model, prompt_ids: list[int], last_logprobs: torch.Tensor, cache,
                          continuation: list[int]) -> float:
    """log p(continuation | prompt), teacher-forced. Runs the continuation through a copy of the prompt's cache;
    models whose cache cannot be copied rerun the whole sequence."""
    total = float(last_logprobs[continuation[0]])
    if len(continuation) == 1:
        return total
    device = _device(model)
    rest = torch.tensor([continuation[:-1]], dtype=torch.long, device=device)
    targets = torch.tensor(continuation[1:], dtype=torch.long, device=device)
    try:
        own = copy.deepcopy(cache)
    except Exception:  # noqa: BLE001 - any cache that cannot be deep-copied takes the slow path below
        own = None
    if own is not None:
        logits = model(input_ids=rest, **cache_kwargs(model, own)).logits[0]
    else:
        full = torch.tensor([prompt_ids + continuation[:-1]], dtype=torch.long, device=device)
        logits = model(input_ids=full, use_cache=False).logits[0, -rest.shape[1]:]
    logprobs = logits.float().log_softmax(-1)
    return total + float(logprobs.gather(-1, targets[:, None]).sum())


@torch.inference_mode()
def _greedy_tail(model, last_logprobs: torch.Tensor, cache, max_new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy tokens after the prompt, the first from its log-probabilities: at most max_new_tokens, up to and
    including the first end-of-sequence token."""
    token = int(last_logprobs.argmax())
    if max_new_tokens <= 1 or token in eos:
        return [token]
    x = torch.tensor([[token]], dtype=torch.long, device=_device(model))
    return [token] + [int(t) for t in decode(CacheStep(model, cache), x, max_new_tokens - 1, stop_ids=eos)]


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids


def _distractor_keys(passkey: str, count: int, seed: str, token_length: Callable[[str], int]) -> list[str]:
    """`count` seeded random 5-digit keys other than `passkey`, each with as many answer tokens as the passkey's
    (a tokenizer that merges some digit groups would otherwise favour keys of fewer tokens: a model with flat
    predictions would beat chance). Keys of another token count only when 10000 draws do not find enough."""
    rng = random.Random(f"distractors-{seed}")
    wanted = token_length(passkey)
    keys: list[str] = []
    others: list[str] = []
    for _ in range(10000):
        if len(keys) == count:
            return keys
        key = str(rng.randint(10000, 99999))
        if key == passkey or key in keys or key in others:
            continue
        (keys if token_length(key) == wanted else others).append(key)
    return keys + others[: count - len(keys)]


def passkey_trial(model, tokenizer, prompt: PasskeyPrompt, *, distractors: int = 4, max_new_tokens: int = 8,
                  seed: int | str = 0, add_bos: bool = True) -> dict:
    """One prompt, both scores: greedy decoding (the first number in up to max_new_tokens greedy tokens must equal
    the key) and rank (1 + how many of `distractors` seeded other keys, of the same answer token count, have a
    teacher-forced log-likelihood at least that of the true key, so ties count against it; rank 1 = retrieved).
    One prefill serves both."""
    bos = tokenizer.bos_token_id if add_bos else None
    answers: dict[str, list[int]] = {}

    def answer_ids(key: str) -> list[int]:
        if key not in answers:
            answers[key] = _continuation_ids(tokenizer, prompt, " " + key, bos)
        return answers[key]

    candidates = [prompt.passkey] + _distractor_keys(prompt.passkey, distractors, str(seed),
                                                     lambda key: len(answer_ids(key)))
    last_logprobs, cache = _prefill(model, prompt.input_ids)
    scores = [_continuation_logprob(model, prompt.input_ids, last_logprobs, cache, answer_ids(key))
              for key in candidates]
    rank = 1 + sum(s >= scores[0] for s in scores[1:])
    generated = _greedy_tail(model, last_logprobs, cache, max_new_tokens, _eos_ids(model, tokenizer))
    text = tokenizer.decode(generated, skip_special_tokens=True)
    number = re.search(r"\d+", text)
    return {"passkey": prompt.passkey, "generated": text,
            "generation_correct": bool(number and number.group() == prompt.passkey),
            "rank": rank, "rank_correct": rank == 1, "true_key_logprob": scores[0],
            "best_distractor_logprob": max(scores[1:]) if distractors else None}


def _accuracy(trials: list[dict], key: str) -> float | None:
    return sum(t[key] for t in trials) / len(trials) if trials else None


def passkey_retrieval(model, tokenizer, *, contexts: Sequence[int] = DEFAULT_PASSKEY_CONTEXTS,
                      depths: Sequence[float] = DEFAULT_PASSKEY_DEPTHS, trials: int = 5, distractors: int = 4,
                      max_new_tokens: int = 8, filler: str = "classic", seed: int = 0,
                      allow_beyond_positions: bool | None = None, add_bos: bool = True, progress=None,
                      label: str = "") -> dict:
    """Passkey retrieval at each context (prompt + max_new_tokens answer tokens <= context) and depth, `trials`
    seeded prompts per cell (the same prompts for every model that shares the tokenizer).

    Returns {settings..., "cells": per (context, depth) accuracy, "per_context": per context accuracy, "trials":
    every trial}. generation_accuracy: exact digits by greedy decoding; rank_accuracy: true key more likely than
    all distractors (chance 1 / (distractors + 1)); mean_rank."""
    if trials < 1 or distractors < 0 or max_new_tokens < 1:
        raise EffconvError("passkey needs trials >= 1, distractors >= 0 and max_new_tokens >= 1")
    limit = position_limit(model, allow_beyond_positions)
    contexts = sorted(set(int(c) for c in contexts))
    depths = [float(d) for d in depths]
    result: dict[str, Any] = {"contexts": contexts, "depths": depths, "trials_per_cell": trials,
                              "distractors": distractors, "chance_rank_accuracy": 1.0 / (distractors + 1),
                              "max_new_tokens": max_new_tokens, "filler": filler, "cells": [], "per_context": [],
                              "trials": []}
    runnable = [c for c in contexts if limit.allows(c)]
    advance = _progress_task(progress, f"passkey {label}", len(runnable) * len(depths) * trials)
    for context in contexts:
        if not limit.allows(context):
            reason = limit.skip_reason(context)
            result["per_context"].append({"context": context, **_skipped(reason)})
            result["cells"] += [{"context": context, "depth": d, **_skipped(reason)} for d in depths]
            continue
        context_trials: list[dict] = []
        status = {"status": "ok"}
        for depth_index, depth in enumerate(depths):
            cell: list[dict] = []
            try:
                for trial in range(trials):
                    trial_seed = f"{seed}-{context}-{depth_index}-{trial}"
                    prompt = make_passkey_prompt(tokenizer, target_tokens=context - max_new_tokens, depth=depth,
                                                 seed=trial_seed, filler=filler, add_bos=add_bos)
                    outcome = passkey_trial(model, tokenizer, prompt, distractors=distractors,
                                            max_new_tokens=max_new_tokens, seed=trial_seed, add_bos=add_bos)
                    cell.append({"context": context, "depth": depth, "trial": trial,
                                 "prompt_tokens": len(prompt.input_ids), "needle_token_offset":
                                 prompt.needle_token_offset, "token_depth": prompt.token_depth, **outcome})
                    advance()
            except Exception as error:  # noqa: BLE001
                if not is_oom(error):
                    raise
                status = {"status": "oom", "reason": one_line(error)}
            result["trials"] += cell
            context_trials += cell
            result["cells"].append({"context": context, "depth": depth, **status, "trials": len(cell),
                                    "generation_accuracy": _accuracy(cell, "generation_correct"),
                                    "rank_accuracy": _accuracy(cell, "rank_correct"),
                                    "mean_rank": _accuracy(cell, "rank")})
            if status["status"] != "ok":
                break
        result["per_context"].append({"context": context, **status, "trials": len(context_trials),
                                      "generation_accuracy": _accuracy(context_trials, "generation_correct"),
                                      "rank_accuracy": _accuracy(context_trials, "rank_correct"),
                                      "mean_rank": _accuracy(context_trials, "rank")})
    return result


# ---------------------------------------------------------------------------------------------------------------
# 4. Comparison
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class LengthEvalConfig:
    """Settings of a length evaluation (`evaluate_length`)."""

    contexts: list[int] = field(default_factory=lambda: list(DEFAULT_CONTEXTS))  # perplexity; [] = off
    max_windows_per_document: int | None = None  # cap so that long documents do not dominate
    common_documents: bool = False  # every context scores only documents long enough for the largest one
    position_curve: bool = True
    position_length: int | None = None  # loss-by-position length L; None: the largest context
    passkey_contexts: list[int] = field(default_factory=lambda: list(DEFAULT_PASSKEY_CONTEXTS))  # [] = off
    passkey_depths: list[float] = field(default_factory=lambda: list(DEFAULT_PASSKEY_DEPTHS))
    passkey_trials: int = 5
    passkey_distractors: int = 4
    passkey_max_new_tokens: int = 8
    passkey_filler: str = "classic"  # classic | sentences
    bootstrap_samples: int = 1000
    seed: int = 0
    chunk_size: int = 1024  # positions per lm_head + log-softmax slice
    tokens_per_batch: int = 8192  # windows of small contexts are batched up to this many tokens per forward
    allow_beyond_positions: bool | dict[str, bool | None] | None = None  # None: decide per model; dict: per name
    add_bos: bool = True

    def validate(self) -> None:
        for name in ("contexts", "passkey_contexts"):
            values = getattr(self, name)
            if any(int(c) < 1 for c in values):
                raise EffconvError(f"{name} must be positive integers, got {values}")
        if self.position_length is not None and self.position_length < 1:
            raise EffconvError(f"position_length must be positive, got {self.position_length}")
        if any(not 0.0 <= d <= 1.0 for d in self.passkey_depths):
            raise EffconvError(f"passkey depths must be in [0, 1], got {self.passkey_depths}")
        if self.passkey_filler not in FILLERS:
            raise EffconvError(f"unknown passkey filler {self.passkey_filler!r}; choose {', '.join(FILLERS)}")
        for name in ("passkey_trials", "passkey_max_new_tokens", "chunk_size", "tokens_per_batch"):
            if getattr(self, name) < 1:
                raise EffconvError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.passkey_distractors < 0 or self.bootstrap_samples < 0:
            raise EffconvError("passkey_distractors and bootstrap_samples must be >= 0")
        if self.max_windows_per_document is not None and self.max_windows_per_document < 1:
            raise EffconvError(f"max_windows_per_document must be at least 1, got {self.max_windows_per_document}")


def _position_length(config: LengthEvalConfig) -> int | None:
    if not config.position_curve:
        return None
    return config.position_length or (max(config.contexts) if config.contexts else None)


def _model_summary(model, limit: PositionLimit, method: str) -> dict:
    config = getattr(model, "config", None)
    return {"class": type(model).__name__, "model_type": getattr(config, "model_type", None),
            "max_position_embeddings": getattr(config, "max_position_embeddings", None),
            "position_limit": limit.tokens, "position_limit_reason": limit.reason, "nll_method": method,
            "attention_types": list(getattr(config, "attention_types", None) or []) or None}


def _ratio_rows(rows: list[dict], reference_rows: list[dict], bootstrap_samples: int, seed: int) -> list[dict]:
    """Perplexity ratio model / reference per context. Paired bootstrap interval when both scored the same
    documents with the same token counts (same tokenizer), else no interval."""
    by_context = {r["context"]: r for r in reference_rows}
    out = []
    for row in rows:
        ref = by_context.get(row["context"])
        if ref is None or row["status"] != "ok" or ref["status"] != "ok":
            out.append({"context": row["context"], "status": "skipped",
                        "reason": "not measured for both models"})
            continue
        entry: dict[str, Any] = {"context": row["context"], "status": "ok"}
        a, b = row["per_document"], ref["per_document"]
        paired = a["index"] == b["index"] and a["tokens"] == b["tokens"]
        for key, sums, tokens in (("", "nll_sum", "tokens"), ("last_half_", "last_half_nll_sum", "last_half_tokens")):
            mine = row["last_half"] if key else row
            theirs = ref["last_half"] if key else ref
            diff = mine["nll"] - theirs["nll"]
            se = paired_bootstrap_se(a[sums], a[tokens], b[sums], b[tokens], samples=bootstrap_samples,
                                     seed=seed) if paired else None
            entry[f"{key}ppl_ratio"] = _exp(diff)
            entry[f"{key}ppl_ratio_ci95"] = _interval(diff, se)
        entry["paired"] = paired
        out.append(entry)
    return out


def _position_difference(curve: dict, reference: dict) -> list[dict]:
    if curve.get("status") != "ok" or reference.get("status") != "ok" or curve["length"] != reference["length"]:
        return []
    return [{"label": a["label"], "start": a["start"], "end": a["end"], "nll_difference": a["nll"] - b["nll"]}
            for a, b in zip(curve["buckets"], reference["buckets"])]


def evaluate_length(models: Mapping[str, Any], tokenizer, documents: Sequence[str] | None,
                    config: LengthEvalConfig | None = None, *, reference: str | None = None, progress=None) -> dict:
    """Perplexity by context, loss by position and passkey retrieval for every named model, plus ratios of every
    other model to the reference ("teacher" when present, else the first name).

    tokenizer: one for all models, or a mapping name -> tokenizer. documents: texts for perplexity and the
    position curve (None: both skipped), tokenized by `quality.document_ids`. Returns a JSON-serialisable dict:

        kind "length_eval", version, settings (the config, position_length resolved), reference, notes [str],
        models: {name: {class, model_type, max_position_embeddings, position_limit (None = unlimited),
                        position_limit_reason, nll_method, attention_types, documents, longest_document_tokens,
                        perplexity: [row per context: see perplexity_by_context],
                        position_curve: see loss_by_position,
                        passkey: see passkey_retrieval}},
        comparisons: {name (not the reference): {
                        perplexity: [{context, status, ppl_ratio, ppl_ratio_ci95, last_half_ppl_ratio,
                                      last_half_ppl_ratio_ci95, paired}],
                        position_curve: [{label, start, end, nll_difference}]}}"""
    config = config or LengthEvalConfig()
    config.validate()
    if not models:
        raise EffconvError("evaluate_length needs at least one model")
    names = list(models)
    if reference is None:
        reference = "teacher" if "teacher" in models else names[0]
    if reference not in models:
        raise EffconvError(f"reference model {reference!r} is not among {names}")
    if isinstance(tokenizer, Mapping) and set(names) - set(tokenizer):
        raise EffconvError(f"no tokenizer for {sorted(set(names) - set(tokenizer))}")
    tokenizers = {n: (tokenizer[n] if isinstance(tokenizer, Mapping) else tokenizer) for n in names}
    length = _position_length(config)
    notes: list[str] = []
    result: dict[str, Any] = {"kind": "length_eval", "version": RESULT_VERSION, "settings": dataclasses.asdict(config),
                              "reference": reference, "models": {}, "comparisons": {}, "notes": notes}
    result["settings"]["position_length"] = length
    token_cache: dict[int, list[list[int]]] = {}
    for name in names:
        model = models[name]
        allow = _resolve_allow(config.allow_beyond_positions, name)
        limit = position_limit(model, allow)
        entry: dict[str, Any] = _model_summary(model, limit, nll_method(model))
        sequences = None
        if documents is not None and (config.contexts or length):
            key = id(tokenizers[name])  # models sharing a tokenizer share the tokenized documents
            if key not in token_cache:
                token_cache[key] = document_ids(tokenizers[name], documents, add_bos=config.add_bos)
            sequences = token_cache[key]
            entry["documents"] = len(sequences)
            entry["longest_document_tokens"] = max((len(s) for s in sequences), default=0)
        common = dict(chunk_size=config.chunk_size, tokens_per_batch=config.tokens_per_batch, progress=progress,
                      label=name)
        positions, share = None, False
        # a model whose positions stop before L (the teacher's RoPE) gets its curve up to its largest allowed context
        model_length = length
        if length and not limit.allows(length):
            fitting = [c for c in config.contexts if limit.allows(c)]
            model_length = max(fitting) if fitting else length
        if sequences is not None and config.contexts:
            # the first windows at context L are exactly the position curve's windows: record them on the way
            share = model_length in config.contexts and (not config.common_documents or model_length == max(config.contexts))
            entry["perplexity"], positions = _perplexity_pass(
                model, sequences, config.contexts, max_windows_per_document=config.max_windows_per_document,
                common_documents=config.common_documents, limit=limit, bootstrap_samples=config.bootstrap_samples,
                seed=config.seed, record_positions_for=model_length if share else None, **common)
        if sequences is not None and model_length:
            shared_row = next((r for r in entry.get("perplexity", []) if r["context"] == model_length), None)
            if positions is not None:
                entry["position_curve"] = _position_result(positions, model_length, None)
            elif shared_row is not None and share and shared_row["status"] != "ok":  # skipped or OOM at L already
                entry["position_curve"] = {"length": model_length, "status": shared_row["status"],
                                           "reason": shared_row["reason"]}
            else:
                entry["position_curve"] = loss_by_position(model, sequences, model_length, allow_beyond_positions=allow,
                                                           **common)
        if config.passkey_contexts:
            entry["passkey"] = passkey_retrieval(
                model, tokenizers[name], contexts=config.passkey_contexts, depths=config.passkey_depths,
                trials=config.passkey_trials, distractors=config.passkey_distractors,
                max_new_tokens=config.passkey_max_new_tokens, filler=config.passkey_filler, seed=config.seed,
                allow_beyond_positions=allow, add_bos=config.add_bos, progress=progress, label=name)
        result["models"][name] = entry
        for row in entry.get("perplexity", []):
            if row["status"] == "ok" and row["documents"] < 2:
                notes.append(f"{name} @{row['context']}: one document only, no error estimate")
            elif row["status"] != "ok":
                notes.append(f"{name} @{row['context']}: {row['status']}: {row['reason']}")
        for row in entry.get("passkey", {}).get("per_context", []):
            if row["status"] != "ok":
                notes.append(f"{name} passkey @{row['context']}: {row['status']}: {row['reason']}")
    if documents is None and (config.contexts or length):
        notes.append("perplexity and loss by position skipped: no documents")
    ref_entry = result["models"][reference]
    for name in names:
        if name == reference:
            continue
        entry = result["models"][name]
        comparison: dict[str, Any] = {}
        if "perplexity" in entry and "perplexity" in ref_entry:
            comparison["perplexity"] = _ratio_rows(entry["perplexity"], ref_entry["perplexity"],
                                                   config.bootstrap_samples, config.seed)
        if "position_curve" in entry and "position_curve" in ref_entry:
            comparison["position_curve"] = _position_difference(entry["position_curve"], ref_entry["position_curve"])
        result["comparisons"][name] = comparison
    return result


# ---------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------


def _f(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if abs(x) < 1e5 else f"{x:.3g}"


def _ci(ci: list[float] | None, digits: int = 2) -> str:
    return "" if ci is None else f" [{_f(ci[0], digits)}, {_f(ci[1], digits)}]"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _short_status(row: dict) -> str:
    return "skipped" if row["status"] == "skipped" else row["status"].upper()


def perplexity_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Per context: each model's ppl [95% CI] (windows/documents), each non-reference model's ratio to the
    reference [95% CI], and the same ratio over the last half of each window."""
    names = list(result["models"])
    reference = result["reference"]
    others = [n for n in names if n != reference]
    contexts = sorted({r["context"] for n in names for r in result["models"][n].get("perplexity", [])})
    header = ["context", *[f"{n} ppl [95% CI]" for n in names]]
    for n in others:
        header += [f"{n} / {reference}", f"{n} / {reference} last half"]
    rows = []
    for context in contexts:
        row = [str(context)]
        for n in names:
            r = next((r for r in result["models"][n].get("perplexity", []) if r["context"] == context), None)
            if r is None:
                row.append("-")
            elif r["status"] != "ok":
                row.append(_short_status(r))
            else:
                row.append(f"{_f(r['ppl'])}{_ci(r['ppl_ci95'])} ({r['windows']} win / {r['documents']} docs)")
        for n in others:
            c = next((c for c in result["comparisons"].get(n, {}).get("perplexity", []) if c["context"] == context),
                     None)
            if c is None or c["status"] != "ok":
                row += ["-", "-"]
            else:
                row += [f"{_f(c['ppl_ratio'], 3)}x{_ci(c['ppl_ratio_ci95'], 3)}",
                        f"{_f(c['last_half_ppl_ratio'], 3)}x{_ci(c['last_half_ppl_ratio_ci95'], 3)}"]
        rows.append(row)
    return header, rows


def position_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Per octave bucket of positions: tokens and mean NLL of every model with a position curve."""
    curves = {n: e["position_curve"] for n, e in result["models"].items()
              if e.get("position_curve", {}).get("status") == "ok"}
    if not curves:
        return [], []
    first = next(iter(curves.values()))
    header = ["positions [start, end)", "tokens", *[f"{n} NLL" for n in curves]]
    rows = []
    for i, bucket in enumerate(first["buckets"]):
        rows.append([bucket["label"], str(bucket["tokens"]),
                     *[_f(c["buckets"][i]["nll"], 3) if i < len(c["buckets"]) else "-" for c in curves.values()]])
    return header, rows


def passkey_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Per context: generation accuracy and rank accuracy of every model, with trial counts."""
    names = [n for n, e in result["models"].items() if "passkey" in e]
    if not names:
        return [], []
    contexts = sorted({r["context"] for n in names for r in result["models"][n]["passkey"]["per_context"]})
    header = ["context", *[h for n in names for h in (f"{n} generation", f"{n} rank")]]
    rows = []
    for context in contexts:
        row = [str(context)]
        for n in names:
            r = next(r for r in result["models"][n]["passkey"]["per_context"] if r["context"] == context)
            if r["status"] != "ok":
                row += [_short_status(r), _short_status(r)]
            else:
                row += [f"{_pct(r['generation_accuracy'])} (n={r['trials']})", _pct(r["rank_accuracy"])]
        rows.append(row)
    return header, rows


def render_length_markdown(result: dict, plots: Sequence[str] = ()) -> str:
    """The length report as Markdown: model summary, perplexity per context, loss by position, passkey."""
    s = result["settings"]
    parts = ["## Length evaluation", ""]
    for name, entry in result["models"].items():
        limit = entry["position_limit"]
        parts.append(f"- **{name}**: {entry['class']}; {entry['nll_method']} NLL; "
                     f"{'no positional limit' if limit is None else f'up to {limit} positions'}: "
                     f"{entry['position_limit_reason']}")
    parts.append("")
    header, rows = perplexity_rows(result)
    if rows:
        cap = s["max_windows_per_document"]
        parts += ["### Perplexity by context", "",
                  "Each document of at least C + 1 tokens is cut into non-overlapping windows of C + 1 tokens "
                  f"({'all windows' if cap is None else f'at most {cap} per document'}), each scored in a fresh "
                  "forward pass. "
                  + ("Every context scores the documents long enough for the largest one. " if s["common_documents"]
                     else "Longer contexts score fewer (longer) documents: compare models at a context, or ratios "
                          "across contexts. ")
                  + "95% intervals from a bootstrap over documents (ratios: paired). *Last half*: the predictions "
                  "made with at least C/2 tokens of context.", "", _table(header, rows), ""]
    header, rows = position_rows(result)
    if rows:
        parts += ["### Loss by position", "",
                  f"Mean NLL of the prediction made at each position of one window of {s['position_length']} + 1 "
                  "tokens from the start of every long-enough document.", "", _table(header, rows), ""]
    header, rows = passkey_rows(result)
    if rows:
        first = next(e["passkey"] for e in result["models"].values() if "passkey" in e)
        parts += ["### Passkey retrieval", "",
                  f"A 5-digit key hidden at depths {', '.join(f'{d:g}' for d in first['depths'])} of a "
                  f"'{first['filler']}' filler haystack filling the context (plain text, no chat template); "
                  f"{first['trials_per_cell']} seeded trials per depth. *Generation*: the first number in "
                  f"{first['max_new_tokens']} greedy tokens is the key. *Rank*: the key is more likely than "
                  f"{first['distractors']} random other keys (chance {_pct(first['chance_rank_accuracy'])}).", "",
                  _table(header, rows), ""]
        for name, entry in result["models"].items():
            cells = [c for c in entry.get("passkey", {}).get("cells", []) if c["status"] == "ok"]
            if not cells:
                continue
            depths = entry["passkey"]["depths"]
            contexts = sorted({c["context"] for c in cells})
            grid = {(c["context"], c["depth"]): c for c in cells}
            table_rows = [[f"{d:g}", *[f"{_pct(grid[(c, d)]['generation_accuracy'])} / "
                                       f"{_pct(grid[(c, d)]['rank_accuracy'])}" if (c, d) in grid else "-"
                                       for c in contexts]] for d in depths]
            parts += [f"{name}, generation / rank accuracy by depth:", "",
                      _table(["depth", *map(str, contexts)], table_rows), ""]
    for plot in plots:
        parts += [f"![{plot}]({plot})", ""]
    if result.get("notes"):
        parts += ["Notes:", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(parts).rstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _log2_axis(ax, ticks: Sequence[int], label: str) -> None:
    ax.set_xscale("log", base=2)
    if ticks:
        ax.set_xticks(list(ticks), [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)


def _save(fig, path: str | Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def plot_perplexity_by_context(result: dict, path: str | Path) -> bool:
    """Left: perplexity vs context per model (95% bars); right: each model's ratio to the reference (log2 x).
    Returns False (nothing written) when no context was measured."""
    series = {n: [r for r in e.get("perplexity", []) if r["status"] == "ok"] for n, e in result["models"].items()}
    if not any(series.values()):
        return False
    plt = _pyplot()
    ratios = {n: [c for c in comp.get("perplexity", []) if c["status"] == "ok"]
              for n, comp in result["comparisons"].items()}
    with_ratios = any(ratios.values())
    fig, axes = plt.subplots(1, 2 if with_ratios else 1, figsize=(11 if with_ratios else 6, 4.2), squeeze=False)
    ax = axes[0][0]
    contexts = sorted({r["context"] for rows in series.values() for r in rows})
    for name, rows in series.items():
        if not rows:
            continue
        x = [r["context"] for r in rows]
        y = [r["ppl"] for r in rows]
        err = [[r["ppl"] - (r["ppl_ci95"] or [r["ppl"]] * 2)[0] for r in rows],
               [(r["ppl_ci95"] or [r["ppl"]] * 2)[1] - r["ppl"] for r in rows]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
    _log2_axis(ax, contexts, "context (tokens)")
    ax.set_ylabel("perplexity")
    ax.legend(fontsize=8)
    if with_ratios:
        ax = axes[0][1]
        for name, rows in ratios.items():
            if not rows:
                continue
            x = [r["context"] for r in rows]
            y = [r["ppl_ratio"] for r in rows]
            err = [[r["ppl_ratio"] - (r["ppl_ratio_ci95"] or [r["ppl_ratio"]] * 2)[0] for r in rows],
                   [(r["ppl_ratio_ci95"] or [r["ppl_ratio"]] * 2)[1] - r["ppl_ratio"] for r in rows]]
            ax.errorbar(x, y, yerr=err, marker="s", capsize=3, label=f"{name} (all)")
            ax.plot(x, [r["last_half_ppl_ratio"] for r in rows], linestyle=":", marker=".",
                    label=f"{name} (last half)")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        _log2_axis(ax, contexts, "context (tokens)")
        ax.set_ylabel(f"perplexity / {result['reference']}")
        ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_loss_by_position(result: dict, path: str | Path) -> bool:
    """Mean NLL vs position (log2 x, finer buckets) for every model with a position curve."""
    curves = {n: e["position_curve"] for n, e in result["models"].items()
              if e.get("position_curve", {}).get("status") == "ok"}
    if not curves:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, curve in curves.items():
        points = [(max(b["start"], 0.5) if b["end"] - b["start"] == 1 else math.sqrt(max(b["start"], 1) * b["end"]),
                   b["nll"]) for b in curve["curve"]]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=name)
    length = next(iter(curves.values()))["length"]
    ticks = [2**k for k in range(0, int(math.log2(length)) + 1, 2)]
    _log2_axis(ax, ticks, "position p in the window (predicting token p + 1)")
    ax.set_ylabel("mean NLL (nats)")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_passkey_accuracy(result: dict, path: str | Path) -> bool:
    """Passkey accuracy vs context: generation (solid) and rank (dashed) per model, with the rank test's chance."""
    runs = {n: [r for r in e["passkey"]["per_context"] if r["status"] == "ok"]
            for n, e in result["models"].items() if "passkey" in e}
    if not any(runs.values()):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    contexts = sorted({r["context"] for rows in runs.values() for r in rows})
    for i, (name, rows) in enumerate(runs.items()):
        x = [r["context"] for r in rows]
        color = colors[i % len(colors)]
        ax.plot(x, [r["generation_accuracy"] for r in rows], marker="o", color=color, label=f"{name} generation")
        ax.plot(x, [r["rank_accuracy"] for r in rows], marker="s", linestyle="--", color=color, label=f"{name} rank")
    chance = next(e["passkey"]["chance_rank_accuracy"] for e in result["models"].values() if "passkey" in e)
    ax.axhline(chance, color="grey", linewidth=0.8, linestyle=":", label="rank chance")
    _log2_axis(ax, contexts, "context (tokens)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("passkey accuracy")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_passkey_heatmaps(result: dict, path: str | Path) -> bool:
    """One depth x context heatmap of generation accuracy per model, cells annotated generation / rank."""
    grids = {}
    for name, entry in result["models"].items():
        cells = [c for c in entry.get("passkey", {}).get("cells", []) if c["status"] == "ok"]
        if cells:
            grids[name] = (entry["passkey"]["depths"], sorted({c["context"] for c in cells}),
                           {(c["context"], c["depth"]): c for c in cells})
    if not grids:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(grids), figsize=(4.2 * len(grids) + 1, 3.8), squeeze=False, layout="constrained")
    image = None
    for ax, (name, (depths, contexts, grid)) in zip(axes[0], grids.items()):
        values = [[grid[(c, d)]["generation_accuracy"] if (c, d) in grid else float("nan") for c in contexts]
                  for d in depths]
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for i, d in enumerate(depths):
            for j, c in enumerate(contexts):
                if (c, d) in grid:
                    cell = grid[(c, d)]
                    ax.text(j, i, f"{_pct(cell['generation_accuracy'])}\n{_pct(cell['rank_accuracy'])}",
                            ha="center", va="center", fontsize=7, color="white" if
                            cell["generation_accuracy"] < 0.6 else "black")
        ax.set_xticks(range(len(contexts)), [str(c) for c in contexts])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context (tokens)")
        if ax is axes[0][0]:
            ax.set_ylabel("needle depth")
        ax.set_title(f"{name}: generation (rank)", fontsize=9)
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="generation accuracy")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


PLOTS: dict[str, Callable[[dict, str | Path], bool]] = {
    "length_perplexity.png": plot_perplexity_by_context,
    "length_loss_by_position.png": plot_loss_by_position,
    "length_passkey.png": plot_passkey_accuracy,
    "length_passkey_heatmap.png": plot_passkey_heatmaps,
}


def write_length_plots(result: dict, directory: str | Path) -> list[str]:
    """Every plot the result has data for, as PNG files in `directory`; returns the file names written."""
    directory = Path(directory)
    return [name for name, plot in PLOTS.items() if plot(result, directory / name)]
