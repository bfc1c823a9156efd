"""Speed and memory of generation: prefill latency and cached decode throughput over context lengths and batch
sizes, peak memory (GPU or process RSS) and the bytes the generation cache holds."""

from __future__ import annotations

import contextlib
import gc
import re
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..errors import is_oom, one_line
from ..generation.decoding import CacheStep, decode, greedy_token, output_cache, prefill


def cache_nbytes(cache) -> int:
    """Bytes held by a generation cache: EffconvCache.nbytes(), or the tensors of a transformers cache's layers
    (keys, values and any other tensor a layer holds), or of a legacy tuple cache."""
    if cache is None:
        return 0
    if callable(getattr(cache, "nbytes", None)):
        return int(cache.nbytes())
    seen: set[int] = set()

    def size(t: torch.Tensor) -> int:
        if t.data_ptr() in seen or t.numel() == 0:
            return 0
        seen.add(t.data_ptr())
        return t.numel() * t.element_size()

    layers = getattr(cache, "layers", None)
    if layers is not None:
        total = 0
        for layer in layers:
            for value in vars(layer).values():
                if isinstance(value, torch.Tensor):
                    total += size(value)
        return total

    def walk(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return size(obj)
        if isinstance(obj, (list, tuple)):
            return sum(walk(o) for o in obj)
        return 0

    return walk(cache)


class MemoryMeter:
    """Peak memory of a block of work, as the increase over what was in use when it started.

    CUDA: torch.cuda.max_memory_allocated. CPU: the process's peak resident set size — VmHWM reset through
    /proc/self/clear_refs on Linux, else psutil sampling, else ru_maxrss (which can only show growth past the
    earlier peak). `method` says which one is used."""

    def __init__(self, device: torch.device):
        self.device = device
        self._sampler: threading.Thread | None = None
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated, minus memory allocated at the start of the cell"
        elif self._clear_refs_works():
            self.method = ("peak RSS (Linux VmHWM, reset per cell via /proc/self/clear_refs), minus RSS at the start of "
                           "the cell (after gc and malloc_trim)")
        elif _has_psutil():
            self.method = "peak RSS sampled every 2 ms with psutil, minus RSS at the start of the cell"
        else:
            self.method = "growth of ru_maxrss (process peak RSS; 0 when the cell stays below an earlier peak)"

    @staticmethod
    def _status_kib(key: str) -> int | None:
        try:
            text = Path("/proc/self/status").read_text()
        except OSError:
            return None
        match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        return int(match.group(1)) if match else None

    def _clear_refs_works(self) -> bool:
        if self._status_kib("VmHWM") is None:
            return False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        return True

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict]:
        """`with meter.measure() as m: ...` then m["peak_bytes"]."""
        result: dict = {}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            start = torch.cuda.memory_allocated(self.device)
            yield result
            torch.cuda.synchronize(self.device)
            result["peak_bytes"] = torch.cuda.max_memory_allocated(self.device) - start
        elif self.method.startswith("peak RSS (Linux"):
            _release_free_memory()
            start = self._status_kib("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            yield result
            result["peak_bytes"] = max((self._status_kib("VmHWM") or 0) - (start or 0), 0) * 1024
        elif self.method.startswith("peak RSS sampled"):
            import psutil

            _release_free_memory()
            proc = psutil.Process()
            start = proc.memory_info().rss
            peak = [start]
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(0.002):
                    peak[0] = max(peak[0], proc.memory_info().rss)

            thread = threading.Thread(target=sample, daemon=True)
            thread.start()
            try:
                yield result
            finally:
                stop.set()
                thread.join()
            result["peak_bytes"] = max(max(peak[0], proc.memory_info().rss) - start, 0)
        else:
            import resource

            scale = 1 if sys.platform == "darwin" else 1024
            start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            yield result
            result["peak_bytes"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) * scale


def _release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc malloc_trim), so that the RSS at the start
    of a cell is the memory in use, not what earlier cells freed."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)


class OtherCpuLoad:
    """Average number of CPU cores that other processes kept busy while a block ran (psutil; None without it).
    Timings taken while this is well above 0 include contention."""

    def __enter__(self):
        self.value = None
        try:
            import psutil
        except ImportError:
            self._psutil = None
            return self
        self._psutil = psutil
        self._proc = psutil.Process()
        self._start = (time.perf_counter(), self._busy(), self._own())
        return self

    def _busy(self) -> float:
        t = self._psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def _own(self) -> float:
        t = self._proc.cpu_times()
        return t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)

    def __exit__(self, *exc) -> None:
        if self._psutil is None:
            return
        wall0, busy0, own0 = self._start
        wall = time.perf_counter() - wall0
        if wall > 0:
            self.value = max((self._busy() - busy0) - (self._own() - own0), 0.0) / wall


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_cell(model, *, batch_size: int, context: int, decode_tokens: int, repeats: int, warmup: int,
               meter: MemoryMeter, seed: int = 0) -> dict:
    """Prefill `context` random tokens for `batch_size` rows, then decode `decode_tokens` greedy tokens one at a
    time through the cache (model forward in a loop, not generate: generation/decoding.py). Medians over `repeats`
    after `warmup`; the prefill time is the prompt's forward, the decode time the `decode_tokens` steps."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed + 1000 * context + batch_size)
    ids = torch.randint(0, vocab, (batch_size, context), generator=generator).to(device)
    prefill_ms, decode_s, cache_bytes = [], [], None
    with meter.measure() as mem:
        for i in range(warmup + repeats):
            _sync(device)
            t0 = time.perf_counter()
            out = prefill(model, ids)
            _sync(device)
            t1 = time.perf_counter()
            step = CacheStep(model, output_cache(out))
            if cache_bytes is None:
                cache_bytes = cache_nbytes(step.cache)
            token = greedy_token(out.logits)
            del out
            _sync(device)
            t2 = time.perf_counter()
            token = decode(step, token, decode_tokens, keep=False)
            _sync(device)
            t3 = time.perf_counter()
            del step, token
            if i >= warmup:
                prefill_ms.append((t1 - t0) * 1000.0)
                decode_s.append(t3 - t2)
    generated = batch_size * decode_tokens
    decode_median = statistics.median(decode_s)
    return {
        "status": "ok",
        "prefill_ms": statistics.median(prefill_ms),
        "prefill_ms_all": prefill_ms,
        "prefill_tokens_per_s": batch_size * context / (statistics.median(prefill_ms) / 1000.0),
        "decode_tokens": generated,
        "decode_seconds": decode_median,
        "decode_seconds_all": decode_s,
        "decode_tokens_per_s": generated / decode_median,
        "peak_memory_bytes": mem["peak_bytes"],
        "cache_bytes": cache_bytes,
        "cache_bytes_per_token": cache_bytes / (batch_size * context),
    }


def _is_effconv(model) -> bool:
    return getattr(model.config, "model_type", None) == "effconv"


def bench_cell_generate(model, *, batch_size: int, context: int, decode_tokens: int, repeats: int, seed: int = 0
                        ) -> dict:
    """The cell through `model.generate` on the model's fastest path (generate_speed.py): an effconv model on its
    own (static cache + CUDA graph on CUDA), a transformers model with its default cache and with its StaticCache
    (compiled by transformers on CUDA), the faster of the two reported (the other in `other_paths`). Peak memory
    is that of the reported path; cache bytes are those of a fresh prefill's cache (the teacher's growing cache,
    the converted model's state and window)."""
    from .generate_speed import decode_path, teacher_kwargs, time_generate

    modes = [None] if _is_effconv(model) else ["dynamic", "static"]
    results = []
    for mode in modes:
        result = time_generate(model, batch_size=batch_size, context=context, new_tokens=decode_tokens,
                               repeats=repeats, seed=seed, generate_kwargs=teacher_kwargs(mode) if mode else None)
        result["path"] = decode_path(model, mode)
        results.append(result)
    ok = [r for r in results if r["status"] == "ok"]
    if not ok:
        return results[0]
    best = max(ok, key=lambda r: r["decode_tokens_per_s"])
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed + 1000 * context + batch_size)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, context), generator=generator).to(device)
    out = prefill(model, ids)
    cache_bytes = cache_nbytes(output_cache(out))
    del out
    return {
        "status": "ok",
        "prefill_ms": best["prefill_ms"],
        "prefill_tokens_per_s": best["prefill_tokens_per_s"],
        "decode_tokens": batch_size * decode_tokens,
        "decode_tokens_per_s": best["decode_tokens_per_s"],
        "peak_memory_bytes": best["peak_bytes"],
        "cache_bytes": cache_bytes,
        "cache_bytes_per_token": cache_bytes / (batch_size * context),
        "path": best["path"],
        "other_paths": {r["path"]: r.get("decode_tokens_per_s", r["status"]) for r in results if r is not best},
    }


def bench_model(model, *, contexts: Sequence[int], batch_sizes: Sequence[int], decode_tokens: int, repeats: int,
                warmup: int, meter: MemoryMeter, seed: int, progress=None, label: str = "",
                method: str = "steps") -> list[dict]:
    """Every (batch size, context) cell; a cell that runs out of memory is recorded as "OOM" and the rest go on.
    `method`: "steps" (bench_cell: the forward of one token at a time in a loop) or "generate"
    (bench_cell_generate: model.generate on its fastest path; contexts longest first, so a static cache keeps
    one size per batch size)."""
    if method == "generate":
        contexts = sorted(contexts, reverse=True)
    rows = []
    task = progress.add_task(f"speed {label}", total=len(contexts) * len(batch_sizes)) if progress is not None else None
    for batch_size in batch_sizes:
        for context in contexts:
            row = {"batch_size": batch_size, "context": context}
            try:
                if method == "generate":
                    cell = bench_cell_generate(model, batch_size=batch_size, context=context,
                                               decode_tokens=decode_tokens, repeats=repeats, seed=seed)
                else:
                    cell = bench_cell(model, batch_size=batch_size, context=context, decode_tokens=decode_tokens,
                                      repeats=repeats, warmup=warmup, meter=meter, seed=seed)
                row.update(cell)
            except Exception as e:  # noqa: BLE001 - only out-of-memory is recorded; anything else is re-raised
                if not is_oom(e):
                    raise
                row.update(status="OOM", error=one_line(e))
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            rows.append(row)
            if progress is not None:
                progress.advance(task)
    return rows
