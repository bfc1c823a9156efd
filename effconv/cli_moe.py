"""The `effconv moe-upcycle` command: a thin typer layer over effconv.moe_upcycle. `register(app)` adds it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Opt = typer.Option


def moe_upcycle(
    model: Annotated[Optional[str], Opt(help="HF model directory (llama/mistral/qwen2/qwen3 or an effconv export), GGUF file or hub id (default: SmolLM2-135M-Instruct)")] = None,
    out: Annotated[Optional[Path], Opt(help="Output directory for the MoE model")] = None,
    recipe: Annotated[Optional[Path], Opt(help="YAML recipe; options given here override it")] = None,
    method: Annotated[Optional[str], Opt(help="split (partition the FFN's neurons) | copy (replicate FFN slices)")] = None,
    split: Annotated[Optional[str], Opt(help="split: random | balanced (k-means of gate/up rows) | coactivation (k-means of activations on data)")] = None,
    experts: Annotated[Optional[int], Opt(help="Routed experts per layer")] = None,
    top_k: Annotated[Optional[int], Opt(help="Experts per token")] = None,
    granularity: Annotated[Optional[int], Opt(help="copy: each expert is a 1/G slice of the FFN")] = None,
    shared: Annotated[Optional[int], Opt(help="Always-on shared experts (split: of expert size; copy: 0 or 1)")] = None,
    router_init: Annotated[Optional[str], Opt(help="auto | activation (split) | kmeans (copy) | uniform")] = None,
    router_init_std: Annotated[Optional[float], Opt(help="Spread of the initial router logits")] = None,
    load_balancing: Annotated[Optional[str], Opt(help="aux (auxiliary loss) | bias (selection bias) | none")] = None,
    aux_weight: Annotated[Optional[float], Opt(help="Weight of the load-balancing loss")] = None,
    calibration_tokens: Annotated[Optional[int], Opt(help="Tokens of layer inputs for clustering and router init")] = None,
    train: Annotated[Optional[str], Opt(help="What distillation trains: router | router-lora | experts")] = None,
    tokens: Annotated[Optional[int], Opt(help="Distillation budget in tokens (0: export the step-0 model)")] = None,
    max_seconds: Annotated[Optional[float], Opt(help="Wall-clock cap of distillation in seconds: fewer steps if needed, LR decayed at the new end")] = None,
    lr: Annotated[Optional[float], Opt(help="Distillation learning rate")] = None,
    lora_rank: Annotated[Optional[int], Opt(help="LoRA rank (router-lora)")] = None,
    hidden_mse_weight: Annotated[Optional[float], Opt(help="Weight of per-layer hidden-state MSE beside the logit KL")] = None,
    export_format: Annotated[Optional[str], Opt(help="auto (native transformers format when it fits) | native | effconv")] = None,
    data: Annotated[Optional[str], Opt(help="Training text: .txt/.jsonl file or directory, or hf:NAME\\[:CONFIG]\\[@SPLIT]; default: teacher-generated")] = None,
    text_field: Annotated[Optional[str], Opt(help="JSONL / dataset field holding the text")] = None,
    generate_tokens: Annotated[Optional[int], Opt(help="Tokens of teacher-generated text when --data is not given")] = None,
    generation_batch_size: Annotated[Optional[int], Opt(help="Batch size of teacher text generation")] = None,
    generation_mode: Annotated[Optional[str], Opt(help="Teacher text generation: auto (default: graph on CUDA where it applies, else static) | static (padded generate batches) | continuous (transformers' continuous batching: finished rows refilled at once) | graph (static cache, decode step replayed from a CUDA graph: fastest on a GPU)")] = None,
    seq_len: Annotated[Optional[int], Opt(help="Training sequence length")] = None,
    batch_size: Annotated[Optional[int], Opt(help="Sequences per step")] = None,
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
    """Turn every dense FFN into a mixture of experts (split or copy), initialise routers from the layers' inputs,
    distill from the dense model and export (native Mixtral / Qwen-MoE format where the layout allows)."""
    from .moe_upcycle import MoeUpcycleConfig, moe_upcycle as run
    from .recipes import build_config

    overrides = dict(
        model=model, out=str(out) if out else None, method=method, split=split, experts=experts, top_k=top_k,
        granularity=granularity, shared=shared, router_init=router_init, router_init_std=router_init_std,
        load_balancing=load_balancing, aux_weight=aux_weight, calibration_tokens=calibration_tokens, train=train,
        tokens=tokens, max_seconds=max_seconds, lr=lr, lora_rank=lora_rank, hidden_mse_weight=hidden_mse_weight, export_format=export_format,
        data=data, text_field=text_field, generate_tokens=generate_tokens, generation_batch_size=generation_batch_size,
        generation_mode=generation_mode,
        seq_len=seq_len, batch_size=batch_size, val_fraction=val_fraction, eval_every=eval_every,
        checkpoint_every=checkpoint_every, seed=seed, dtype=dtype, device=device,
        resume=resume or None, overwrite=overwrite or None, keep_run=keep_run or None,
        progress=False if no_progress else None,
    )
    run(build_config(MoeUpcycleConfig, recipe, overrides))


def register(app: typer.Typer) -> None:
    """Add the `moe-upcycle` command to `app`."""
    app.command(name="moe-upcycle")(moe_upcycle)
