"""The one greedy decode loop of effconv: prefill a prompt into the model's cache, then one token per step.

    out = prefill(model, input_ids)                     # the prompt's forward into a fresh cache (the model output)
    token = greedy_token(out.logits)                    # (B, 1)
    step = CacheStep(model, output_cache(out))          # step(token) -> the next greedy token, through the cache
    tokens = decode(step, token, n, stop_ids={2})       # n more tokens, fewer once every row has produced a stop id

Any Hugging Face causal LM works (effconv exports and softmax teachers alike). The speed benchmark
(eval/speed.py) and the passkey test (eval/length.py) decode through `CacheStep`; `greedy_generate`
(fast_decode.py) runs the same loop over StaticDecoder's static-cache step, which replays a CUDA graph
(`capture_step`, shared with the teacher's graph sampler).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Sequence

import torch


def accepts_argument(model, name: str) -> bool:
    """Whether the model's forward takes keyword `name` (False when its signature cannot be read)."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def cache_kwargs(model, cache) -> dict:
    """The cache under the name the model's forward takes (transformers >= 5.2x: `cache`, before:
    `past_key_values`; effconv takes both), with use_cache."""
    name = "cache" if accepts_argument(model, "cache") else "past_key_values"
    return {name: cache, "use_cache": True}


def output_cache(output):
    """The cache a forward returned (`cache`, or `past_key_values` in older transformers)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def new_cache(model):
    """A DynamicCache for transformers models that use one; None lets models with their own cache (effconv's
    EffconvCache, recurrent models) create it on the first forward."""
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if not callable(supports) or not supports():
        return None
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def _last_logits_kwargs(model) -> dict:
    return {"logits_to_keep": 1} if accepts_argument(model, "logits_to_keep") else {}


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor):
    """The prompt's forward into a fresh cache, last position's logits only where the model allows; returns the
    model output (`output_cache(out)` holds the cache)."""
    return model(input_ids=input_ids, **cache_kwargs(model, new_cache(model)), **_last_logits_kwargs(model))


def greedy_token(logits: torch.Tensor) -> torch.Tensor:
    """(B, 1) argmax of the last position's logits (B, T, V)."""
    return logits[:, -1].argmax(-1, keepdim=True)


class CacheStep:
    """`step(token)`: the forward of one token per row (B, 1) through the cache, returning the next greedy token
    (B, 1); the cache the model returns replaces the one held."""

    def __init__(self, model, cache):
        self.model = model
        self.cache = cache
        self.cache_name = "cache" if accepts_argument(model, "cache") else "past_key_values"  # once, not per step
        self.kwargs = _last_logits_kwargs(model)

    @torch.inference_mode()
    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=token, **{self.cache_name: self.cache}, use_cache=True, **self.kwargs)
        self.cache = output_cache(out)
        return greedy_token(out.logits)


def decode(step: Callable[[torch.Tensor], torch.Tensor], token: torch.Tensor, count: int, *,
           stop_ids: Collection[int] = (), keep: bool = True) -> list[torch.Tensor]:
    """`count` greedy tokens after `token` (B, 1), each `step(previous token)`: the list of (B, 1) tokens, or with
    keep=False only the last one (nothing else stays referenced). With stop_ids, the loop ends after the step in
    which every row has produced one of them (a host sync per step); without, it never syncs with the device."""
    tokens: list[torch.Tensor] = []
    stops = torch.tensor(sorted(stop_ids), device=token.device) if stop_ids else None
    stopped = None
    for _ in range(count):
        token = step(token)
        if keep or not tokens:
            tokens.append(token)
        else:
            tokens[0] = token
        if stops is not None:
            hit = torch.isin(token[:, -1], stops)
            stopped = hit if stopped is None else stopped | hit
            if bool(stopped.all()):
                break
    return tokens


def capture_step(step: Callable[[], None], buffers: Sequence[torch.Tensor]) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `step()`, captured on a side stream. Capture records the step without running it; the static
    `buffers` the step advances are put back to their values from before the capture all the same, in case some
    backend ran eagerly."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    saved = [b.clone() for b in buffers]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    for buffer, value in zip(buffers, saved):
        buffer.copy_(value)
    return graph
