"""A small, resumable training loop shared by every conversion (attention transfer, LoRA fine-tune, MoE recovery).

Resume is exact up to floating-point non-determinism of the backend: batches are a pure function of the step
(data.BlockLoader), and a checkpoint holds the trainable weights, the optimizer and scheduler state and the
loss history. Checkpoints are written to a temporary file and renamed, so a kill leaves the previous one intact.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from . import distributed, fsdp
from .errors import EffconvError

console = Console(stderr=True)

LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class StageSpec:
    """One optimisation stage: what to minimise, for how many steps, how fast."""

    name: str
    steps: int
    lr: float
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 50
    checkpoint_every: int = 50


@dataclass
class StageResult:
    name: str
    steps: int
    tokens: int
    seconds: float
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full copies of the trainable parameters (FSDP shards are gathered: collective under FSDP)."""
    return {n: fsdp.full_tensor(p) for n, p in model.named_parameters() if p.requires_grad}


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    # weights_only: a checkpoint is data (tensors, numbers, strings), never code
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise EffconvError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e


def _lr_lambda(spec: StageSpec):
    def fn(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return fn


def run_stage(
    model: torch.nn.Module,
    spec: StageSpec,
    *,
    loss_fn: LossFn,
    next_batch: Callable[[int], torch.Tensor],
    evaluate: Callable[[], float] | None,
    checkpoint_path: Path | None,
    resume_state: dict | None = None,
    extra_state: Callable[[], dict] | None = None,
    progress: bool = True,
    stop_after_steps: int | None = None,
    accelerator=None,
    backward: bool = True,
) -> StageResult:
    """Minimise loss_fn over `spec.steps` batches, checkpointing every `spec.checkpoint_every` steps.

    `resume_state` is a checkpoint of this stage (load_checkpoint); training continues from its step.
    `stop_after_steps` ends the loop early (used by tests to simulate a crash without killing the process).
    `accelerator`: data parallelism over the processes of `accelerate launch` (default: the launched one, if any).
    `next_batch` returns the global batch; each process trains on its 1/N slice and the gradients are averaged
    (distributed.py), so N processes follow the 1-process run with the same global batch. Only the main
    process writes the checkpoint; every process reads it on resume.
    A model sharded by FSDP (fsdp.py) is called through its root (`fsdp.call`); FSDP averages the gradients of
    its sharded parameters, the global gradient norm is clipped, and checkpoints hold the gathered full tensors
    (the 1-process format). `backward=False`: loss_fn leaves the gradients itself (fsdp.transfer_backward) and
    returns the loss without a graph.
    """
    if accelerator is None:
        accelerator = distributed.get_accelerator()
    is_main = accelerator is None or accelerator.is_main_process
    sharded = fsdp.is_sharded(model)
    fsdp.reshard_all(model)  # the optimizer must hold the sharded parameters, not gathered ones
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise EffconvError(f"stage {spec.name}: nothing to train")
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(spec))
    result = StageResult(spec.name, 0, 0, 0.0)
    start_step = 0
    if resume_state is not None:
        named = dict(model.named_parameters())
        for name, value in resume_state["trainable"].items():
            fsdp.load_full_(named[name], value)  # a sharded parameter keeps its part
        optimizer.load_state_dict(resume_state["optimizer"])
        fsdp.shard_optimizer_state_(optimizer)
        scheduler.load_state_dict(resume_state["scheduler"])
        start_step = resume_state["step"]
        result.train_losses = list(resume_state["train_losses"])
        result.val_losses = [tuple(x) for x in resume_state["val_losses"]]
        result.tokens = resume_state["tokens"]
        result.seconds = resume_state["seconds"]

    def save(step: int) -> None:
        if checkpoint_path is None:
            return
        if sharded:  # every process takes part in gathering the shards; the main one writes
            fsdp.reshard_all(model)
            trainable, optimizer_state = trainable_state(model), fsdp.full_optimizer_state(optimizer)
        elif is_main:
            trainable, optimizer_state = trainable_state(model), optimizer.state_dict()
        if not is_main:
            accelerator.wait_for_everyone()  # the main process writes; the others wait until it is on disk
            return
        state = {
            "stage": spec.name,
            "step": step,
            "trainable": trainable,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "train_losses": result.train_losses,
            "val_losses": [list(x) for x in result.val_losses],
            "tokens": result.tokens,
            "seconds": result.seconds,
        }
        if extra_state is not None:
            state.update(extra_state())
        atomic_torch_save(state, checkpoint_path)
        if accelerator is not None:
            accelerator.wait_for_everyone()

    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("val {task.fields[val]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeRemainingColumn(),
    ]
    model.train()
    last_val = f"{result.val_losses[-1][1]:.4g}" if result.val_losses else "-"
    with Progress(*columns, console=console, disable=not (progress and is_main), transient=False) as bar:
        task = bar.add_task(spec.name, total=spec.steps, completed=start_step, loss="-", val=last_val, tps="-")
        for step in range(start_step, spec.steps):
            if stop_after_steps is not None and step >= stop_after_steps:
                break
            t0 = time.perf_counter()
            batch = next_batch(step)
            local = distributed.shard_batch(batch, accelerator)
            optimizer.zero_grad(set_to_none=True)
            loss, _ = fsdp.call(model, lambda: loss_fn(local))
            global_loss = distributed.mean_over_processes(loss, accelerator)  # every process stops together
            if not torch.isfinite(global_loss):
                raise EffconvError(
                    f"stage {spec.name}: loss became {global_loss.item()} at step {step}; the last good checkpoint"
                    f" is kept at {checkpoint_path} (lower the learning rate and --resume)"
                )
            if backward:
                loss.backward()
            distributed.average_gradients(params, accelerator)  # the plain (unsharded) trainable parameters
            if spec.grad_clip > 0:
                fsdp.clip_grad_norm_(params, spec.grad_clip)  # the global norm, sharded gradients included
            optimizer.step()
            scheduler.step()
            dt = time.perf_counter() - t0
            result.seconds += dt
            tokens = math.prod(batch.shape[:2])  # token ids [B, T] or (block-wise stage 1) hidden states [B, T, d]
            result.tokens += tokens
            result.train_losses.append(float(global_loss.item()))
            done = step + 1
            if evaluate is not None and (done % spec.eval_every == 0 or done == spec.steps):
                model.eval()
                val = fsdp.call(model, evaluate)
                model.train()
                result.val_losses.append((done, val))
                last_val = f"{val:.4g}"
            bar.update(task, completed=done, loss=f"{global_loss.item():.4g}", val=last_val, tps=f"{tokens / dt:,.0f}")
            if done % spec.checkpoint_every == 0 or done == spec.steps:
                save(done)
    model.eval()
    result.steps = len(result.train_losses)
    return result
