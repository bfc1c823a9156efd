"""The eval report: terminal tables, report.md, PNG plots, and the atomic write of report.json/md and plots."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io.export import atomic_directory
from . import length

ROLES = ("teacher", "student")




def _roles(report: dict) -> list[str]:
    return [r for r in ROLES if r in report["models"]]


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 1e6 else f"{x:.4g}"
    return str(x)


def quality_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    roles = _roles(report)
    header = ["metric", *roles]
    rows: list[list[str]] = []
    ppl = report.get("perplexity", {})
    if ppl and "skipped" not in ppl:
        rows.append(["perplexity", *[_fmt(ppl[r]["perplexity"]) for r in roles]])
        rows.append(["loss (nats/token)", *[_fmt(ppl[r]["loss"], 4) for r in roles]])
        if all("bits_per_byte" in ppl[r] for r in roles):
            rows.append(["bits per byte", *[_fmt(ppl[r]["bits_per_byte"], 4) for r in roles]])
        rows.append(["tokens scored", *[str(ppl[r]["tokens"]) for r in roles]])
    tasks = report.get("tasks", {})
    for task in sorted({t for r in roles for t in tasks.get(r, {})}):
        metrics = sorted({m for r in roles for m in tasks[r].get(task, {}) if "stderr" not in m and m != "sample_len"})
        for metric in metrics:
            rows.append([f"{task} {metric}", *[_fmt(tasks[r].get(task, {}).get(metric), 4) for r in roles]])
    return header, rows


SPEED_HEADER = ["model", "batch", "context", "prefill ms", "decode tok/s", "x teacher", "peak MiB", "cache MiB",
                "cache B/tok"]


def speed_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """One line per (batch, context, model), teacher first, so each pair compares at a glance."""
    roles = _roles(report)
    rows_in = report.get("speed", {}).get("rows", [])
    cells = {(r["model"], r["batch_size"], r["context"]): r for r in rows_in}
    keys = sorted({(r["batch_size"], r["context"]) for r in rows_in})
    rows = []
    for b, c in keys:
        teacher = cells.get(("teacher", b, c))
        for role in roles:
            row = cells.get((role, b, c))
            if row is None:
                continue
            if row["status"] != "ok":
                rows.append([role, str(b), str(c)] + ["OOM"] * (len(SPEED_HEADER) - 3))
                continue
            ratio = "-"
            if role != "teacher" and teacher is not None and teacher["status"] == "ok":
                ratio = f"{row['decode_tokens_per_s'] / teacher['decode_tokens_per_s']:.2f}x"
            rows.append([role, str(b), str(c), _fmt(row["prefill_ms"], 1), _fmt(row["decode_tokens_per_s"], 1), ratio,
                         _mib(row["peak_memory_bytes"]), _mib(row["cache_bytes"]),
                         f"{row['cache_bytes_per_token']:.0f}"])
    return (SPEED_HEADER if "teacher" in roles else [h for h in SPEED_HEADER if h != "x teacher"]), (
        rows if "teacher" in roles else [r[:5] + r[6:] for r in rows])


def print_report(report: dict) -> None:
    """The report on stdout: rich tables on a terminal; the Markdown report (report.md's text) when stdout is a file
    or a pipe, where a table of any width stays whole instead of being cut or wrapped to a guessed width."""
    if not sys.stdout.isatty():
        sys.stdout.write(render_markdown(report))
        return
    from rich.console import Console
    from rich.table import Table

    # piped to a file, rich would cut the tables to 80 columns: print them whole instead
    console = Console() if sys.stdout.isatty() else Console(width=240)
    tables = [("Parameters", parameter_rows(report)), ("Quality", quality_rows(report))]
    if "length" in report:
        tables += [("Perplexity by context", length.perplexity_rows(report["length"])),
                   ("Loss by position", length.position_rows(report["length"])),
                   ("Passkey retrieval", length.passkey_rows(report["length"]))]
    tables.append(("Speed and memory", speed_rows(report)))
    for title, (header, rows) in tables:
        if not rows:
            continue
        table = Table(title=title)
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    if report.get("generations"):
        roles = _roles(report)
        table = Table(title="Greedy generations", show_lines=True)
        table.add_column("prompt")
        for role in roles:
            table.add_column(role)
        for g in report["generations"]:
            table.add_row(g["prompt"], *[g[r] for r in roles])
        console.print(table)
    for note in report.get("notes", []):
        console.print(f"note: {note}")


def parameter_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Parameters stored and run per token (a mixture of experts runs its top-k experts only), and the FFN share
    a token runs beside the teacher's dense FFN."""
    models = report.get("models", {})
    roles = [r for r in _roles(report) if "active_parameters" in models.get(r, {})]
    teacher_ffn = models.get("teacher", {}).get("ffn_parameters")
    header = ["model", "parameters", "active per token", "FFN", "FFN active per token", "FFN active / teacher FFN"]
    rows = []
    for role in roles:
        m = models[role]
        share = f"{m['active_ffn_parameters'] / teacher_ffn:.1%}" if teacher_ffn else "-"
        rows.append([role, f"{m['parameters']:,}", f"{m['active_parameters']:,}", f"{m['ffn_parameters']:,}",
                     f"{m['active_ffn_parameters']:,}", share])
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: dict, plots: Sequence[str] = ()) -> str:
    roles = _roles(report)
    env = report["environment"]
    parts = ["# effconv eval", ""]
    for role in roles:
        m = report["models"][role]
        parts.append(f"- **{role}**: {m['source']} ({m['class']}, {m['parameters']:,} parameters; {m['attention']})")
    where = f" ({env['gpu']})" if "gpu" in env else f" ({env.get('cpu_count')} CPUs)"
    load = f", load average {env['load_average_at_start'][0]} at start" if "load_average_at_start" in env else ""
    parts += [f"- device: {env['device']}{where}, {env['dtype']}, torch {env['torch']}, {env['threads']} threads{load}",
              ""]
    header, rows = parameter_rows(report)
    if rows:  # a mixture of experts runs fewer parameters per token than it stores
        parts += ["## Parameters", "", _md_table(header, rows), ""]
    parts += ["## Quality", ""]
    ppl = report.get("perplexity", {})
    if "skipped" in ppl:
        parts.append(f"Perplexity skipped: {ppl['skipped']}.")
    elif ppl:
        parts.append(f"Perplexity on {ppl['data']}; window {ppl['context']} tokens, stride {ppl['stride']} "
                     "(each token scored once, with up to window - 1 tokens of left context).")
    header, rows = quality_rows(report)
    if rows:
        parts += ["", _md_table(header, rows)]
    parts.append("")
    if report.get("speed"):
        s = report["speed"]
        if s.get("method") == "generate":
            paths = sorted({(r["model"], r["path"]) for r in s["rows"] if r.get("path")})
            how = ("Random-token prompts of each context length, through `model.generate` (greedy) on each model's "
                   f"fastest path ({'; '.join(f'{m}: {p}' for m, p in paths)}). Prefill: the time of a call for one "
                   f"new token. Decode: {s['decode_tokens']} more tokens per row, timed as the difference of two "
                   f"calls (tok/s counts every row of the batch). Medians of {s['repeats']} runs after a warm-up "
                   f"call. Peak memory: {s['memory_method']}. Cache: bytes a fresh prefill's cache holds.")
        else:
            how = ("Random-token prompts of each context length. Prefill: one forward pass over the prompt that "
                   f"builds the cache. Decode: {s['decode_tokens']} greedy tokens per row, one forward pass each "
                   f"through the cache (tok/s counts every row of the batch). Medians of {s['repeats']} runs after "
                   f"{s['warmup']} warm-up. Peak memory: {s['memory_method']}. Cache: bytes the generation cache "
                   "holds after prefill.")
        parts += ["## Speed and memory", "", how
                  + (f" Other processes kept {s['other_cpu_load']:.2f} CPU cores busy on average meanwhile."
                     if s.get("other_cpu_load") is not None else ""),
                  ""]
        header, rows = speed_rows(report)
        parts += [_md_table(header, rows), ""]
    for plot in plots:
        if not plot.startswith("length_"):  # the length section shows its own
            parts += [f"![{plot}]({plot})", ""]
    if report.get("generations"):
        parts += ["## Greedy generations", ""]
        for g in report["generations"]:
            parts += [f"**Prompt:** {g['prompt']}", ""]
            for role in roles:
                parts += [f"*{role}:*", "", "~~~text", g[role].replace("~~~", "~ ~ ~"), "~~~", ""]
    if "length" in report:
        parts += [length.render_length_markdown(report["length"], [p for p in plots if p.startswith("length_")]), ""]
    if report.get("notes"):
        parts += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(parts).rstrip("\n") + "\n"


def make_plots(report: dict, directory: Path) -> list[str]:
    """PNG plots, teacher and student on the same axes. Returns the file names written."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    roles = _roles(report)
    styles = {"teacher": dict(linestyle="--", marker="o"), "student": dict(linestyle="-", marker="s")}
    written = []
    rows = [r for r in report.get("speed", {}).get("rows", []) if r["status"] == "ok"]
    batches = sorted({r["batch_size"] for r in rows})

    def series(role: str, batch: int, key: str):
        pts = sorted((r["context"], r[key]) for r in rows
                     if r["model"] == role and r["batch_size"] == batch and r.get(key) is not None)
        return [p[0] for p in pts], [p[1] for p in pts]

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    contexts = sorted({r["context"] for r in rows})

    def draw(ax, key: str, ylabel: str, scale: float = 1.0) -> None:
        for role in roles:  # one colour per batch size; dashed = teacher, solid = student
            for i, b in enumerate(batches):
                x, y = series(role, b, key)
                if x:
                    ax.plot(x, [v * scale for v in y], label=f"{role} batch {b}", color=colors[i % len(colors)],
                            **styles[role])
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.minorticks_off()
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    if rows:
        for name, key, ylabel in (("decode_tokens_per_s.png", "decode_tokens_per_s", "decode tokens/s"),
                                  ("prefill_ms.png", "prefill_ms", "prefill latency (ms)")):
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            draw(ax, key, ylabel)
            fig.tight_layout()
            fig.savefig(directory / name, dpi=110)
            plt.close(fig)
            written.append(name)
        for name, key, ylabel in (("memory.png", "peak_memory_bytes", "peak memory over start (MiB)"),
                                  ("cache_bytes.png", "cache_bytes", "generation cache after prefill (MiB)")):
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            draw(ax, key, ylabel, 1 / 2**20)
            fig.tight_layout()
            fig.savefig(directory / name, dpi=110)
            plt.close(fig)
            written.append(name)
    ppl = report.get("perplexity", {})
    if ppl and "skipped" not in ppl:
        fig, ax = plt.subplots(figsize=(4.8, 4.2))
        values = [ppl[r]["perplexity"] for r in roles]
        bars = ax.bar(roles, values, color=["#999999" if r == "teacher" else "#3b75af" for r in roles])
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values])
        ax.set_ylabel("perplexity")
        ax.set_title(f"window {ppl['context']}, stride {ppl['stride']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(directory / "perplexity.png", dpi=110)
        plt.close(fig)
        written.append("perplexity.png")
    return written


def write_report(report: dict, out: Path, *, overwrite: bool = False) -> Path:
    """report.json, report.md and the plots, written all or nothing (io.export.atomic_directory)."""
    with atomic_directory(out, overwrite=overwrite, what="the report") as tmp:
        plots = make_plots(report, tmp)
        if "length" in report:
            plots += length.write_length_plots(report["length"], tmp)
        report["files"] = ["report.json", "report.md", *plots]
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (tmp / "report.md").write_text(render_markdown(report, plots))
    return Path(out)
