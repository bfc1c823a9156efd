"""`model.generate` speed of an effconv export against its teacher, as users run them (one JSON file).

    python bench/generate.py --export EXPORT_DIR --teacher TEACHER --out runs/generate.json
    python bench/generate.py --tiny --device cpu --out /tmp/generate.json      # random tiny models, any machine
    python bench/generate.py --random-shape smollm2-135m-w64 --out runs/generate-w64.json   # no weights needed

Rows (each: model, batch, context, prefill ms, decode tokens/s, peak memory, decode path):
* `student`: the export loaded through effconv (its fast generate path by itself);
* `student-no-effconv`: the same export in a subprocess where effconv and effconv_kernels cannot be imported, loaded
  by plain transformers (trust_remote_code): the kernels it runs are the ones it ships;
* `teacher-dynamic` / `teacher-static`: the teacher (GGUF file, HF directory or hub id) with transformers' default
  cache, and with its StaticCache (which transformers compiles with torch.compile on CUDA). Contexts run from the
  longest down, so the static cache keeps one size (one compile) per batch size.
Summary: per (batch, context) the student's decode speed over the faster teacher mode; batch 1 at 4K; the peak
memory at 8K over 512 at batch 16, both generating with `--memory-prefill-chunk` token prefill chunks.
Timing: effconv/eval/generate_speed.py (decode tokens/s from generate calls of 1 and N+1 new tokens).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMING_FILE = ROOT / "effconv" / "eval" / "generate_speed.py"


def load_timing():
    """effconv/eval/generate_speed.py as a standalone module (the no-effconv worker must not import effconv)."""
    spec = importlib.util.spec_from_file_location("generate_speed", TIMING_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", help="effconv export directory")
    p.add_argument("--teacher", help="teacher: GGUF file, HF directory or hub id")
    p.add_argument("--tiny", action="store_true", help="random tiny teacher and export (CPU smoke run)")
    p.add_argument("--random-shape", choices=sorted(RANDOM_SHAPES),
                   help="a random-weight SmolLM2-135M teacher and an export of a recipe's shape (speed does not "
                        "depend on the weight values, so no weights need to be present)")
    p.add_argument("--out", required=True, help="JSON output file")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per cell")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--models", nargs="+", default=["student", "student-no-effconv", "teacher-dynamic", "teacher-static"],
                   choices=["student", "student-no-effconv", "teacher-dynamic", "teacher-static"])
    p.add_argument("--memory-contexts", type=int, nargs=2, default=[512, 8192])
    p.add_argument("--memory-batch", type=int, default=16)
    p.add_argument("--memory-prefill-chunk", type=int, default=512)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # the no-effconv subprocess
    return p.parse_args(argv)


def cells(args):
    """(batch, context) in the order they run: per batch, longest context first."""
    return [(b, c) for b in args.batches for c in sorted(args.contexts, reverse=True)]


def measure(model, name: str, args, timing, teacher_mode: str | None = None, log=print) -> list[dict]:
    extra = timing.teacher_kwargs(teacher_mode) if teacher_mode else {}
    rows = []
    for batch, context in cells(args):
        row = {"model": name, "batch": batch, "context": context}
        row.update(timing.time_generate(model, batch_size=batch, context=context, new_tokens=args.new_tokens,
                                        repeats=args.repeats, generate_kwargs=extra))
        row["path"] = timing.decode_path(model, teacher_mode)
        rows.append(row)
        log(json.dumps(row))
    if args.memory_contexts and teacher_mode != "static":  # chunked prefill would compile the static teacher again
        for context in args.memory_contexts:
            row = {"model": name, "batch": args.memory_batch, "context": context, "memory_cell": True,
                   "prefill_chunk": args.memory_prefill_chunk}
            row.update(timing.time_generate(model, batch_size=args.memory_batch, context=context,
                                            new_tokens=args.new_tokens, repeats=1, generate_kwargs=extra,
                                            prefill_chunk=args.memory_prefill_chunk))
            row["path"] = timing.decode_path(model, teacher_mode)
            rows.append(row)
            log(json.dumps(row))
    return rows


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def worker(args) -> None:
    """The export through plain transformers, effconv unimportable; rows as JSON lines on stdout."""
    import importlib.abc

    class NoEffconv(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("effconv", "effconv_kernels"):
                raise ImportError(f"{name} is hidden: this process measures the export without effconv")

    sys.meta_path.insert(0, NoEffconv())
    sys.path = [p for p in sys.path if Path(p or ".").resolve() not in (ROOT, ROOT / "kernels")]
    from transformers import AutoModelForCausalLM

    timing = load_timing()
    model = AutoModelForCausalLM.from_pretrained(args.export, trust_remote_code=True,
                                                 dtype=torch_dtype(args.dtype)).to(args.device).eval()
    backend = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".backend"]
    print(json.dumps({"kernels": backend.KERNELS_SOURCE, "kernels_missing": backend.KERNELS_MISSING}), flush=True)
    measure(model, "student-no-effconv", args, timing, log=lambda line: print(line, flush=True))


def run_worker(args) -> tuple[list[dict], dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--export", str(args.export), "--out", args.out,
           "--device", args.device, "--dtype", args.dtype, "--new-tokens", str(args.new_tokens),
           "--repeats", str(args.repeats), "--batches", *map(str, args.batches), "--contexts", *map(str, args.contexts),
           "--memory-batch", str(args.memory_batch), "--memory-prefill-chunk", str(args.memory_prefill_chunk),
           "--memory-contexts", *map(str, args.memory_contexts)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with tempfile.TemporaryDirectory() as modules:
        env["HF_MODULES_CACHE"] = modules  # a fresh copy of the export's remote code
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if done.returncode != 0:
        raise SystemExit(f"the no-effconv run failed:\n{done.stderr[-3000:]}")
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return [r for r in lines if "model" in r], next(r for r in lines if "kernels" in r)


def tiny_models(directory: Path, dtype) -> tuple[Path, Path]:
    """A tiny random Llama teacher and an effconv export of it with a kept softmax layer (hybridize's layout)."""
    import torch
    import transformers

    from effconv.conversion.student import build_student, effconv_config_from_teacher
    from effconv.io.export import export_model

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=400, hidden_size=96, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=4096,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    teacher = transformers.LlamaForCausalLM(config).eval()
    teacher.save_pretrained(directory / "teacher")
    student = build_student(teacher, effconv_config_from_teacher(
        teacher.config, window_size=8, attention_types=["linear", "softmax", "linear"]))
    export_model(student, None, directory / "export")
    return directory / "export", directory / "teacher"


# SmolLM2-135M-Instruct's config; the layouts of the w64 recipe (window 64 + linear with decay, unrotated features)
# and the r25 recipe (window 128 + linear, the layers its measured score kept as softmax)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
R25_KEPT_LAYERS = [8, 12, 14, 18, 19, 20, 21, 23]
R25_LONG_KEPT_LAYERS = [2, 3, 8, 10, 15, 18, 20, 23]
RANDOM_SHAPES = {
    "smollm2-135m-w64": dict(window_size=64, kept=[], decay=True),
    "smollm2-135m-r25": dict(window_size=128, kept=R25_KEPT_LAYERS, decay=False),
    # the long recipes: gated linear part (PyTorch decode step), 4 sinks, unrotated features
    "smollm2-135m-w64-long": dict(window_size=64, kept=[], decay=True, gate=True, sinks=4),
    "smollm2-135m-r25-long": dict(window_size=128, kept=R25_LONG_KEPT_LAYERS, decay=True, gate=True, sinks=4),
}


def random_shape_student(shape: str, num_hidden_layers: int | None = None):
    """A random SmolLM2-135M-shaped teacher (optionally with fewer layers) and its student with a recipe's
    attention layout, in memory."""
    import torch
    import transformers

    from effconv.conversion.student import build_student, effconv_config_from_teacher

    torch.manual_seed(0)
    layout = RANDOM_SHAPES[shape]
    settings = {**SMOLLM2_135M, **({"num_hidden_layers": num_hidden_layers} if num_hidden_layers else {})}
    teacher = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)).eval()
    n = teacher.config.num_hidden_layers
    config = effconv_config_from_teacher(teacher.config, window_size=layout["window_size"], attention_types=[
        "softmax" if i in layout["kept"] else "linear" for i in range(n)])
    config.linear_decay, config.linear_rope = layout["decay"], not layout["decay"]
    config.linear_gate, config.linear_sinks = layout.get("gate", False), layout.get("sinks", 0)
    return teacher, build_student(teacher, config)


def random_shape_models(directory: Path, shape: str) -> tuple[Path, Path]:
    """A random SmolLM2-135M-shaped teacher and an export with a recipe's attention layout."""
    from effconv.io.export import export_model

    teacher, student = random_shape_student(shape)
    teacher.save_pretrained(directory / "teacher")
    export_model(student, None, directory / "export")
    return directory / "export", directory / "teacher"


def summary(rows: list[dict]) -> dict:
    ok = {(r["model"], r["batch"], r["context"]): r for r in rows if r["status"] == "ok" and not r.get("memory_cell")}
    ratios = {}
    for (model, batch, context), row in ok.items():
        if not model.startswith("student"):
            continue
        teachers = [ok[(t, batch, context)]["decode_tokens_per_s"] for t in ("teacher-dynamic", "teacher-static")
                    if (t, batch, context) in ok]
        if teachers:
            ratios[f"{model} b{batch} c{context}"] = row["decode_tokens_per_s"] / max(teachers)
    memory = {}
    for model in sorted({r["model"] for r in rows}):
        cells_ = sorted((r for r in rows if r["model"] == model and r.get("memory_cell") and r["status"] == "ok"
                         and r.get("peak_bytes")), key=lambda r: r["context"])
        if len(cells_) == 2:
            memory[model] = {"contexts": [c["context"] for c in cells_], "peak_bytes": [c["peak_bytes"] for c in cells_],
                             "ratio": cells_[1]["peak_bytes"] / cells_[0]["peak_bytes"]}
    batch1_4k = {m: r["decode_tokens_per_s"] for (m, b, c), r in ok.items() if b == 1 and c == 4096}
    return {"decode_speedup_over_faster_teacher": ratios, "batch1_context4096_decode_tokens_per_s": batch1_4k,
            "peak_memory_long_over_short": memory,
            "oom": [f"{r['model']} b{r['batch']} c{r['context']}" for r in rows if r["status"] == "OOM"]}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    import torch

    import effconv  # noqa: F401 - registers the effconv model type with the Auto classes
    from effconv.io.sources import local_path, resolve_model_source
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(args.dtype)
    device = torch.device(args.device)
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        if args.tiny:
            args.export, args.teacher = tiny_models(Path(scratch), dtype)
        elif args.random_shape:
            args.export, args.teacher = random_shape_models(Path(scratch), args.random_shape)
        if not args.export or not args.teacher:
            raise SystemExit("pass --export and --teacher (or --tiny, or --random-shape)")
        random_models = args.tiny or args.random_shape
        timing = load_timing()
        rows, kernels = [], None
        for name in args.models:
            if name == "student-no-effconv":
                worker_rows, kernels = run_worker(args)
                rows += worker_rows
                continue
            spec = args.export if name == "student" else str(args.teacher)
            model = AutoModelForCausalLM.from_pretrained(local_path(resolve_model_source(spec)), dtype=dtype)
            model.to(device).eval()
            rows += measure(model, name, args, timing, None if name == "student" else name.split("-")[1])
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    import transformers

    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "triton": _version("triton"), "device": str(device), "dtype": args.dtype,
                        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                        "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - started, 1)},
        "export": f"random weights: {args.random_shape or 'tiny'}" if random_models else str(args.export),
        "teacher": f"random weights: {args.random_shape or 'tiny'}" if random_models else str(args.teacher), "no_effconv_kernels": kernels, "rows": rows, "summary": summary(rows),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 - not installed
        return None


if __name__ == "__main__":
    main()
