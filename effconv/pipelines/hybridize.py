"""`effconv hybridize`: keep softmax attention in the layers where converting it costs most, convert the rest.

A fraction `ratio` of the layers keeps full softmax attention; the others become the linear / sliding-window
hybrid of `effconv linearize`. Which layers stay is measured (`select="measured"`, the default):

1. every layer is converted and a short joint attention transfer (stage 1 of linearize, `score_tokens` tokens)
   trains all feature maps at once;
2. each layer is scored on held-out validation blocks by its attention-transfer MSE (after `o_proj`). In
   transfer mode every layer gets the teacher's own hidden states and passes the softmax output on, so the
   layers are independent and one forward pass per validation batch scores all of them;
3. optionally the score is instead the rise of the validation next-token loss when that layer alone runs
   converted (`score="next-token"`, the default; L extra evaluations), the rise of a long-range copying loss
   ("copy") or both ("next-token+copy"): distill/layer_scores.py;
4. the round(ratio * L) highest-scoring layers keep softmax; `linearize()` then runs on the others
   (`LinearizeConfig.layers`) and the scores go into the export (effconv.json, scores.json, scores.png).

Fixed selections (`interval`, `first`, `last`) and an explicit list of kept layers (`softmax_layers`) skip the
measurement's role but, unless `score="none"`, still record the scores for comparison.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import check_choice, option
from ..console import console
from ..conversion.student import make_student
from ..distill.layer_scores import (
    SELECT_CHOICES, LayerScores, kept_count, measure_layer_scores, plot_scores, print_scores_table, scores_report,
    select_layers,
)
from ..errors import EffconvError
from ..io.export import check_output_dir, write_file_atomic
from ..io.sources import load_model_config, load_teacher
from ..training import distributed, fsdp
from ..training.run import (
    check_resume_identity, holds_progress, prepare_run_data, resolve_device_and_dtype, run_dir_for,
)
from .linearize import LinearizeConfig, linearize

SCORE_CHOICES = ("transfer", "next-token", "copy", "next-token+copy", "none")


@dataclass
class HybridizeConfig(LinearizeConfig):
    """Every setting of a hybridize run: linearize's settings plus the layer selection. YAML recipes hold
    these keys. `layers` (linearize's layers to convert) is chosen here and must stay unset: give the layers
    to keep as `softmax_layers` (`--layers` on the command line)."""

    out: str = option("out/hybridized", "Output directory for the converted model")
    layers: list[int] | None = option(None, "chosen by hybridize itself (the converted ones)", cli=False)
    ratio: float | None = option(None, "Fraction of layers that KEEP softmax attention, in (0, 1)")
    select: str | None = option(None, "measured (default) | interval | first | last | explicit (with --layers)")
    softmax_layers: list[int] | None = option(None, "Comma-separated layers to KEEP as softmax (instead of --ratio)",
                                              flag="--layers")
    # next-token: val-loss rise (measured better than transfer MSE on SmolLM2 r25, docs/hybridize.md)
    score: str = option("next-token", "next-token (val-loss rise, L extra evaluations; default) | copy (rise of "
                                      "the loss on validation text written twice, [x, x]: long-range retrieval) | "
                                      "next-token+copy (each layer's share of both) | transfer "
                                      "(attention-transfer MSE, one pass) | none")
    score_tokens: int = option(8_192, "Joint attention-transfer tokens before scoring (0: score the initial maps)")
    stage1_lr: float = option(1e-2, "Attention-transfer learning rate (scoring uses it too)")

    @property
    def selection(self) -> str:
        if self.select is not None:
            return self.select
        return "explicit" if self.softmax_layers is not None else "measured"

    def validate(self) -> None:
        super().validate()
        if self.layers is not None:
            raise EffconvError(
                "hybridize chooses the converted layers itself: give the layers to keep as softmax_layers "
                "(--layers on the command line) instead of layers"
            )
        if self.select is not None:
            check_choice("select", self.select, SELECT_CHOICES)
        check_choice("score", self.score, SCORE_CHOICES)
        if self.score_tokens < 0:
            raise EffconvError(f"--score-tokens must be >= 0, got {self.score_tokens}")
        if self.selection == "explicit":
            if self.softmax_layers is None:
                raise EffconvError("--select explicit needs --layers (the layers to keep as softmax)")
            if not self.softmax_layers:
                raise EffconvError("--layers is empty: give at least one layer to keep as softmax")
            if self.ratio is not None:
                raise EffconvError("--layers gives the kept layers itself; drop --ratio")
        else:
            if self.softmax_layers is not None:
                raise EffconvError(f"--layers conflicts with --select {self.selection}; drop one of them")
            if self.ratio is None:
                raise EffconvError("--ratio is required: the fraction of layers that keep softmax attention, in (0, 1)")
            if not 0 < self.ratio < 1:
                raise EffconvError(f"--ratio must be in (0, 1) (the fraction of layers kept as softmax), got {self.ratio}")
        if self.selection == "measured" and self.score == "none":
            raise EffconvError("--select measured needs scores: use --score next-token, copy, next-token+copy or transfer")

    def linearize_config(self, converted: list[int]) -> LinearizeConfig:
        """linearize's config for the chosen layers: the same settings, `layers` = the converted ones."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(LinearizeConfig)}
        values["layers"] = list(converted)
        return LinearizeConfig(**values)


@dataclass
class HybridizeResult:
    out: Path
    softmax_layers: list[int]
    converted_layers: list[int]
    scores: LayerScores | None
    metrics: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------


def score_layers(cfg: HybridizeConfig) -> LayerScores:
    """Load the teacher and the data as linearize does (same split: scoring validates on linearize's held-out
    blocks), convert every layer, and measure what converting each one costs."""
    device, dtype = resolve_device_and_dtype(cfg.device, cfg.dtype)
    device = distributed.local_device(device)
    torch.manual_seed(cfg.seed)
    console.print(f"[bold]effconv hybridize[/bold]: scoring the layers of {cfg.model or 'the default model'}")
    sharded = distributed.fsdp_requested()  # FSDP: built in CPU memory, each process keeps its shards
    teacher, tokenizer, _ = load_teacher(cfg.model, dtype=dtype, device=torch.device("cpu") if sharded else device)
    train_blocks, val_blocks, description = prepare_run_data(cfg, tokenizer, lambda: (teacher, tokenizer))
    val_blocks = val_blocks[: cfg.max_val_blocks]
    console.print(f"data: {description}; scoring on {val_blocks.shape[0]} validation blocks")
    all_layers = dataclasses.replace(cfg.linearize_config([]), layers=None)
    student = make_student(teacher, all_layers, next(teacher.parameters()).device)
    del teacher
    if sharded:
        fsdp.shard(student, device)
    return measure_layer_scores(student, train_blocks, val_blocks, score=cfg.score, score_tokens=cfg.score_tokens,
                                lr=cfg.stage1_lr, batch_size=cfg.batch_size, seed=cfg.seed,
                                attn_ce_weight=cfg.attn_ce_weight, device=device, progress=cfg.progress)


def _num_layers(cfg: HybridizeConfig) -> int:
    config = load_model_config(cfg.model)
    if cfg.attention == "gqa":  # a --kv-heads that cannot merge the heads fails before any work
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        if cfg.kv_heads is not None and (kv % cfg.kv_heads or cfg.kv_heads == kv):
            divisors = [d for d in range(1, kv) if kv % d == 0]
            raise EffconvError(f"--kv-heads {cfg.kv_heads} must divide the model's {kv} key/value heads "
                               f"({config.num_attention_heads} query heads) and be smaller; choose one of {divisors}")
    return int(config.num_hidden_layers)


# ---------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------


def state_dir_for(out: Path) -> Path:
    """Where hybridize keeps its settings and scores while running (beside linearize's run directory)."""
    return out.resolve().parent / f".{out.name}.effconv-hybridize"


def _prepare_state(cfg: HybridizeConfig, state_dir: Path, linearize_run: Path) -> LayerScores | None:
    """Create (or, with --resume, check) the state directory; returns scores saved by an interrupted run."""
    identity_file, scores_file = state_dir / "config.json", state_dir / "scores.json"
    current = json.loads(json.dumps(cfg.identity()))
    if cfg.resume:
        check_resume_identity(identity_file, current, what="hybridize run")
        return LayerScores.from_json(json.loads(scores_file.read_text())) if scores_file.is_file() else None
    interrupted = [d for d in (state_dir, linearize_run) if holds_progress(d)]
    if interrupted and not cfg.overwrite:
        raise EffconvError(f"an interrupted run exists at {interrupted[0]}; pass --resume to continue it or "
                           "--overwrite to start over")
    shutil.rmtree(state_dir, ignore_errors=True)
    shutil.rmtree(linearize_run, ignore_errors=True)
    try:
        state_dir.mkdir(parents=True)
        identity_file.write_text(json.dumps(current, indent=2) + "\n")
    except OSError as e:
        raise EffconvError(f"cannot write the run directory {state_dir} ({e.strerror}); choose an --out on a "
                           "writable disk") from e
    return None


def hybridize(cfg: HybridizeConfig) -> HybridizeResult:
    """Score the layers, keep the most expensive ones as softmax, linearize the others, export with the scores."""
    cfg.validate()
    distributed.check_launch(cfg.batch_size, blockwise=cfg.layers_per_block is not None)
    out = Path(cfg.out)
    check_output_dir(out, cfg.overwrite)
    resolve_device_and_dtype(cfg.device, cfg.dtype)  # a bad --device fails before any work
    with distributed.main_process_first():  # a GGUF model is converted (and cached) once
        num_layers = _num_layers(cfg)
    # Fixed selections are known (and checked) before anything is trained.
    kept = None if cfg.selection == "measured" else select_layers(
        cfg.selection, num_layers, ratio=cfg.ratio, softmax_layers=cfg.softmax_layers)
    if cfg.selection == "measured":
        kept_count(cfg.ratio, num_layers)  # a ratio that keeps nothing (or everything) fails before scoring
    state_dir, linearize_run = state_dir_for(out), run_dir_for(out)
    main = distributed.is_main_process()  # under accelerate launch only the main process writes
    scores = _prepare_state(cfg, state_dir, linearize_run) if main else None
    distributed.wait_for_everyone()
    scores_file = state_dir / "scores.json"
    if not main and cfg.resume and scores_file.is_file():
        scores = LayerScores.from_json(json.loads(scores_file.read_text()))
    if scores is None and cfg.score != "none":
        scores = score_layers(cfg)  # every process trains its slice and measures the same scores
        gc.collect()  # a sharded scoring student (model <-> FSDP root cycle) frees its shards before linearize
        if main:
            write_file_atomic(scores_file, (json.dumps(scores.to_json(), indent=2) + "\n").encode())
        distributed.wait_for_everyone()
        # every process selects from the main process's scores: one selection even if a device's arithmetic
        # differed in the last bits
        scores = LayerScores.from_json(json.loads(scores_file.read_text()))
    elif scores is not None:
        console.print(f"resuming: layer scores from {scores_file}")
    if kept is None:
        kept = select_layers("measured", num_layers, ratio=cfg.ratio, scores=scores.scores)
    converted = [i for i in range(num_layers) if i not in kept]
    report = scores_report(cfg, scores, kept, num_layers)
    if scores is not None:
        print_scores_table(scores, kept)
    console.print(f"keeping softmax attention in layers {kept}; converting {converted}")

    extra_files = {"scores.json": (json.dumps(report, indent=2) + "\n").encode()}  # written inside the export
    if scores is not None and main:
        title = (f"{Path(cfg.model).name if cfg.model else 'SmolLM2-135M-Instruct'}: {len(kept)} of "
                 f"{num_layers} layers kept as softmax ({cfg.selection})")
        extra_files["scores.png"] = plot_scores(scores, kept, title)
    lin_cfg = cfg.linearize_config(converted)
    lin_cfg.resume = cfg.resume and linearize_run.exists()  # killed after scoring: linearize starts fresh
    distributed.wait_for_everyone()  # every process has looked before the main one creates linearize's run dir
    result = linearize(lin_cfg, metadata={"command": "hybridize", "hybridize_config": dataclasses.asdict(cfg),
                                          "hybridize": report}, extra_files=extra_files)
    if main and not cfg.keep_run:
        shutil.rmtree(state_dir, ignore_errors=True)
    distributed.wait_for_everyone()
    return HybridizeResult(out=out, softmax_layers=kept, converted_layers=converted, scores=scores,
                           metrics=result.metrics)
