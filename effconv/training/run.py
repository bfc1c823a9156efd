"""What every training command shares around its stages: the device, the run directory that holds checkpoints
while a run lasts (and lets `--resume` continue it), and how a stage is sized and reported."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from ..data import prepare_data
from ..errors import EffconvError
from ..io.sources import cache_root
from . import distributed
from .loop import StageResult


def resolve_device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """--device / --dtype: auto means CUDA when available, bfloat16 on CUDA and float32 on CPU."""
    if device == "auto":
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(device)
        except RuntimeError as e:
            raise EffconvError(f"unknown --device {device!r}") from e
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise EffconvError("--device cuda was asked for but no CUDA device is available")
    if dtype == "auto":
        return resolved, torch.bfloat16 if resolved.type == "cuda" else torch.float32
    return resolved, getattr(torch, dtype)


def run_dir_for(out: Path) -> Path:
    """The run directory of an output: a hidden sibling, so a crash never leaves a half-made --out."""
    return Path(out).resolve().parent / f".{Path(out).name}.effconv-run"


def holds_progress(run_dir: Path) -> bool:
    """Whether a run directory holds work to continue (a checkpoint, saved scores): anything but its settings file.
    A run that failed before its first checkpoint (a mistyped path, Ctrl-C while loading) left nothing to resume."""
    return run_dir.is_dir() and any(p.name != "config.json" for p in run_dir.iterdir())


def prepare_run_dir(run_dir: Path, identity: dict, *, resume: bool, overwrite: bool) -> None:
    """Start a run directory, or check that `--resume` continues one made with the same settings (`identity`).
    `--resume` of a run that stopped before its first checkpoint starts it again (with the settings given now)."""
    identity_file = run_dir / "config.json"
    if resume and (holds_progress(run_dir) or not identity_file.is_file()):
        check_resume_identity(identity_file, identity)
        return
    if holds_progress(run_dir) and not overwrite:
        raise EffconvError(
            f"an interrupted run exists at {run_dir}; pass --resume to continue it or --overwrite to start over"
        )
    try:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        identity_file.write_text(json.dumps(identity, indent=2) + "\n")
    except OSError as e:
        raise EffconvError(f"cannot write the run directory {run_dir} ({e.strerror}); choose an --out on a writable "
                           "disk") from e


def interrupted_message(run_dirs: list[Path]) -> str:
    """What Ctrl-C leaves to resume from: the newest checkpoint in `run_dirs` (its stage and step), or that the run
    stopped before its first one."""
    checkpoints = sorted((p for d in run_dirs if d.is_dir() for p in d.glob("*.pt")), key=lambda p: p.stat().st_mtime)
    if not checkpoints:
        saved = [d for d in run_dirs if holds_progress(d)]  # e.g. hybridize's layer scores
        if saved:
            return f"interrupted; earlier work is saved in {saved[0]}; rerun the same command with --resume to use it"
        return "interrupted before the first checkpoint; rerun the same command to start again"
    latest = checkpoints[-1]
    try:  # mmap: only the few numbers read come off the disk, not the weights
        state = torch.load(latest, map_location="cpu", weights_only=True, mmap=True)
        where = f"{state['stage']} at step {state['step']} of {state.get('planned_steps', '?')}"
    except Exception:  # noqa: BLE001 - the hint must not fail; the file is named either way
        where = "its last checkpoint"
    return f"interrupted; {where} is saved in {latest}; rerun the same command with --resume to continue from there"


def steps_for(tokens: int, batch_size: int, seq_len: int) -> int:
    """Optimizer steps of a stage with a token budget (0 tokens: the stage is skipped)."""
    return math.ceil(tokens / (batch_size * seq_len)) if tokens > 0 else 0


def stage_metrics(result: StageResult) -> dict:
    """A stage's steps against its plan (steps trained, steps the token budget asked for, whether the time budget
    cut it, its wall time with evals and checkpoints) and its throughput, for the metrics."""
    metrics = {"steps": result.steps, "planned_steps": result.planned_steps, "cut_by_time": result.cut_by_time,
               "wall_seconds": round(result.wall_seconds, 2), "tokens": result.tokens,
               "seconds": round(result.seconds, 2), "tokens_per_second": round(result.tokens_per_second, 1)}
    if result.peak_memory_gb is not None:
        metrics["peak_memory_gb"] = round(result.peak_memory_gb, 2)
    return metrics


def prepare_run_data(cfg, tokenizer, teacher_factory):
    """(train_blocks, val_blocks, description) for a command's config (its DataArgs and TrainArgs fields). Under
    accelerate the main process fills the data cache first, the others then read it."""
    with distributed.main_process_first():
        return prepare_data(
            cfg.data, tokenizer, seq_len=cfg.seq_len, teacher_factory=teacher_factory,
            num_tokens=cfg.generate_tokens, cache_dir=cache_root() / "data", val_fraction=cfg.val_fraction,
            seed=cfg.seed, text_field=cfg.text_field, generation_batch_size=cfg.generation_batch_size,
            generation_mode=cfg.generation_mode, generation_turns=cfg.generation_turns, packing=cfg.packing,
            max_new_tokens=cfg.generation_new_tokens,
            progress=cfg.progress,
        )


def check_resume_identity(identity_file: Path, identity: dict, *, what: str = "run") -> None:
    """--resume continues only a run made with the same settings."""
    if not identity_file.is_file():
        raise EffconvError(f"nothing to resume: no {what} found at {identity_file.parent}")
    saved = json.loads(identity_file.read_text())
    current = json.loads(json.dumps(identity))
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if changed:
        raise EffconvError(f"--resume with different settings than the interrupted run: {', '.join(changed)}")
