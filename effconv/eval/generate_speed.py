"""Speed of `model.generate` as a user calls it: prefill time and decode tokens/s of greedy generation, peak memory.

Self-contained (torch and transformers only): bench/generate.py also loads this file in a process where effconv is
not importable, to time an export the way a machine without effconv runs it.

A cell generates from `batch_size` random prompts of `context` tokens: once with one new token (the prefill time)
and once with `new_tokens + 1` (min_new_tokens set: no early stop); decode tokens/s = batch * new_tokens / (long -
short). Medians over `repeats` after one untimed warm-up call (kernel compilation, graph capture, torch.compile).
Peak memory (CUDA): the most allocated during the cell above what was allocated before it (weights and the like),
so it includes the cell's cache, prefill activations and any CUDA-graph pool.
"""

from __future__ import annotations

import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_path(model, teacher_mode: str | None = None) -> str:
    """How the model's last generate call decoded (effconv models: static cache, CUDA graph)."""
    if teacher_mode is not None:
        compiled = " + torch.compile" if next(model.parameters()).is_cuda else ""
        return {"dynamic": "transformers DynamicCache", "static": f"transformers StaticCache{compiled}"}.get(
            teacher_mode, teacher_mode)
    cache = getattr(model, "_effconv_generation_cache", None)
    loop = f"{getattr(model, '_effconv_generate_loop', 'transformers')} loop, "
    if cache is None or not cache.static:
        return loop + "eager (growing cache)"
    return loop + ("static cache + CUDA graph" if cache.graph is not None else "static cache, eager steps")


def teacher_kwargs(mode: str) -> dict:
    """generate() arguments of a teacher mode: `dynamic` (transformers' default) or `static` (StaticCache, which
    transformers compiles with torch.compile on CUDA)."""
    if mode == "dynamic":
        return {}
    if mode == "static":
        return {"cache_implementation": "static"}
    raise ValueError(f"unknown teacher mode {mode!r}; choose dynamic or static")


def release_generation_cache(model) -> None:
    """Drop the static cache (and CUDA graph) an effconv model keeps from its last generate call."""
    if getattr(model, "_effconv_generation_cache", None) is not None:
        model._effconv_generation_cache = None


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def time_generate(model, *, batch_size: int, context: int, new_tokens: int, repeats: int = 1, seed: int = 0,
                  generate_kwargs: dict | None = None, prefill_chunk: int | None = None) -> dict:
    """One cell (module docstring); {"status": "OOM", "error": ...} when it runs out of memory."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed + 1000 * context + batch_size)
    ids = torch.randint(3, model.config.vocab_size, (batch_size, context), generator=generator).to(device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, **(generate_kwargs or {}))
    if prefill_chunk:
        kwargs["prefill_chunk_size"] = prefill_chunk

    def run(count: int) -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=count, min_new_tokens=count, **kwargs)
        _sync(device)
        return time.perf_counter() - start

    release_generation_cache(model)  # the cell's peak includes its own cache, not the last cell's
    peak = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    try:
        run(new_tokens + 1)
        short, long = [], []
        for _ in range(repeats):
            short.append(run(1))
            long.append(run(new_tokens + 1))
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - base
    except Exception as error:  # noqa: BLE001 - out of memory is a result; anything else is re-raised
        if not is_oom(error):
            raise
        return {"status": "OOM", "error": str(error).splitlines()[0]}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    prefill_s, long_s = statistics.median(short), statistics.median(long)
    decode_s = max(long_s - prefill_s, 1e-9)
    return {
        "status": "ok",
        "prefill_ms": prefill_s * 1000.0,
        "prefill_tokens_per_s": batch_size * context / prefill_s,
        "decode_tokens_per_s": batch_size * new_tokens / decode_s,
        "decode_ms_per_step": decode_s * 1000.0 / new_tokens,
        "peak_bytes": peak,
    }
