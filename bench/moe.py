"""MoE experts benchmark: effconv's Triton kernel against transformers' per-expert loop and a dense FFN.

Shapes (bf16, top-2 of 8 experts, random router):
    smol_split   D=576,  I=192  (SmolLM2-135M's FFN of 1536 split into 8 experts)
    smol_copy    D=576,  I=1536 (SmolLM2-135M's FFN copied into 8 experts)
    large        D=2048, I=1024 (an 8192 FFN split into 8 experts)
with N in {4096, 8192, 16384, 32768} tokens. For each method: forward and forward+backward time
(triton.testing.do_bench, median, ms; backward gives grads for hidden, routing weights and all weights)
and the peak memory of one forward+backward (torch.cuda.max_memory_allocated, MiB, inputs included).

    python bench/moe.py --out moe.json                 # full sweep (needs CUDA)
    python bench/moe.py --quick --out moe_quick.json   # N in {4096, 16384}
    TRITON_INTERPRET=1 python bench/moe.py --tiny      # CPU smoke test of the script (timings meaningless)

Methods
    triton   effconv_kernels.moe_experts(backend="triton")
    loop     transformers' MixtralExperts style loop (effconv_kernels.moe.naive.naive_moe_experts)
    dense    SwiGLU FFN with the same active parameters: intermediate k*I, one fused gate_up matmul
Ratios in the summary: loop / triton (target >= 3) and triton / dense (target <= 1.3).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))

SHAPES = {"smol_split": (576, 192, 8, 2), "smol_copy": (576, 1536, 8, 2), "large": (2048, 1024, 8, 2)}
METHODS = ("triton", "loop", "dense")


def make_inputs(N, D, I, E, k, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    logits = torch.randn(N, E, generator=g, device=device)
    top_w, top_i = logits.softmax(-1).topk(k, dim=-1)
    return dict(x=rnd(N, D), idx=top_i, w=top_w.to(dtype), gu=rnd(E, 2 * I, D, scale=D ** -0.5),
                dn=rnd(E, D, I, scale=I ** -0.5), dout=rnd(N, D),
                w1=rnd(2 * k * I, D, scale=D ** -0.5), w2=rnd(D, k * I, scale=(k * I) ** -0.5))


def build(name, inp):
    import effconv_kernels as ek
    from effconv_kernels.moe.naive import naive_moe_experts
    if name == "dense":
        x, w1, w2 = (inp[n].detach().requires_grad_() for n in ("x", "w1", "w2"))

        def fwd():
            gate, up = F.linear(x, w1).chunk(2, dim=-1)
            return F.linear(F.silu(gate) * up, w2)
        return fwd, [x, w1, w2]
    x, w, gu, dn = (inp[n].detach().requires_grad_() for n in ("x", "w", "gu", "dn"))
    idx = inp["idx"]
    if name == "triton":
        return (lambda: ek.moe_experts(x, idx, w, gu, dn, backend="triton")), [x, w, gu, dn]
    if name == "loop":
        return (lambda: naive_moe_experts(x, idx, w, gu, dn)), [x, w, gu, dn]
    raise ValueError(name)


class Timer:
    def __init__(self, warmup_ms, rep_ms):
        self.warmup, self.rep = warmup_ms, rep_ms
        self.cuda = torch.cuda.is_available()

    def time(self, fn, grad_to_none=None):
        if self.cuda:
            import triton.testing
            return float(triton.testing.do_bench(fn, warmup=self.warmup, rep=self.rep, grad_to_none=grad_to_none,
                                                 return_mode="median"))
        fn()  # CPU smoke path: one warm call, then the mean of three
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        return (time.perf_counter() - t0) / 3 * 1e3

    def peak_mib(self, fn):
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20


def run_method(name, inp, timer):
    fwd, leaves = build(name, inp)
    dout = inp["dout"]

    def fwdbwd():
        fwd().backward(dout)
    try:
        with torch.no_grad():
            fwd_ms = timer.time(fwd)
        fb_ms = timer.time(fwdbwd, grad_to_none=leaves)
        for t in leaves:
            t.grad = None
        peak = timer.peak_mib(fwdbwd)
    except torch.cuda.OutOfMemoryError:
        return dict(skipped="out of memory")
    finally:
        for t in leaves:
            t.grad = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return dict(fwd_ms=fwd_ms, fwdbwd_ms=fb_ms, peak_mib=peak)


def correctness(N, D, I, E, k, device, dtype):
    """Triton and the loop in `dtype` (bf16 on the GPU; fp32 on CPU, where the interpreter mishandles bf16 dots) against the fp32 loop on one shape: relative norm errors."""
    from effconv_kernels.moe.naive import naive_moe_experts
    import effconv_kernels as ek
    inp = make_inputs(N, D, I, E, k, dtype, device, seed=1)

    def go(fn, dtype):
        leaves = [inp[n].detach().to(dtype).requires_grad_() for n in ("x", "w", "gu", "dn")]
        out = fn(leaves[0], inp["idx"], *leaves[1:])
        out.backward(inp["dout"].to(dtype))
        return [out.detach().float()] + [t.grad.float() for t in leaves]

    ref = go(naive_moe_experts, torch.float32)
    res = {}
    for name, fn in (("triton", lambda *a: ek.moe_experts(*a, backend="triton")), ("loop", naive_moe_experts)):
        got = go(fn, dtype)
        res[name] = {n: ((a - b).norm() / b.norm()).item()
                     for n, a, b in zip(("out", "d_hidden", "d_weights", "d_gate_up", "d_down"), got, ref)}
    return res


def profile_once(inp):
    from torch.profiler import ProfilerActivity, profile
    fwd, leaves = build("triton", inp)
    for _ in range(3):
        fwd().backward(inp["dout"])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fwd().backward(inp["dout"])
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=40))


SWEEP = [  # (BM, BN, BK, warps, stages, WG_BP, WG_BQ, WG_BR, WG_WARPS)
    (64, 128, 64, 4, 3, 64, 128, 64, 4),
    (64, 128, 64, 8, 3, 64, 128, 64, 8),
    (128, 128, 64, 8, 3, 128, 128, 64, 8),
    (128, 64, 64, 4, 4, 128, 128, 32, 8),
    (64, 64, 64, 4, 4, 64, 64, 64, 4),
]


def sweep(shapes, tokens, dtype, device, timer):
    from effconv_kernels.moe import triton as mt
    out = []
    for sname, (D, I, E, k) in shapes.items():
        inp = make_inputs(tokens[-1], D, I, E, k, dtype, device)
        for cfg in SWEEP:
            mt.BM, mt.BN, mt.BK, mt.WARPS, mt.STAGES, mt.WG_BP, mt.WG_BQ, mt.WG_BR, mt.WG_WARPS = cfg
            try:
                r = run_method("triton", inp, timer)
            except Exception as e:  # noqa: BLE001 - a config that does not compile (shared memory)
                r = dict(error=f"{type(e).__name__}: {str(e)[:80]}")
            row = dict(shape=sname, N=tokens[-1], cfg=cfg, **r)
            print(json.dumps(row))
            out.append(row)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON output path (default: print only)")
    ap.add_argument("--quick", action="store_true", help="N in {4096, 16384}")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU smoke test")
    ap.add_argument("--tokens", type=int, nargs="*", default=None)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--profile", action="store_true", help="print the CUDA kernel table of one triton fwd+bwd")
    ap.add_argument("--sweep", action="store_true", help="time tile configs of the Triton kernel, then exit")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = {n: SHAPES[n] for n in args.shapes}
    tokens = args.tokens or ([4096, 16384] if args.quick else [4096, 8192, 16384, 32768])
    if args.tiny:
        shapes = {"tiny": (40, 24, 4, 2)}
        tokens = args.tokens or [33]
    timer = Timer(warmup_ms=10 if args.quick else 25, rep_ms=40 if args.quick else 100)
    env = dict(device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
               torch=torch.__version__, dtype=str(dtype))
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    if args.sweep:
        return sweep(shapes, tokens, dtype, device, timer)
    results, t0 = [], time.time()
    first = next(iter(shapes.values()))
    check = correctness(min(tokens), *first, device, dtype)
    print(json.dumps({"correctness (rel. norm error vs the fp32 loop)": check}))
    for sname, (D, I, E, k) in shapes.items():
        for N in tokens:
            inp = make_inputs(N, D, I, E, k, dtype, device)
            row = dict(shape=sname, N=N, D=D, I=I, E=E, k=k)
            for m in args.methods:
                row[m] = run_method(m, inp, timer)
            tri, loop, dense = (row.get(m, {}) for m in METHODS)
            for phase in ("fwd_ms", "fwdbwd_ms"):
                if phase in tri and phase in loop:
                    row[f"loop_over_triton_{phase[:-3]}"] = loop[phase] / tri[phase]
                if phase in tri and phase in dense:
                    row[f"triton_over_dense_{phase[:-3]}"] = tri[phase] / dense[phase]
            if args.profile and device == "cuda":
                profile_once(inp)
            results.append(row)
            print(json.dumps(row))
            del inp
    report = dict(env=env, correctness=check, results=results, seconds=time.time() - t0,
                  targets="loop_over_triton >= 3, triton_over_dense <= 1.3")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
