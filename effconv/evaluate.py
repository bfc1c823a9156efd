"""`effconv eval`: did a conversion keep the quality and gain the speed?

One model (MODEL, called the student) and optionally a reference (TEACHER) are measured the same way:

* quality: perplexity on text (strided sliding window), lm-eval-harness tasks, greedy generations side by side;
* speed and memory: prefill latency and cached decode throughput over context lengths and batch sizes, peak
  memory and the bytes the generation cache holds.

The whole run is a function of `EvalConfig` (`evaluate(cfg) -> dict`); the CLI (`effconv/cli_eval.py`) and YAML
recipes only fill that config. With `out` set, report.json, report.md and PNG plots are written to a temporary
directory that is renamed onto `out` at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import json
import math
import os
import platform
import re
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .errors import EffconvError

TEACHER_DATA = "teacher"  # --data teacher: held-out teacher-generated text, as linearize makes it
DEFAULT_TEACHER = "default"  # --teacher default: the default model (SmolLM2-135M-Instruct)
ROLES = ("teacher", "student")
DEFAULT_CONTEXTS = {"cpu": [128, 256, 512], "cuda": [512, 1024, 2048, 4096, 8192]}
DEFAULT_BATCH_SIZES = [1, 4]
DEFAULT_PPL_CONTEXT = {"cpu": 512, "cuda": 2048}
BUILTIN_PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about a lighthouse.",
    "What is 17 times 3? Explain your steps.",
]
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory")


@dataclass
class EvalConfig:
    """Every setting of an eval run; YAML recipes hold these keys."""

    model: str | None = None  # the model to evaluate (any form --model takes); None: the default model
    teacher: str | None = None  # reference model to compare with; "default": the default model; None: none
    out: str | None = None  # report directory (report.json, report.md, *.png); None: terminal only
    data: str | None = None  # perplexity text: file, directory, hf:NAME[:CONFIG][@SPLIT], or "teacher"
    text_field: str = "text"
    max_documents: int | None = None
    context: int | None = None  # perplexity window (default: 512 on CPU, 2048 on CUDA, capped at the models')
    stride: int | None = None  # perplexity stride (default: context // 2); must be < context
    tasks: list[str] | None = None  # lm-eval-harness task names
    task_path: str | None = None  # directory of extra lm-eval task YAMLs (TaskManager include_path)
    task_limit: int | None = None  # lm-eval: at most this many examples per task
    num_fewshot: int | None = None
    task_batch_size: int = 8
    prompts: str | None = None  # file of generation prompts, one per line ('#' comments); None: 3 built-in
    max_new_tokens: int = 48
    generations: bool = True
    speed: bool = True
    contexts: list[int] | None = None  # speed: prompt lengths (default: 128,256,512 on CPU; 512..8192 on CUDA)
    batch_sizes: list[int] | None = None  # speed: batch sizes (default: 1,4)
    decode_tokens: int = 16  # new tokens timed per decode measurement
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        for name in ("task_batch_size", "max_new_tokens", "decode_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise EffconvError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise EffconvError(f"--warmup must be >= 0, got {self.warmup}")
        if self.context is not None and self.context < 2:
            raise EffconvError(f"--context must be at least 2, got {self.context}")
        if self.stride is not None:
            if self.stride < 1:
                raise EffconvError(f"--stride must be at least 1, got {self.stride}")
            if self.context is not None and self.stride >= self.context:
                raise EffconvError(
                    f"--stride ({self.stride}) must be smaller than --context ({self.context}) so that every "
                    "window scores its tokens with some left context"
                )
        if self.contexts is not None and (not self.contexts or min(self.contexts) < 1):
            raise EffconvError(f"--contexts must be positive integers, got {self.contexts}")
        if self.batch_sizes is not None and (not self.batch_sizes or min(self.batch_sizes) < 1):
            raise EffconvError(f"--batch-sizes must be positive integers, got {self.batch_sizes}")
        if self.task_limit is not None and self.task_limit < 1:
            raise EffconvError(f"--task-limit must be at least 1, got {self.task_limit}")
        if self.max_documents is not None and self.max_documents < 1:
            raise EffconvError(f"--max-documents must be at least 1, got {self.max_documents}")
        if self.tasks is not None:
            self.tasks = [t.strip() for t in self.tasks if t.strip()]
            if not self.tasks:
                raise EffconvError("--tasks is empty; give comma-separated lm-eval task names")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise EffconvError(f"unknown --dtype {self.dtype!r}; choose auto, float32, bfloat16 or float16")


# ---------------------------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------------------------


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


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.inference_mode()
def sequence_nll(model, ids: Sequence[int] | torch.Tensor, *, context: int, stride: int, on_window=None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) of one token sequence and the number of tokens scored."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    device = next(model.parameters()).device
    keep_logits = _accepts(model, "logits_to_keep")
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


def _document_ids(tokenizer, documents: Sequence[str]) -> list[list[int]]:
    """Each document as [BOS] tokens (BOS only when the tokenizer has one and the text lacks it); no EOS."""
    bos = tokenizer.bos_token_id
    with _quiet_transformers():
        encoded = tokenizer(list(documents), add_special_tokens=False)["input_ids"]
    out = []
    for ids in encoded:
        ids = list(ids)
        if bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        out.append(ids)
    return out


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


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


# ---------------------------------------------------------------------------------------------------------------
# Speed and memory
# ---------------------------------------------------------------------------------------------------------------


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


def _new_cache(model):
    """A DynamicCache for transformers models that use one; None lets models with their own cache (effconv's
    EffconvCache, recurrent models) create it on the first forward."""
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if callable(supports) and not supports():
        return None
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _OOM_MARKERS)


@torch.inference_mode()
def _prefill(model, ids: torch.Tensor, keep_logits: bool):
    kwargs = {"logits_to_keep": 1} if keep_logits else {}
    return model(input_ids=ids, past_key_values=_new_cache(model), use_cache=True, **kwargs)


@torch.inference_mode()
def _decode_step(model, token: torch.Tensor, cache, keep_logits: bool):
    kwargs = {"logits_to_keep": 1} if keep_logits else {}
    return model(input_ids=token, past_key_values=cache, use_cache=True, **kwargs)


def bench_cell(model, *, batch_size: int, context: int, decode_tokens: int, repeats: int, warmup: int,
               meter: MemoryMeter, seed: int = 0) -> dict:
    """Prefill `context` random tokens for `batch_size` rows, then decode `decode_tokens` greedy tokens one at a
    time through the cache (model forward in a loop, not generate). Medians over `repeats` after `warmup`."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed + 1000 * context + batch_size)
    ids = torch.randint(0, vocab, (batch_size, context), generator=generator).to(device)
    keep_logits = _accepts(model, "logits_to_keep")
    prefill_ms, decode_s, cache_bytes = [], [], None
    with meter.measure() as mem:
        for i in range(warmup + repeats):
            _sync(device)
            t0 = time.perf_counter()
            out = _prefill(model, ids, keep_logits)
            _sync(device)
            t1 = time.perf_counter()
            cache = out.past_key_values
            if cache_bytes is None:
                cache_bytes = cache_nbytes(cache)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            del out
            _sync(device)
            t2 = time.perf_counter()
            for _ in range(decode_tokens):
                out = _decode_step(model, token, cache, keep_logits)
                cache = out.past_key_values
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                del out
            _sync(device)
            t3 = time.perf_counter()
            del cache, token
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


def bench_model(model, *, contexts: Sequence[int], batch_sizes: Sequence[int], decode_tokens: int, repeats: int,
                warmup: int, meter: MemoryMeter, seed: int, progress=None, label: str = "") -> list[dict]:
    """Every (batch size, context) cell; a cell that runs out of memory is recorded as "OOM" and the rest go on."""
    rows = []
    task = progress.add_task(f"speed {label}", total=len(contexts) * len(batch_sizes)) if progress is not None else None
    for batch_size in batch_sizes:
        for context in contexts:
            row = {"batch_size": batch_size, "context": context}
            try:
                row.update(bench_cell(model, batch_size=batch_size, context=context, decode_tokens=decode_tokens,
                                      repeats=repeats, warmup=warmup, meter=meter, seed=seed))
            except Exception as e:  # noqa: BLE001 - only out-of-memory is recorded; anything else is re-raised
                if not _is_oom(e):
                    raise
                row.update(status="OOM", error=_one_line(e))
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            rows.append(row)
            if progress is not None:
                progress.advance(task)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Generations and lm-eval
# ---------------------------------------------------------------------------------------------------------------


def load_prompts(path: str | None) -> list[str]:
    if path is None:
        return list(BUILTIN_PROMPTS)
    p = Path(path).expanduser()
    if not p.is_file():
        raise EffconvError(f"prompts file not found: {path}")
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EffconvError(f"cannot read prompts file {path}: {e}") from e
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise EffconvError(f"prompts file {path} has no prompts (one per line; '#' starts a comment)")
    return prompts


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


@torch.inference_mode()
def greedy_generations(model, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy continuation of each prompt (chat-formatted when the tokenizer has a template), special tokens
    removed."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    texts = []
    for prompt in prompts:
        ids = torch.tensor([_prompt_ids(tokenizer, prompt)], device=device)
        with _quiet_transformers():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return texts


def _network_available(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def import_lm_eval():
    """Import lm-eval-harness, offline when there is no network (set before the import: the HF libraries read
    these variables once). Raises EffconvError when it is not installed."""
    if sys.modules.get("lm_eval") is None and not _network_available():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        import lm_eval.tasks  # noqa: F401 - not imported by `import lm_eval`
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as e:
        raise EffconvError(f"--tasks needs lm-eval-harness, which is not installed: pip install lm-eval ({e})") from e
    return lm_eval


def check_tasks(lm_eval, tasks: Sequence[str], include_path: str | None = None):
    """A TaskManager, after checking that every task name is known."""
    if include_path is not None and not Path(include_path).is_dir():
        raise EffconvError(f"--task-path {include_path} is not a directory")
    try:
        manager = lm_eval.tasks.TaskManager(include_path=include_path) if include_path else lm_eval.tasks.TaskManager()
        known = set(manager.all_tasks)
    except Exception as e:  # noqa: BLE001
        raise EffconvError(f"lm-eval could not list its tasks: {_one_line(e)}") from e
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise EffconvError(f"unknown lm-eval task(s): {', '.join(unknown)} (`lm-eval ls tasks` lists them)")
    return manager


def run_tasks(lm_eval, manager, model, tokenizer, tasks: Sequence[str], *, limit: int | None,
              num_fewshot: int | None, batch_size: int, seed: int) -> dict:
    """lm-eval-harness on the in-memory model. Returns {task: {metric: value}} (numbers only)."""
    from lm_eval.models.huggingface import HFLM

    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, log_samples=False,
        )
    except EffconvError:
        raise
    except Exception as e:  # noqa: BLE001 - dataset download failures come as many types
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (offline: only datasets already in the local Hugging Face cache can be used)" if offline else ""
        raise EffconvError(f"lm-eval failed on {', '.join(tasks)}: {_one_line(e)}{hint}") from e
    if results is None:
        raise EffconvError("lm-eval returned no results")
    out = {}
    for task, metrics in results.get("results", {}).items():
        out[task] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def _device_and_dtype(cfg: EvalConfig) -> tuple[torch.device, torch.dtype]:
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(cfg.device)
        except RuntimeError as e:
            raise EffconvError(f"unknown --device {cfg.device!r}") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise EffconvError("--device cuda was asked for but no CUDA device is available")
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    return device, dtype


def _one_line(error: BaseException) -> str:
    message = " ".join(str(error).split()) or type(error).__name__
    return message if len(message) <= 300 else message[:297] + "..."


def _teacher_spec(teacher: str | None) -> str | None:
    return None if teacher == DEFAULT_TEACHER else teacher


def _model_info(model, source, spec: str | None) -> dict:
    config = model.config
    info = {
        "spec": spec,
        "source": source.description,
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
    }
    types = getattr(config, "attention_types", None)
    if getattr(config, "model_type", None) == "effconv" and types:
        linear = sum(t == "linear" for t in types)
        info["attention"] = (f"{linear}/{len(types)} layers linear ({config.feature_map}), "
                             f"window {config.window_size}" + (" (pure linear)" if config.window_size == 0 else ""))
    else:
        info["attention"] = "softmax (KV cache)"
    return info


def _linearize_metadata(source) -> dict | None:
    """The linearize config recorded in an effconv export's effconv.json, if any."""
    if source.kind != "dir":
        return None
    path = Path(source.path) / "effconv.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    config = meta.get("config") if isinstance(meta, dict) else None
    return config if isinstance(config, dict) and meta.get("command") in ("linearize", "hybridize") else None


def _teacher_text_blocks(cfg: EvalConfig, student_source, tokenizer, models: dict, device, dtype, progress: bool):
    """Held-out blocks of teacher-generated text. When the student is an effconv export trained on teacher text,
    the generation and split settings come from its effconv.json, so these are exactly the validation blocks its
    linearize run held out (same cached texts, same split)."""
    from . import data as data_lib
    from .linearize import LinearizeConfig
    from .loading import cache_root, load_causal_lm, resolve_model_source

    recorded = _linearize_metadata(student_source)
    defaults = dataclasses.asdict(LinearizeConfig())
    settings = {k: (recorded or {}).get(k, defaults[k]) for k in
                ("generate_tokens", "generation_batch_size", "generation_mode", "seq_len", "val_fraction", "seed",
                 "max_val_blocks")}
    if recorded is not None and "generation_mode" not in recorded:
        settings["generation_mode"] = "static"  # exports from before the setting existed generated with static
    if recorded is not None and recorded.get("data") is not None:
        note = (f"the student was trained on {recorded['data']!r}, not on teacher text; "
                "teacher-generated text is new to it")
    else:
        note = None
    if recorded is not None:
        generator_spec = recorded.get("model")
    elif cfg.teacher is not None:
        generator_spec = _teacher_spec(cfg.teacher)
    else:
        raise EffconvError("--data teacher needs --teacher (the model that writes the text) unless MODEL is an "
                           "effconv export that records its teacher")
    if "teacher" in models and resolve_model_source(generator_spec) == resolve_model_source(_teacher_spec(cfg.teacher)):
        gen_model, gen_tokenizer = models["teacher"][0], models["teacher"][1]
    else:
        gen_model, gen_tokenizer, _ = load_causal_lm(generator_spec, dtype=dtype, device=device)
    if gen_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise EffconvError("--data teacher needs the text writer and the student to share a tokenizer; pass --data FILE")
    _, val_blocks, description = data_lib.prepare_data(
        None, tokenizer, settings["seq_len"], teacher_factory=lambda: (gen_model, gen_tokenizer),
        num_tokens=settings["generate_tokens"], cache_dir=cache_root() / "data", val_fraction=settings["val_fraction"],
        seed=settings["seed"], generation_batch_size=settings["generation_batch_size"],
        generation_mode=settings["generation_mode"], progress=progress,
    )
    val_blocks = val_blocks[: settings["max_val_blocks"]]
    description = (f"held-out teacher-generated text: {val_blocks.shape[0]} validation blocks of {settings['seq_len']} "
                   f"tokens ({description})")
    return [row.tolist() for row in val_blocks], description, note


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .train import console

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=not enabled, transient=False)


def evaluate(cfg: EvalConfig) -> dict:
    """Measure MODEL (and TEACHER, when given) and return the report; with cfg.out, also write it there."""
    from .export import check_output_dir
    from .loading import load_causal_lm
    from .train import console

    cfg.validate()
    out = Path(cfg.out) if cfg.out else None
    if out is not None:
        check_output_dir(out, cfg.overwrite)
    lm_eval = manager = None
    if cfg.tasks:  # first: the offline switches must be set before anything imports the HF datasets library
        lm_eval = import_lm_eval()
        manager = check_tasks(lm_eval, cfg.tasks, cfg.task_path)
    prompts = load_prompts(cfg.prompts) if cfg.generations else []
    documents = None
    if cfg.data is not None and cfg.data != TEACHER_DATA:
        from .data import load_texts

        documents = load_texts(cfg.data, text_field=cfg.text_field, max_documents=cfg.max_documents)
    device, dtype = _device_and_dtype(cfg)
    torch.manual_seed(cfg.seed)

    specs = {"student": cfg.model}
    if cfg.teacher is not None:
        specs = {"teacher": _teacher_spec(cfg.teacher), "student": cfg.model}
    models: dict[str, tuple] = {}
    for role, spec in specs.items():
        console.print(f"[bold]effconv eval[/bold]: loading {role} {spec or 'the default model'}")
        models[role] = load_causal_lm(spec, dtype=dtype, device=device)
    roles = [r for r in ROLES if r in models]
    info = {role: _model_info(models[role][0], models[role][2], specs[role]) for role in roles}

    # Context checks before any measurement.
    max_pos = {role: info[role]["max_position_embeddings"] for role in roles}
    limits = [m for m in max_pos.values() if m]
    context = cfg.context or min([DEFAULT_PPL_CONTEXT[device.type]] + limits)
    stride = cfg.stride or max(context // 2, 1)
    if stride >= context:
        raise EffconvError(f"--stride ({stride}) must be smaller than --context ({context})")
    contexts = sorted(set(cfg.contexts)) if cfg.contexts else [
        c for c in DEFAULT_CONTEXTS[device.type] if all(c + cfg.decode_tokens <= m for m in limits)]
    for role in roles:
        m = max_pos[role]
        if not m:
            continue
        if (cfg.data is not None) and context > m:
            raise EffconvError(f"--context {context} is longer than the {role}'s max_position_embeddings ({m})")
        if cfg.speed:
            too_long = [c for c in contexts if c + cfg.decode_tokens > m]
            if too_long:
                raise EffconvError(
                    f"--contexts {','.join(map(str, too_long))} plus {cfg.decode_tokens} decode tokens exceed the "
                    f"{role}'s max_position_embeddings ({m})"
                )

    report: dict[str, Any] = {
        "command": "eval",
        "config": dataclasses.asdict(cfg),
        "environment": _environment(device, dtype),
        "models": info,
        "notes": [],
    }
    with _progress(cfg.progress) as progress:
        # Quality: perplexity.
        if cfg.data is None:
            report["perplexity"] = {"skipped": "no --data given (a text/JSONL file, a directory, hf:NAME, or 'teacher')"}
            report["notes"].append("perplexity skipped: no --data given")
        else:
            ppl: dict[str, Any] = {"context": context, "stride": stride}
            if cfg.data == TEACHER_DATA:
                blocks, description, note = _teacher_text_blocks(cfg, models["student"][2], models["student"][1],
                                                                  models, device, dtype, cfg.progress)
                if note:
                    report["notes"].append(note)
                ppl["data"] = description
                per_role = {role: (blocks, None) for role in roles}
            else:
                ppl["data"] = f"{len(documents)} document(s) from {cfg.data}"
                text_bytes = sum(len(d.encode("utf-8")) for d in documents)
                per_role = {role: (_document_ids(models[role][1], documents), text_bytes) for role in roles}
            for role in roles:
                seqs, text_bytes = per_role[role]
                ppl[role] = perplexity_report(models[role][0], seqs, context=context, stride=stride,
                                              text_bytes=text_bytes, progress=progress, label=role)
            report["perplexity"] = ppl

        # Quality: lm-eval tasks.
        if cfg.tasks:
            report["tasks"] = {role: run_tasks(lm_eval, manager, models[role][0], models[role][1], cfg.tasks,
                                               limit=cfg.task_limit, num_fewshot=cfg.num_fewshot,
                                               batch_size=cfg.task_batch_size, seed=cfg.seed) for role in roles}

        # Quality: generations.
        if cfg.generations:
            outputs = {role: greedy_generations(models[role][0], models[role][1], prompts, cfg.max_new_tokens)
                       for role in roles}
            report["generations"] = [{"prompt": p, **{role: outputs[role][i] for role in roles}}
                                     for i, p in enumerate(prompts)]

        # Speed and memory.
        if cfg.speed:
            meter = MemoryMeter(device)
            batch_sizes = sorted(set(cfg.batch_sizes or DEFAULT_BATCH_SIZES))
            rows = []
            with OtherCpuLoad() as other:
                for role in roles:
                    for row in bench_model(models[role][0], contexts=contexts, batch_sizes=batch_sizes,
                                           decode_tokens=cfg.decode_tokens, repeats=cfg.repeats, warmup=cfg.warmup,
                                           meter=meter, seed=cfg.seed, progress=progress, label=role):
                        rows.append({"model": role, **row})
            report["speed"] = {"memory_method": meter.method, "decode_tokens": cfg.decode_tokens,
                               "repeats": cfg.repeats, "warmup": cfg.warmup, "other_cpu_load": other.value,
                               "rows": rows}
            if other.value is not None and other.value > 0.25:
                report["notes"].append(
                    f"other processes kept {other.value:.2f} CPU cores busy on average during the speed measurements "
                    f"({os.cpu_count()} cores, {torch.get_num_threads()} torch threads): the timings include "
                    "contention; rerun on an idle machine"
                )

    print_report(report)
    if out is not None:
        write_report(report, out, overwrite=cfg.overwrite)
        console.print(f"[green]wrote {out}[/green]")
    return report


def _environment(device: torch.device, dtype: torch.dtype) -> dict:
    env = {
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu_count"] = os.cpu_count()
    with contextlib.suppress(OSError, AttributeError):
        env["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return env


# ---------------------------------------------------------------------------------------------------------------
# Report: terminal, markdown, plots, files
# ---------------------------------------------------------------------------------------------------------------


def _roles(report: dict) -> list[str]:
    return [r for r in ROLES if r in report["models"]]


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 1e6 else f"{x:.4g}"
    return str(x)


def quality_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    roles = _roles(report)
    header = ["metric", *roles]
    rows: list[list[str]] = []
    ppl = report.get("perplexity", {})
    if ppl and "skipped" not in ppl:
        rows.append(["perplexity", *[_fmt(ppl[r]["perplexity"]) for r in roles]])
        rows.append(["loss (nats/token)", *[_fmt(ppl[r]["loss"], 4) for r in roles]])
        if all("bits_per_byte" in ppl[r] for r in roles):
            rows.append(["bits per byte", *[_fmt(ppl[r]["bits_per_byte"], 4) for r in roles]])
        rows.append(["tokens scored", *[str(ppl[r]["tokens"]) for r in roles]])
    tasks = report.get("tasks", {})
    for task in sorted({t for r in roles for t in tasks.get(r, {})}):
        metrics = sorted({m for r in roles for m in tasks[r].get(task, {}) if "stderr" not in m and m != "sample_len"})
        for metric in metrics:
            rows.append([f"{task} {metric}", *[_fmt(tasks[r].get(task, {}).get(metric), 4) for r in roles]])
    return header, rows


SPEED_HEADER = ["model", "batch", "context", "prefill ms", "decode tok/s", "x teacher", "peak MiB", "cache MiB",
                "cache B/tok"]


def speed_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """One line per (batch, context, model), teacher first, so each pair compares at a glance."""
    roles = _roles(report)
    rows_in = report.get("speed", {}).get("rows", [])
    cells = {(r["model"], r["batch_size"], r["context"]): r for r in rows_in}
    keys = sorted({(r["batch_size"], r["context"]) for r in rows_in})
    rows = []
    for b, c in keys:
        teacher = cells.get(("teacher", b, c))
        for role in roles:
            row = cells.get((role, b, c))
            if row is None:
                continue
            if row["status"] != "ok":
                rows.append([role, str(b), str(c)] + ["OOM"] * (len(SPEED_HEADER) - 3))
                continue
            ratio = "-"
            if role != "teacher" and teacher is not None and teacher["status"] == "ok":
                ratio = f"{row['decode_tokens_per_s'] / teacher['decode_tokens_per_s']:.2f}x"
            rows.append([role, str(b), str(c), _fmt(row["prefill_ms"], 1), _fmt(row["decode_tokens_per_s"], 1), ratio,
                         _mib(row["peak_memory_bytes"]), _mib(row["cache_bytes"]),
                         f"{row['cache_bytes_per_token']:.0f}"])
    return (SPEED_HEADER if "teacher" in roles else [h for h in SPEED_HEADER if h != "x teacher"]), (
        rows if "teacher" in roles else [r[:5] + r[6:] for r in rows])


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for title, (header, rows) in (("Quality", quality_rows(report)), ("Speed and memory", speed_rows(report))):
        if not rows:
            continue
        table = Table(title=title)
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    if report.get("generations"):
        roles = _roles(report)
        table = Table(title="Greedy generations", show_lines=True)
        table.add_column("prompt")
        for role in roles:
            table.add_column(role)
        for g in report["generations"]:
            table.add_row(g["prompt"], *[g[r] for r in roles])
        console.print(table)
    for note in report.get("notes", []):
        console.print(f"note: {note}")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: dict, plots: Sequence[str] = ()) -> str:
    roles = _roles(report)
    env = report["environment"]
    parts = ["# effconv eval", ""]
    for role in roles:
        m = report["models"][role]
        parts.append(f"- **{role}**: {m['source']} ({m['class']}, {m['parameters']:,} parameters; {m['attention']})")
    where = f" ({env['gpu']})" if "gpu" in env else f" ({env.get('cpu_count')} CPUs)"
    load = f", load average {env['load_average_at_start'][0]} at start" if "load_average_at_start" in env else ""
    parts += [f"- device: {env['device']}{where}, {env['dtype']}, torch {env['torch']}, {env['threads']} threads{load}",
              ""]
    parts += ["## Quality", ""]
    ppl = report.get("perplexity", {})
    if "skipped" in ppl:
        parts.append(f"Perplexity skipped: {ppl['skipped']}.")
    elif ppl:
        parts.append(f"Perplexity on {ppl['data']}; window {ppl['context']} tokens, stride {ppl['stride']} "
                     "(each token scored once, with up to window - 1 tokens of left context).")
    header, rows = quality_rows(report)
    if rows:
        parts += ["", _md_table(header, rows)]
    parts.append("")
    if report.get("speed"):
        s = report["speed"]
        parts += ["## Speed and memory", "",
                  "Random-token prompts of each context length. Prefill: one forward pass over the prompt that builds "
                  f"the cache. Decode: {s['decode_tokens']} greedy tokens per row, one forward pass each through the "
                  f"cache (tok/s counts every row of the batch). Medians of {s['repeats']} runs after {s['warmup']} "
                  f"warm-up. Peak memory: {s['memory_method']}. Cache: bytes the generation cache holds after prefill."
                  + (f" Other processes kept {s['other_cpu_load']:.2f} CPU cores busy on average meanwhile."
                     if s.get("other_cpu_load") is not None else ""),
                  ""]
        header, rows = speed_rows(report)
        parts += [_md_table(header, rows), ""]
    for plot in plots:
        parts += [f"![{plot}]({plot})", ""]
    if report.get("generations"):
        parts += ["## Greedy generations", ""]
        for g in report["generations"]:
            parts += [f"**Prompt:** {g['prompt']}", ""]
            for role in roles:
                parts += [f"*{role}:*", "", "~~~text", g[role].replace("~~~", "~ ~ ~"), "~~~", ""]
    if report.get("notes"):
        parts += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(parts).rstrip("\n") + "\n"


def make_plots(report: dict, directory: Path) -> list[str]:
    """PNG plots, teacher and student on the same axes. Returns the file names written."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    roles = _roles(report)
    styles = {"teacher": dict(linestyle="--", marker="o"), "student": dict(linestyle="-", marker="s")}
    written = []
    rows = [r for r in report.get("speed", {}).get("rows", []) if r["status"] == "ok"]
    batches = sorted({r["batch_size"] for r in rows})

    def series(role: str, batch: int, key: str):
        pts = sorted((r["context"], r[key]) for r in rows if r["model"] == role and r["batch_size"] == batch)
        return [p[0] for p in pts], [p[1] for p in pts]

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    contexts = sorted({r["context"] for r in rows})

    def draw(ax, key: str, ylabel: str, scale: float = 1.0) -> None:
        for role in roles:  # one colour per batch size; dashed = teacher, solid = student
            for i, b in enumerate(batches):
                x, y = series(role, b, key)
                if x:
                    ax.plot(x, [v * scale for v in y], label=f"{role} batch {b}", color=colors[i % len(colors)],
                            **styles[role])
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.minorticks_off()
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    if rows:
        for name, key, ylabel in (("decode_tokens_per_s.png", "decode_tokens_per_s", "decode tokens/s"),
                                  ("prefill_ms.png", "prefill_ms", "prefill latency (ms)")):
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            draw(ax, key, ylabel)
            fig.tight_layout()
            fig.savefig(directory / name, dpi=110)
            plt.close(fig)
            written.append(name)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        draw(axes[0], "peak_memory_bytes", "peak memory over start (MiB)", 1 / 2**20)
        draw(axes[1], "cache_bytes", "generation cache after prefill (MiB)", 1 / 2**20)
        fig.tight_layout()
        fig.savefig(directory / "memory.png", dpi=110)
        plt.close(fig)
        written.append("memory.png")
    ppl = report.get("perplexity", {})
    if ppl and "skipped" not in ppl:
        fig, ax = plt.subplots(figsize=(4.8, 4.2))
        values = [ppl[r]["perplexity"] for r in roles]
        bars = ax.bar(roles, values, color=["#999999" if r == "teacher" else "#3b75af" for r in roles])
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values])
        ax.set_ylabel("perplexity")
        ax.set_title(f"window {ppl['context']}, stride {ppl['stride']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(directory / "perplexity.png", dpi=110)
        plt.close(fig)
        written.append("perplexity.png")
    return written


def write_report(report: dict, out: Path, *, overwrite: bool = False) -> Path:
    """report.json, report.md and the plots, written to a temporary sibling directory renamed onto `out`."""
    from .export import check_output_dir

    out = Path(out)
    check_output_dir(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))
    try:
        plots = make_plots(report, tmp)
        report["files"] = ["report.json", "report.md", *plots]
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (tmp / "report.md").write_text(render_markdown(report, plots))
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.resolve().parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EffconvError(f"could not write the report to {out}: {e.strerror or e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
