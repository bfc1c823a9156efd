"""Stage-1 attention-transfer throughput on a SmolLM2-135M-shaped model (random weights: speed needs no weights).

Times one optimizer step of attention transfer (transfer-mode forward over all layers + backward into the
feature maps + AdamW) per attention backend and window, beside the teacher's plain forward in the same run.
    python bench/stage1_throughput.py --out stage1.json [--batch 32 --seq-len 1024]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers as tf

from effconv.linearize import LinearizeConfig, attention_transfer_loss, make_student


def smollm2_config() -> tf.LlamaConfig:
    return tf.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True,
    )


def timed(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--kernels", nargs="+", default=["triton", "reference"])
    parser.add_argument("--windows", nargs="+", type=int, default=[64, 0])
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    config = smollm2_config()
    config._attn_implementation = "sdpa"
    teacher = tf.LlamaForCausalLM(config).to(device, torch.bfloat16).eval()
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device)
    tokens = batch.numel()
    results = {"device": torch.cuda.get_device_name(), "batch": args.batch, "seq_len": args.seq_len, "runs": []}

    with torch.no_grad():
        sec = timed(lambda: teacher(batch, use_cache=False), args.steps, args.warmup)
    results["teacher_forward_tokens_per_s"] = tokens / sec
    print(f"teacher forward: {tokens / sec:,.0f} tokens/s")

    for window in args.windows:
        for kernel in args.kernels:
            student = make_student(teacher, LinearizeConfig(window=window, kernel=kernel), device)
            params = [p for p in student.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-3)

            def step():
                loss = attention_transfer_loss(student, batch, last_layer=config.num_hidden_layers - 1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            torch.cuda.reset_peak_memory_stats()
            try:
                sec = timed(step, args.steps, args.warmup)
                row = {"window": window, "kernel": kernel, "tokens_per_s": tokens / sec, "step_ms": sec * 1e3,
                       "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
            except torch.cuda.OutOfMemoryError:
                row = {"window": window, "kernel": kernel, "error": "OOM"}
            print(row)
            results["runs"].append(row)
            del student, opt, params
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
