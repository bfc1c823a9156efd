"""Run recipes as they are (recipes/*.yaml) and measure what they produce.

    python bench/recipes.py run recipes/smollm2-135m-moe-8x2.yaml --log runs/recipes.jsonl [--set tokens=8000000 ...]
    python bench/recipes.py report runs/recipes.jsonl [more.jsonl ...]
    python bench/recipes.py plot --out stage2.png runs/*.jsonl [--exclude "window 0"]   # ratios vs stage-2 tokens

`run` builds the command's config from the recipe exactly as `effconv <command> --recipe` does (the command is
read from the recipe's file name: linearize, hybridize, moe / linear-moe -> moe-upcycle), with `--set KEY=VALUE`
overrides (YAML values) on top, runs it through the Python API, then loads the export with plain transformers and
appends one JSON line to --log: the recipe, the settings, wall time, the run's own metrics (effconv.json: held-out
teacher-text perplexities, tokens/s), perplexity on data/heldout-prose.txt (written for this repository, trained on
by no run; strided, context 1024 on GPU) for the student and for the model it was made from, and greedy samples.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "kernels"))

from ablations import PROMPTS, _load_export, _prose_ppl  # noqa: E402


def command_of(recipe: Path) -> str:
    name = recipe.stem
    if "-moe" in name or "linear-moe" in name:
        return "moe-upcycle"
    for command in ("hybridize", "linearize"):
        if command in name:
            return command
    raise SystemExit(f"cannot tell the command of recipe {recipe}: its name names none of linearize/hybridize/moe")


def build(command: str, recipe: Path, overrides: dict):
    from effconv.config import build_config

    if command == "linearize":
        from effconv.pipelines.linearize import LinearizeConfig as cls, linearize as fn
    elif command == "hybridize":
        from effconv.pipelines.hybridize import HybridizeConfig as cls, hybridize as fn
    else:
        from effconv.pipelines.moe_upcycle import MoeUpcycleConfig as cls, moe_upcycle as fn
    return build_config(cls, recipe, overrides), fn


def parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set wants KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def reference_prose(model_spec: str | None, log: Path, device, dtype, context: int) -> dict:
    """Prose perplexity of the model a recipe starts from (teacher or an earlier export), cached beside the log."""
    cache = log.with_name(log.stem + "-references.json")
    try:  # runs side by side share this file: written atomically, a torn read counts as empty
        known = json.loads(cache.read_text()) if cache.exists() else {}
    except json.JSONDecodeError:
        known = {}
    key = str(model_spec)
    if key not in known:
        from effconv.io.sources import load_teacher

        if model_spec and Path(model_spec).is_dir() and (Path(model_spec) / "effconv.json").exists():
            model, tok = _load_export(Path(model_spec), device, dtype)
        else:
            model, tok, _ = load_teacher(model_spec, dtype=dtype, device=device)
        known[key] = _prose_ppl(model.eval(), tok, context)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, cache)
        del model
    return known[key]


def run(recipe: Path, log: Path, sets: dict, name: str | None) -> dict:
    import torch

    from effconv.eval.run import greedy_generations

    command = command_of(recipe)
    cfg, fn = build(command, recipe, {"overwrite": True, "progress": False, **sets})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    context = 1024 if device.type == "cuda" else 256
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    fn(cfg)
    wall = time.perf_counter() - start
    student, tok = _load_export(Path(cfg.out), device, dtype)
    record = {
        "name": name or recipe.stem, "recipe": str(recipe), "command": command, "overrides": sets,
        "settings": dataclasses.asdict(cfg), "wall_seconds": round(wall, 1),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "metadata": json.loads((Path(cfg.out) / "effconv.json").read_text()),
        "prose": _prose_ppl(student, tok, context),
        "samples": greedy_generations(student, tok, PROMPTS, 48),
    }
    del student
    record["reference_prose"] = reference_prose(cfg.model, log, device, dtype, context)
    with log.open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")
    r = record["prose"]["perplexity"] / record["reference_prose"]["perplexity"]
    print(f"[recipes] {record['name']}: prose ppl {record['prose']['perplexity']:.2f} ({r:.3f}x the model it was made"
          f" from), wall {wall:.0f}s", flush=True)
    return record


def _val(meta: dict) -> tuple[float | None, float | None]:
    m = meta.get("metrics", meta)
    final = next((m[k] for k in ("stage2_val_ppl", "distilled_val_ppl", "stage1_val_ppl", "upcycled_val_ppl") if k in m), None)
    return final, m.get("teacher_val_ppl")


def trained_tokens(record: dict) -> tuple[list[int], list[int], bool]:
    """(tokens trained per stage, tokens asked for per stage, whether a wall-clock budget cut a stage): from the
    run's own metrics, since a stage with max_seconds can end before its token budget."""
    s, m = record["settings"], record["metadata"].get("metrics", record["metadata"])
    stages = [k for k in ("stage1", "stage2", "distillation") if isinstance(m.get(k), dict)]
    asked = [s.get("tokens", 0)] if "tokens" in s else [s.get("stage1_tokens", 0), s.get("stage2_tokens", 0)]
    if not stages:  # no training stage ran (a step-0 export, or a record without stage metrics)
        return [0] * len(asked), asked, False
    done = [int(m[k].get("tokens", 0)) for k in stages]
    return done, asked, any(m[k].get("cut_by_time") for k in stages)


def report(logs: list[Path]) -> str:
    lines = ["| run | command | tokens trained (asked) | held-out teacher text ppl (x teacher) | before training / after "
             "stage 1 (x teacher) | held-out prose ppl (x reference) | wall s |", "|---|---|---|---|---|---|---|"]
    for log in logs:
        for line in log.read_text().splitlines():
            r = json.loads(line)
            done, asked, cut = trained_tokens(r)
            tokens = " + ".join(f"{t / 1e6:.2f}M" for t in done) + f" ({' + '.join(f'{t / 1e6:.1f}M' for t in asked)}" \
                + (", time-cut)" if cut else ")")
            final, teacher = _val(r["metadata"])
            val = f"{final:.3f} ({final / teacher:.3f}x)" if final and teacher else "-"
            m = r["metadata"].get("metrics", r["metadata"])
            early = m.get("upcycled_val_ppl", m.get("stage1_val_ppl"))
            early = f"{early:.3f} ({early / teacher:.3f}x)" if early and teacher else "-"
            p, ref = r["prose"]["perplexity"], r["reference_prose"]["perplexity"]
            lines.append(f"| {r['name']} | {r['command']} | {tokens} | {val} | {early} | {p:.2f} ({p / ref:.3f}x)"
                         f" | {r['wall_seconds']} |")
    return "\n".join(lines)


def series_of(record: dict) -> str:
    """The family a linearize / hybridize record belongs to in the plot: command, ratio and window."""
    s = record["settings"]
    name = "linearize" if record["command"] == "linearize" else f"hybridize r{round(100 * s.get('ratio', 0))}"
    loss = ", KL stage 2" if s.get("ce_weight", 1.0) == 0 else ""
    rank = f", LoRA r{s['lora_rank']}" if s.get("lora_rank", 8) != 8 else ""
    return f"{name}, window {s.get('window')}{loss}{rank}"


def stage2_points(logs: list[Path]) -> dict[str, list[tuple[float, float, float, float]]]:
    """Per series: (stage-2 tokens trained, stage-1 tokens trained, prose ratio, held-out teacher-text ratio)."""
    points: dict[str, list[tuple[float, float, float, float]]] = {}
    for log in logs:
        for line in log.read_text().splitlines():
            r = json.loads(line)
            if r["command"] not in ("linearize", "hybridize"):
                continue
            done, _, _ = trained_tokens(r)
            final, teacher = _val(r["metadata"])
            prose = r["prose"]["perplexity"] / r["reference_prose"]["perplexity"]
            stage2 = done[1] if len(done) > 1 else 0
            points.setdefault(series_of(r), []).append(
                (stage2, done[0], prose, final / teacher if final and teacher else float("nan")))
    return {k: sorted(v) for k, v in points.items()}


def plot(logs: list[Path], out: Path, exclude: tuple[str, ...] = ()) -> dict:
    """Prose and held-out teacher-text perplexity (x teacher) against the stage-2 tokens trained, one line per
    series, each point labelled with its stage-1 tokens. Returns the points it drew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = {k: v for k, v in stage2_points(logs).items() if not any(x in k for x in exclude)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for series, pts in points.items():
        xs = [p[0] / 1e6 for p in pts]
        for ax, column in zip(axes, (2, 3)):
            line, = ax.plot(xs, [p[column] for p in pts], "o-", label=series)
            for p in pts:
                ax.annotate(f"{p[1] / 1e6:.0f}M", (p[0] / 1e6, p[column]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points", color=line.get_color())
    axes[0].set_title("held-out prose (x teacher)")
    axes[1].set_title("held-out teacher text (x teacher)")
    for ax in axes:
        ax.set_xlabel("stage-2 tokens trained (M); labels: stage-1 tokens")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return points


def moe_points(logs: list[Path]) -> list[tuple[str, float, float, float]]:
    """moe-upcycle records: (name, before-training val ratio, after-training val ratio, prose ratio), x teacher."""
    pts = []
    for log in logs:
        for line in log.read_text().splitlines():
            r = json.loads(line)
            if r["command"] != "moe-upcycle":
                continue
            m = r["metadata"].get("metrics", r["metadata"])
            final, teacher = _val(r["metadata"])
            before = m.get("upcycled_val_ppl")
            if not (final and teacher and before):
                continue
            done, _, _ = trained_tokens(r)
            pts.append((f"{r['name']} ({sum(done) / 1e6:.1f}M)", before / teacher, final / teacher,
                        r["prose"]["perplexity"] / r["reference_prose"]["perplexity"]))
    return pts


def plot_moe(logs: list[Path], out: Path) -> list[tuple[str, float, float, float]]:
    """Grouped bars (log scale) of each moe-upcycle run's perplexity x teacher: before training, after, prose."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = moe_points(logs)
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    width = 0.27
    for j, label in enumerate(("teacher text, before training", "teacher text, after", "prose, after")):
        ax.bar([i + (j - 1) * width for i in range(len(pts))], [p[1 + j] for p in pts], width, label=label)
    ax.set_xticks(range(len(pts)), [p[0] for p in pts], fontsize=8)
    ax.set_yscale("log")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_ylabel("perplexity (x teacher)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return pts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("recipe", type=Path)
    r.add_argument("--log", type=Path, required=True)
    r.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE override (YAML value)")
    r.add_argument("--name", default=None)
    g = sub.add_parser("report")
    g.add_argument("logs", type=Path, nargs="+")
    q = sub.add_parser("plot")
    q.add_argument("logs", type=Path, nargs="+")
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--exclude", action="append", default=[], help="leave out series whose name contains this")
    mq = sub.add_parser("plot-moe", help="before / after / prose bars of the moe-upcycle records")
    mq.add_argument("logs", type=Path, nargs="+")
    mq.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    if a.cmd == "run":
        run(a.recipe, a.log, parse_sets(a.sets), a.name)
    elif a.cmd == "plot":
        for series, pts in plot(a.logs, a.out, tuple(a.exclude)).items():
            print(series, [(f"{p[0] / 1e6:.2f}M", f"{p[2]:.3f}x") for p in pts])
    elif a.cmd == "plot-moe":
        for name, before, after, prose in plot_moe(a.logs, a.out):
            print(f"{name}: before {before:.1f}x, after {after:.2f}x, prose {prose:.2f}x")
    else:
        print(report(a.logs))


if __name__ == "__main__":
    main()
