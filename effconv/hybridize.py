"""`effconv hybridize`: keep softmax attention in the layers where converting it costs most, convert the rest.

A fraction `ratio` of the layers keeps full softmax attention; the others become the linear / sliding-window
hybrid of `effconv linearize`. Which layers stay is measured (`select="measured"`, the default):

1. every layer is converted and a short joint attention transfer (stage 1 of linearize, `score_tokens` tokens)
   trains all feature maps at once;
2. each layer is scored on held-out validation blocks by its attention-transfer MSE (after `o_proj`). In
   transfer mode every layer gets the teacher's own hidden states and passes the softmax output on, so the
   layers are independent and one forward pass per validation batch scores all of them;
3. optionally (`score="next-token"`) the score is instead the rise of the validation next-token loss when
   that layer alone runs converted (L extra evaluations);
4. the round(ratio * L) highest-scoring layers keep softmax; `linearize()` then runs on the others
   (`LinearizeConfig.layers`) and the scores go into the export (effconv.json, scores.json, scores.png).

Fixed selections (`interval`, `first`, `last`) and an explicit list of kept layers (`softmax_layers`) skip the
measurement's role but, unless `score="none"`, still record the scores for comparison.
"""

from __future__ import annotations

import dataclasses
import gc
import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import data as data_lib
from . import distributed, fsdp
from .errors import EffconvError
from .export import check_output_dir
from .linearize import (
    LinearizeConfig,
    _device_and_dtype,
    _steps,
    converted_layer_indices,
    linearize,
    make_student,
    prepare_run_data,
    run_dir_for,
    transfer_loss_fn,
)
from .loading import load_teacher
from .metrics import next_token_loss
from .train import StageSpec, console, run_stage

SELECT_CHOICES = ("measured", "interval", "first", "last", "explicit")
SCORE_CHOICES = ("transfer", "next-token", "none")


@dataclass
class HybridizeConfig(LinearizeConfig):
    """Every setting of a hybridize run: linearize's settings plus the layer selection. YAML recipes hold
    these keys. `layers` (linearize's layers to convert) is chosen here and must stay unset: give the layers
    to keep as `softmax_layers` (`--layers` on the command line)."""

    out: str = "out/hybridized"
    ratio: float | None = None  # fraction of layers that keep softmax attention, in (0, 1)
    select: str | None = None  # measured | interval | first | last | explicit; None: explicit if softmax_layers
    softmax_layers: list[int] | None = None  # explicit layers to keep as softmax (CLI --layers)
    # next-token: val-loss rise (measured better: r25 prose 1.141x vs 1.228x by transfer MSE, docs/hybridize.md);
    # transfer: attention-transfer MSE (one pass, cheaper); none: no scoring
    score: str = "next-token"
    score_tokens: int = 8_192  # joint attention-transfer budget before scoring (0: score the initial maps)

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
        if self.select is not None and self.select not in SELECT_CHOICES:
            raise EffconvError(f"unknown --select {self.select!r}; choose one of {', '.join(SELECT_CHOICES)}")
        if self.score not in SCORE_CHOICES:
            raise EffconvError(f"unknown --score {self.score!r}; choose one of {', '.join(SCORE_CHOICES)}")
        if self.score_tokens < 0:
            raise EffconvError(f"--score-tokens must be >= 0, got {self.score_tokens}")
        if self.attention == "linear" and self.window >= self.seq_len:
            raise EffconvError(
                f"--window {self.window} is not smaller than --seq-len {self.seq_len}: the linear part would never "
                "be trained or measured; use a smaller window or longer sequences"
            )
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
            raise EffconvError("--select measured needs scores: use --score transfer or next-token")

    def linearize_config(self, converted: list[int]) -> LinearizeConfig:
        """linearize's config for the chosen layers: the same settings, `layers` = the converted ones."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(LinearizeConfig)}
        values["layers"] = list(converted)
        return LinearizeConfig(**values)


@dataclass
class LayerScores:
    """What converting each layer costs, measured after a short joint attention transfer of all layers."""

    metric: str  # the score used for selection: "transfer_mse" or "next_token_delta"
    transfer_mse: list[float]  # per layer: MSE between converted and softmax attention output (after o_proj)
    relative_mse: list[float]  # transfer_mse / mean square of the softmax output (scale-free, for reference)
    next_token_delta: list[float] | None = None  # per layer: val loss with that layer alone converted - teacher
    teacher_val_loss: float | None = None
    trained_tokens: int = 0
    val_tokens: int = 0
    seconds: float = 0.0

    @property
    def scores(self) -> list[float]:
        return list(self.next_token_delta if self.metric == "next_token_delta" else self.transfer_mse)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> LayerScores:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclass
class HybridizeResult:
    out: Path
    softmax_layers: list[int]
    converted_layers: list[int]
    scores: LayerScores | None
    metrics: dict = field(default_factory=dict)


def kept_count(ratio: float, num_layers: int) -> int:
    """round(ratio * num_layers), halves rounded up; must leave at least one layer of each kind."""
    k = math.floor(ratio * num_layers + 0.5)
    if not 0 < k < num_layers:
        lo, hi = 0.5 / num_layers, (num_layers - 0.5) / num_layers
        raise EffconvError(
            f"--ratio {ratio} keeps {k} of {num_layers} layers as softmax, which leaves "
            f"{'nothing kept' if k == 0 else 'nothing to convert'}; use a ratio in [{lo:.3g}, {hi:.3g})"
        )
    return k


def select_layers(
    select: str,
    num_layers: int,
    *,
    ratio: float | None = None,
    scores: list[float] | None = None,
    softmax_layers: list[int] | None = None,
) -> list[int]:
    """The layers that keep softmax attention (sorted).

    measured: the round(ratio*L) highest scores (ties: lower index first); interval: one layer in the middle
    of each of k equal slices, floor((j + 1/2) * L / k); first / last: the first / last k layers;
    explicit: `softmax_layers`."""
    if select == "explicit":
        if not softmax_layers:
            raise EffconvError("--layers is empty: give at least one layer to keep as softmax")
        kept = converted_layer_indices(num_layers, softmax_layers)  # range check, dedup, sort
        if len(kept) == num_layers:
            raise EffconvError(f"--layers keeps all {num_layers} layers as softmax: nothing to convert")
        return kept
    if ratio is None:
        raise EffconvError("--ratio is required: the fraction of layers that keep softmax attention, in (0, 1)")
    k = kept_count(ratio, num_layers)
    if select == "first":
        return list(range(k))
    if select == "last":
        return list(range(num_layers - k, num_layers))
    if select == "interval":
        return sorted({math.floor((j + 0.5) * num_layers / k) for j in range(k)})
    if select == "measured":
        if scores is None or len(scores) != num_layers:
            raise EffconvError(f"measured selection needs one score per layer ({num_layers})")
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            raise EffconvError(f"layer scores are not finite for layers {bad}; lower --stage1-lr")
        order = sorted(range(num_layers), key=lambda i: (-scores[i], i))
        return sorted(order[:k])
    raise EffconvError(f"unknown --select {select!r}; choose one of {', '.join(SELECT_CHOICES)}")


# ---------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def layer_transfer_errors(student, blocks: torch.Tensor, *, batch_size: int, device) -> tuple[list[float], list[float]]:
    """Per-layer attention-transfer MSE (and MSE relative to the softmax output's mean square) over `blocks`,
    every layer scored from the same transfer-mode forward passes. Every layer of `student` must be converted."""
    attns = [layer.self_attn for layer in student.model.layers]
    n = len(attns)
    sq_err, energy, count = [0.0] * n, [0.0] * n, 0
    saved_ce = [a.transfer_attn_ce_weight for a in attns]
    current: dict[int, int] = {}

    def hook(index):
        def fn(module, args, output):  # transfer mode returns the softmax output y_true
            energy[index] += float(output.float().pow(2).mean()) * current["rows"]
        return fn

    handles = [a.register_forward_hook(hook(i)) for i, a in enumerate(attns)]
    student.set_attention_mode("transfer")
    try:
        for a in attns:
            a.transfer_attn_ce_weight = 0.0  # the score is the pure output MSE
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start : start + batch_size].to(device)
            current["rows"] = batch.shape[0]
            student.model(input_ids=batch, use_cache=False)
            for i, a in enumerate(attns):
                sq_err[i] += float(a.transfer_loss) * batch.shape[0]
            count += batch.shape[0]
    finally:
        for h in handles:
            h.remove()
        student.set_attention_mode("student")
        for a, ce in zip(attns, saved_ce):
            a.transfer_attn_ce_weight = ce
            a.transfer_loss = None
    mse = [s / count for s in sq_err]
    rel = [m / max(e / count, 1e-30) for m, e in zip(mse, energy)]
    return mse, rel


@torch.no_grad()
def layer_next_token_deltas(student, blocks: torch.Tensor, *, batch_size: int) -> tuple[float, list[float]]:
    """Teacher validation loss, and per layer the rise of it when that layer alone runs converted."""
    attns = [layer.self_attn for layer in student.model.layers]
    try:
        student.set_attention_mode("teacher")
        teacher_loss = next_token_loss(student, blocks, batch_size=batch_size)
        deltas = []
        for i, a in enumerate(attns):
            a.mode = "student"
            deltas.append(next_token_loss(student, blocks, batch_size=batch_size) - teacher_loss)
            a.mode = "teacher"
    finally:
        student.set_attention_mode("student")
    return teacher_loss, deltas


def measure_layer_scores(student, train_blocks, val_blocks, cfg: HybridizeConfig, device) -> LayerScores:
    """Short joint attention transfer of every layer (`score_tokens`), then per-layer scores on `val_blocks`."""
    t0 = time.perf_counter()
    n = len(student.model.layers)
    if len(student.converted_attentions()) != n:
        raise ValueError("scoring needs a student with every layer converted")
    for attn in student.converted_attentions():
        attn.transfer_attn_ce_weight = cfg.attn_ce_weight
    # sliding / block_sparse layers have nothing to train: they are scored as they are
    steps = _steps(cfg.score_tokens, cfg) if any(p.requires_grad for p in student.parameters()) else 0
    trained = 0
    if steps > 0:
        loader = data_lib.BlockLoader(train_blocks, cfg.batch_size, seed=cfg.seed)
        spec = StageSpec("layer scoring", steps, cfg.stage1_lr, warmup_steps=min(10, steps // 10),
                         eval_every=max(steps, 1), checkpoint_every=max(steps, 1))
        loss_fn, backward = transfer_loss_fn(student, n - 1)
        r = run_stage(student, spec, loss_fn=loss_fn, next_batch=lambda step: loader.batch(step).to(device),
                      evaluate=None, checkpoint_path=None, progress=cfg.progress, backward=backward)
        trained = r.tokens
    student.eval()
    mse, rel = fsdp.call(student, lambda: layer_transfer_errors(student, val_blocks, batch_size=cfg.batch_size,
                                                                 device=device))
    scores = LayerScores("transfer_mse", mse, rel, trained_tokens=trained, val_tokens=val_blocks.numel())
    if cfg.score == "next-token":
        scores.teacher_val_loss, scores.next_token_delta = layer_next_token_deltas(
            student, val_blocks, batch_size=cfg.batch_size
        )
        scores.metric = "next_token_delta"
    scores.seconds = round(time.perf_counter() - t0, 2)
    return scores


def score_layers(cfg: HybridizeConfig) -> LayerScores:
    """Load the teacher and the data as linearize does (same split: scoring validates on linearize's held-out
    blocks), convert every layer, and measure what converting each one costs."""
    device, dtype = _device_and_dtype(cfg)
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
    return measure_layer_scores(student, train_blocks, val_blocks, cfg, device)


def _teacher_config(cfg: HybridizeConfig):
    from transformers import AutoConfig

    from .loading import _materialise_gguf, resolve_model_source

    source = resolve_model_source(cfg.model)
    path = _materialise_gguf(source) if source.kind == "gguf" else source.path
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise EffconvError(f"could not read the config of {source.description}: {e}") from e


def _num_layers(cfg: HybridizeConfig) -> int:
    config = _teacher_config(cfg)
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


def scores_report(cfg: HybridizeConfig, scores: LayerScores | None, kept: list[int], num_layers: int) -> dict:
    """The content of scores.json (also stored under "hybridize" in effconv.json)."""
    report = {
        "select": cfg.selection,
        "ratio": cfg.ratio,
        "num_layers": num_layers,
        "softmax_layers": kept,
        "converted_layers": [i for i in range(num_layers) if i not in kept],
        "score": cfg.score,
    }
    if scores is not None:
        report.update(
            metric=scores.metric, score_tokens=scores.trained_tokens, val_tokens=scores.val_tokens,
            teacher_val_loss=scores.teacher_val_loss, seconds=scores.seconds,
            layers=[
                {
                    "layer": i,
                    "score": scores.scores[i],
                    "transfer_mse": scores.transfer_mse[i],
                    "relative_mse": scores.relative_mse[i],
                    **({"next_token_delta": scores.next_token_delta[i]} if scores.next_token_delta else {}),
                    "rank": sorted(range(num_layers), key=lambda j: (-scores.scores[j], j)).index(i) + 1,
                    "kept_softmax": i in kept,
                }
                for i in range(num_layers)
            ],
        )
    return report


def print_scores_table(scores: LayerScores, kept: list[int]) -> None:
    from rich.table import Table

    n = len(scores.transfer_mse)
    order = sorted(range(n), key=lambda j: (-scores.scores[j], j))
    table = Table(title=f"per-layer conversion cost ({scores.metric}; {len(kept)} of {n} kept as softmax)")
    table.add_column("layer", justify="right")
    table.add_column("transfer MSE", justify="right")
    table.add_column("relative MSE", justify="right")
    if scores.next_token_delta is not None:
        table.add_column("Δ val loss", justify="right")
    table.add_column("rank", justify="right")
    table.add_column("attention")
    for i in range(n):
        row = [str(i), f"{scores.transfer_mse[i]:.4g}", f"{scores.relative_mse[i]:.4g}"]
        if scores.next_token_delta is not None:
            row.append(f"{scores.next_token_delta[i]:+.4f}")
        row += [str(order.index(i) + 1), "[bold red]softmax[/bold red]" if i in kept else "converted"]
        table.add_row(*row)
    console.print(table)


def plot_scores(scores: LayerScores, kept: list[int], title: str) -> bytes:
    """A PNG bar chart of the scores (one panel per measured quantity), kept layers highlighted."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    n = len(scores.transfer_mse)
    panels = [("attention-transfer MSE (validation)", scores.transfer_mse)]
    if scores.next_token_delta is not None:
        panels.append(("Δ validation loss, layer alone converted (nats)", scores.next_token_delta))
    fig = Figure(figsize=(max(6.0, 0.32 * n + 2), 2.8 * len(panels) + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    colors = ["tab:red" if i in kept else "tab:blue" for i in range(n)]
    for ax, (label, values) in zip(axes, panels):
        ax.bar(range(n), values, color=colors)
        ax.set_ylabel(label, fontsize=8)
        ax.set_xticks(range(n))
        ax.tick_params(labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xlabel("layer")
    axes[0].set_title(title, fontsize=9)
    axes[0].legend(handles=[Patch(color="tab:red", label="kept: softmax"), Patch(color="tab:blue", label="converted")],
                   fontsize=7, loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def _write_atomic(path: Path, content: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------


def state_dir_for(out: Path) -> Path:
    """Where hybridize keeps its settings and scores while running (beside linearize's run directory)."""
    return out.resolve().parent / f".{out.name}.effconv-hybridize"


def _prepare_state(cfg: HybridizeConfig, state_dir: Path, linearize_run: Path) -> LayerScores | None:
    """Create (or, with --resume, check) the state directory; returns scores saved by an interrupted run."""
    identity_file, scores_file = state_dir / "config.json", state_dir / "scores.json"
    current = json.loads(json.dumps(cfg.identity()))
    if cfg.resume:
        if not identity_file.is_file():
            raise EffconvError(f"nothing to resume: no hybridize run found at {state_dir}")
        saved = json.loads(identity_file.read_text())
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if changed:
            raise EffconvError(f"--resume with different settings than the interrupted run: {', '.join(changed)}")
        return LayerScores.from_json(json.loads(scores_file.read_text())) if scores_file.is_file() else None
    if state_dir.exists() or linearize_run.exists():
        if not cfg.overwrite:
            raise EffconvError(
                f"an interrupted run exists at {state_dir if state_dir.exists() else linearize_run}; pass --resume "
                "to continue it or --overwrite to start over"
            )
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(linearize_run, ignore_errors=True)
    state_dir.mkdir(parents=True)
    identity_file.write_text(json.dumps(current, indent=2) + "\n")
    return None


def hybridize(cfg: HybridizeConfig) -> HybridizeResult:
    """Score the layers, keep the most expensive ones as softmax, linearize the others, export with the scores."""
    cfg.validate()
    distributed.check_launch(cfg.batch_size, blockwise=cfg.layers_per_block is not None)
    out = Path(cfg.out)
    check_output_dir(out, cfg.overwrite)
    _device_and_dtype(cfg)  # a bad --device fails before any work
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
            _write_atomic(scores_file, (json.dumps(scores.to_json(), indent=2) + "\n").encode())
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

    lin_cfg = cfg.linearize_config(converted)
    lin_cfg.resume = cfg.resume and linearize_run.exists()  # killed after scoring: linearize starts fresh
    distributed.wait_for_everyone()  # every process has looked before the main one creates linearize's run dir
    result = linearize(lin_cfg, metadata={"command": "hybridize", "hybridize_config": dataclasses.asdict(cfg),
                                          "hybridize": report})
    if main:
        if scores is not None:
            title = (f"{Path(cfg.model).name if cfg.model else 'SmolLM2-135M-Instruct'}: {len(kept)} of "
                     f"{num_layers} layers kept as softmax ({cfg.selection})")
            _write_atomic(out / "scores.png", plot_scores(scores, kept, title))
        _write_atomic(out / "scores.json", (json.dumps(report, indent=2) + "\n").encode())
        if not cfg.keep_run:
            shutil.rmtree(state_dir, ignore_errors=True)
    distributed.wait_for_everyone()
    return HybridizeResult(out=out, softmax_layers=kept, converted_layers=converted, scores=scores,
                           metrics=result.metrics)
