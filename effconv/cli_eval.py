"""The `effconv eval` command: a thin typer layer over effconv.evaluate.

`register(app)` adds the command to the effconv typer app (effconv/cli.py calls it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Opt = typer.Option


def _split(text: Optional[str], option: str, kind=int) -> Optional[list]:
    from .errors import EffconvError

    if text is None:
        return None
    try:
        values = [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise EffconvError(f"{option} takes comma-separated {kind.__name__}s, got {text!r}") from e
    if not values:
        raise EffconvError(f"{option} is empty")
    return values


def eval_command(
    model: Annotated[Optional[str], typer.Argument(help="Model to evaluate: effconv export, HF directory, GGUF file or hub id (default: SmolLM2-135M-Instruct)")] = None,
    teacher: Annotated[Optional[str], Opt(help="Reference model to compare with, same forms as MODEL; 'default' = SmolLM2-135M-Instruct")] = None,
    out: Annotated[Optional[Path], Opt(help="Write report.json, report.md and PNG plots to this directory")] = None,
    recipe: Annotated[Optional[Path], Opt(help="YAML file of eval settings; options given here override it")] = None,
    data: Annotated[Optional[str], Opt(help="Perplexity text: .txt/.md/.jsonl file or directory, hf:NAME (hf:NAME:CONFIG@SPLIT), or 'teacher' (held-out teacher-generated text); without it perplexity is skipped")] = None,
    text_field: Annotated[Optional[str], Opt(help="JSONL / dataset field holding the text")] = None,
    max_documents: Annotated[Optional[int], Opt(help="Use at most this many documents of --data")] = None,
    context: Annotated[Optional[int], Opt(help="Perplexity window in tokens (default 512 on CPU, 2048 on CUDA)")] = None,
    stride: Annotated[Optional[int], Opt(help="Perplexity window stride (default: context/2; must be < context)")] = None,
    tasks: Annotated[Optional[str], Opt(help="Comma-separated lm-eval-harness tasks, e.g. piqa,arc_easy (needs: pip install lm-eval)")] = None,
    task_path: Annotated[Optional[Path], Opt(help="Directory of extra lm-eval task YAMLs (e.g. local datasets)")] = None,
    task_limit: Annotated[Optional[int], Opt(help="lm-eval: at most this many examples per task")] = None,
    num_fewshot: Annotated[Optional[int], Opt(help="lm-eval: few-shot examples")] = None,
    task_batch_size: Annotated[Optional[int], Opt(help="lm-eval batch size")] = None,
    prompts: Annotated[Optional[Path], Opt(help="File of generation prompts, one per line (default: 3 built-in prompts)")] = None,
    max_new_tokens: Annotated[Optional[int], Opt(help="Tokens per greedy generation")] = None,
    contexts: Annotated[Optional[str], Opt(help="Speed: comma-separated prompt lengths (default 128,256,512 on CPU; 512..8192 on CUDA)")] = None,
    batch_sizes: Annotated[Optional[str], Opt(help="Speed: comma-separated batch sizes (default 1,4)")] = None,
    decode_tokens: Annotated[Optional[int], Opt(help="Speed: greedy tokens timed per decode measurement")] = None,
    repeats: Annotated[Optional[int], Opt(help="Speed: timed runs per cell (median reported)")] = None,
    warmup: Annotated[Optional[int], Opt(help="Speed: untimed warm-up runs per cell")] = None,
    no_speed: Annotated[bool, Opt("--no-speed", help="Skip the speed and memory measurements")] = False,
    no_generations: Annotated[bool, Opt("--no-generations", help="Skip the greedy generations")] = False,
    seed: Annotated[Optional[int], Opt()] = None,
    dtype: Annotated[Optional[str], Opt(help="auto | float32 | bfloat16 | float16")] = None,
    device: Annotated[Optional[str], Opt(help="auto | cpu | cuda | cuda:N")] = None,
    overwrite: Annotated[bool, Opt("--overwrite", help="Replace an existing --out")] = False,
    no_progress: Annotated[bool, Opt("--no-progress", help="No progress bars")] = False,
) -> None:
    """Compare a converted model with its teacher: perplexity, lm-eval tasks, greedy generations, prefill latency,
    decode tokens/s, peak memory and cache size over context lengths."""
    from .evaluate import EvalConfig, evaluate
    from .recipes import build_config

    overrides = dict(
        model=model, teacher=teacher, out=str(out) if out else None, data=data, text_field=text_field,
        max_documents=max_documents, context=context, stride=stride, tasks=_split(tasks, "--tasks", str),
        task_path=str(task_path) if task_path else None, task_limit=task_limit, num_fewshot=num_fewshot, task_batch_size=task_batch_size,
        prompts=str(prompts) if prompts else None, max_new_tokens=max_new_tokens,
        contexts=_split(contexts, "--contexts"), batch_sizes=_split(batch_sizes, "--batch-sizes"),
        decode_tokens=decode_tokens, repeats=repeats, warmup=warmup,
        speed=False if no_speed else None, generations=False if no_generations else None,
        seed=seed, dtype=dtype, device=device, overwrite=overwrite or None, progress=False if no_progress else None,
    )
    evaluate(build_config(EvalConfig, recipe, overrides))


def register(app: typer.Typer) -> None:
    """Add the `eval` command to an effconv typer app."""
    app.command(name="eval")(eval_command)
