"""Ablation sweeps of the conversion recipes on one model, one equal token budget per sweep (docs/results.md).

    python bench/ablations.py run --plan linearize --out runs/ablations [--only w64,w0] [--scale 0.01]
    python bench/ablations.py report runs/ablations --plots docs/results      # markdown tables + PNGs

`run` executes the named runs of a plan one after another in this process (the teacher text is generated once and
cached by effconv), and after each run appends one JSON line to OUT/runs.jsonl: settings, the validation perplexity
the run recorded (held-out teacher-generated blocks), perplexity on data/heldout-prose.txt (text written for this
repository that no run trains on) for teacher and student, wall time and tokens/s of each stage, and greedy
samples. A run already in runs.jsonl is skipped, so a killed sweep continues where it stopped.
`--scale` multiplies every token budget (tiny CPU smoke runs of the same plan).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "kernels"))

PROSE = ROOT / "data" / "heldout-prose.txt"
PROMPTS = ["Why is the sky blue?", "Write a short poem about the sea.", "What is 17 times 3? Explain your steps."]

# One budget for every run of a sweep: stage 1 + stage 2 tokens, on the same teacher-generated text.
BASE = dict(seq_len=512, batch_size=16, generate_tokens=370_000, generation_batch_size=512,
            stage1_tokens=1_000_000, stage1_lr=1e-2, stage2_tokens=500_000, stage2_lr=2e-4,
            eval_every=50, checkpoint_every=10_000, window=64, feature_map="hedgehog", lora_rank=8)

PLANS: dict[str, list[tuple[str, str, dict]]] = {
    # (name, command, overrides of BASE)
    "linearize": [
        ("w64-hedgehog", "linearize", {}),
        ("w64-t2r", "linearize", {"feature_map": "t2r"}),
        ("w64-elu", "linearize", {"feature_map": "elu"}),
        ("w0-hedgehog", "linearize", {"window": 0}),
        ("w16-hedgehog", "linearize", {"window": 16}),
        ("w256-hedgehog", "linearize", {"window": 256}),
        ("w64-no-stage2", "linearize", {"stage2_tokens": 0}),
        ("w64-lora4", "linearize", {"lora_rank": 4, "lora_alpha": 8.0}),
        ("w64-lora32", "linearize", {"lora_rank": 32, "lora_alpha": 64.0}),
        ("w64-kl1", "linearize", {"kl_weight": 1.0}),
        # training text: a user file (--user-text) instead of teacher-generated text; compare on the prose column
        ("w64-user-text", "linearize", {"data": "USER_TEXT"}),
    ],
    "hybridize": [
        (f"r{int(r * 100):02d}-{sel}", "hybridize",
         {"ratio": r, **({"score": "next-token"} if sel == "measured" else {"select": "interval", "score": "none"})})
        for r in (0.1, 0.25, 0.5) for sel in ("measured", "interval")
    ] + [("r25-measured-transfer", "hybridize", {"ratio": 0.25, "score": "transfer"})],
}


def _scaled(overrides: dict, scale: float) -> dict:
    out = dict(overrides)
    for key in ("generate_tokens", "stage1_tokens", "stage2_tokens", "score_tokens"):
        if key in out and out[key]:
            out[key] = max(1, int(out[key] * scale))
    return out


def _prose_ppl(model, tokenizer, context: int) -> dict:
    from effconv.eval.quality import perplexity_report

    text = PROSE.read_text()
    docs = [d.strip() for d in text.split("\n---\n") if d.strip()]
    seqs = [[tokenizer.bos_token_id] + tokenizer(d, add_special_tokens=False)["input_ids"]
            if tokenizer.bos_token_id is not None else tokenizer(d)["input_ids"] for d in docs]
    return perplexity_report(model, seqs, context=context, stride=context // 2, text_bytes=len(text.encode()))


def _load_export(path: Path, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def run_plan(plan: str, out: Path, *, only: list[str] | None, scale: float, model: str | None, device: str,
             data: str | None, user_text: str | None = None) -> None:
    import torch

    from effconv.eval.run import greedy_generations
    from effconv.pipelines.hybridize import HybridizeConfig, hybridize
    from effconv.pipelines.linearize import LinearizeConfig, linearize
    from effconv.io.sources import load_teacher

    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    done = {json.loads(line)["name"] for line in log.read_text().splitlines()} if log.exists() else set()
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    context = 1024 if dev.type == "cuda" else 256

    teacher_file = out / "teacher.json"
    if not teacher_file.exists():
        teacher, tok, _ = load_teacher(model, dtype=dtype, device=dev)
        teacher.eval()
        record = {"prose": _prose_ppl(teacher, tok, context), "samples": greedy_generations(teacher, tok, PROMPTS, 48),
                  "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
        teacher_file.write_text(json.dumps(record, indent=2))
        del teacher
    for name, command, overrides in PLANS[plan]:
        if (only and name not in only) or name in done:
            continue
        settings = _scaled({**BASE, **overrides}, scale)
        if overrides.get("data") == "USER_TEXT":
            if not user_text:
                print(f"[ablations] {name}: skipped, needs --user-text", flush=True)
                continue
            settings["data"] = user_text
        else:
            settings["data"] = data
        settings.update(model=model, out=str(out / "models" / name), overwrite=True, progress=False, device=device)
        cls, fn = (HybridizeConfig, hybridize) if command == "hybridize" else (LinearizeConfig, linearize)
        cfg = cls(**{k: v for k, v in settings.items() if k in {f.name for f in dataclasses.fields(cls)}})
        start = time.perf_counter()
        result = fn(cfg)
        wall = time.perf_counter() - start
        student, tok = _load_export(Path(cfg.out), dev, dtype)
        record = {"name": name, "command": command, "settings": dataclasses.asdict(cfg), "wall_seconds": round(wall, 1),
                  "metrics": result.metrics, "prose": _prose_ppl(student, tok, context),
                  "samples": greedy_generations(student, tok, PROMPTS, 48)}
        if command == "hybridize":
            record["softmax_layers"] = result.softmax_layers
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"[ablations] {name}: val ppl {result.metrics.get('stage2_val_ppl', result.metrics.get('stage1_val_ppl')):.3f}"
              f" prose ppl {record['prose']['perplexity']:.2f} wall {wall:.0f}s", flush=True)
        del student
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def _final_ppl(metrics: dict) -> float:
    return metrics.get("stage2_val_ppl", metrics.get("stage1_val_ppl", math.nan))


def report(dirs: list[Path], plots: Path | None) -> str:
    """Markdown table of every run in the given sweep directories (and bar charts when --plots is given)."""
    lines = []
    rows = []
    for d in dirs:
        teacher = json.loads((d / "teacher.json").read_text())
        for line in (d / "runs.jsonl").read_text().splitlines():
            r = json.loads(line)
            m = r["metrics"]
            tval = m["teacher_val_ppl"]
            rows.append(dict(
                sweep=d.name, name=r["name"], val=_final_ppl(m), val_ratio=_final_ppl(m) / tval, stage1=m["stage1_val_ppl"],
                teacher_val=tval, prose=r["prose"]["perplexity"], prose_ratio=r["prose"]["perplexity"] / teacher["prose"]["perplexity"],
                s1_tps=m.get("stage1", {}).get("tokens_per_second"), s2_tps=m.get("stage2", {}).get("tokens_per_second"),
                tokens=r["settings"]["stage1_tokens"] + r["settings"]["stage2_tokens"], wall=r["wall_seconds"],
                kept=r.get("softmax_layers"), sample=r["samples"][0]))
    lines.append("| sweep | run | stage-1+2 tokens | val ppl after stage 1 | val ppl final | x teacher | prose ppl | x teacher "
                 "| stage-1 tok/s | stage-2 tok/s | wall s | softmax layers |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lines.append(f"| {r['sweep']} | {r['name']} | {r['tokens'] / 1e6:.2f}M | {r['stage1']:.3f} | {r['val']:.3f} | "
                     f"{r['val_ratio']:.3f} | {r['prose']:.2f} | {r['prose_ratio']:.3f} | "
                     f"{r['s1_tps'] or '-'} | {r['s2_tps'] or '-'} | {r['wall']} | {r['kept'] if r['kept'] else '-'} |")
    if plots is not None and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plots.mkdir(parents=True, exist_ok=True)
        for sweep in sorted({r["sweep"] for r in rows}):
            sel = [r for r in rows if r["sweep"] == sweep]
            fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(sel)), 3.5))
            x = range(len(sel))
            ax.bar([i - 0.2 for i in x], [r["val_ratio"] for r in sel], 0.4, label="held-out teacher text")
            ax.bar([i + 0.2 for i in x], [r["prose_ratio"] for r in sel], 0.4, label="held-out prose")
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xticks(list(x), [r["name"] for r in sel], rotation=30, ha="right")
            ax.set_ylabel("perplexity / teacher's")
            ax.set_title(f"{sweep}: equal token budget")
            ax.legend()
            fig.tight_layout()
            fig.savefig(plots / f"ablation-{sweep}.png", dpi=110)
            plt.close(fig)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--plan", choices=sorted(PLANS), required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--only", default=None, help="comma-separated run names")
    r.add_argument("--scale", type=float, default=1.0, help="multiply every token budget")
    r.add_argument("--model", default=None)
    r.add_argument("--device", default="auto")
    r.add_argument("--data", default=None, help="training text instead of teacher-generated")
    r.add_argument("--user-text", default=None, help="text/JSONL file for the user-text run")
    g = sub.add_parser("report")
    g.add_argument("dirs", type=Path, nargs="+")
    g.add_argument("--plots", type=Path, default=None)
    a = p.parse_args()
    if a.cmd == "run":
        run_plan(a.plan, a.out, only=a.only.split(",") if a.only else None, scale=a.scale, model=a.model,
                 device=a.device, data=a.data, user_text=a.user_text)
    else:
        print(report(a.dirs, a.plots))


if __name__ == "__main__":
    main()
