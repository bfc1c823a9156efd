"""Training text written by the teacher itself: prompts, batched generation (static, continuous or CUDA-graph
decoding) and an on-disk cache of the samples."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib.resources
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..console import quiet_transformers
from ..errors import EffconvError, one_line
from .packing import mix_seed

#: Bump when the teacher-generation procedure changes, so old caches are not reused.
TEACHER_CACHE_VERSION = 1
#: How teacher text is generated: "static" (padded batches through `model.generate`; every batch runs until its
#: longest row ends), "continuous" (transformers' continuous batching: a finished row is refilled at once),
#: "graph" (effconv.graph_sampling: a static cache and the decode step replayed from a CUDA graph; eager off CUDA)
#: or "auto" (the default: graph for a transformers model on CUDA whose settings it covers, static otherwise).
GENERATION_MODES = ("auto", "static", "continuous", "graph")
#: Continuous mode queues the requests in waves of at most this many generation batches. All of a wave is queued
#: before transformers' loop starts, so the batches it forms, and so the sampled tokens, never depend on thread
#: timing; its scheduler's per-step work grows with the waiting requests, which the cap bounds. A wave's last
#: requests run on a draining batch, so larger waves waste less. The samples depend on it: it is in the cache key.
CONTINUOUS_WAVE_BATCHES = 8

# --------------------------------------------------------------------------------------------
# Teacher-generated text
# --------------------------------------------------------------------------------------------


def load_default_prompts() -> list[str]:
    """The built-in prompts (``effconv/prompts/default_prompts.txt``: one per line, ``#`` comments)."""
    resource = importlib.resources.files("effconv").joinpath("prompts", "default_prompts.txt")
    lines = resource.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


@dataclass(frozen=True)
class TeacherSample:
    """One generated training text: the formatted prompt plus the teacher's response."""

    prompt: str
    text: str
    generated_tokens: int


def generate_teacher_texts(model: Any, tokenizer: Any, **kwargs: Any) -> list[str]:
    """Texts written by the teacher: prompt + sampled response, until ``num_tokens`` are generated; the settings
    and caching of :func:`generate_teacher_samples`, which this returns just the texts of."""
    return [sample.text for sample in generate_teacher_samples(model, tokenizer, **kwargs)]


def generate_teacher_samples(
    model: Any,
    tokenizer: Any,
    *,
    num_tokens: int,
    cache_dir: Path,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    temperature: float = 0.8,
    top_p: float = 0.95,
    top_k: int = 50,
    seed: int = 0,
    prompts: list[str] | None = None,
    progress: bool = True,
    generation_mode: str = "auto",
    do_sample: bool = True,
    turns: int = 1,
) -> list[TeacherSample]:
    """Sample responses from the teacher until at least ``num_tokens`` new tokens are generated.

    Prompts (default: :func:`load_default_prompts`) are shuffled with ``seed`` and cycled through;
    each is wrapped in the tokenizer's chat template when it has one. Each text is the formatted
    prompt plus the response, decoded with special tokens kept, because the student will see
    exactly that format at use time. Only generated tokens count towards ``num_tokens``; the last
    batch is shrunk to what is still needed, so the total overshoots by less than
    ``batch_size * max_new_tokens``.

    ``generation_mode`` "auto" (default) is "graph" where :func:`resolve_generation_mode` finds it applies (a
    transformers model on CUDA) and "static" otherwise; "static" samples padded batches of ``batch_size`` rows with
    ``model.generate``; "continuous" uses transformers' continuous batching (``batch_size`` sequences
    at most at once, a finished one replaced by the next prompt at once; see
    :func:`_generate_samples_continuous`): the same kind of samples, not the same tokens, and its
    overshoot is bounded by its last wave's size estimate instead.
    ``do_sample=False`` decodes greedily (for tests: both modes then write the same tokens).

    ``turns`` > 1 makes each sample a conversation of that many turns (:func:`_generate_conversations`): every
    response is generated with the whole conversation so far as its prompt, so samples are long documents whose
    later parts depend on their earlier ones (long-context training text).

    The result is deterministic for a fixed seed (on one device) and is cached in
    ``cache_dir/teacher_text-<key>.jsonl``, keyed on the model, tokenizer, prompts and all
    generation parameters; a cache hit returns without calling ``model.generate``.
    """
    if num_tokens < 1:
        raise EffconvError(f"num_tokens must be at least 1, got {num_tokens}")
    if max_new_tokens < 1 or batch_size < 1:
        raise EffconvError("max_new_tokens and batch_size must be at least 1")
    if turns < 1:
        raise EffconvError(f"--generation-turns must be at least 1, got {turns}")
    check_generation_mode(generation_mode)
    if turns > 1 and generation_mode == "continuous":
        raise EffconvError("--generation-mode continuous writes single-turn samples; use static or graph with "
                           "--generation-turns > 1")
    prompts = load_default_prompts() if prompts is None else [p for p in prompts if p.strip()]
    if not prompts:
        raise EffconvError("no prompts given for teacher text generation")
    generation_mode = resolve_generation_mode(model, tokenizer, generation_mode, prompts, max_new_tokens)

    generation_params: dict[str, Any] = {
        "num_tokens": num_tokens,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
    }
    # Keys only for non-default settings, so caches written before these settings existed stay valid.
    if not do_sample:
        generation_params["do_sample"] = False
    if turns > 1:
        generation_params["turns"] = turns
        generation_params["follow_ups"] = FOLLOW_UPS
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}
        if do_sample else {"do_sample": False}
    )
    if generation_mode == "static":
        cache_implementation = _generation_cache_implementation(model)
        if cache_implementation != "dynamic":  # other numerics, other samples: a key of their own
            generation_params["cache_implementation"] = cache_implementation
    else:
        generation_params["generation_mode"] = generation_mode
        if generation_mode == "continuous":
            generation_params["continuous_wave_batches"] = CONTINUOUS_WAVE_BATCHES
    cache_key = _teacher_cache_key(model, tokenizer, generation_params, prompts)
    cache_path = Path(cache_dir) / f"teacher_text-{cache_key}.jsonl"
    cached = _read_teacher_cache(cache_path)
    if cached is not None:
        return cached

    if turns > 1:
        samples = _generate_conversations(
            model, tokenizer, prompts=prompts, num_tokens=num_tokens, turns=turns, max_new_tokens=max_new_tokens,
            batch_size=batch_size, sampling=sampling, seed=seed, progress=progress, generation_mode=generation_mode,
            static_kwargs=_cache_kwargs(cache_implementation) if generation_mode == "static" else {},
        )
    elif generation_mode == "static":
        samples = _generate_samples(
            model,
            tokenizer,
            prompts=prompts,
            num_tokens=num_tokens,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            generate_kwargs={**sampling, **_cache_kwargs(cache_implementation)},
            seed=seed,
            progress=progress,
        )
    else:
        generate = _generate_samples_continuous if generation_mode == "continuous" else _generate_samples_graph
        samples = generate(
            model,
            tokenizer,
            prompts=prompts,
            num_tokens=num_tokens,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            sampling=sampling,
            seed=seed,
            progress=progress,
        )
    _write_teacher_cache(cache_path, samples)
    return samples


def resolve_generation_mode(model: Any, tokenizer: Any, mode: str, prompts: Sequence[str], max_new_tokens: int) -> str:
    """The mode "auto" stands for here: "graph" for a transformers model (not an effconv one) on CUDA whose
    generation_config and window graph mode covers, else "static". Other modes are returned as they are."""
    if mode != "auto":
        return mode
    if next(model.parameters()).device.type != "cuda":
        return "static"
    prompt_ids = [format_prompt_ids(tokenizer, prompt) for prompt in prompts]
    return "static" if _graph_mode_obstacle(model, prompt_ids, max_new_tokens) else "graph"


def check_generation_mode(mode: str) -> None:
    """Raise the one-line error for an unknown teacher-generation mode."""
    if mode not in GENERATION_MODES:
        raise EffconvError(f"--generation-mode must be one of {', '.join(GENERATION_MODES)}, got {mode!r}")


def _model_fingerprint(model: Any) -> str:
    """Name plus sums of a few weight tensors: cheap, and changes whenever the weights do."""
    name = str(getattr(getattr(model, "config", None), "_name_or_path", ""))
    tensors: list[torch.Tensor] = []
    with contextlib.suppress(AttributeError, NotImplementedError):
        embeddings = model.get_input_embeddings()
        if embeddings is not None and hasattr(embeddings, "weight"):
            tensors.append(embeddings.weight)
    parameters = list(model.parameters())
    if parameters:
        tensors += [parameters[0], parameters[len(parameters) // 2], parameters[-1]]
    with torch.no_grad():
        sums = [
            f"{tensor.detach().double().sum().item():.9g}"
            for tensor in tensors
            if tensor.device.type != "meta"
        ]
    return f"{name}|{type(model).__name__}|{len(parameters)}|{','.join(sums)}"


def _teacher_cache_key(
    model: Any, tokenizer: Any, generation_params: dict[str, Any], prompts: Sequence[str]
) -> str:
    fingerprint = {
        "version": TEACHER_CACHE_VERSION,
        "model": _model_fingerprint(model),
        "tokenizer": [
            type(tokenizer).__name__,
            len(tokenizer),
            getattr(tokenizer, "chat_template", None),
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
        ],
        "generation": generation_params,
        "prompts": list(prompts),
    }
    encoded = json.dumps(fingerprint, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()[:16]


def _read_teacher_cache(path: Path) -> list[TeacherSample] | None:
    """The cached samples, or None when the file is missing or damaged (then we regenerate)."""
    if not path.is_file():
        return None
    try:
        with path.open(encoding="utf-8") as file:
            return [TeacherSample(**json.loads(line)) for line in file if line.strip()]
    except (OSError, ValueError, TypeError):
        return None


def _write_teacher_cache(path: Path, samples: Sequence[TeacherSample]) -> None:
    """Write atomically, so an interrupted run never leaves a truncated cache behind."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    except OSError as error:
        raise EffconvError(f"cannot write cache directory {path.parent}: {error.strerror or error}") from error
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            for sample in samples:
                record = {"prompt": sample.prompt, "text": sample.text, "generated_tokens": sample.generated_tokens}
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise


def format_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of ``prompt``, chat-formatted when the tokenizer has a chat template."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    # The template already contains its special tokens; we add only a missing BOS, exactly as
    # pack_texts does, so generation and training see the same token stream.
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos_id = tokenizer.bos_token_id
    if bos_id is not None and (not ids or ids[0] != bos_id):
        ids.insert(0, bos_id)
    return ids


def _stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    stop_ids: set[int] = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            stop_ids.add(value)
        elif isinstance(value, (list, tuple)):
            stop_ids.update(int(v) for v in value)
    return sorted(stop_ids)


def _ordered_prompt_ids(tokenizer: Any, prompts: Sequence[str], seed: int) -> list[list[int]]:
    """The prompts' token ids, shuffled with ``seed``: the order both generation modes cycle through."""
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    return [format_prompt_ids(tokenizer, prompts[index]) for index in order]


def _pad_token_id(tokenizer: Any, stop_ids: Sequence[int]) -> int:
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = stop_ids[0] if stop_ids else 0
    return pad_id


def _teacher_sample(tokenizer: Any, prompt_ids: list[int], response_ids: list[int]) -> TeacherSample:
    """Prompt and prompt + response decoded with special tokens kept: the format the student sees at use time."""
    text = tokenizer.decode(prompt_ids + response_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return TeacherSample(prompt=prompt_text, text=text, generated_tokens=len(response_ids))


def _progress_bar(progress: bool) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("teacher text"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not progress,
    )


def _generate_samples(
    model: Any,
    tokenizer: Any,
    *,
    prompts: Sequence[str],
    num_tokens: int,
    max_new_tokens: int,
    batch_size: int,
    generate_kwargs: dict[str, Any],
    seed: int,
    progress: bool,
) -> list[TeacherSample]:
    formatted = _ordered_prompt_ids(tokenizer, prompts, seed)
    stop_ids = _stop_token_ids(model, tokenizer)
    pad_id = _pad_token_id(tokenizer, stop_ids)
    device = next(model.parameters()).device

    def generate_chunk(index: int, batch: list[list[int]], advance: Callable[[int], None]) -> list[list[int]]:
        torch.manual_seed(mix_seed(seed, index))
        return _generate_batch(model, batch, pad_id, stop_ids, max_new_tokens, generate_kwargs, device)

    return _generation_loop(model, tokenizer, formatted, num_tokens=num_tokens, max_new_tokens=max_new_tokens,
                            chunk_limit=batch_size, progress=progress, generate_chunk=generate_chunk)


def _generation_loop(
    model: Any,
    tokenizer: Any,
    formatted: Sequence[list[int]],
    *,
    num_tokens: int,
    max_new_tokens: int,
    chunk_limit: int,
    progress: bool,
    generate_chunk: Callable[[int, list[list[int]], Callable[[int], None]], list[list[int]]],
) -> list[TeacherSample]:
    """The driver both generation modes share: prompts (cycled) in chunks of at most `chunk_limit`, the last
    chunks shrunk to what `num_tokens` still needs (tokens per sample estimated from what was seen so far,
    max_new_tokens before the first), samples in prompt order, one progress bar. `generate_chunk(index, prompts,
    advance)` returns each prompt's response ids; `advance(tokens)` may move the bar within a chunk."""
    samples: list[TeacherSample] = []
    generated_total = 0
    next_prompt = 0
    was_training = model.training
    model.eval()
    progress_bar = _progress_bar(progress)
    device = next(model.parameters()).device
    try:
        # fork_rng: seeding for generation does not disturb the caller's global RNG state.
        with torch.no_grad(), torch.random.fork_rng(devices=_cuda_devices(device)), progress_bar:
            task = progress_bar.add_task("generate", total=num_tokens)
            index = 0
            while generated_total < num_tokens:
                remaining = num_tokens - generated_total
                per_sample = generated_total / len(samples) if samples else max_new_tokens
                count = max(1, min(chunk_limit, math.ceil(remaining / max(per_sample, 1.0))))
                chunk = [formatted[(next_prompt + i) % len(formatted)] for i in range(count)]
                next_prompt += count
                chunk_tokens = [generated_total]  # running count for the progress bar within the chunk

                def advance(tokens: int, chunk_tokens: list[int] = chunk_tokens) -> None:
                    chunk_tokens[0] += tokens
                    progress_bar.update(task, completed=min(chunk_tokens[0], num_tokens))

                for prompt_ids, response_ids in zip(chunk, generate_chunk(index, chunk, advance)):
                    samples.append(_teacher_sample(tokenizer, prompt_ids, response_ids))
                    generated_total += len(response_ids)
                progress_bar.update(task, completed=min(generated_total, num_tokens))
                index += 1
    finally:
        model.train(was_training)
    return samples


GENERATION_CACHES = ("dynamic", "static", "static-compile")


def _generation_cache_implementation(model: Any) -> str:
    """KV cache of teacher generation: `EFFCONV_GENERATION_CACHE` = dynamic (default), static (preallocated, no
    per-step concatenation) or static-compile (static plus transformers' compiled, CUDA-graph decode step; CUDA)."""
    choice = os.environ.get("EFFCONV_GENERATION_CACHE", "dynamic")
    if choice not in GENERATION_CACHES:
        raise EffconvError(f"EFFCONV_GENERATION_CACHE={choice!r}: choose one of {', '.join(GENERATION_CACHES)}")
    if choice == "static-compile" and next(model.parameters()).device.type != "cuda":
        return "static"  # transformers compiles the decode step on accelerators only
    return choice


def _cache_kwargs(cache_implementation: str) -> dict[str, Any]:
    """`generate` arguments for a GENERATION_CACHES choice."""
    if cache_implementation == "dynamic":
        return {}
    return {"cache_implementation": "static", "disable_compile": cache_implementation != "static-compile"}


def _cuda_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


def _generate_batch(
    model: Any,
    prompt_ids: Sequence[list[int]],
    pad_id: int,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    generate_kwargs: dict[str, Any],
    device: torch.device,
) -> list[list[int]]:
    """Sample one batch; return each row's new tokens up to and including its first stop token."""
    # Left padding done by hand: the caller's tokenizer is never modified.
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1

    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=list(stop_ids) or None,
        **generate_kwargs,
    )
    responses: list[list[int]] = []
    stop_set = set(stop_ids)
    for row in output[:, width:].tolist():
        # Finished rows are padded after their stop token (often with that same token).
        end = next((i + 1 for i, token in enumerate(row) if token in stop_set), len(row))
        responses.append(row[:end])
    return responses


def _generate_samples_graph(
    model: Any,
    tokenizer: Any,
    *,
    prompts: Sequence[str],
    num_tokens: int,
    max_new_tokens: int,
    batch_size: int,
    sampling: dict[str, Any],
    seed: int,
    progress: bool,
) -> list[TeacherSample]:
    """Teacher samples through effconv.graph_sampling.GraphSampler: batches of `batch_size` rows (the last one
    padded with repeats, so one captured graph serves every batch) decoded from a static cache, each batch seeded
    with (seed, batch) like the static path's. The same kind of samples as `generate` draws, not the same tokens;
    greedy (do_sample=False) gives the same tokens."""
    from ..generation.graph_sampling import GraphSampler

    formatted = _ordered_prompt_ids(tokenizer, prompts, seed)
    obstacle = _graph_mode_obstacle(model, formatted, max_new_tokens)
    if obstacle:
        raise EffconvError(obstacle)
    stop_ids = _stop_token_ids(model, tokenizer)
    sampler = GraphSampler(
        model, batch_size=batch_size, max_prompt_len=max(len(ids) for ids in formatted),
        max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=_pad_token_id(tokenizer, stop_ids),
        do_sample=bool(sampling.get("do_sample")), temperature=float(sampling.get("temperature", 1.0)),
        top_k=int(sampling.get("top_k", 0) or 0), top_p=float(sampling.get("top_p", 1.0)),
    )

    def generate_chunk(index: int, batch: list[list[int]], advance: Callable[[int], None]) -> list[list[int]]:
        torch.manual_seed(mix_seed(seed, index))
        return sampler.generate(batch)

    with quiet_transformers():  # the per-call deprecation notes of newer transformers' cache arguments
        return _generation_loop(model, tokenizer, formatted, num_tokens=num_tokens, max_new_tokens=max_new_tokens,
                                chunk_limit=batch_size, progress=progress, generate_chunk=generate_chunk)


#: The user turns after the first of a teacher conversation alternate between a new prompt and one of these,
#: which make later responses depend on what was said before (long-range dependencies in the training text).
FOLLOW_UPS = (
    "Tell me more about that, with more detail.",
    "Can you give a concrete example of what you just described?",
    "Summarize everything we have discussed so far in a few sentences.",
    "What was the first thing I asked you about, and what did you answer?",
    "Continue.",
    "Explain the second point you made again, in simpler words.",
)


def _format_conversation_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """A conversation's token ids, ready for the next assistant turn (as _format_prompt_ids for one message)."""
    if not getattr(tokenizer, "chat_template", None):
        text = "\n\n".join(m["content"] for m in messages)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos_id = tokenizer.bos_token_id
    if bos_id is not None and (not ids or ids[0] != bos_id):
        ids.insert(0, bos_id)
    return ids


def _generate_conversations(
    model: Any,
    tokenizer: Any,
    *,
    prompts: Sequence[str],
    num_tokens: int,
    turns: int,
    max_new_tokens: int,
    batch_size: int,
    sampling: dict[str, Any],
    seed: int,
    progress: bool,
    generation_mode: str,
    static_kwargs: dict[str, Any],
) -> list[TeacherSample]:
    """Conversations of `turns` turns, `batch_size` at a time: turn 0 asks a prompt, later user turns alternate
    between a follow-up (FOLLOW_UPS: more detail, an example, a summary, recalling the first question) and a new
    prompt; each response is sampled with the whole conversation so far as its prompt. A sample is the whole
    conversation (the last turn's prompt plus its response); its generated tokens are all its responses'."""
    from ..generation.graph_sampling import GraphSampler

    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    stop_ids = _stop_token_ids(model, tokenizer)
    pad_id = _pad_token_id(tokenizer, stop_ids)
    device = next(model.parameters()).device
    stop_set = set(stop_ids)

    def respond(prompt_ids: list[list[int]]) -> list[list[int]]:
        if generation_mode == "graph":
            sampler = GraphSampler(
                model, batch_size=len(prompt_ids), max_prompt_len=max(len(ids) for ids in prompt_ids),
                max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                do_sample=bool(sampling.get("do_sample")), temperature=float(sampling.get("temperature", 1.0)),
                top_k=int(sampling.get("top_k", 0) or 0), top_p=float(sampling.get("top_p", 1.0)),
            )
            return sampler.generate(prompt_ids)
        return _generate_batch(model, prompt_ids, pad_id, stop_ids, max_new_tokens, {**sampling, **static_kwargs},
                               device)

    samples: list[TeacherSample] = []
    generated_total, next_prompt, group = 0, 0, 0
    was_training = model.training
    model.eval()
    progress_bar = _progress_bar(progress)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=_cuda_devices(device)), progress_bar, quiet_transformers():
            task = progress_bar.add_task("generate", total=num_tokens)
            while generated_total < num_tokens:
                per_conversation = generated_total / len(samples) if samples else turns * max_new_tokens
                count = max(1, min(batch_size, math.ceil((num_tokens - generated_total) / max(per_conversation, 1.0))))
                conversations: list[list[dict[str, str]]] = [[] for _ in range(count)]
                generated = [0] * count
                for turn in range(turns):
                    prompt_ids = []
                    for row, messages in enumerate(conversations):
                        if turn % 2 == 1:
                            content = FOLLOW_UPS[(group * count + row + turn) % len(FOLLOW_UPS)]
                        else:
                            content = prompts[order[next_prompt % len(order)]]
                            next_prompt += 1
                        messages.append({"role": "user", "content": content})
                        prompt_ids.append(_format_conversation_ids(tokenizer, messages))
                    torch.manual_seed(mix_seed(seed, group * turns + turn))
                    responses = respond(prompt_ids)
                    for row, (messages, response) in enumerate(zip(conversations, responses)):
                        reply = [t for t in response if t not in stop_set]
                        messages.append({"role": "assistant", "content": tokenizer.decode(reply, skip_special_tokens=True)})
                        generated[row] += len(response)
                    progress_bar.update(task, completed=min(generated_total + sum(generated), num_tokens))
                for row, (ids, response) in enumerate(zip(prompt_ids, responses)):
                    sample = _teacher_sample(tokenizer, ids, response)
                    samples.append(dataclasses.replace(sample, generated_tokens=generated[row]))
                generated_total += sum(generated)
                group += 1
    finally:
        model.train(was_training)
    return samples


#: generation_config settings `generate` would apply and graph mode does not, with their neutral values.
_GRAPH_UNSUPPORTED_GENERATION = {
    "repetition_penalty": (None, 1, 1.0), "encoder_repetition_penalty": (None, 1, 1.0),
    "no_repeat_ngram_size": (None, 0), "min_p": (None, 0, 0.0), "typical_p": (None, 1, 1.0),
    "epsilon_cutoff": (None, 0, 0.0), "eta_cutoff": (None, 0, 0.0), "bad_words_ids": (None,),
    "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "min_new_tokens": (None, 0), "min_length": (None, 0), "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,), "num_beams": (None, 1), "guidance_scale": (None, 1, 1.0),
}


def _graph_mode_obstacle(model: Any, prompt_ids: Sequence[list[int]], max_new_tokens: int) -> str | None:
    """Why graph mode cannot write this model's text (None: it can), the one list both "auto" (which then picks
    static) and an explicit "graph" (which then fails with it) read: an effconv model; generation settings beyond
    temperature/top-k/top-p, which `generate` would apply (refused rather than sampling another distribution); a
    sliding window the longest sequence does not fit."""
    if hasattr(model, "converted_attentions"):
        return ("--generation-mode graph covers transformers' own models; an effconv model (linearized, hybridized "
                "or MoE) writes its text with --generation-mode static")
    config = getattr(model, "generation_config", None)
    active = [f"{name}={getattr(config, name)!r}" for name, neutral in _GRAPH_UNSUPPORTED_GENERATION.items()
              if getattr(config, name, None) not in neutral and getattr(config, name, None) != []]
    if active:
        return (f"--generation-mode graph samples with temperature/top-k/top-p only; the model's generation_config "
                f"also sets {', '.join(active)}: use --generation-mode static")
    from ..generation.graph_sampling import full_attention_config

    try:
        full_attention_config(model.config, max(len(ids) for ids in prompt_ids) + max_new_tokens)
    except ValueError as error:
        return f"--generation-mode graph: {error}; use --generation-mode static"
    return None


def _generate_samples_continuous(
    model: Any,
    tokenizer: Any,
    *,
    prompts: Sequence[str],
    num_tokens: int,
    max_new_tokens: int,
    batch_size: int,
    sampling: dict[str, Any],
    seed: int,
    progress: bool,
) -> list[TeacherSample]:
    """Teacher samples through transformers' continuous batching (``model.init_continuous_batching``).

    At most ``batch_size`` sequences run at once; one that stops (stop token or ``max_new_tokens``) is replaced by
    a waiting prompt in the next forward pass, so no row idles until the longest one of its batch ends, and nothing
    is padded. Prompts go in waves of at most ``CONTINUOUS_WAVE_BATCHES * batch_size``, each sized like the static
    path's batches from the mean response length seen so far (``max_new_tokens`` before the first), so no more is
    queued than ``num_tokens`` still needs; a wave is queued whole before the loop starts and seeded with
    (seed, wave), which keeps the result reproducible for a fixed seed on one device. Samples come back in prompt
    order, in the static path's format.
    """
    cb_config_class = _continuous_batching_support(model)
    formatted = _ordered_prompt_ids(tokenizer, prompts, seed)
    stop_ids = _stop_token_ids(model, tokenizer)
    generation_config = _continuous_generation_config(
        model, sampling, max_new_tokens, stop_ids, _pad_token_id(tokenizer, stop_ids)
    )
    max_prompt_len = max(len(ids) for ids in formatted)

    def generate_chunk(index: int, wave: list[list[int]], advance: Callable[[int], None]) -> list[list[int]]:
        cb_config = _continuous_batching_config(
            cb_config_class, batch_size=batch_size, max_prompt_len=max_prompt_len,
            max_new_tokens=max_new_tokens, seed=mix_seed(seed, index),
        )
        return _run_continuous_wave(model, wave, generation_config, cb_config, stop_ids, max_new_tokens, advance)

    return _generation_loop(model, tokenizer, formatted, num_tokens=num_tokens, max_new_tokens=max_new_tokens,
                            chunk_limit=batch_size * CONTINUOUS_WAVE_BATCHES, progress=progress,
                            generate_chunk=generate_chunk)


def _continuous_batching_support(model: Any) -> Any:
    """transformers' ContinuousBatchingConfig class, or the one-line error saying what is missing."""
    import transformers

    version = getattr(transformers, "__version__", "?")
    if not callable(getattr(model, "init_continuous_batching", None)):
        raise EffconvError(
            f"--generation-mode continuous needs transformers' continuous batching (model.init_continuous_batching), "
            f"which {type(model).__name__} under transformers {version} lacks; use --generation-mode static"
        )
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError as error:
        raise EffconvError(
            f"--generation-mode continuous needs transformers.ContinuousBatchingConfig, missing in transformers "
            f"{version}; use --generation-mode static"
        ) from error
    fields = {field.name for field in dataclasses.fields(ContinuousBatchingConfig)}
    missing = sorted({"num_blocks", "max_batch_tokens", "max_requests_per_batch", "seed"} - fields)
    if missing or not {"page_size", "block_size"} & fields:
        raise EffconvError(
            f"--generation-mode continuous: transformers {version}'s ContinuousBatchingConfig lacks "
            f"{', '.join(missing) or 'page_size/block_size'}; use --generation-mode static"
        )
    return ContinuousBatchingConfig


def _continuous_batching_config(
    config_class: Any, *, batch_size: int, max_prompt_len: int, max_new_tokens: int, seed: int
) -> Any:
    """Continuous-batching settings that make ``batch_size`` the number of sequences at once, sized from the
    workload rather than from free memory (so that the schedule, and the samples, do not depend on it)."""
    fields = {field.name for field in dataclasses.fields(config_class)}
    page_field = "page_size" if "page_size" in fields else "block_size"  # its name up to transformers 5.17
    page = int(getattr(config_class(), page_field, 0) or 256)
    settings: dict[str, Any] = {
        # room for batch_size sequences of the longest prompt plus max_new_tokens, so one never waits for cache
        "num_blocks": batch_size * math.ceil((max_prompt_len + max_new_tokens) / page) + 1,
        # a forward pass holds every running sequence's next token plus new prompts (up to a whole batch of them)
        "max_batch_tokens": batch_size + min(8192, batch_size * max_prompt_len),
        "max_requests_per_batch": batch_size,
        "seed": seed,
        # the cache is sized for the whole batch, so no headroom is kept back from new prompts
        "safety_margin": 0.0,
        # prompts share a chat-template prefix; reusing its cache blocks saves little and adds version-dependent paths
        "allow_block_sharing": False,
        # no tensor parallelism here: leave NCCL's environment alone in a multi-process (accelerate) run
        "disable_nccl_graph_mixing": False,
    }
    return config_class(**{name: value for name, value in settings.items() if name in fields})


def _continuous_generation_config(
    model: Any, sampling: dict[str, Any], max_new_tokens: int, stop_ids: Sequence[int], pad_id: int
) -> Any:
    """The model's generation config with our settings on top, as ``model.generate`` merges them."""
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if isinstance(base, GenerationConfig) else GenerationConfig()
    config.update(
        **sampling,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_ids) if stop_ids else -1,  # -1: no stop token, generate max_new_tokens
        pad_token_id=pad_id,
    )
    return config


def _run_continuous_wave(
    model: Any,
    prompt_ids: Sequence[list[int]],
    generation_config: Any,
    cb_config: Any,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    on_result: Callable[[int], None],
) -> list[list[int]]:
    """Generate one wave; each prompt's new tokens, up to and including its first stop token, in prompt order."""
    manager = model.init_continuous_batching(generation_config=generation_config, continuous_batching_config=cb_config)
    request_ids = [f"effconv-{index}" for index in range(len(prompt_ids))]
    pending = set(request_ids)
    results: dict[str, list[int]] = {}
    started = finished = False
    try:
        # The whole wave is queued before the loop starts: its first scheduling step sees all of it.
        for request_id, ids in zip(request_ids, prompt_ids):
            accepted = manager.add_request(
                list(ids), request_id=request_id, max_new_tokens=max_new_tokens,
                eos_token_id=list(stop_ids) if stop_ids else -1,
            )
            if accepted is None:
                raise EffconvError("transformers' continuous batching refused a request (see its log above)")
        manager.start()
        started = True
        while len(results) < len(request_ids):
            output = manager.get_result(timeout=1.0)
            if output is None:
                if not manager.is_running():
                    raise EffconvError(
                        f"transformers' continuous batching stopped after {len(results)} of {len(request_ids)} "
                        "requests (see its log above); --generation-mode static avoids it"
                    )
                continue
            if not output.is_finished() or output.request_id not in pending:
                continue
            if output.error is not None:
                raise EffconvError(f"continuous batching failed on a request: {one_line(RuntimeError(output.error))}")
            pending.discard(output.request_id)
            results[output.request_id] = list(output.generated_tokens)
            on_result(len(output.generated_tokens))
        finished = True
    finally:
        if started:
            manager.stop(block=True, hard_stop=not finished)
        elif getattr(manager, "_original_attn_impl", None) is not None:  # stop() restores it only once started
            model.set_attn_implementation(manager._original_attn_impl)
        destroy = getattr(manager, "destroy", None)
        if callable(destroy):
            destroy()
    return [results[request_id] for request_id in request_ids]
