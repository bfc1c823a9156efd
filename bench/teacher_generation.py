"""How fast can the teacher write its own training text? HF `generate` (sampling, as effconv.data does) on a
SmolLM2-135M-shaped Llama with random weights, bf16, fixed-length outputs (min_new_tokens = max_new_tokens), for
batch sizes and cache implementations:

    dynamic          DynamicCache (transformers' default; effconv.data's setting until now)
    static           StaticCache, compilation disabled
    static-compile   StaticCache with transformers' automatic torch.compile of the decode step (CUDA graphs)

Reports new tokens per second (the first call of each configuration is a warm-up: compilation is reported
separately as warmup_s) and peak memory. JSON with --out.

    python bench/teacher_generation.py --out gen.json                     # GPU, ~2-4 minutes
    python bench/teacher_generation.py --tiny                              # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import smollm2_config  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_config(model, batch, prompt_len, new_tokens, cache, device):
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), device=device)
    mask = torch.ones_like(ids)
    mask[: batch // 2, : prompt_len // 4] = 0  # left padding on half the rows, as effconv.data batches have
    kw = dict(attention_mask=mask, do_sample=True, temperature=0.8, top_p=0.95, top_k=50, pad_token_id=0,
              max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    if cache != "dynamic":
        kw["cache_implementation"] = "static"
        kw["disable_compile"] = cache == "static"

    def once():
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
        sync(device)
        assert out.shape == (batch, prompt_len + new_tokens), out.shape
        return time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warm = once()
    timed = once()
    row = dict(batch=batch, cache=cache, prompt_len=prompt_len, new_tokens=new_tokens, warmup_s=round(warm, 2),
               seconds=round(timed, 3), tokens_per_s=round(batch * new_tokens / timed, 1),
               ms_per_step=round(timed / new_tokens * 1e3, 2))
    if device.type == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--configs", nargs="*", default=["512:dynamic", "2048:dynamic", "2048:static",
                                                       "2048:static-compile", "4096:dynamic"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--budget-s", type=float, default=240, help="skip configurations after this much time")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(smollm2_config(args.tiny)).to(device=device, dtype=dtype).eval()
    configs = args.configs
    new_tokens = args.new_tokens
    if args.tiny:
        configs, new_tokens = ["4:dynamic", "4:static"], 8
    rows, t0 = [], time.time()
    for spec in configs:
        if time.time() - t0 > args.budget_s:
            rows.append(dict(config=spec, skipped="time budget"))
            continue
        batch, cache = spec.split(":")
        try:
            row = run_config(model, int(batch), args.prompt_len, new_tokens, cache, device)
        except Exception as error:  # noqa: BLE001 - record and go on (a compile failure is a result too)
            row = dict(config=spec, error=f"{type(error).__name__}: {str(error)[:300]}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                  transformers=tf.__version__, rows=rows)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
