"""Attention benchmark: effconv's Triton kernels against fla, torch SDPA and the O(T^2) formulation.

Sweeps T in {512 .. 32K} with B*T = 16384 tokens (B = 1 from 16K on), H = 16 heads, bf16, head dim 64
(feature dim 128) and 128 (feature dim 256). For each method: forward and forward+backward time
(triton.testing.do_bench, median, ms) and the peak memory of one forward+backward
(torch.cuda.max_memory_allocated, MiB, inputs included).

    python bench/attention.py --out bench.json            # full sweep (needs CUDA)
    python bench/attention.py --quick --out quick.json    # T in {1K, 8K}, head dim 64, fewer repeats
    python bench/attention.py --profile --sweep ...       # + per-kernel breakdown and launch-config sweep

Methods
    linear      effconv_kernels.linear_attention (normalized, Triton)
    fla         fla.ops.linear_attn.chunk_linear_attn (normalize=True, scale=1), if `fla` imports
    sdpa        torch SDPA, flash backend, causal (softmax attention for scale)
    naive_hyb   O(T^2) masked window + linear formulation in fp32 (naive_hybrid_attention), skipped when
                its T x T tensors would not fit
    hybrid      effconv_kernels.hybrid_attention, window 64 (Triton)
    linear_decay, hybrid_decay   the same with a per-head decay (log_decay = -0.01, trained: in the backward);
                opt-in: --methods ... linear_decay hybrid_decay
    fmap        the Hedgehog feature map phi(x) = [softmax(xW+b), softmax(-(xW+b))] for q and k in plain
                PyTorch (what fusing it into the kernels could save at most)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))

TOKENS = 16384
HEADS = 16
WINDOW = 64


def _fmt(x):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:.3f}" if x < 100 else f"{x:.1f}"


class Bench:
    def __init__(self, warmup_ms: int, rep_ms: int, budget_s: float, fla_budget_s: float = 1e9):
        import triton.testing
        self.do_bench = triton.testing.do_bench
        self.warmup, self.rep = warmup_ms, rep_ms
        self.t0 = time.time()
        self.budget = budget_s
        self.fla_budget = fla_budget_s
        self.fla_s = 0.0  # fla's autotuner compiles dozens of configs: kept out of the general budget

    def over_budget(self) -> bool:
        return time.time() - self.t0 - self.fla_s > self.budget

    def fla_over_budget(self) -> bool:
        return self.fla_s > self.fla_budget

    def time(self, fn, grad_to_none=None) -> float:
        return float(self.do_bench(fn, warmup=self.warmup, rep=self.rep, grad_to_none=grad_to_none,
                                   return_mode="median"))

    @staticmethod
    def peak_mib(fn) -> float:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20


def make_inputs(B, T, D, dtype=torch.bfloat16, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    F = 2 * D

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32)

    q, k, v = (rnd(B, HEADS, T, D).to(dtype) for _ in range(3))
    fq = rnd(B, HEADS, T, F).softmax(-1).to(dtype)  # positive features, like Hedgehog's
    fk = rnd(B, HEADS, T, F).softmax(-1).to(dtype)
    mix = rnd(HEADS)
    do = rnd(B, HEADS, T, D).to(dtype)
    return dict(q=q, k=k, v=v, fq=fq, fk=fk, mix=mix, do=do)


def run_method(name, x, D, bench: Bench, args):
    """Returns dict(fwd_ms, fwdbwd_ms, peak_mib) or dict(skipped=reason)."""
    import effconv_kernels as ek
    B, H, T, _ = x["q"].shape
    scale = D ** -0.5
    leaves = None

    if name == "linear":
        fq, fk, v = (x[n].detach().requires_grad_() for n in ("fq", "fk", "v"))
        leaves = [fq, fk, v]
        fwd = lambda: ek.linear_attention(fq, fk, v, backend="triton")[0]  # noqa: E731
    elif name == "fla":
        try:
            from fla.ops.linear_attn import chunk_linear_attn
        except Exception as e:  # noqa: BLE001
            return dict(skipped=f"fla not importable ({type(e).__name__})")
        # fla's layout is [B, T, H, K]; built contiguous in that layout so no transpose is timed
        fq, fk, v = (x[n].transpose(1, 2).contiguous().detach().requires_grad_() for n in ("fq", "fk", "v"))
        leaves = [fq, fk, v]
        fwd = lambda: chunk_linear_attn(fq, fk, v, scale=1.0, normalize=True)[0]  # noqa: E731
        x = dict(x, do=x["do"].transpose(1, 2).contiguous())
    elif name == "sdpa":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        q, k, v = (x[n].detach().requires_grad_() for n in ("q", "k", "v"))
        leaves = [q, k, v]

        def fwd():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif name == "naive_hyb":
        from effconv_kernels.hybrid_attn.naive import naive_hybrid_attention
        # at least ~8 live fp32 T x T tensors in forward + backward (scores, exp, linear scores, their grads);
        # sizes past that are skipped, sizes near it are tried and may end in "out of memory"
        need = 8 * B * H * T * T * 4
        free = torch.cuda.mem_get_info()[0]
        if need > free:
            return dict(skipped=f"skipped: ~{need / 2**30:.0f} GiB of T x T tensors > free memory")
        if bench.over_budget():
            return dict(skipped="skipped: time budget")
        q, k, v, fq, fk = (x[n].float().detach().requires_grad_() for n in ("q", "k", "v", "fq", "fk"))
        mix = x["mix"].detach().requires_grad_()
        leaves = [q, k, v, fq, fk, mix]
        fwd = lambda: naive_hybrid_attention(q, k, v, fq, fk, mix, window=WINDOW, scale=scale)[0]  # noqa: E731
        x = dict(x, do=x["do"].float())
    elif name == "hybrid":
        q, k, v, fq, fk = (x[n].detach().requires_grad_() for n in ("q", "k", "v", "fq", "fk"))
        mix = x["mix"].detach().requires_grad_()
        leaves = [q, k, v, fq, fk, mix]
        fwd = lambda: ek.hybrid_attention(q, k, v, fq, fk, mix, window=WINDOW, scale=scale, backend="triton")[0]  # noqa: E731
    elif name in ("linear_decay", "hybrid_decay"):
        ld = torch.full((H,), -0.01, device="cuda", requires_grad=True)  # H = Hkv here
        if name == "linear_decay":
            fq, fk, v = (x[n].detach().requires_grad_() for n in ("fq", "fk", "v"))
            leaves = [fq, fk, v, ld]
            fwd = lambda: ek.linear_attention(fq, fk, v, log_decay=ld, backend="triton")[0]  # noqa: E731
        else:
            q, k, v, fq, fk = (x[n].detach().requires_grad_() for n in ("q", "k", "v", "fq", "fk"))
            mix = x["mix"].detach().requires_grad_()
            leaves = [q, k, v, fq, fk, mix, ld]
            fwd = lambda: ek.hybrid_attention(q, k, v, fq, fk, mix, window=WINDOW, scale=scale, log_decay=ld,  # noqa: E731
                                              backend="triton")[0]
    elif name == "fmap":
        # Hedgehog map for q and k: per head W (D, D), b (D); F = 2D
        Wq = (torch.randn(H, D, D, device="cuda") * D ** -0.5).to(x["q"].dtype).requires_grad_()
        bq = torch.zeros(H, D, device="cuda", dtype=x["q"].dtype).requires_grad_()
        q, k = (x[n].detach().requires_grad_() for n in ("q", "k"))
        leaves = [q, k, Wq, bq]

        def phi(t):
            u = torch.einsum("bhtd,hde->bhte", t, Wq) + bq[None, :, None]
            return torch.cat([u.softmax(-1), (-u).softmax(-1)], -1)

        def fwd():
            return torch.cat([phi(q), phi(k)], -1)
        x = dict(x, do=torch.randn(B, H, T, 4 * D, device="cuda", dtype=x["q"].dtype))
    else:
        raise ValueError(name)

    do = x["do"]

    def fwdbwd():
        fwd().backward(do)

    try:
        with torch.no_grad():
            fwd_ms = bench.time(fwd)
        fb_ms = bench.time(fwdbwd, grad_to_none=leaves)
        for t in leaves:
            t.grad = None
        peak = bench.peak_mib(fwdbwd)
    except torch.cuda.OutOfMemoryError:
        return dict(skipped="skipped: out of memory")
    finally:
        for t in leaves or []:
            t.grad = None
        torch.cuda.empty_cache()
    return dict(fwd_ms=fwd_ms, fwdbwd_ms=fb_ms, peak_mib=peak)


def correctness_checks(D=64, T=2048):
    """Large-shape spot checks on the GPU (the unit tests use tiny shapes)."""
    import importlib.util

    import effconv_kernels as ek
    # the chunked fp32 PyTorch path is the model's (effconv_kernels has no copy of it); attention_ops.py imports only
    # torch, so it is loaded from its file (no transformers needed on the GPU machine)
    path = Path(__file__).resolve().parents[1] / "effconv" / "modeling" / "attention_ops.py"
    spec = importlib.util.spec_from_file_location("effconv_attention_ops", path)
    ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ops)
    chunk_linear_attention_ref, chunk_hybrid_attention_ref = ops.linear_attention, ops.hybrid_attention
    B = TOKENS // T
    x = make_inputs(B, T, D, seed=1)
    out = {}

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    def grads(fn, names, extra=()):
        leaves = [x[n].detach().requires_grad_() for n in names] + [e.detach().requires_grad_() for e in extra]
        o = fn(*leaves)
        o.float().backward(x["do"].float())
        return o.detach(), [t.grad for t in leaves]

    lin = lambda fq, fk, v: ek.linear_attention(fq, fk, v, backend="triton")[0]  # noqa: E731
    lin_ref = lambda fq, fk, v: chunk_linear_attention_ref(fq.float(), fk.float(), v.float())[0]  # noqa: E731
    o1, g1 = grads(lin, ["fq", "fk", "v"])
    o2, g2 = grads(lin_ref, ["fq", "fk", "v"])
    out["linear_vs_torch_fp32"] = dict(o=rel(o1, o2), dfq=rel(g1[0], g2[0]), dfk=rel(g1[1], g2[1]), dv=rel(g1[2], g2[2]))
    try:
        from fla.ops.linear_attn import chunk_linear_attn
        fo = chunk_linear_attn(*(x[n].transpose(1, 2).contiguous() for n in ("fq", "fk", "v")), scale=1.0,
                               normalize=True)[0].transpose(1, 2)
        out["linear_vs_fla_output"] = rel(o1, fo)
        out["fla_vs_torch_fp32_output"] = rel(fo, o2)
    except Exception as e:  # noqa: BLE001
        out["linear_vs_fla_output"] = f"fla unavailable: {type(e).__name__}"
    scale = D ** -0.5
    hyb = lambda q, k, v, fq, fk, mix: ek.hybrid_attention(q, k, v, fq, fk, mix, window=WINDOW, scale=scale,  # noqa: E731
                                                           backend="triton")[0]
    hyb_ref = lambda q, k, v, fq, fk, mix: chunk_hybrid_attention_ref(  # noqa: E731
        q.float(), k.float(), v.float(), fq.float(), fk.float(), mix, window=WINDOW, scale=scale)[0]
    o1, g1 = grads(hyb, ["q", "k", "v", "fq", "fk"], (x["mix"],))
    o2, g2 = grads(hyb_ref, ["q", "k", "v", "fq", "fk"], (x["mix"],))
    out["hybrid_vs_torch_fp32"] = dict(o=rel(o1, o2), **{f"d{n}": rel(a, b) for n, a, b in
                                                         zip(["q", "k", "v", "fq", "fk", "mix"], g1, g2)})
    # with a per-head decay (one value per head: -1e-4 .. -0.5), d(log_decay) included
    ld = -torch.logspace(-4, math.log10(0.5), HEADS, device="cuda")
    lin = lambda fq, fk, v, ld: ek.linear_attention(fq, fk, v, log_decay=ld, backend="triton")[0]  # noqa: E731
    lin_ref = lambda fq, fk, v, ld: chunk_linear_attention_ref(  # noqa: E731
        fq.float(), fk.float(), v.float(), log_decay=ld)[0]
    o1, g1 = grads(lin, ["fq", "fk", "v"], (ld,))
    o2, g2 = grads(lin_ref, ["fq", "fk", "v"], (ld,))
    out["linear_decay_vs_torch_fp32"] = dict(o=rel(o1, o2), **{f"d{n}": rel(a, b) for n, a, b in
                                                               zip(["fq", "fk", "v", "log_decay"], g1, g2)})
    hyb = lambda q, k, v, fq, fk, mix, ld: ek.hybrid_attention(  # noqa: E731
        q, k, v, fq, fk, mix, window=WINDOW, scale=scale, log_decay=ld, backend="triton")[0]
    hyb_ref = lambda q, k, v, fq, fk, mix, ld: chunk_hybrid_attention_ref(  # noqa: E731
        q.float(), k.float(), v.float(), fq.float(), fk.float(), mix, window=WINDOW, scale=scale, log_decay=ld)[0]
    o1, g1 = grads(hyb, ["q", "k", "v", "fq", "fk"], (x["mix"], ld))
    o2, g2 = grads(hyb_ref, ["q", "k", "v", "fq", "fk"], (x["mix"], ld))
    out["hybrid_decay_vs_torch_fp32"] = dict(o=rel(o1, o2), **{f"d{n}": rel(a, b) for n, a, b in
                                                               zip(["q", "k", "v", "fq", "fk", "mix", "log_decay"],
                                                                   g1, g2)})
    return out


def profile_kernels(D, T, method):
    """Per-kernel CUDA time of one forward+backward (torch.profiler), averaged over 5 runs."""
    from torch.profiler import ProfilerActivity, profile
    import effconv_kernels as ek
    B = max(1, TOKENS // T)
    x = make_inputs(B, T, D)
    names = ("fq", "fk", "v") if method == "linear" else ("q", "k", "v", "fq", "fk")
    leaves = [x[n].detach().requires_grad_() for n in names]
    mix = x["mix"].detach().requires_grad_()

    def step():
        if method == "linear":
            o = ek.linear_attention(*leaves, backend="triton")[0]
        else:
            o = ek.hybrid_attention(*leaves, mix, window=WINDOW, scale=D ** -0.5, backend="triton")[0]
        o.backward(x["do"])

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if "CUDA" not in str(getattr(e, "device_type", "")):  # kernels only, not the aten ops around them
            continue
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((e.key, t / 5 / 1000.0, e.count // 5))
    rows.sort(key=lambda r: -r[1])
    return [dict(kernel=k, ms=ms, calls=c) for k, ms, c in rows[:14]]


SWEEP = {
    "hybrid": ["hyb_fwd", "hyb_dq", "hyb_dkv"],
    "linear": ["lin_fwd", "lin_dkv"],
}
CONFIGS = [(4, 1), (4, 2), (8, 1), (8, 2)]


def config_sweep(bench: Bench, D, T):
    """fwd+bwd time with one kernel's (num_warps, num_stages) changed at a time (EFFCONV_KCFG)."""
    B = max(1, TOKENS // T)
    x = make_inputs(B, T, D)
    res = []
    for method, kernels in SWEEP.items():
        for kname in kernels:
            for w, s in CONFIGS:
                if bench.over_budget():
                    res.append(dict(method=method, kernel=kname, warps=w, stages=s, skipped="time budget"))
                    continue
                os.environ["EFFCONV_KCFG"] = f"{kname}={w},{s}"
                try:
                    r = run_method(method, x, D, bench, None)
                    res.append(dict(method=method, kernel=kname, warps=w, stages=s, fwdbwd_ms=r.get("fwdbwd_ms"),
                                    fwd_ms=r.get("fwd_ms"), skipped=r.get("skipped")))
                except Exception as e:  # noqa: BLE001  (a config that does not compile, e.g. out of shared memory)
                    res.append(dict(method=method, kernel=kname, warps=w, stages=s, error=f"{type(e).__name__}: {e}"[:300]))
                finally:
                    os.environ.pop("EFFCONV_KCFG", None)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="write all results as JSON here")
    p.add_argument("--quick", action="store_true", help="T in {1K, 8K}, head dim 64, short repeats")
    p.add_argument("--head-dims", type=int, nargs="+", default=None)
    p.add_argument("--seqlens", type=int, nargs="+", default=None)
    p.add_argument("--methods", nargs="+", default=["linear", "fla", "sdpa", "naive_hyb", "hybrid", "fmap"])
    p.add_argument("--fla-head-dims", type=int, nargs="+", default=None,
                   help="head dims at which fla runs (its autotuner compiles many configs: costly)")
    p.add_argument("--warmup-ms", type=int, default=None)
    p.add_argument("--rep-ms", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=1e9,
                   help="skip the O(T^2) runs and the config sweep past this many seconds (fla time not counted)")
    p.add_argument("--fla-budget-s", type=float, default=1e9, help="stop running fla once it has used this long")
    p.add_argument("--checks", action="store_true", help="large-shape correctness spot checks")
    p.add_argument("--profile", action="store_true", help="per-kernel breakdown at T=1K and 32K, head dim 64")
    p.add_argument("--sweep", action="store_true", help="launch-config sweep at T=1K, head dim 64")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2

    seqlens = args.seqlens or ([1024, 8192] if args.quick else [512, 1024, 2048, 4096, 8192, 16384, 32768])
    dims = args.head_dims or ([64] if args.quick else [64, 128])
    warmup = args.warmup_ms or (5 if args.quick else 10)
    rep = args.rep_ms or (20 if args.quick else 50)
    bench = Bench(warmup, rep, args.budget_s, args.fla_budget_s)
    import triton
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), tokens=TOKENS, heads=HEADS, window=WINDOW, dtype="bf16",
                do_bench=dict(warmup_ms=warmup, rep_ms=rep, return_mode="median"), argv=sys.argv[1:])
    try:
        import fla
        meta["fla"] = getattr(fla, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        meta["fla"] = f"not importable: {type(e).__name__}"
    results = dict(meta=meta, rows=[])

    def dump():
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))

    if args.checks:
        results["checks"] = correctness_checks()
        print("checks:", json.dumps(results["checks"]))
        dump()

    for D in dims:
        for T in seqlens:
            B = max(1, TOKENS // T)
            x = make_inputs(B, T, D)
            for m in args.methods:
                if m == "fla" and args.fla_head_dims is not None and D not in args.fla_head_dims:
                    r = dict(skipped="skipped: not requested at this head dim")
                elif m == "fla" and bench.fla_over_budget():
                    r = dict(skipped="skipped: fla time budget")
                else:
                    t0 = time.time()
                    try:
                        r = run_method(m, x, D, bench, args)
                    except Exception as e:  # noqa: BLE001
                        r = dict(skipped=f"error: {type(e).__name__}: {str(e)[:200]}")
                    r["wall_s"] = round(time.time() - t0, 2)
                    if m == "fla":
                        bench.fla_s += r["wall_s"]
                row = dict(method=m, head_dim=D, feature_dim=2 * D, T=T, B=B, **r)
                results["rows"].append(row)
                print(f"D={D:4d} T={T:6d} B={B:3d} {m:10s} fwd={_fmt(r.get('fwd_ms'))} fwd+bwd={_fmt(r.get('fwdbwd_ms'))}"
                      f" peak={_fmt(r.get('peak_mib'))}MiB {r.get('skipped', '')}", flush=True)
                dump()
            del x
            torch.cuda.empty_cache()
        if D == dims[0]:  # diagnostics at head dim 64 before the larger head dim
            if args.profile:
                try:
                    results["profile"] = {f"{m}_T{T}": profile_kernels(64, T, m) for m in ("linear", "hybrid")
                                          for T in (1024, 32768)}
                except Exception as e:  # noqa: BLE001
                    results["profile"] = {"error": f"{type(e).__name__}: {e}"[:300]}
                for key, rows in results["profile"].items():
                    if isinstance(rows, list):
                        print(key, "; ".join(f"{r['kernel'][:40]} {r['ms']:.3f}ms x{r['calls']}" for r in rows[:8]))
                dump()
            if args.sweep:
                results["sweep"] = config_sweep(bench, 64, 1024)
                for r in results["sweep"]:
                    print("sweep", r)
                dump()

    # summary table (fwd+bwd ms / peak MiB)
    methods = args.methods
    print("\nfwd+bwd ms (peak MiB), bf16, B*T = 16384, H = 16, window 64")
    for D in dims:
        print(f"\nhead dim {D}, feature dim {2 * D}")
        print("T".rjust(6) + "".join(m.rjust(20) for m in methods))
        for T in seqlens:
            cells = []
            for m in methods:
                r = next((r for r in results["rows"] if r["method"] == m and r["T"] == T and r["head_dim"] == D), {})
                cells.append("skipped" if "fwdbwd_ms" not in r else f"{_fmt(r['fwdbwd_ms'])} ({r['peak_mib']:.0f})")
            print(str(T).rjust(6) + "".join(c.rjust(20) for c in cells))
    dump()
    return 0


if __name__ == "__main__":
    sys.exit(main())
