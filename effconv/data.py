"""Training text for distillation: loading, teacher generation, packing, splitting and batching.

The pipeline is::

    texts  = load_texts("corpus.jsonl")                 # or generate_teacher_texts(teacher, ...)
    blocks = pack_texts(texts, tokenizer, seq_len)      # LongTensor [N, seq_len]
    train, val = split_train_val(blocks)
    loader = BlockLoader(train, batch_size, seed)       # loader.batch(step) -> [batch_size, seq_len]

``prepare_data`` wires these together for the CLI. Nothing here downloads anything unless the user
asks for an ``hf:`` dataset; by default the training text is written by the teacher model itself.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib.resources
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from effconv.errors import EffconvError

__all__ = [
    "BlockLoader",
    "TeacherSample",
    "generate_teacher_samples",
    "generate_teacher_texts",
    "load_default_prompts",
    "load_texts",
    "pack_texts",
    "prepare_data",
    "split_train_val",
]

#: File suffixes read as plain text (one document per file, long files split at paragraphs).
TEXT_SUFFIXES = (".txt", ".md")
#: Suffixes picked up when the spec is a directory.
DIRECTORY_SUFFIXES = (".txt", ".md", ".jsonl")
#: Plain-text files longer than this are split at paragraph boundaries into documents of about
#: this many characters, so that ``max_documents`` and document boundaries stay meaningful.
MAX_DOCUMENT_CHARS = 20_000
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

HF_PREFIX = "hf:"


# --------------------------------------------------------------------------------------------
# Loading text
# --------------------------------------------------------------------------------------------


def load_texts(spec: str, *, text_field: str = "text", max_documents: int | None = None) -> list[str]:
    """Load training documents from ``spec``.

    ``spec`` is one of:

    * a ``.txt``/``.md`` file: one document (split at paragraph boundaries into documents of
      about ``MAX_DOCUMENT_CHARS`` characters when longer than that);
    * a ``.jsonl`` file: one JSON object per line, the document is its ``text_field`` value;
    * a ``.json`` file holding a list of such objects (or of plain strings);
    * a directory: every ``.txt``/``.md``/``.jsonl`` file below it, in sorted path order;
    * ``hf:NAME[:CONFIG][@SPLIT]``: a Hugging Face dataset (needs the ``datasets`` package and
      either network access or a local cache; ``SPLIT`` defaults to ``train``).

    Empty and whitespace-only documents are skipped. At most ``max_documents`` documents are
    returned. Any problem with the input raises :class:`EffconvError` with a one-line message.
    """
    if max_documents is not None and max_documents < 1:
        raise EffconvError(f"max_documents must be at least 1, got {max_documents}")
    if spec.startswith(HF_PREFIX):
        return _load_hf_dataset(spec, text_field=text_field, max_documents=max_documents)

    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_directory(path, text_field=text_field, max_documents=max_documents)
    if not path.exists():
        raise EffconvError(f"data file not found: {spec}")
    documents = _take(_iter_file_documents(path, text_field=text_field), max_documents)
    if not documents:
        raise EffconvError(f"data file contains no text: {path}")
    return documents


def _take(documents: Iterator[str], limit: int | None) -> list[str]:
    """The first ``limit`` documents (all when ``limit`` is None), consuming no more than needed."""
    taken: list[str] = []
    if limit is not None and limit <= 0:
        return taken
    for document in documents:
        taken.append(document)
        if limit is not None and len(taken) >= limit:
            break  # stop before reading (and possibly failing on) anything beyond the limit
    return taken


def _load_directory(directory: Path, *, text_field: str, max_documents: int | None) -> list[str]:
    files = sorted(
        path
        for path in directory.rglob("*")
        if path.is_file()
        and path.suffix.lower() in DIRECTORY_SUFFIXES
        # Skip hidden files and folders (.git, editor backups) below the given directory.
        and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    )
    if not files:
        suffixes = "/".join(DIRECTORY_SUFFIXES)
        raise EffconvError(f"no {suffixes} files in data directory: {directory}")

    def all_documents() -> Iterator[str]:
        for path in files:
            yield from _iter_file_documents(path, text_field=text_field)

    documents = _take(all_documents(), max_documents)
    if not documents:
        raise EffconvError(f"no text in any of the {len(files)} data files in {directory}")
    return documents


def _iter_file_documents(path: Path, *, text_field: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        yield from _split_long_text(_read_text(path))
    elif suffix == ".jsonl":
        yield from _iter_jsonl_documents(path, text_field=text_field)
    elif suffix == ".json":
        yield from _iter_json_documents(path, text_field=text_field)
    else:
        raise EffconvError(
            f"unsupported data file type {suffix or '(no suffix)'!r}: {path} "
            "(expected .txt, .md, .jsonl, .json, a directory or hf:NAME)"
        )


def _read_text(path: Path) -> str:
    try:
        # utf-8-sig drops a byte-order mark, which would otherwise break the first JSONL line.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise EffconvError(f"data file is not UTF-8 text: {path} (byte {error.start})") from error
    except OSError as error:
        raise EffconvError(f"cannot read data file {path}: {error.strerror or error}") from error


def _split_long_text(text: str, max_chars: int = MAX_DOCUMENT_CHARS) -> list[str]:
    """Split ``text`` into documents of at most about ``max_chars`` characters at blank lines.

    A single paragraph longer than ``max_chars`` is cut at the last whitespace before the limit
    (or hard at the limit when there is none).
    """
    text = text.strip()
    if not text:
        return []
    if len(text) <= max_chars:
        return [text]

    documents: list[str] = []
    current: list[str] = []
    current_chars = 0
    for paragraph in re.split(r"\n[ \t]*\n", text):
        paragraph = paragraph.strip("\n")
        if not paragraph.strip():
            continue
        for piece in _cut_paragraph(paragraph, max_chars):
            added_chars = len(piece) + (2 if current else 0)  # 2 for the "\n\n" joiner
            if current and current_chars + added_chars > max_chars:
                documents.append("\n\n".join(current))
                current, current_chars = [], 0
                added_chars = len(piece)
            current.append(piece)
            current_chars += added_chars
    if current:
        documents.append("\n\n".join(current))
    return documents


def _cut_paragraph(paragraph: str, max_chars: int) -> Iterator[str]:
    while len(paragraph) > max_chars:
        cut = paragraph.rfind(" ", max_chars // 2, max_chars)
        if cut <= 0:
            cut = max_chars
        yield paragraph[:cut].rstrip()
        paragraph = paragraph[cut:].lstrip()
    if paragraph:
        yield paragraph


def _iter_jsonl_documents(path: Path, *, text_field: str) -> Iterator[str]:
    text = _read_text(path)
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise EffconvError(f"{path}:{line_number}: not valid JSON ({error.msg})") from error
        document = _text_from_record(record, text_field=text_field, where=f"{path}:{line_number}")
        if document.strip():
            yield document


def _iter_json_documents(path: Path, *, text_field: str) -> Iterator[str]:
    try:
        records = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise EffconvError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from error
    if not isinstance(records, list):
        raise EffconvError(f"{path}: expected a JSON list of objects, got {type(records).__name__}")
    for index, record in enumerate(records):
        document = record if isinstance(record, str) else _text_from_record(
            record, text_field=text_field, where=f"{path}: item {index}"
        )
        if document.strip():
            yield document


def _text_from_record(record: Any, *, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise EffconvError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        fields = ", ".join(map(str, list(record)[:10])) or "none"
        raise EffconvError(f"{where}: no field {text_field!r} (fields present: {fields})")
    value = record[text_field]
    if not isinstance(value, str):
        raise EffconvError(f"{where}: field {text_field!r} is {type(value).__name__}, expected a string")
    return value


def _parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf:NAME[:CONFIG][@SPLIT]`` -> (name, config, split)."""
    body = spec[len(HF_PREFIX):]
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise EffconvError(f"bad dataset spec {spec!r}: expected hf:NAME[:CONFIG][@SPLIT]")
    return name, (config or None), (split or "train")


def _load_hf_dataset(spec: str, *, text_field: str, max_documents: int | None) -> list[str]:
    name, config, split = _parse_hf_spec(spec)
    try:
        import datasets  # imported lazily: optional, heavy, and only needed for hf: specs
    except ImportError as error:
        raise EffconvError(
            f"loading {spec!r} needs the 'datasets' package, which is not installed (pip install datasets)"
        ) from error

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # noqa: BLE001 - datasets raises many unrelated types; all mean "unavailable"
        raise EffconvError(
            f"could not load Hugging Face dataset {spec!r}: {_one_line(error)} "
            "(without network access only datasets already in the local cache work; set HF_HUB_OFFLINE=1)"
        ) from error

    def documents() -> Iterator[str]:
        for index, row in enumerate(dataset):
            document = _text_from_record(row, text_field=text_field, where=f"{spec} row {index}")
            if document.strip():
                yield document

    taken = _take(documents(), max_documents)
    if not taken:
        raise EffconvError(f"dataset {spec!r} contains no text in field {text_field!r}")
    return taken


def _one_line(error: BaseException) -> str:
    message = " ".join(str(error).split()) or type(error).__name__
    return message if len(message) <= 300 else message[:297] + "..."


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


def generate_teacher_texts(
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
) -> list[str]:
    """Texts written by the teacher: prompt + sampled response, until ``num_tokens`` are generated.

    See :func:`generate_teacher_samples` for details; this returns just the texts.
    """
    samples = generate_teacher_samples(
        model,
        tokenizer,
        num_tokens=num_tokens,
        cache_dir=cache_dir,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        prompts=prompts,
        progress=progress,
        generation_mode=generation_mode,
        do_sample=do_sample,
    )
    return [sample.text for sample in samples]


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

    The result is deterministic for a fixed seed (on one device) and is cached in
    ``cache_dir/teacher_text-<key>.jsonl``, keyed on the model, tokenizer, prompts and all
    generation parameters; a cache hit returns without calling ``model.generate``.
    """
    if num_tokens < 1:
        raise EffconvError(f"num_tokens must be at least 1, got {num_tokens}")
    if max_new_tokens < 1 or batch_size < 1:
        raise EffconvError("max_new_tokens and batch_size must be at least 1")
    check_generation_mode(generation_mode)
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

    if generation_mode == "static":
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
    prompt_ids = [_format_prompt_ids(tokenizer, prompt) for prompt in prompts]
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


def _format_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
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
    return [_format_prompt_ids(tokenizer, prompts[index]) for index in order]


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
        torch.manual_seed(_mix_seed(seed, index))
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


def _mix_seed(seed: int, index: int) -> int:
    """A 63-bit seed derived from (seed, index), so nearby pairs give unrelated streams."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


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
    from effconv.graph_sampling import GraphSampler

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
        torch.manual_seed(_mix_seed(seed, index))
        return sampler.generate(batch)

    with _quiet_transformers():  # the per-call deprecation notes of newer transformers' cache arguments
        return _generation_loop(model, tokenizer, formatted, num_tokens=num_tokens, max_new_tokens=max_new_tokens,
                                chunk_limit=batch_size, progress=progress, generate_chunk=generate_chunk)


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
    from effconv.graph_sampling import _full_attention_config

    try:
        _full_attention_config(model.config, max(len(ids) for ids in prompt_ids) + max_new_tokens)
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
            max_new_tokens=max_new_tokens, seed=_mix_seed(seed, index),
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
                raise EffconvError(f"continuous batching failed on a request: {_one_line(RuntimeError(output.error))}")
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


# --------------------------------------------------------------------------------------------
# Packing, splitting, batching
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence "sequence longer than model_max_length" warnings: we cut into blocks ourselves."""
    from transformers.utils import logging as transformers_logging

    previous = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(previous)


def pack_texts(texts: list[str], tokenizer: Any, seq_len: int) -> torch.LongTensor:
    """Tokenize, concatenate and cut documents into a ``[N, seq_len]`` LongTensor of blocks.

    Each document becomes ``[BOS] tokens [EOS]``: BOS only if the tokenizer has one and the text
    does not already start with it, EOS only if the tokenizer has one and the text does not
    already end with it. No other special tokens are added. Blocks are contiguous and
    non-overlapping; the ragged tail is dropped.
    """
    if seq_len < 1:
        raise EffconvError(f"seq_len must be at least 1, got {seq_len}")
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream: list[int] = []
    documents = [text for text in texts if text]
    if documents:
        with _quiet_transformers():
            encoded = tokenizer(documents, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            if not ids:
                continue
            if bos_id is not None and ids[0] != bos_id:
                stream.append(bos_id)
            stream.extend(ids)
            if eos_id is not None and ids[-1] != eos_id:
                stream.append(eos_id)

    num_blocks = len(stream) // seq_len
    if num_blocks == 0:
        raise EffconvError(
            f"not enough text: {len(stream)} tokens found, at least {seq_len} needed for one block of seq_len {seq_len}"
        )
    return torch.tensor(stream[: num_blocks * seq_len], dtype=torch.long).view(num_blocks, seq_len)


def split_train_val(
    blocks: torch.Tensor, val_fraction: float = 0.05, *, seed: int = 0, min_val_blocks: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle blocks deterministically (by ``seed``) and split off a validation set.

    The validation set has ``round(N * val_fraction)`` blocks but at least ``min_val_blocks``;
    at least one block must remain for training.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise EffconvError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if min_val_blocks < 0:
        raise EffconvError(f"min_val_blocks must be non-negative, got {min_val_blocks}")
    num_blocks = blocks.shape[0]
    num_val = max(min_val_blocks, round(num_blocks * val_fraction))
    if num_blocks - num_val < 1:
        raise EffconvError(
            f"not enough text to split: {num_blocks} blocks, need at least {num_val + 1} "
            f"({num_val} for validation and 1 for training); add text or shorten seq_len"
        )
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).to(blocks.device)
    shuffled = blocks[order]
    return shuffled[num_val:], shuffled[:num_val]


class BlockLoader:
    """Deterministic, resumable batches over a ``[N, T]`` block tensor.

    The sample stream is an endless sequence of epochs, each a permutation of the blocks seeded
    by ``(seed, epoch)``. ``batch(step)`` returns samples ``step * batch_size`` to
    ``(step + 1) * batch_size - 1`` of that stream, so it depends only on ``step``: a resumed run
    gets exactly the batches the original run would have seen. Batches may span an epoch boundary.
    """

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int = 0) -> None:
        if blocks.ndim != 2 or blocks.shape[0] == 0:
            raise EffconvError(f"BlockLoader needs a non-empty [N, T] tensor, got shape {tuple(blocks.shape)}")
        if batch_size < 1:
            raise EffconvError(f"batch_size must be at least 1, got {batch_size}")
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self._permutations: dict[int, torch.Tensor] = {}

    @property
    def num_blocks(self) -> int:
        return self.blocks.shape[0]

    @property
    def seq_len(self) -> int:
        return self.blocks.shape[1]

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def steps_per_epoch(self) -> float:
        return self.num_blocks / self.batch_size

    def epoch(self, step: int) -> int:
        """The epoch in which ``step``'s batch starts."""
        return step * self.batch_size // self.num_blocks

    def batch(self, step: int) -> torch.Tensor:
        """The ``[batch_size, T]`` batch for global step ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        first = step * self.batch_size
        indices = [
            self._permutation(position // self.num_blocks)[position % self.num_blocks]
            for position in range(first, first + self.batch_size)
        ]
        return self.blocks[torch.stack(indices).to(self.blocks.device)]

    def _permutation(self, epoch: int) -> torch.Tensor:
        permutation = self._permutations.get(epoch)
        if permutation is None:
            generator = torch.Generator().manual_seed(_mix_seed(self.seed, epoch))
            permutation = torch.randperm(self.num_blocks, generator=generator)
            if len(self._permutations) >= 4:  # a batch touches at most a few consecutive epochs
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = permutation
        return permutation


# --------------------------------------------------------------------------------------------
# Convenience
# --------------------------------------------------------------------------------------------


def prepare_data(
    spec: str | None,
    tokenizer: Any,
    seq_len: int,
    *,
    teacher_factory: Callable[[], tuple[Any, Any]],
    num_tokens: int,
    cache_dir: Path,
    val_fraction: float = 0.05,
    seed: int = 0,
    text_field: str = "text",
    max_documents: int | None = None,
    max_new_tokens: int = 256,
    generation_batch_size: int = 16,
    generation_mode: str = "auto",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Load or generate training text and return ``(train_blocks, val_blocks, description)``.

    With ``spec`` None the teacher from ``teacher_factory()`` (called only then) writes about
    ``num_tokens`` tokens of responses (cached in ``cache_dir``; ``generation_mode`` as in
    :func:`generate_teacher_samples`); otherwise ``spec`` is read with
    :func:`load_texts`. Text is packed with ``tokenizer`` into blocks of ``seq_len`` tokens.
    """
    if spec is None:
        teacher_model, teacher_tokenizer = teacher_factory()
        texts = generate_teacher_texts(
            teacher_model,
            teacher_tokenizer,
            num_tokens=num_tokens,
            cache_dir=cache_dir,
            max_new_tokens=max_new_tokens,
            batch_size=generation_batch_size,
            seed=seed,
            progress=progress,
            generation_mode=generation_mode,
        )
        source = f"{len(texts):,} teacher-generated texts"
    else:
        texts = load_texts(spec, text_field=text_field, max_documents=max_documents)
        source = f"{len(texts):,} documents from {spec}"

    blocks = pack_texts(texts, tokenizer, seq_len)
    train_blocks, val_blocks = split_train_val(blocks, val_fraction, seed=seed)
    description = (
        f"{source}: {blocks.numel():,} tokens in {blocks.shape[0]:,} blocks of {seq_len} "
        f"({train_blocks.shape[0]:,} train, {val_blocks.shape[0]:,} validation)"
    )
    return train_blocks, val_blocks, description
