"""Sparse attention benchmark: the sliding-window (+ sinks) and top-k block-sparse Triton kernels against
torch SDPA (flash backend, causal), bf16, H = 16 heads, head dim 64, B*T = 16384 tokens (B = 1 from 16K on),
T in {4K, 8K, 16K, 32K}. Per method: forward and forward+backward time (triton.testing.do_bench, median ms)
and the peak memory of one forward+backward (torch.cuda.max_memory_allocated, MiB, inputs included).

    python bench/sparse.py --out sparse.json          # H100, about a minute
    TRITON_INTERPRET=1 python bench/sparse.py --tiny --out tiny.json   # CPU smoke test (timings meaningless)

Methods
    sdpa        F.scaled_dot_product_attention(is_causal=True), flash backend on CUDA
    window512   sliding_window_attention, window 512, 64 sink tokens
    window2048  sliding_window_attention, window 2048, 64 sink tokens
    topk8       block_sparse_attention, 64-token blocks, top-8 earlier blocks + own (576 keys per query),
                selection (block sums + one matmul + a Triton top-k) included in the time; the row also
                has select_ms (the selection alone) and attn_fwd_ms (the forward with the selection given)

Off CUDA (--tiny) the Triton kernels run through the interpreter: TRITON_INTERPRET=1 is set if missing, and
nothing touches torch.cuda.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))

TOKENS = 16384
HEADS = 16
HEAD_DIM = 64


def methods(on_gpu: bool):
    import effconv_kernels as ek

    backend = "triton"

    def sdpa(q, k, v):
        if on_gpu:
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def window(w):
        return lambda q, k, v: ek.sliding_window_attention(q, k, v, window=w, sinks=64, scale=HEAD_DIM ** -0.5,
                                                           backend=backend)

    def topk(n):
        return lambda q, k, v: ek.block_sparse_attention(q, k, v, block_size=64, topk=n, scale=HEAD_DIM ** -0.5,
                                                         backend=backend)

    return {"sdpa": sdpa, "window512": window(512), "window2048": window(2048), "topk8": topk(8)}


def time_ms(fn, on_gpu: bool, rep_ms: int) -> float:
    if on_gpu:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=rep_ms))
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def topk_split(q, k, v, n: int, on_gpu: bool, rep_ms: int) -> dict:
    """The top-k forward in two parts: the selection alone, and the attention kernel with the selection given."""
    from effconv_kernels.block_sparse.triton import triton_select_key_blocks
    from effconv_kernels.common.block_list_attn import block_list_attention

    def select():
        return triton_select_key_blocks(q, k, block_size=64, topk=n, with_counts=True)

    idx, nsel = select()
    t = q.shape[2]
    with torch.no_grad():
        attn = time_ms(lambda: block_list_attention(q, k, v, idx, block=64, window=t + 1, sinks=0,
                                                    scale=HEAD_DIM ** -0.5, nsel=nsel), on_gpu, rep_ms)
    return {"select_ms": time_ms(select, on_gpu, rep_ms), "attn_fwd_ms": attn}


def run(lengths, on_gpu: bool, rep_ms: int, budget_s: float) -> list[dict]:
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    rows = []
    start = time.perf_counter()
    for t in lengths:
        b = max(1, TOKENS // t) if on_gpu else 1
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(b, HEADS, t, HEAD_DIM, device=device, dtype=dtype, generator=g).requires_grad_()
                   for _ in range(3))
        do = torch.randn_like(q)
        for name, fn in methods(on_gpu).items():
            row = {"method": name, "T": t, "B": b, "H": HEADS, "D": HEAD_DIM, "dtype": str(dtype).split(".")[-1]}
            if time.perf_counter() - start > budget_s:
                row["skipped"] = "time budget"
                rows.append(row)
                continue
            try:
                with torch.no_grad():
                    row["fwd_ms"] = time_ms(lambda: fn(q, k, v), on_gpu, rep_ms)

                def fwd_bwd():
                    q.grad = k.grad = v.grad = None
                    fn(q, k, v).backward(do)

                row["fwd_bwd_ms"] = time_ms(fwd_bwd, on_gpu, rep_ms)
                if name.startswith("topk"):
                    row.update(topk_split(q, k, v, int(name[4:]), on_gpu, rep_ms))
                if on_gpu:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    fwd_bwd()
                    torch.cuda.synchronize()
                    row["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            except Exception as e:  # noqa: BLE001 - record the failure, keep benchmarking the rest
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
        q.grad = k.grad = v.grad = None
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tiny", action="store_true", help="T = 80 on CPU (TRITON_INTERPRET=1): a smoke test")
    p.add_argument("--rep-ms", type=int, default=50)
    p.add_argument("--budget-s", type=float, default=100.0, help="skip remaining rows after this long")
    args = p.parse_args(argv)
    on_gpu = not args.tiny and torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before effconv_kernels' Triton modules are imported
    if not on_gpu and not args.tiny:
        p.error("needs CUDA; use --tiny (with TRITON_INTERPRET=1) for a CPU smoke test")
    global TOKENS, HEADS, HEAD_DIM
    if args.tiny:
        TOKENS, HEADS, HEAD_DIM = 80, 2, 16
    lengths = [80] if args.tiny else [4096, 8192, 16384, 32768]
    t0 = time.perf_counter()
    rows = run(lengths, on_gpu, args.rep_ms, args.budget_s)
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if on_gpu else "cpu (interpreter; timings meaningless)"}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    report = {"benchmark": "sparse attention vs SDPA flash (causal)", "env": env, "tokens_per_batch": TOKENS,
              "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
