"""MoE experts benchmark: effconv's Triton kernel against transformers' per-expert loop and a dense FFN.

Shapes (bf16, top-2 of 8 experts, random router):
    smol_split   D=576,  I=192  (SmolLM2-135M's FFN of 1536 split into 8 experts)
    smol_copy    D=576,  I=1536 (SmolLM2-135M's FFN copied into 8 experts)
    large        D=2048, I=1024 (an 8192 FFN split into 8 experts)
with N in {4096, 8192, 16384, 32768} tokens. For each method: forward and forward+backward time
(triton.testing.do_bench, median, ms, L2 flushed before every call; backward gives grads for hidden, routing
weights and all weights), achieved TFLOP/s (fwd 2*N*k*D*3I FLOPs, fwd+bwd 3x that) and the peak memory of
one forward+backward (torch.cuda.max_memory_allocated, MiB, inputs included).

    python bench/moe.py --out moe.json                 # full sweep (needs CUDA)
    python bench/moe.py --quick --out moe_quick.json   # N in {4096, 16384}
    python bench/moe.py --quick --graph                # + CUDA-graph replay times (GPU time without host overhead)
    python bench/moe.py --quick --configs              # + the autotuner's chosen tile configs per kernel / key
    python bench/moe.py --count-launches               # kernel launches per fwd and fwd+bwd (profiler on CUDA)
    python bench/moe.py --profile --profile-only --shapes large --tokens 16384   # GPU ms per kernel + floors
    TRITON_INTERPRET=1 python bench/moe.py --tiny      # CPU smoke test of the script (timings meaningless)

Methods
    triton   effconv_kernels.moe_experts(backend="triton")
    loop     transformers' MixtralExperts style loop (effconv_kernels.moe.naive.naive_moe_experts); eager only:
             its torch.where syncs with the host, so it cannot be captured in a CUDA graph
    dense    SwiGLU FFN with the same active parameters: intermediate k*I, one fused gate_up matmul
Ratios in the summary: loop / triton (target >= 3) and triton / dense (target <= 1.3), eager and graph.
The JSON is rewritten after every (shape, N) row, so a run cut short by a timeout keeps its finished rows.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))

SHAPES = {"smol_split": (576, 192, 8, 2), "smol_copy": (576, 1536, 8, 2), "large": (2048, 1024, 8, 2)}
METHODS = ("triton", "loop", "dense")
GRAPH_METHODS = ("triton", "dense")
PROFILE_METHODS = ("triton", "dense")


def flops_fwd(N, D, I, k):
    return 2 * N * k * D * 3 * I  # gate, up, down: three (N*k, D) x (D, I)-sized matmuls


def min_bytes(N, D, I, E, k, method, phase, elem=2):
    """Fewest device-memory bytes of one call (each tensor read once, written once; gathered x/dout rows counted
    once per (token, slot)). triton fwd = the no-grad forward timed by the bench; fwdbwd adds the saved gate/up
    pre-activations and the backward's reads and writes."""
    M = N * k
    if method == "dense":
        w = (2 * k * I * D + D * k * I) * elem
        fwd = N * D + N * 2 * k * I + 2 * N * k * I + N * D  # x; gate/up out; h write + read; out
        if phase == "fwd":
            return w + fwd * elem
        bwd = (N * D + 2 * N * k * I) * 2 + N * k * I * 2 + N * D * 3  # dout/dh/dgu passes, dx, weight grads
        return 3 * w + (fwd + bwd) * elem
    w = (E * 2 * I * D + E * D * I) * elem
    fwd = M * D + 2 * M * I + 2 * M * D + N * D  # x[tok]; h write + read; y write + read; out
    if phase == "fwd":
        return w + fwd * elem
    fwd += 2 * M * I  # gate/up pre-activations saved
    bwd = (M * D + 2 * M * 2 * I) + (2 * M * I + 2 * M * D + N * D) + (2 * M * I + M * D) + (M * D + M * I)
    return 3 * w + (fwd + bwd) * elem  # down_bwd; dx + slot sum; dW_gu; dW_d; weights read / grads written


def floors_ms(N, D, I, E, k, method, phase, tflops=790.0, tb_s=4.3):
    """(compute floor, memory floor) in ms at H200 ceilings (8192^3 bf16 matmul ~790 TFLOP/s, device copy ~4.3
    TB/s; `--ceilings` measures the card at hand)."""
    f = flops_fwd(N, D, I, k) * (1 if phase == "fwd" else 3)
    return f / (tflops * 1e9), min_bytes(N, D, I, E, k, method, phase) / (tb_s * 1e9)


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


def _tflops(flops, ms):
    return flops / (ms * 1e-3) / 1e12 if ms and ms > 0 else None


def run_method(name, inp, timer, flops):
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
    return dict(fwd_ms=fwd_ms, fwdbwd_ms=fb_ms, peak_mib=peak, fwd_tflops=_tflops(flops, fwd_ms),
                fwdbwd_tflops=_tflops(3 * flops, fb_ms))


def graph_method(name, inp, timer, flops):
    """fwd and fwd+bwd captured in a CUDA graph after a warm-up (which autotunes), timed by replay: GPU time
    without Python / launch overhead. do_bench flushes L2 before each replay, so no input rotation is needed."""
    fwd, leaves = build(name, inp)
    dout = inp["dout"]

    def f():
        with torch.no_grad():
            fwd()

    def fb():
        fwd().backward(dout)
    res = {}
    try:
        for label, fn in (("fwd", f), ("fwdbwd", fb)):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn()
                    for t in leaves:
                        t.grad = None
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            ms = timer.time(g.replay)
            res[f"graph_{label}_ms"] = ms
            res[f"graph_{label}_tflops"] = _tflops(flops if label == "fwd" else 3 * flops, ms)
            del g
            for t in leaves:
                t.grad = None
    except Exception as e:  # noqa: BLE001 - keep the eager numbers of the row
        res["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        for t in leaves:
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return res


# --- launch counting ---------------------------------------------------------------------------------------
_NO_KERNEL = {  # aten ops that launch nothing on CUDA (views, metadata, allocation)
    "view", "_unsafe_view", "reshape", "as_strided", "t", "transpose", "permute", "unsqueeze", "squeeze", "expand",
    "slice", "select", "alias", "detach", "split", "split_with_sizes", "unbind", "empty", "empty_like",
    "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "_reshape_alias", "is_same_size",
    "_has_compatible_shallow_copy_type", "chunk", "narrow", "contiguous", "numpy_T",
}


def count_launches_cpu(fn):
    """(torch ops that would launch a CUDA kernel, Triton launches, op names) for one call of fn on CPU,
    counted with a TorchDispatchMode; ops issued inside a (interpreted) Triton launch are not counted."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime import interpreter as interp
    state = dict(inside=0)
    ops, tri = Counter(), Counter()

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if not state["inside"] and name not in _NO_KERNEL:
                ops[name] += 1
            return func(*args, **(kwargs or {}))

    orig = interp.InterpretedFunction.run

    def run(self, *a, **k):
        tri[self.fn.__name__] += 1
        state["inside"] += 1
        try:
            return orig(self, *a, **k)
        finally:
            state["inside"] -= 1
    interp.InterpretedFunction.run = run
    try:
        with Mode():
            fn()
    finally:
        interp.InterpretedFunction.run = orig
    return sum(ops.values()), sum(tri.values()), dict(ops), dict(tri)


def count_launches_cuda(fn):
    """CUDA kernels (and memsets / memcpys) of one call of fn, from the profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = Counter(e.name for e in prof.events() if e.device_type == DeviceType.CUDA)
    return sum(names.values()), dict(names)


def count_launches(inp, device):
    out = {}
    for name in ("triton", "dense"):
        fwd, leaves = build(name, inp)

        def f():
            with torch.no_grad():
                fwd()

        def fb():
            fwd().backward(inp["dout"])
            for t in leaves:
                t.grad = None
        row = {}
        for label, fn in (("fwd", f), ("fwdbwd", fb)):
            if device == "cuda":
                n, names = count_launches_cuda(fn)
                row[f"{label}_kernels"], row[f"{label}_names"] = n, names
            else:
                fn()  # warm (first-call allocations)
                n_ops, n_tri, ops, tri = count_launches_cpu(fn)
                row[f"{label}_torch_ops"], row[f"{label}_triton"] = n_ops, n_tri
                row[f"{label}_total"] = n_ops + n_tri
                row[f"{label}_ops"], row[f"{label}_triton_names"] = ops, tri
        out[name] = row
    return out


def ceilings(timer):
    """The two ceilings of this card (METHOD.md): device-to-device copy TB/s (bytes read + written) and an
    8192^3 bf16 matmul's TFLOP/s on random data."""
    n = 1 << 29  # 1 GiB of bf16 (0.5 G elements)
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = timer.time(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = timer.time(lambda: a @ b)
    del src, dst, a, b
    torch.cuda.empty_cache()
    return dict(copy_tb_s=2 * n * 2 / (ms * 1e-3) / 1e12, matmul_bf16_tflops=2 * 8192 ** 3 / (mm * 1e-3) / 1e12)


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


def kernel_floors(N, D, I, E, k, elem=2):
    """Per Triton kernel of one fwd+bwd (names as the profile labels them): (GFLOP, MB of fewest bytes), each
    tensor read / written once, gathered rows once per (token, slot)."""
    M = N * k
    wgu, wd = E * 2 * I * D, E * D * I
    mb = lambda n: n * elem / 1e6  # noqa: E731
    return {
        "moe_route_hist_kernel": (0.0, M * 8 / 1e6),
        "moe_route_scatter_kernel": (0.0, M * 8 / 1e6),
        "moe_up_kernel": (2 * M * D * 2 * I / 1e9, mb(M * D + wgu + M * I + M * 2 * I)),
        "moe_down_kernel": (2 * M * I * D / 1e9, mb(M * I + wd + M * D)),
        "moe_slot_sum_kernel": (0.0, 2 * mb(M * D + N * D)),
        "moe_swiglu_bwd_kernel": (0.0, mb(M * I + 2 * M * 2 * I) + M * 8 / 1e6),
        "moe_down_bwd_kernel": (2 * M * D * I / 1e9, mb(M * D + wd + 2 * M * 2 * I) + M * 4 * (I // 64) / 1e6),
        "moe_dx_kernel": (2 * M * 2 * I * D / 1e9, mb(M * 2 * I + wgu + M * D)),
        "moe_weight_grad_kernel dW_gu": (2 * M * 2 * I * D / 1e9, mb(M * 2 * I + M * D + wgu)),
        "moe_weight_grad_kernel dW_d": (2 * M * D * I / 1e9, mb(M * D + M * I + wd)),
    }


def _kernel_label(name, nth):
    """Short label of a CUDA kernel; the two weight-grad launches of one backward alternate dW_gu, dW_d."""
    if name == "moe_weight_grad_kernel":
        return name + (" dW_gu" if nth % 2 == 0 else " dW_d")
    if "reduce_kernel" in name and "sum" in name.lower():
        return "torch sum"
    if "index" in name.lower() and ("gather" in name.lower() or "select" in name.lower()):
        return "gather rows (index_select)"
    if "cutlass" in name.lower() or "grouped" in name.lower() or "Sm90" in name:
        return "grouped GEMM (torch._grouped_mm): " + re.sub(r"<.*", "", name.replace("void ", ""))[:40]
    short = re.sub(r"<.*", "", name.replace("void ", ""))
    return short[:60]


def profile_kernels(name, inp, shape_dims, iters=5, tflops=801.0, tb_s=4.2):
    """torch.profiler over `iters` fwd+bwd of one method, L2 flushed before each (a bitwise_not over 256 MB,
    left out of the table): per kernel label the launches and GPU ms per iteration, the share of the summed
    kernel time, and for the Triton kernels the compute / memory floors at the ceilings. Also the wall ms per
    iteration (synchronized), so wall - kernel sum = host / launch gaps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    fwd, leaves = build(name, inp)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")

    def step():
        fwd().backward(inp["dout"])
        for t in leaves:
            t.grad = None
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / iters * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            flush.bitwise_not_()
            step()
        torch.cuda.synchronize()
    evs = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    per, seen = {}, Counter()
    for e in evs:
        if "bitwise_not" in e.name:
            continue
        label = _kernel_label(e.name, seen[e.name])
        seen[e.name] += 1
        c, us = per.get(label, (0, 0.0))
        per[label] = (c + 1, us + e.time_range.elapsed_us())
    floors = kernel_floors(*shape_dims) if name == "triton" else {}
    total = sum(us for _, us in per.values()) / iters / 1e3
    rows = []
    for label, (c, us) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        ms = us / iters / 1e3
        gf, mbytes = floors.get(label, (None, None))
        row = dict(kernel=label, calls=c / iters, ms=ms, share=ms / total if total else None)
        if gf is not None:
            row.update(gflop=gf, mb=mbytes, floor_flop_ms=gf / tflops, floor_mem_ms=mbytes / (tb_s * 1e3),
                       tflops=gf / ms if ms and gf else None, tb_s=mbytes / ms / 1e3 if ms else None)
        rows.append(row)
    return dict(method=name, iters=iters, wall_ms=wall, kernel_ms=total, kernels=rows)


def profile_table(p, shape, N):
    lines = [f"profile {p['method']} {shape} N={N}: kernel sum {p['kernel_ms']:.3f} ms / fwd+bwd, wall "
             f"{p['wall_ms']:.3f} ms (eager, synchronized; floors at 801 TFLOP/s, 4.2 TB/s)",
             f"  {'kernel':44s} {'calls':>5s} {'ms':>7s} {'share':>6s} {'TF/s':>6s} {'TB/s':>5s} "
             f"{'floorF':>7s} {'floorB':>7s} {'x floor':>7s}"]
    for r in p["kernels"]:
        fl = max(r.get("floor_flop_ms", 0) or 0, r.get("floor_mem_ms", 0) or 0)
        lines.append(f"  {r['kernel'][:44]:44s} {r['calls']:5.1f} {r['ms']:7.4f} {r['share']:6.1%} "
                     f"{_f(r.get('tflops'), '{:.0f}'):>6s} {_f(r.get('tb_s'), '{:.2f}'):>5s} "
                     f"{_f(r.get('floor_flop_ms'), '{:.4f}'):>7s} {_f(r.get('floor_mem_ms'), '{:.4f}'):>7s} "
                     f"{_f(r['ms'] / fl if fl else None, '{:.1f}'):>7s}")
    return "\n".join(lines)


def _f(v, fmt="{:.3f}"):
    return fmt.format(v) if isinstance(v, (int, float)) else "-"


def summary_table(results):
    cols = ("shape", "N", "tri fwd", "tri fb", "tri g-fwd", "tri g-fb", "dense fb", "dense g-fb", "loop fb",
            "loop/tri fb", "tri/dense fb", "tri/dense g-fb", "tri TF/s fb", "tri TF/s g-fb", "dense TF/s g-fb")
    lines = ["fwd / fwd+bwd ms (g- = CUDA-graph replay; loop eager only), TF/s achieved; targets loop/tri >= 3, "
             "tri/dense <= 1.3", " | ".join(cols)]
    for r in results:
        t, d, lp = r.get("triton", {}), r.get("dense", {}), r.get("loop", {})
        gd = (t.get("graph_fwdbwd_ms") / d["graph_fwdbwd_ms"]) if t.get("graph_fwdbwd_ms") and d.get(
            "graph_fwdbwd_ms") else None
        vals = (r["shape"], str(r["N"]), _f(t.get("fwd_ms")), _f(t.get("fwdbwd_ms")), _f(t.get("graph_fwd_ms")),
                _f(t.get("graph_fwdbwd_ms")), _f(d.get("fwdbwd_ms")), _f(d.get("graph_fwdbwd_ms")),
                _f(lp.get("fwdbwd_ms")), _f(r.get("loop_over_triton_fwdbwd"), "{:.2f}"),
                _f(r.get("triton_over_dense_fwdbwd"), "{:.2f}"), _f(gd, "{:.2f}"),
                _f(t.get("fwdbwd_tflops"), "{:.0f}"), _f(t.get("graph_fwdbwd_tflops"), "{:.0f}"),
                _f(d.get("graph_fwdbwd_tflops"), "{:.0f}"))
        lines.append(" | ".join(vals))
    return "\n".join(lines)


def plans_table(results, plans):
    """triton fwd+bwd per backward plan (WGRAD:DGRAD) against dense, eager and graph."""
    lines = ["backward plans: triton fwd+bwd ms (eager / graph) and triton/dense (eager / graph); "
             "'auto' = the row's default plan", "shape | N | plan | tri fb | tri g-fb | tri/dense fb | tri/dense g-fb"]
    for r in results:
        d = r.get("dense", {})
        for label, t in [(f"auto={r.get('plan')}", r.get("triton", {}))] + [(p, r.get(f"triton[{p}]", {}))
                                                                             for p in plans]:
            if "error" in t:
                lines.append(f"{r['shape']} | {r['N']} | {label} | error: {t['error'][:120]}")
                continue
            ratio = lambda a, b: (t.get(a) / d[b]) if t.get(a) and d.get(b) else None  # noqa: E731
            lines.append(" | ".join((r["shape"], str(r["N"]), label, _f(t.get("fwdbwd_ms")),
                                     _f(t.get("graph_fwdbwd_ms")), _f(ratio("fwdbwd_ms", "fwdbwd_ms"), "{:.2f}"),
                                     _f(ratio("graph_fwdbwd_ms", "graph_fwdbwd_ms"), "{:.2f}"))))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON output path (default: print only)")
    ap.add_argument("--quick", action="store_true", help="N in {4096, 16384}")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU smoke test")
    ap.add_argument("--tokens", type=int, nargs="*", default=None)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--profile", action="store_true",
                    help="per row: torch.profiler kernel table of triton and dense fwd+bwd (GPU ms per kernel, "
                         "floors), printed after the summary")
    ap.add_argument("--profile-only", action="store_true", help="with --profile: no timings, only the tables")
    ap.add_argument("--profile-iters", type=int, default=5)
    ap.add_argument("--graph", action="store_true", help="also time triton and dense by CUDA-graph replay")
    ap.add_argument("--configs", action="store_true",
                    help="print (and store) the chosen tile configs (pinned or autotuned) per kernel and key")
    ap.add_argument("--count-launches", action="store_true",
                    help="count kernel launches per fwd and fwd+bwd (triton, dense) on the first shape")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--ceilings", action="store_true", help="measure copy TB/s and bf16 matmul TFLOP/s first")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--plans", nargs="*", default=[],
                    help="also time triton with these backward plans WGRAD:DGRAD (e.g. triton:fused "
                         "grouped_mm:grouped_mm; EFFCONV_MOE_WGRAD / EFFCONV_MOE_DGRAD), stored as triton[PLAN]")
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
    from effconv_kernels.moe import triton as mt
    results, t0 = [], time.time()
    report = dict(env=env, results=results, targets="loop_over_triton >= 3, triton_over_dense <= 1.3",
                  flops="fwd 2*N*k*D*3I, fwd+bwd 3x fwd", graph_note="loop: eager only (host syncs)")

    def save():
        report["seconds"] = time.time() - t0
        if args.configs:
            report["autotune"] = mt.tuned_configs()
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1))

    if args.ceilings and device == "cuda":
        report["ceilings"] = ceilings(timer)
        print(json.dumps({"ceilings": report["ceilings"]}))
    first_name, first = next(iter(shapes.items()))
    if args.count_launches:
        try:
            report["launches"] = dict(shape=first_name, N=min(tokens), **count_launches(
                make_inputs(min(tokens), *first, dtype, device), device))
            brief = {m: {k: v for k, v in r.items() if not k.endswith("names") and not k.endswith("ops")}
                     for m, r in report["launches"].items() if isinstance(r, dict)}
            print(json.dumps({"launches": brief}))
        except Exception as e:  # noqa: BLE001 - a profiler problem must not cost the timings
            report["launches"] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
            print(json.dumps({"launches": report["launches"]}))
        save()
    if not args.skip_correctness:
        report["correctness"] = correctness(min(tokens), *first, device, dtype)
        print(json.dumps({"correctness (rel. norm error vs the fp32 loop)": report["correctness"]}))
        save()
    for sname, (D, I, E, k) in shapes.items():
        for N in tokens:
            inp = make_inputs(N, D, I, E, k, dtype, device)
            flops = flops_fwd(N, D, I, k)
            row = dict(shape=sname, N=N, D=D, I=I, E=E, k=k, fwd_gflop=flops / 1e9, floors_ms={
                f"{m}_{ph}": floors_ms(N, D, I, E, k, m, ph) for m in ("triton", "dense") for ph in ("fwd", "fwdbwd")})
            for m in ([] if args.profile_only else args.methods):
                row[m] = run_method(m, inp, timer, flops)
                if args.graph and device == "cuda" and m in GRAPH_METHODS and "skipped" not in row[m]:
                    row[m].update(graph_method(m, inp, timer, flops))
            row["plan"] = ":".join(mt.backward_plan(inp["x"], D, I))
            for plan in args.plans:
                wg, dg = plan.split(":")
                saved = {v: os.environ.get(v) for v in mt.BACKWARD_MODES}
                os.environ.update(EFFCONV_MOE_WGRAD=wg, EFFCONV_MOE_DGRAD=dg)
                try:
                    key = f"triton[{plan}]"
                    row[key] = {} if args.profile_only else run_method("triton", inp, timer, flops)
                    if args.graph and device == "cuda" and "skipped" not in row[key]:
                        row[key].update(graph_method("triton", inp, timer, flops))
                    if args.profile and device == "cuda":
                        row[key]["profile"] = profile_kernels("triton", inp, (N, D, I, E, k), iters=args.profile_iters)
                except Exception as e:  # noqa: BLE001 - one plan failing must not cost the others
                    row[f"triton[{plan}]"] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
                finally:
                    for v, val in saved.items():
                        if val is None:
                            os.environ.pop(v, None)
                        else:
                            os.environ[v] = val
            tri, loop, dense = (row.get(m, {}) for m in METHODS)
            for phase in ("fwd", "fwdbwd"):
                if f"{phase}_ms" in tri and f"{phase}_ms" in loop:
                    row[f"loop_over_triton_{phase}"] = loop[f"{phase}_ms"] / tri[f"{phase}_ms"]
                if f"{phase}_ms" in tri and f"{phase}_ms" in dense:
                    row[f"triton_over_dense_{phase}"] = tri[f"{phase}_ms"] / dense[f"{phase}_ms"]
                g = f"graph_{phase}_ms"
                if g in tri and g in dense:
                    row[f"triton_over_dense_graph_{phase}"] = tri[g] / dense[g]
            if args.profile and device == "cuda":
                try:
                    row["profile"] = [profile_kernels(m, inp, (N, D, I, E, k), iters=args.profile_iters)
                                      for m in PROFILE_METHODS]
                except Exception as e:  # noqa: BLE001 - a profiler problem must not cost the timings
                    row["profile"] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            results.append(row)
            print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "profile"} if isinstance(v, dict) else v)
                              for k, v in row.items() if k != "profile"}))
            save()
            del inp
    if args.configs:
        print("autotuned configs (kernel, key = [" + "; ".join(f"{n}: {', '.join(k)}" for n, k in mt.KEYS.items())
              + "] + tensor dtypes):")
        for c in mt.tuned_configs():  # the key's dtypes are in the JSON
            cfg = " ".join(f"{k}{v}" for k, v in c["config"].items())
            print(f"  {c['kernel']:8s} {','.join(c['key'][:len(c['key_names'])])} -> {cfg} w{c['num_warps']} "
                  f"s{c['num_stages']} ({c['source']})")
    save()
    if not args.profile_only:
        print(summary_table(results))
    if args.plans:
        print(plans_table(results, args.plans))
    for r in results:
        prof = r.get("profile")
        if isinstance(prof, dict):
            print(f"profile {r['shape']} N={r['N']} failed: {prof['error']}")
        for p in prof if isinstance(prof, list) else ():
            print(profile_table(p, r["shape"], r["N"]))
        for plan in args.plans:
            p = r.get(f"triton[{plan}]", {}).get("profile")
            if p:
                print(profile_table(p, r["shape"], f"{r['N']} plan {plan}"))
    return report


if __name__ == "__main__":
    main()
