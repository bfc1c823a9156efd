"""What converting each layer costs, measured: the per-layer scores `effconv hybridize` keeps softmax layers by.

1. every layer is converted and a short joint attention transfer trains all feature maps at once;
2. each layer is scored on held-out validation blocks by its attention-transfer MSE (after `o_proj`). In
   transfer mode every layer gets the teacher's own hidden states and passes the softmax output on, so the
   layers are independent and one forward pass per validation batch scores all of them;
3. optionally ("next-token") the score is instead the rise of the validation next-token loss when that layer
   alone runs converted (L extra evaluations);
   or ("copy") the rise of the loss on the second copy of validation text written twice ([x, x], x half a block),
   that layer alone converted: what the layer does for retrieving tokens far behind it, which the next-token loss
   of ordinary text barely sees (most of its tokens are predictable from the last few);
   or ("next-token+copy") each layer's share of the summed next-token rise plus its share of the summed copy rise;
4. the round(ratio * L) highest-scoring layers keep softmax.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
import typing
from dataclasses import dataclass

import torch

from ..console import console
from ..conversion.student import converted_layer_indices
from ..data import BlockLoader
from ..errors import EffconvError
from ..eval.quality import copy_loss, next_token_loss, repeated_halves
from ..training import fsdp
from ..training.loop import StageSpec, run_stage
from ..training.run import steps_for
from .transfer import attention_mode, set_attention_mode, transfer_loss_fn

SELECT_CHOICES = ("measured", "interval", "first", "last", "explicit")


@dataclass
class LayerScores:
    """What converting each layer costs, measured after a short joint attention transfer of all layers."""

    metric: str  # the score used for selection: "transfer_mse", "next_token_delta", "copy_delta", "next_token+copy"
    transfer_mse: list[float]  # per layer: MSE between converted and softmax attention output (after o_proj)
    relative_mse: list[float]  # transfer_mse / mean square of the softmax output (scale-free, for reference)
    next_token_delta: list[float] | None = None  # per layer: val loss with that layer alone converted - teacher
    teacher_val_loss: float | None = None
    copy_delta: list[float] | None = None  # per layer: copy loss with that layer alone converted - teacher
    teacher_copy_loss: float | None = None
    trained_tokens: int = 0
    val_tokens: int = 0
    seconds: float = 0.0

    @property
    def scores(self) -> list[float]:
        if self.metric == "next_token_delta":
            return list(self.next_token_delta)
        if self.metric == "copy_delta":
            return list(self.copy_delta)
        if self.metric == "next_token+copy":
            return [a + b for a, b in zip(_shares(self.next_token_delta), _shares(self.copy_delta))]
        return list(self.transfer_mse)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> LayerScores:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def _shares(values: list[float]) -> list[float]:
    """Each layer's share of the summed (non-negative) values: two probes of different scale on one footing."""
    clipped = [max(v, 0.0) for v in values]
    total = sum(clipped)
    return [v / total if total > 0 else 0.0 for v in clipped]


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


@torch.no_grad()
def layer_transfer_errors(student, blocks: torch.Tensor, *, batch_size: int, device) -> tuple[list[float], list[float]]:
    """Per-layer attention-transfer MSE (and MSE relative to the softmax output's mean square) over `blocks`,
    every layer scored from the same transfer-mode forward passes. Every layer of `student` must be converted."""
    attns = [layer.self_attn for layer in student.model.layers]
    n = len(attns)
    sq_err, energy, count = [0.0] * n, [0.0] * n, 0
    current: dict[str, int] = {}

    def hook(index):
        def fn(module, args, output):  # transfer mode returns the softmax output y_true
            energy[index] += float(output.float().pow(2).mean()) * current["rows"]
        return fn

    handles = [a.register_forward_hook(hook(i)) for i, a in enumerate(attns)]
    try:
        with attention_mode(student, "transfer") as losses:  # no attention-map CE: the score is the pure output MSE
            for start in range(0, blocks.shape[0], batch_size):
                batch = blocks[start : start + batch_size].to(device)
                current["rows"] = batch.shape[0]
                student.model(input_ids=batch, use_cache=False)
                for i, a in enumerate(attns):
                    sq_err[i] += float(losses.pop(a)) * batch.shape[0]
                count += batch.shape[0]
    finally:
        for h in handles:
            h.remove()
    mse = [s / count for s in sq_err]
    rel = [m / max(e / count, 1e-30) for m, e in zip(mse, energy)]
    return mse, rel


def _per_layer_rise(student, loss: typing.Callable[[], float]) -> tuple[float, list[float]]:
    """`loss()` with every layer softmax, and per layer its rise when that layer alone runs converted."""
    attns = [layer.self_attn for layer in student.model.layers]
    try:
        set_attention_mode(attns, "teacher")
        teacher_loss = loss()
        deltas = []
        for a in attns:
            set_attention_mode([a], "student")
            deltas.append(loss() - teacher_loss)
            set_attention_mode([a], "teacher")
    finally:
        set_attention_mode(attns, "student")
    return teacher_loss, deltas


@torch.no_grad()
def layer_next_token_deltas(student, blocks: torch.Tensor, *, batch_size: int) -> tuple[float, list[float]]:
    """Teacher validation loss, and per layer the rise of it when that layer alone runs converted."""
    return _per_layer_rise(student, lambda: next_token_loss(student, blocks, batch_size=batch_size))


@torch.no_grad()
def layer_copy_deltas(student, blocks: torch.Tensor, *, batch_size: int) -> tuple[float, list[float]]:
    """Teacher copy loss on `repeated_halves(blocks)`, and per layer its rise when that layer alone runs converted."""
    copies = repeated_halves(blocks)
    return _per_layer_rise(student, lambda: copy_loss(student, copies, batch_size=batch_size))


def measure_layer_scores(student, train_blocks, val_blocks, *, score: str, score_tokens: int, lr: float,
                         batch_size: int, seed: int, attn_ce_weight: float, device, progress: bool = True) -> LayerScores:
    """Short joint attention transfer of every layer (`score_tokens`), then per-layer scores on `val_blocks`
    (`score`: "transfer" = transfer MSE, "next-token" = validation-loss rise, "copy" = copy-loss rise,
    "next-token+copy" = both, as shares)."""
    t0 = time.perf_counter()
    n = len(student.model.layers)
    if len(student.converted_attentions()) != n:
        raise ValueError("scoring needs a student with every layer converted")
    # sliding / block_sparse layers have nothing to train: they are scored as they are
    steps = steps_for(score_tokens, batch_size, train_blocks.shape[1]) if any(
        p.requires_grad for p in student.parameters()) else 0
    trained = 0
    if steps > 0:
        loader = BlockLoader(train_blocks, batch_size, seed=seed)
        spec = StageSpec("layer scoring", steps, lr, warmup_steps=min(10, steps // 10),
                         eval_every=max(steps, 1), checkpoint_every=max(steps, 1))
        loss_fn, backward = transfer_loss_fn(student, n - 1, attn_ce_weight)
        r = run_stage(student, spec, loss_fn=loss_fn, next_batch=lambda step: loader.batch(step).to(device),
                      evaluate=None, checkpoint_path=None, progress=progress, backward=backward)
        trained = r.tokens
    student.eval()
    mse, rel = fsdp.call(student, lambda: layer_transfer_errors(student, val_blocks, batch_size=batch_size,
                                                                 device=device))
    scores = LayerScores("transfer_mse", mse, rel, trained_tokens=trained, val_tokens=val_blocks.numel())
    if score in ("next-token", "next-token+copy"):
        scores.teacher_val_loss, scores.next_token_delta = layer_next_token_deltas(student, val_blocks,
                                                                                   batch_size=batch_size)
        scores.metric = "next_token_delta"
    if score in ("copy", "next-token+copy"):
        scores.teacher_copy_loss, scores.copy_delta = layer_copy_deltas(student, val_blocks, batch_size=batch_size)
        scores.metric = "copy_delta" if score == "copy" else "next_token+copy"
    scores.seconds = round(time.perf_counter() - t0, 2)
    return scores


def scores_report(cfg, scores: LayerScores | None, kept: list[int], num_layers: int) -> dict:
    """The content of scores.json (also stored under "hybridize" in effconv.json); `cfg`: the hybridize settings."""
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
            teacher_val_loss=scores.teacher_val_loss, teacher_copy_loss=scores.teacher_copy_loss, seconds=scores.seconds,
            layers=[
                {
                    "layer": i,
                    "score": scores.scores[i],
                    "transfer_mse": scores.transfer_mse[i],
                    "relative_mse": scores.relative_mse[i],
                    **({"next_token_delta": scores.next_token_delta[i]} if scores.next_token_delta else {}),
                    **({"copy_delta": scores.copy_delta[i]} if scores.copy_delta else {}),
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
    if scores.copy_delta is not None:
        table.add_column("Δ copy loss", justify="right")
    table.add_column("rank", justify="right")
    table.add_column("attention")
    for i in range(n):
        row = [str(i), f"{scores.transfer_mse[i]:.4g}", f"{scores.relative_mse[i]:.4g}"]
        if scores.next_token_delta is not None:
            row.append(f"{scores.next_token_delta[i]:+.4f}")
        if scores.copy_delta is not None:
            row.append(f"{scores.copy_delta[i]:+.4f}")
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
    if scores.copy_delta is not None:
        panels.append(("Δ copy loss (second half of [x, x]), layer alone converted (nats)", scores.copy_delta))
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
