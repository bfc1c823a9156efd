"""Decode speed and memory: converted model vs its teacher through the same static-step harness.

For each model, batch and context: prefill the context (in --prefill-chunk pieces), run one eager step, capture
the step in a CUDA graph (StaticDecoder, effconv/generation/; the teacher decodes from transformers' StaticCache),
warm up, then time --repeats blocks of --steps greedy steps; tokens/s = batch * steps / median block time. Peak
CUDA memory is reported for the whole run of a point (prefill included) and for decoding alone (reset after the
prefill: weights + cache + graph pool). The plain `generate` figure (batch 1, no static cache, no graph) is added
for reference. A SmolLM2-135M-shaped model with random weights by default (speed needs no weights).
    python bench/decode.py --out decode.json
    python bench/decode.py --teacher DIR --student EXPORT_DIR --out decode.json   # real weights
    python bench/decode.py --tiny --device cpu --out runs/decode-tiny.json        # CPU smoke test (eager)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from effconv.generation.fast_decode import StaticDecoder  # noqa: E402
from effconv.conversion.student import build_student, effconv_config_from_teacher  # noqa: E402


def smollm2_config(tiny: bool) -> tf.LlamaConfig:
    if tiny:
        return tf.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
                              tie_word_embeddings=True)
    return tf.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def mib(n: int) -> float:
    return round(n / 2**20, 1)


def measure(model, batch: int, context: int, args, device) -> dict:
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, context), device=device, generator=None)
    new_tokens = 1 + args.warmup + args.steps * args.repeats + 1
    decoder = StaticDecoder(model, max_new_tokens=new_tokens, prefill_chunk=args.prefill_chunk,
                            use_cuda_graph=None if device.type == "cuda" else False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    t0 = time.perf_counter()
    decoder.prefill(ids)
    sync(device)
    prefill_s = time.perf_counter() - t0
    peak_prefill = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(1 + args.warmup):  # eager step, capture + replays
        decoder.step()
    sync(device)
    blocks = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            decoder.step()
        sync(device)
        blocks.append(time.perf_counter() - t0)
    sec = statistics.median(blocks)
    peak_decode = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    cache_bytes = decoder.cache.nbytes() if hasattr(decoder.cache, "nbytes") else sum(
        t.numel() * t.element_size() for layer in decoder.cache.layers for t in (layer.keys, layer.values)
        if t is not None)
    decoder.finish()
    row = {
        "batch": batch, "context": context, "tokens_per_s": batch * args.steps / sec,
        "ms_per_step": 1e3 * sec / args.steps, "cuda_graph": decoder.graph is not None,
        "prefill_s": prefill_s, "cache_bytes": cache_bytes, "cache_mib": mib(cache_bytes),
        "peak_mib": mib(max(peak_prefill, peak_decode)), "peak_decode_mib": mib(peak_decode),
        "peak_prefill_mib": mib(peak_prefill), "weights_and_other_mib_before_prefill": mib(base),
    }
    del decoder
    return row


def generate_figure(model, context: int, steps: int, device) -> dict:
    """Plain HF generate at batch 1: (time(1 + steps new tokens) - time(1 new token)) / steps."""
    ids = torch.randint(3, model.config.vocab_size, (1, context), device=device)
    kw = dict(do_sample=False, pad_token_id=0)

    def run(n):
        sync(device)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        sync(device)
        return time.perf_counter() - t0

    run(2)  # warm-up
    t1, tn = run(1), run(1 + steps)
    return {"batch": 1, "context": context, "tokens_per_s": steps / max(tn - t1, 1e-9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--steps", type=int, default=32, help="decode steps per timed block")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks; the median is kept")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--window", type=int, default=64, help="converted model's window (0: pure linear)")
    parser.add_argument("--prefill-chunk", type=int, default=512,
                        help="prompt fed in pieces of this many tokens (both models): bounds prefill activations")
    parser.add_argument("--generate-steps", type=int, default=32)
    parser.add_argument("--teacher", help="HF model dir (default: SmolLM2-135M-shaped, random weights)")
    parser.add_argument("--student", help="effconv export dir (default: converted from the teacher, all layers)")
    parser.add_argument("--tiny", action="store_true", help="tiny random model (CPU smoke test)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.teacher:
        teacher = tf.AutoModelForCausalLM.from_pretrained(args.teacher, dtype=dtype, attn_implementation="sdpa")
    else:
        config = smollm2_config(args.tiny)
        config._attn_implementation = "sdpa"
        teacher = tf.LlamaForCausalLM(config)
    teacher = teacher.to(device, dtype).eval()
    if args.student:
        student = tf.AutoModelForCausalLM.from_pretrained(args.student, dtype=dtype, trust_remote_code=True)
    else:
        student = build_student(teacher, effconv_config_from_teacher(teacher.config, window_size=args.window))
    student = student.to(device, dtype).eval()

    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": args.dtype,
               "window": args.window, "steps": args.steps, "repeats": args.repeats,
               "prefill_chunk": args.prefill_chunk, "random_weights": not (args.teacher or args.student), "runs": []}
    with torch.no_grad():
        for name, model in (("converted", student), ("teacher", teacher)):
            for batch in args.batches:
                for context in args.contexts:
                    row = {"model": name, **measure(model, batch, context, args, device)}
                    results["runs"].append(row)
                    print(f"{name:9s} B={batch:<3d} ctx={context:<5d} {row['tokens_per_s']:10.1f} tok/s "
                          f"{row['ms_per_step']:7.2f} ms/step peak {row['peak_mib']:8.1f} MiB "
                          f"(decode {row['peak_decode_mib']:8.1f}) graph={row['cuda_graph']}", flush=True)
        ctx = min(args.contexts)
        results["generate_batch1"] = {name: generate_figure(m, ctx, args.generate_steps, device)
                                      for name, m in (("teacher", teacher), ("converted", student))}
        print("generate (batch 1):", json.dumps(results["generate_batch1"]), flush=True)
    results["targets"] = targets(results["runs"])
    print(json.dumps(results["targets"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


def targets(runs: list[dict]) -> dict:
    """Decode targets (batch-16 speed-up at 8K, peak-memory growth 512 -> 8K, batch-1 tokens/s), computed from this
    run (None where a point was not measured)."""
    def get(model, batch, context, key):
        for r in runs:
            if (r["model"], r["batch"], r["context"]) == (model, batch, context):
                return r[key]
        return None

    out = {}
    conv, teach = get("converted", 16, 8192, "tokens_per_s"), get("teacher", 16, 8192, "tokens_per_s")
    if conv and teach:
        out["b16_8k_speedup_vs_teacher"] = conv / teach  # target >= 3
    for key in ("peak_mib", "peak_decode_mib"):
        hi, lo = get("converted", 16, 8192, key), get("converted", 16, 512, key)
        if hi and lo:
            out[f"b16_{key}_8k_over_512"] = hi / lo  # target <= 1.1
    b1 = [r["tokens_per_s"] for r in runs if r["model"] == "converted" and r["batch"] == 1]
    if b1:
        out["converted_b1_min_tokens_per_s"] = min(b1)  # target >= 90
    return out


if __name__ == "__main__":
    main()
