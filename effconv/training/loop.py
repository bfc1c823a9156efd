"""A small, resumable training loop shared by every conversion (attention transfer, LoRA fine-tune, MoE recovery).

Resume is exact up to floating-point non-determinism of the backend: batches are a pure function of the step
(data.BlockLoader), and a checkpoint holds the trainable weights, the optimizer and scheduler state and the
loss history. Checkpoints are written to a temporary file and renamed, so a kill leaves the previous one intact.

A stage may also have a wall-clock budget (`StageSpec.max_seconds`): its step count is then re-projected from the
measured time per step, so that it ends, with its learning rate decayed and its final eval and checkpoint, within
the budget (`run_stage`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..console import console
from ..errors import EffconvError
from ..io.export import replace_atomically
from . import distributed
from . import fsdp

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
    max_seconds: float | None = None  # wall-clock budget of the stage (evals included); None: `steps` steps


# Re-projection of the step count under a time budget: after the first PROJECT_FIRST measured steps of a run
# (of a resumed run too), then every PROJECT_EVERY steps.
PROJECT_FIRST = 5
PROJECT_EVERY = 25


@dataclass
class StageResult:
    name: str
    steps: int  # steps trained (all of them, a resumed run's earlier ones included)
    tokens: int
    seconds: float  # time in training steps (evals and checkpoints excluded)
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    planned_steps: int = 0  # the requested steps (StageSpec.steps)
    cut_by_time: bool = False  # max_seconds cut the stage short of planned_steps
    wall_seconds: float = 0.0  # the stage's wall time, evals and checkpoints included
    peak_memory_gb: float | None = None  # this process's peak CUDA memory during the stage (None off CUDA)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full copies of the trainable parameters (FSDP shards are gathered: collective under FSDP)."""
    return {n: fsdp.full_tensor(p) for n, p in model.named_parameters() if p.requires_grad}


def atomic_torch_save(obj, path: Path) -> None:
    """Write a checkpoint under a temporary name and rename it over the previous one. Any failure (a full disk,
    Ctrl-C) removes the temporary file and leaves the previous checkpoint as it was; a file-system failure becomes
    one EffconvError line."""

    def write(tmp: Path) -> None:
        # through a Python file object: a full disk then surfaces as OSError(ENOSPC), not as torch's zip writer's
        # "unexpected pos" RuntimeError
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

    def advice() -> str:
        kept = f"the previous checkpoint is kept at {path}" if path.is_file() else "no earlier checkpoint"
        return f"; {kept}; free space, then rerun the same command with --resume"

    replace_atomically(path, write, tmp=path.with_name(path.name + ".tmp"), what="checkpoint ", advice=advice)


def load_checkpoint(path: Path) -> dict:
    # weights_only: a checkpoint is data (tensors, numbers, strings), never code
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise EffconvError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e


def _now() -> float:
    """The clock of run_stage (tests replace it)."""
    return time.perf_counter()


@dataclass
class _Plan:
    steps: int  # the stage's total steps as planned now; a time budget lowers it


def _lr_lambda(spec: StageSpec, plan: _Plan | None = None):
    """Linear warm-up, then cosine decay to 0.1 x lr at the planned end (read at each call: a time budget that
    re-plans the stage moves the end, and the schedule follows)."""

    def fn(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        total = spec.steps if plan is None else plan.steps
        progress = (step - spec.warmup_steps) / max(1, total - spec.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return fn


def project_steps(requested: int, done: int, max_seconds: float, elapsed: float, step_seconds: float) -> int:
    """The stage's total steps under a time budget: the steps done plus as many more as fit in the remaining
    time at `step_seconds` each, at least one more, at most `requested`."""
    fit = done + math.floor((max_seconds - elapsed) / step_seconds) if step_seconds > 0 else requested
    return min(requested, max(done + 1, fit))


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
    before_step: Callable[[int, int], None] | None = None,
) -> StageResult:
    """Minimise loss_fn over `spec.steps` batches, checkpointing every `spec.checkpoint_every` steps.

    `spec.max_seconds`: a wall-clock budget of the whole stage: a resumed stage counts the time of its earlier
    attempts up to their last checkpoint, is re-planned at once from that checkpoint's time per step, and ends at
    once when that time already reaches the budget. After the first PROJECT_FIRST steps of the run and then every
    PROJECT_EVERY steps the total is re-planned as project_steps(spec.steps, done, max_seconds, elapsed, t):
    `elapsed` is the stage's wall time so far (a resumed checkpoint's included), `t` the mean wall time per step
    over the steps since the last projection (evals and checkpoints included, so they are budgeted). The
    learning-rate schedule and the final eval and checkpoint follow the planned total; under accelerate launch
    every process plans from the largest `elapsed` and `t` of all processes, so they agree. A checkpoint holds
    the planned total and a resumed run continues with it.

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
    `before_step(step, planned_steps)` runs before each step (schedules that follow a time-budgeted plan).
    """
    if accelerator is None:
        accelerator = distributed.get_accelerator()
    is_main = accelerator is None or accelerator.is_main_process
    sharded = fsdp.is_sharded(model)
    fsdp.reshard_all(model)  # the optimizer must hold the sharded parameters, not gathered ones
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise EffconvError(f"stage {spec.name}: nothing to train")
    if spec.max_seconds is not None and not spec.max_seconds > 0:
        raise EffconvError(f"stage {spec.name}: max_seconds must be > 0, got {spec.max_seconds}")
    plan = _Plan(spec.steps)
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(spec, plan))
    result = StageResult(spec.name, 0, 0, 0.0, planned_steps=spec.steps)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start_step = 0
    carried_seconds = 0.0  # wall time of the stage before this run (from a resumed checkpoint)
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
        carried_seconds = resume_state.get("wall_seconds", resume_state["seconds"])
        plan.steps = min(spec.steps, resume_state.get("planned_steps", spec.steps))
        if spec.max_seconds is not None and start_step > 0:
            # the cap counts the earlier attempts' time (up to their last checkpoint): re-plan now, from the
            # checkpoint's own time per step, not after PROJECT_FIRST more steps
            plan.steps = start_step if carried_seconds >= spec.max_seconds else min(plan.steps, project_steps(
                spec.steps, start_step, spec.max_seconds, carried_seconds, carried_seconds / start_step))
        if is_main:
            if spec.max_seconds is not None and carried_seconds >= spec.max_seconds:
                console.print(f"{spec.name}: its time cap of {spec.max_seconds:g} s was spent by earlier attempts "
                              f"({carried_seconds:.0f} s); it ends at step {start_step}, from {checkpoint_path}")
            elif start_step >= plan.steps:
                console.print(f"{spec.name}: finished before the interruption ({start_step} steps), from "
                              f"{checkpoint_path}")
            else:
                console.print(f"{spec.name}: resuming at step {start_step} of {plan.steps} from {checkpoint_path}")
    t_start = _now()

    def wall_seconds() -> float:
        return carried_seconds + (_now() - t_start)

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
            "wall_seconds": wall_seconds(),
            "planned_steps": plan.steps,
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
        task = bar.add_task(spec.name, total=plan.steps, completed=start_step, loss="-", val=last_val, tps="-")
        window_start, window_steps = _now(), 0  # the steps since the last projection, and when they began
        next_projection = PROJECT_FIRST
        step = start_step
        while step < plan.steps:
            if stop_after_steps is not None and step >= stop_after_steps:
                break
            t0 = _now()
            if before_step is not None:
                before_step(step, plan.steps)
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
            dt = _now() - t0
            result.seconds += dt
            tokens = math.prod(batch.shape[:2])  # token ids [B, T] or (block-wise stage 1) hidden states [B, T, d]
            result.tokens += tokens
            result.train_losses.append(float(global_loss.item()))
            done = step + 1
            if evaluate is not None and (done % spec.eval_every == 0 or done == plan.steps):
                model.eval()
                val = fsdp.call(model, evaluate)
                model.train()
                result.val_losses.append((done, val))
                last_val = f"{val:.4g}"
            bar.update(task, completed=done, loss=f"{global_loss.item():.4g}", val=last_val,
                       tps=f"{tokens / dt:,.0f}" if dt > 0 else "-")
            if done % spec.checkpoint_every == 0 or done == plan.steps:
                save(done)
            window_steps += 1
            if spec.max_seconds is not None and window_steps == next_projection and done < plan.steps:
                now = _now()
                # every process plans from the same (largest) numbers: no process leaves the loop alone
                elapsed, window = distributed.max_over_processes(
                    torch.tensor([carried_seconds + now - t_start, now - window_start], dtype=torch.float64),
                    accelerator).tolist()
                plan.steps = project_steps(spec.steps, done, spec.max_seconds, elapsed, window / window_steps)
                bar.update(task, total=plan.steps)
                window_start, window_steps, next_projection = now, 0, PROJECT_EVERY
            step = done
    model.eval()
    result.steps = len(result.train_losses)
    result.cut_by_time = plan.steps < spec.steps
    if result.cut_by_time and result.steps == plan.steps:
        console.print(f"{spec.name}: the time budget ended it after {plan.steps} of {spec.steps} steps")
    result.wall_seconds = wall_seconds()
    if torch.cuda.is_available():
        result.peak_memory_gb = torch.cuda.max_memory_allocated() / 1e9
    return result
