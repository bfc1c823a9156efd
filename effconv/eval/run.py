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
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import option
from ..console import quiet_transformers
from ..data.teacher_text import format_prompt_ids
from ..errors import EffconvError
from .length import LengthEvalConfig, evaluate_length
from .params import parameter_counts
from .quality import document_ids, perplexity_report
from .report import ROLES, print_report, write_report
from .speed import MemoryMeter, OtherCpuLoad, bench_model
from .tasks import check_tasks, import_lm_eval, run_tasks
from ..training.run import resolve_device_and_dtype

TEACHER_DATA = "teacher"  # --data teacher: held-out teacher-generated text, as linearize makes it
DEFAULT_TEACHER = "default"  # --teacher default: the default model (SmolLM2-135M-Instruct)
DEFAULT_CONTEXTS = {"cpu": [128, 256, 512], "cuda": [512, 1024, 2048, 4096, 8192, 16384, 32768]}
DEFAULT_BATCH_SIZES = {"cpu": [1, 4], "cuda": [1, 4, 16, 64]}
SPEED_METHODS = ("auto", "generate", "steps")
DEFAULT_PPL_CONTEXT = {"cpu": 512, "cuda": 2048}
BUILTIN_PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about a lighthouse.",
    "What is 17 times 3? Explain your steps.",
]


@dataclass
class EvalConfig:
    """Every setting of an eval run; YAML recipes hold these keys."""

    model: str | None = option(None, "Model to evaluate: effconv export, HF directory, GGUF file or hub id (default: "
                                     "SmolLM2-135M-Instruct)")
    teacher: str | None = option(None, "Reference model to compare with, same forms as MODEL; 'default' = "
                                       "SmolLM2-135M-Instruct")
    out: str | None = option(None, "Write report.json, report.md and PNG plots to this directory")
    data: str | None = option(None, "Perplexity text: .txt/.md/.jsonl file or directory, hf:NAME (hf:NAME:CONFIG@SPLIT), "
                                    "or 'teacher' (held-out teacher-generated text); without it perplexity is skipped")
    text_field: str = option("text", "JSONL / dataset field holding the text")
    max_documents: int | None = option(None, "Use at most this many documents of --data")
    context: int | None = option(None, "Perplexity window in tokens (default 512 on CPU, 2048 on CUDA)")
    stride: int | None = option(None, "Perplexity window stride (default: context/2; must be < context)")
    tasks: list[str] | None = option(None, "Comma-separated lm-eval-harness tasks, e.g. piqa,arc_easy (needs: pip "
                                           "install lm-eval)")
    task_path: str | None = option(None, "Directory of extra lm-eval task YAMLs (e.g. local datasets)")
    task_limit: int | None = option(None, "lm-eval: at most this many examples per task")
    num_fewshot: int | None = option(None, "lm-eval: few-shot examples")
    task_batch_size: int = option(8, "lm-eval batch size")
    prompts: str | None = option(None, "File of generation prompts, one per line (default: 3 built-in prompts)")
    max_new_tokens: int = option(48, "Tokens per greedy generation")
    contexts: list[int] | None = option(None, "Speed: comma-separated prompt lengths (default 128,256,512 on CPU; "
                                              "512..8192 on CUDA)")
    batch_sizes: list[int] | None = option(None, "Speed: comma-separated batch sizes (default 1,4 on CPU; 1,4,16,64 "
                                                 "on CUDA)")
    speed_method: str = option("auto", "Speed: generate (model.generate on each model's fastest path: effconv's "
                                       "static cache + CUDA graph, the teacher's faster of its default and static "
                                       "cache), steps (one-token forwards in a loop) or auto (generate on CUDA, "
                                       "steps on CPU)")
    decode_tokens: int = option(16, "Speed: greedy tokens timed per decode measurement")
    repeats: int = option(3, "Speed: timed runs per cell (median reported)")
    warmup: int = option(1, "Speed: untimed warm-up runs per cell")
    contexts_ppl: list[int] | None = option(None, "Length evaluation: perplexity of --data documents at each of these "
                                                  "contexts (e.g. 512,1024,2048,4096,8192; non-overlapping windows, "
                                                  "bootstrap intervals), with a loss-by-position curve")
    position_curve: int | None = option(None, "Length evaluation: loss-by-position length (default: the largest "
                                              "--contexts-ppl; 0: no curve)")
    max_windows_per_doc: int | None = option(None, "Length evaluation: at most this many windows per document and "
                                                   "context")
    passkey_contexts: list[int] | None = option(None, "Passkey retrieval at these prompt lengths (e.g. 2048,4096,8192), "
                                                      "needle at depths 0, 0.25, 0.5, 0.75, 1")
    passkey_trials: int = option(5, "Passkey: trials per context and depth")
    speed: bool = option(True, "Skip the speed and memory measurements", flag="--no-speed")
    generations: bool = option(True, "Skip the greedy generations", flag="--no-generations")
    seed: int = option(0, "Random seed")
    dtype: str = option("auto", "auto | float32 | bfloat16 | float16")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    overwrite: bool = option(False, "Replace an existing --out", flag="--overwrite")
    progress: bool = option(True, "No progress bars", flag="--no-progress")

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
        for name in ("contexts_ppl", "passkey_contexts"):
            values = getattr(self, name)
            if values is not None and (not values or min(values) < 2):
                raise EffconvError(f"--{name.replace('_', '-')} must be integers >= 2, got {values}")
        if self.passkey_trials < 1:
            raise EffconvError(f"--passkey-trials must be at least 1, got {self.passkey_trials}")
        if self.contexts_ppl and (self.data is None or self.data == TEACHER_DATA):
            raise EffconvError("--contexts-ppl needs long documents: pass --data FILE (e.g. data/long/test.jsonl)")
        if self.speed_method not in SPEED_METHODS:
            raise EffconvError(f"unknown --speed-method {self.speed_method!r}; choose {', '.join(SPEED_METHODS)}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise EffconvError(f"unknown --dtype {self.dtype!r}; choose auto, float32, bfloat16 or float16")


# ---------------------------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# Speed and memory
# ---------------------------------------------------------------------------------------------------------------


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
        ids = torch.tensor([format_prompt_ids(tokenizer, prompt)], device=device)
        with quiet_transformers():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return texts


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def _teacher_spec(teacher: str | None) -> str | None:
    return None if teacher == DEFAULT_TEACHER else teacher


def _model_info(model, source, spec: str | None) -> dict:
    config = model.config
    info = {
        "spec": spec,
        "source": source.description,
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        **parameter_counts(model),
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
    from .. import data as data_lib
    from ..config import DataArgs, RunArgs, TrainArgs
    from ..io.sources import cache_root, load_causal_lm, resolve_model_source

    recorded = _linearize_metadata(student_source)
    defaults = {**dataclasses.asdict(DataArgs()), **dataclasses.asdict(TrainArgs()), **dataclasses.asdict(RunArgs())}
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

    from ..console import console

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=not enabled, transient=False)


def evaluate(cfg: EvalConfig) -> dict:
    """Measure MODEL (and TEACHER, when given) and return the report; with cfg.out, also write it there."""
    from ..io.export import check_output_dir
    from ..io.sources import load_causal_lm
    from ..console import console

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
        from ..data import load_texts

        documents = load_texts(cfg.data, text_field=cfg.text_field, max_documents=cfg.max_documents)
    device, dtype = resolve_device_and_dtype(cfg.device, cfg.dtype)
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
                per_role = {role: (document_ids(models[role][1], documents), text_bytes) for role in roles}
            for role in roles:
                seqs, text_bytes = per_role[role]
                ppl[role] = perplexity_report(models[role][0], seqs, context=context, stride=stride,
                                              text_bytes=text_bytes, progress=progress, label=role)
            report["perplexity"] = ppl

        # Quality over length: perplexity per context, loss by position, passkey retrieval.
        if cfg.contexts_ppl or cfg.passkey_contexts:
            length_cfg = LengthEvalConfig(
                contexts=sorted(set(cfg.contexts_ppl or [])), max_windows_per_document=cfg.max_windows_per_doc,
                position_curve=cfg.position_curve != 0 and bool(cfg.contexts_ppl),
                position_length=cfg.position_curve or None, passkey_contexts=sorted(set(cfg.passkey_contexts or [])),
                passkey_trials=cfg.passkey_trials, seed=cfg.seed)
            report["length"] = evaluate_length({role: models[role][0] for role in roles},
                                               {role: models[role][1] for role in roles},
                                               documents if cfg.contexts_ppl else None, length_cfg, progress=progress)
            report["notes"].extend(report["length"].get("notes", []))

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
            batch_sizes = sorted(set(cfg.batch_sizes or DEFAULT_BATCH_SIZES[device.type]))
            method = cfg.speed_method if cfg.speed_method != "auto" else (
                "generate" if device.type == "cuda" else "steps")
            rows = []
            with OtherCpuLoad() as other:
                for role in roles:
                    for row in bench_model(models[role][0], contexts=contexts, batch_sizes=batch_sizes,
                                           decode_tokens=cfg.decode_tokens, repeats=cfg.repeats, warmup=cfg.warmup,
                                           meter=meter, seed=cfg.seed, progress=progress, label=role,
                                           method=method):
                        rows.append({"model": role, **row})
            report["speed"] = {"method": method, "memory_method": meter.method if method == "steps" else
                               "torch.cuda.max_memory_allocated over the cell's generate calls, minus memory "
                               "allocated at its start", "decode_tokens": cfg.decode_tokens,
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


