"""Peak memory of linearize stage 1 (attention transfer), full-model mode vs block-wise (--layers-per-block K).

Every configuration runs in a fresh subprocess (peak RSS is per process). The child resets the kernel's RSS high-water
mark (/proc/self/clear_refs = 5) right before stage 1 and reads VmHWM right after it, so `stage1_peak_above_start`
is the memory stage 1 adds on top of what was resident when it started (the model in CPU memory, the data, torch).
On CPU the "device" is the CPU, so the model weights are resident in both modes; what block-wise mode saves here is
the activation memory of the layers outside the block. On a GPU the block-wise device memory is one block's weights
plus that (see docs/scale.md for the formula and its constants).

    python bench/blockwise_memory.py --out runs/blockwise-memory-cpu.json                     # SmolLM2-135M, CPU
    python bench/blockwise_memory.py --model tiny --batch-sizes 2 --modes full 1 --steps 2    # seconds-long smoke test
    PYTHONPATH=$PWD:$PWD/kernels python bench/blockwise_memory.py --device cuda --model smollm2-random \
        --batch-sizes 8 16 --seq-len 1024 --modes full 1 5 --out runs/blockwise-memory-cuda.json  # GPU: CUDA peaks

Writes one JSON file: per run the mode, batch, sequence length, resident MiB before stage 1, stage-1 peak MiB, the
peak before stage 1 (loading, data, teacher perplexity), and a least-squares fit per mode of (peak above start) = fixed + slope x tokens per step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS (Linux >= 4.0)


def child(args) -> dict:
    import gc

    import torch

    import effconv.distill.blockwise as blockwise
    import effconv.pipelines.linearize as lin

    measured: dict = {}
    cuda = args.device == "cuda"

    def measure(fn):
        def wrapper(*a, **kw):
            gc.collect()
            start, before = _status_kib("VmRSS"), _status_kib("VmHWM")
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                cuda_start = torch.cuda.memory_allocated()
            _reset_peak()
            result = fn(*a, **kw)
            measured.update(peak_before_stage1_mib=before / 1024, start_mib=start / 1024,
                            stage1_peak_mib=_status_kib("VmHWM") / 1024)
            if cuda:  # device memory: the numbers that matter on a GPU
                measured.update(cuda_start_mib=cuda_start / 2**20,
                                cuda_stage1_peak_mib=torch.cuda.max_memory_allocated() / 2**20)
            return result
        return wrapper

    if args.mode == "full":
        lin.run_stage = measure(lin.run_stage)  # stage 2 is off: the only run_stage call is stage 1
    else:
        blockwise.blockwise_attention_transfer = measure(blockwise.blockwise_attention_transfer)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model in ("tiny", "smollm2-random"):  # no model files needed (e.g. a GPU host without network)
            sys.path.insert(0, str(ROOT / "tests"))
            from conftest import tiny_teacher
            from helpers_tokenizer import make_tiny_tokenizer

            model = tmp / "teacher"
            if args.model == "tiny":
                tiny_teacher("llama").save_pretrained(model)
            else:  # SmolLM2-135M's shape with random weights (as bench/scale_gpu.py)
                import transformers as tf

                torch.manual_seed(0)
                tf.LlamaForCausalLM(tf.LlamaConfig(
                    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, tie_word_embeddings=True)).save_pretrained(model)
            make_tiny_tokenizer().save_pretrained(model)
            model = str(model)
        else:
            model = None if args.model == "default" else args.model
        text = tmp / "train.txt"  # the repository's own docs: plain English, no network needed
        text.write_text("\n\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]))
        cfg = lin.LinearizeConfig(
            model=model, data=str(text), out=str(tmp / "out"), seq_len=args.seq_len, batch_size=args.batch_size,
            stage1_tokens=args.steps * args.batch_size * args.seq_len, stage2_tokens=0, max_val_blocks=args.batch_size,
            eval_every=args.steps, checkpoint_every=args.steps, progress=False,
            dtype="float32" if args.device == "cpu" else "bfloat16", device=args.device,
            layers_per_block=None if args.mode == "full" else int(args.mode),
        )
        result = lin.linearize(cfg)
        import transformers

        config = transformers.AutoConfig.from_pretrained(cfg.out)
        params = sum(t.numel() for t in __import__("safetensors.torch", fromlist=["x"]).load_file(
            str(Path(cfg.out) / "model.safetensors")).values())
    return {
        "mode": args.mode, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "tokens_per_step": args.batch_size * args.seq_len, "steps": args.steps,
        "hidden_size": config.hidden_size, "num_layers": config.num_hidden_layers, "parameters": params,
        "device": args.device, "dtype": cfg.dtype, "torch_threads": torch.get_num_threads(),
        **{k: round(v, 1) for k, v in measured.items()},
        "stage1_peak_above_start_mib": round(measured["stage1_peak_mib"] - measured["start_mib"], 1),
        "final_train_mse": result.metrics["stage1"]["final_train_mse"],
    }


def fit(rows: list[dict], key: str = "stage1_peak_above_start_mib") -> dict:
    """Least squares: rows[key] (MiB) = fixed + slope x tokens per step, per mode."""
    out = {}
    for mode in sorted({r["mode"] for r in rows}):
        pts = [(r["tokens_per_step"], r[key]) for r in rows if r["mode"] == mode and key in r]
        if len({x for x, _ in pts}) < 2:
            continue
        n = len(pts)
        mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
        slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
        out[mode] = {"fixed_mib": round(my - slope * mx, 1), "mib_per_1k_tokens": round(1024 * slope, 2),
                     "bytes_per_token": round(slope * 2**20)}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="default",
                   help="default (SmolLM2-135M-Instruct), smollm2-random (its shape, random weights), tiny, or a path")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--modes", nargs="+", default=["full", "1", "5"], help="full and/or layers per block")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[4, 8])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true")
    p.add_argument("--mode", default="full")
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return
    rows = []
    for batch in args.batch_sizes:
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--child", "--model", args.model, "--device", args.device, "--mode", mode, "--batch-size", str(batch),
                   "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"child failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
            rows.append(json.loads(lines[-1][7:]))
            print(json.dumps(rows[-1]), flush=True)
    summary = {"runs": rows, "fit": fit(rows)}
    if args.device == "cuda":
        summary["fit_cuda_peak"] = fit(rows, "cuda_stage1_peak_mib")
    print(json.dumps(summary["fit"], indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
