"""SmolLM2-135M -> 8 experts top-2: held-out perplexity of each upcycling method before training, then a short
distillation through the real pipeline. Writes JSON to --out (CPU-sized token budgets; see docs/moe.md).

    PYTHONPATH=$PWD:$PWD/kernels python bench/moe_upcycle_cpu.py --out runs/moe_upcycle_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from effconv import data as data_lib
from effconv.io.sources import cache_root, load_causal_lm
from effconv.eval.quality import next_token_loss, perplexity
from effconv.pipelines.moe_upcycle import MoeUpcycleConfig, moe_upcycle
from effconv.conversion.moe import collect_mlp_inputs, dense_effconv_model, upcycle
from effconv.distill.moe import expert_load, kl_to_teacher

VARIANTS = {
    "split-random": dict(method="split", split="random", router_init_std=0.1),
    "split-balanced": dict(method="split", split="balanced", router_init_std=0.1),
    "split-coactivation": dict(method="split", split="coactivation", router_init_std=0.1),
    "split-coactivation-uniform-router": dict(method="split", split="coactivation", router_init="uniform"),
    "split-coactivation-router-std1": dict(method="split", split="coactivation", router_init_std=1.0),
    "split-coactivation-shared1": dict(method="split", split="coactivation", experts=7, shared=1, router_init_std=0.1),
    "copy-G1": dict(method="copy", granularity=1),
    "copy-G2": dict(method="copy", granularity=2),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="JSON file to write (e.g. runs/moe_upcycle_cpu.json)")
    ap.add_argument("--generate-tokens", type=int, default=16000)
    ap.add_argument("--distill-tokens", type=int, default=40960)
    ap.add_argument("--distill-variants", default="split-coactivation", help="comma-separated; empty: no distillation")
    ap.add_argument("--data", default=None, help="text file/dir instead of teacher-generated text")
    ap.add_argument("--val-blocks", type=int, default=12)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    base = dict(experts=8, top_k=2, seq_len=256, batch_size=8, calibration_tokens=4096, generate_tokens=args.generate_tokens, data=args.data,
                generation_batch_size=32, val_fraction=0.15, max_val_blocks=12, device="cpu", progress=False)
    teacher, tokenizer, source = load_causal_lm(None)
    train, val, description = data_lib.prepare_data(
        args.data, tokenizer, 256, teacher_factory=lambda: (teacher, tokenizer), num_tokens=args.generate_tokens,
        cache_dir=cache_root() / "data", val_fraction=0.15, seed=0, generation_batch_size=32, progress=False)
    val = val[: args.val_blocks]
    dense = dense_effconv_model(teacher)
    dense.requires_grad_(False)
    report = {"model": source.description, "data": description, "val_tokens": int(val.numel()), "variants": {}}
    report["teacher_val_ppl"] = perplexity(next_token_loss(dense, val, batch_size=8))
    print("teacher ppl", report["teacher_val_ppl"], flush=True)
    calib = collect_mlp_inputs(dense, train, 4096, 8)
    for name in args.variants.split(","):
        overrides = VARIANTS[name]
        cfg = MoeUpcycleConfig(**{**base, **overrides})
        cfg.validate()
        t0 = time.time()
        moe = upcycle(dense, calib, cfg)
        seconds = time.time() - t0
        ppl = perplexity(next_token_loss(moe, val, batch_size=8))
        report["variants"][name] = {
            "settings": overrides, "val_ppl": ppl, "ppl_ratio": ppl / report["teacher_val_ppl"],
            "kl_to_teacher": kl_to_teacher(moe, dense, val, 8),
            "max_expert_share_per_layer": expert_load(moe, val, 8), "upcycle_seconds": round(seconds, 1)}
        print(name, ppl, flush=True)
        del moe
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    del teacher, dense, calib
    report["distillation"] = {}
    for name in filter(None, args.distill_variants.split(",")):
        for train in ("router", "experts"):
            cfg = MoeUpcycleConfig(**{**base, **VARIANTS[name]}, tokens=args.distill_tokens, train=train,
                                   lr=1e-3 if train == "router" else 1e-4, eval_every=5, checkpoint_every=100,
                                   out=tempfile.mkdtemp() + "/moe")
            result = moe_upcycle(cfg)
            m = result.metrics
            report["distillation"][f"{name}/{train}"] = {
                "config": dataclasses.asdict(cfg), "teacher_val_ppl": m["teacher_val_ppl"],
                "before_val_ppl": m["upcycled_val_ppl"], "before_kl": m["upcycled_kl"],
                "after_val_ppl": m["distilled_val_ppl"], "after_kl": m["distilled_kl"],
                "train_kl_first": m["distillation"]["first_train_loss"], "train_kl_last": m["distillation"]["final_train_loss"],
                "val_kl_curve": m["distillation"]["val_kl"], "steps": m["distillation"]["steps"],
                "tokens": m["distillation"]["tokens"], "export_format": result.export_format}
            print(name, train, report["distillation"][f"{name}/{train}"]["after_val_ppl"], flush=True)
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
