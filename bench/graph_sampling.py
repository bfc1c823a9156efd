"""Speed of GraphSampler (effconv/generation/; teacher text, --generation-mode graph) against `model.generate`, on a
SmolLM2-135M-shaped Llama with random weights (no weights needed), bf16 on CUDA, prompts of mixed lengths (left
padding), sampling as effconv.data does (temperature 0.8, top-k 50, top-p 0.95), fixed-length outputs (random
weights rarely write a stop token; no stop ids). Also checks, at a small batch, that greedy tokens agree with
`generate` (bf16 kernels differ between the masked and the unmasked path, so it reports the fraction of rows whose
first 16 tokens agree rather than asserting).

    python bench/graph_sampling.py --out graph-sampling.json           # GPU, about a minute
    python bench/graph_sampling.py --tiny                               # CPU smoke test
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
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from decode import smollm2_config  # noqa: E402

from effconv.generation.graph_sampling import GraphSampler  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_prompts(count, vocab, low, high, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (count,), generator=g).tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def greedy_agreement(model, device, vocab, rows=8, new=16):
    prompts = random_prompts(rows, vocab, 20, 60, seed=1)
    sampler = GraphSampler(model, batch_size=rows, max_prompt_len=60, max_new_tokens=new, stop_ids=[], pad_id=0,
                           do_sample=False)
    ours = sampler.generate(prompts)
    agree = 0
    for prompt, row in zip(prompts, ours):
        ref = model.generate(torch.tensor([prompt], device=device), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        agree += int(ref == row)
    return dict(rows=rows, new_tokens=new, rows_identical=agree, cuda_graph=sampler.graph is not None,
                graph_error=sampler.graph_error)


def time_sampler(model, device, vocab, batch, new_tokens, repeats):
    prompts = random_prompts(batch, vocab, 30, 120, seed=2)
    sampler = GraphSampler(model, batch_size=batch, max_prompt_len=120, max_new_tokens=new_tokens, stop_ids=[],
                           pad_id=0, do_sample=True, temperature=0.8, top_k=50, top_p=0.95)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    sampler.generate(prompts)  # warm-up: kernels, capture
    sync(device)
    warm = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = sampler.generate(prompts)
        sync(device)
        times.append(time.perf_counter() - t0)
    best = min(times)
    tokens = sum(len(r) for r in out)
    return dict(impl="graph_sampler", batch=batch, new_tokens=new_tokens, seconds=best, warmup_s=warm,
                tokens_per_s=tokens / best, cuda_graph=sampler.graph is not None, graph_error=sampler.graph_error,
                cache_gb=sum(layer.keys.numel() * 2 * layer.keys.element_size() for layer in sampler.cache.layers
                             if getattr(layer, "is_initialized", False)) / 1e9)


def time_generate(model, device, vocab, batch, new_tokens):
    prompts = random_prompts(batch, vocab, 30, 120, seed=2)
    width = max(map(len, prompts))
    ids = torch.zeros((batch, width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    kw = dict(attention_mask=mask.to(device), do_sample=True, temperature=0.8, top_p=0.95, top_k=50, pad_token_id=0,
              max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    model.generate(ids[:, :].to(device), **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
    sync(device)
    t0 = time.perf_counter()
    model.generate(ids.to(device), **kw)
    sync(device)
    dt = time.perf_counter() - t0
    return dict(impl="hf_generate", batch=batch, new_tokens=new_tokens, seconds=dt, tokens_per_s=batch * new_tokens / dt)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny config on the CPU (smoke test)")
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[256, 1024, 2048])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--generate-new-tokens", type=int, default=64, help="HF generate baseline (0: skip)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        args.batch_sizes, args.new_tokens, args.generate_new_tokens, args.repeats = [4], 8, 4, 1
    torch.manual_seed(0)
    config = smollm2_config(args.tiny)
    model = tf.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    report = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", dtype=str(dtype),
                  torch=torch.__version__, transformers=tf.__version__, rows=[])
    report["greedy_check"] = greedy_agreement(model, device, config.vocab_size, new=8 if args.tiny else 16)
    print(json.dumps(report["greedy_check"]), flush=True)
    for batch in args.batch_sizes:
        runs = [lambda: time_sampler(model, device, config.vocab_size, batch, args.new_tokens, args.repeats)]
        if args.generate_new_tokens:
            runs.append(lambda: time_generate(model, device, config.vocab_size, batch, args.generate_new_tokens))
        for run in runs:
            try:
                row = run()
            except Exception as error:  # noqa: BLE001 - record and go on
                row = dict(batch=batch, error=f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")
            if device.type == "cuda":
                row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
                torch.cuda.reset_peak_memory_stats()
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
