"""Stage-1 attention-transfer throughput on a SmolLM2-135M-shaped model (random weights: speed needs no weights).

Times one optimizer step of attention transfer (transfer-mode forward over all layers + backward into the
feature maps + AdamW) per attention backend, window and feature-map implementation (the fused Triton
Hedgehog map of effconv_kernels vs the PyTorch FeatureMap; the reference backend always uses PyTorch),
beside the teacher's plain forward in the same run.
    python bench/stage1_throughput.py --out stage1.json [--batch 32 --seq-len 1024]
    python bench/stage1_throughput.py --kernels triton --breakdown --out stage1.json
--breakdown adds, per window, (a) a torch.profiler table of the whole step's GPU kernels (top kernels and GPU ms
per step grouped by component: feature map, attention kernel, teacher SDPA, GEMMs, copies, ...), and (b)
do_bench times of one layer's components in isolation at the model's shapes (feature maps q+k fwd+bwd torch vs
Triton, the attention kernel fwd+bwd, the teacher's SDPA forward), scaled to all layers; (b) includes autograd
and gradient-seed allocation, so it reads higher than the kernels' share in (a).
"""

from __future__ import annotations

import argparse
import json
import time

import contextlib

import torch
import transformers as tf

from effconv.pipelines.linearize import LinearizeConfig
from effconv.distill.transfer import attention_transfer_loss
from effconv.conversion.student import make_student
from effconv.modeling.attention_ops import FeatureMap


def smollm2_config() -> tf.LlamaConfig:
    return tf.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True,
    )


def timed(fn, steps: int, warmup: int, repeats: int = 3) -> float:
    """Median over `repeats` blocks of `steps` calls, seconds per call (single blocks varied by ~10% run to run)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    blocks = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
        blocks.append((time.perf_counter() - t0) / steps)
    return sorted(blocks)[len(blocks) // 2]


def host_time_ms(fn, steps: int = 3) -> float:
    """Host (Python + launch) time of one call: timed without waiting for the GPU, starting from an idle GPU;
    only meaningful when the call makes no blocking sync. Close to step_ms means the step is host-bound."""
    total = 0.0
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        total += time.perf_counter() - t0
    torch.cuda.synchronize()
    return total / steps * 1e3


def host_profile(step, steps: int = 2, top: int = 40) -> list[dict]:
    """Host-side ops of the step by self CPU time (torch.profiler, CPU activity only), ms per step."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = [{"op": e.key[:120], "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
             "calls_per_step": e.count / steps} for e in prof.key_averages()]
    rows.sort(key=lambda r: -r["self_cpu_ms_per_step"])
    total = sum(r["self_cpu_ms_per_step"] for r in rows)
    return [{"op": "TOTAL self CPU", "self_cpu_ms_per_step": total, "calls_per_step": 0}] + rows[:top]


@contextlib.contextmanager
def torch_feature_map():
    """Run FeatureMap in PyTorch even where the model would pass it the fused Triton map."""
    original = FeatureMap.forward
    FeatureMap.forward = lambda self, x, kernel=None: original(self, x)
    try:
        yield
    finally:
        FeatureMap.forward = original


def do_bench_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100))


def component_times(student, batch: torch.Tensor, window: int, layers: int) -> dict:
    """do_bench of one converted layer's parts on the inputs it sees in the step (ms per layer and all layers)."""
    import effconv_kernels as ek

    attn = student.model.layers[0].self_attn
    b, t = batch.shape
    hidden = torch.randn(b, t, student.config.hidden_size, device=batch.device, dtype=torch.bfloat16)
    pos = torch.arange(t, device=batch.device)[None].expand(b, -1)
    with torch.no_grad():
        cos_sin = student.model.rotary_emb(hidden, pos)
        q, k, v = attn._project(hidden, cos_sin)
    fmq, fmk = attn.feature_map_q, attn.feature_map_k
    params = [fmq.weight, fmq.bias, fmk.weight, fmk.bias]

    def fm_fused():
        return [ek.hedgehog_feature_map(x, fm.weight, fm.bias, out_dtype=v.dtype) for x, fm in ((q, fmq), (k, fmk))]

    def fm_torch():
        return [fm(x).to(v.dtype) for x, fm in ((q, fmq), (k, fmk))]

    def fm_step(make):
        fq, fk = make()
        torch.autograd.grad([fq, fk], params, [torch.ones_like(fq), torch.ones_like(fk)])

    fq, fk = (x.detach().requires_grad_() for x in fm_fused())
    do = torch.randn(b, attn.num_heads, t, v.shape[-1], device=v.device, dtype=v.dtype)
    eps = student.config.linear_eps

    def attention_step():
        if window > 0:
            o, _ = ek.hybrid_attention(q, k, v, fq, fk, attn.window_mix, window=window, scale=attn.scale, eps=eps)
            leaves = [fq, fk, attn.window_mix]
        else:
            o, _ = ek.linear_attention(fq, fk, v, eps=eps)
            leaves = [fq, fk]
        torch.autograd.grad(o, leaves, do)

    def teacher_softmax():
        with torch.no_grad():
            attn._softmax(q, k, v, None, None)

    per_layer = {
        "feature_maps_torch_fwd_bwd": do_bench_ms(lambda: fm_step(fm_torch)),
        "feature_maps_triton_fwd_bwd": do_bench_ms(lambda: fm_step(fm_fused)),
        "attention_kernel_fwd_bwd": do_bench_ms(attention_step),
        "teacher_softmax_fwd": do_bench_ms(teacher_softmax),
    }
    return {"per_layer_ms": per_layer, "all_layers_ms": {key: val * layers for key, val in per_layer.items()}}


def profile_step(step, steps: int = 2, top: int = 20) -> list[dict]:
    """GPU kernels of the step by self GPU time (ms per step), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        gpu_us = getattr(evt, "self_device_time_total", None)
        if gpu_us is None:
            gpu_us = getattr(evt, "self_cuda_time_total", 0.0)
        if gpu_us > 0:
            rows.append({"kernel": evt.key[:120], "ms_per_step": gpu_us / 1e3 / steps, "calls_per_step": evt.count / steps})
    rows.sort(key=lambda r: -r["ms_per_step"])
    total = sum(r["ms_per_step"] for r in rows)
    return [{"kernel": "TOTAL GPU time", "ms_per_step": total, "calls_per_step": None}] + rows[:top], categorize(rows)


# kernel-name patterns -> component; first match wins. The PyTorch feature map's einsum is the only fp32 GEMM of
# the step (everything else is bf16); its softmax/cat/cast kernels are generic and stay in "other elementwise".
CATEGORIES = [
    ("feature_map_triton", ("hedgehog",)),
    ("feature_map_torch_fp32_gemm", ("f32f32",)),
    ("attention_kernel", ("hybrid_", "linear_", "chunk_state")),
    ("teacher_softmax_sdpa", ("sdpa", "flash", "fmha")),
    ("bf16_gemm_projections_mlp", ("nvjet", "gemm", "cutlass", "sm90_xmma")),
    ("softmax_kernels", ("softmax",)),
    ("reductions", ("reduce_kernel",)),
    ("copies_casts", ("copy",)),
]


def categorize(rows: list[dict]) -> dict:
    out = {name: 0.0 for name, _ in CATEGORIES}
    out["other_elementwise"] = 0.0
    for r in rows:
        name = next((c for c, pats in CATEGORIES if any(p in r["kernel"] for p in pats)), "other_elementwise")
        out[name] += r["ms_per_step"]
    return out


def feature_map_sweep(student, batch: torch.Tensor) -> list[dict]:
    """Dot precision, row block and warps of the fused map's kernels, at the q map's shapes in the model:
    forward alone, and backward (fwd+bwd minus fwd) with the forward at its default; plus the output's error
    against an fp64 reference per precision."""
    import effconv_kernels as ek
    from effconv_kernels.feature_map import hedgehog as hh
    from effconv_kernels.feature_map.naive import hedgehog_feature_map_ref

    attn = student.model.layers[0].self_attn
    b, t = batch.shape
    x = torch.randn(b, t, attn.num_heads, attn.head_dim, device=batch.device, dtype=torch.bfloat16).transpose(1, 2)
    fm = attn.feature_map_q
    with torch.no_grad():
        weight = fm.weight + 0.3 * torch.randn_like(fm.weight)
        bias = 0.3 * torch.randn_like(fm.bias)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    ref = hedgehog_feature_map_ref(x.double(), weight.double(), bias.double())
    saved = (hh.FWD_BT, hh.FWD_WARPS, hh.BWD_BT, hh.BWD_WARPS, hh.DOT_PREC)

    def fwd():
        return ek.hedgehog_feature_map(x, weight, bias, out_dtype=torch.float32)

    def fwd_bwd():
        out = fwd()
        torch.autograd.grad(out, [weight, bias], torch.ones_like(out))

    rows = []
    try:
        for prec in ("ieee", "tf32x3"):
            hh.DOT_PREC = prec
            hh.FWD_BT, hh.FWD_WARPS, hh.BWD_BT, hh.BWD_WARPS = saved[:4]
            err = ((fwd().double() - ref).norm() / ref.norm()).item()
            for fwd_bt, fwd_warps in [(32, 4), (64, 8), (32, 2), (64, 4), (128, 8)]:
                hh.FWD_BT, hh.FWD_WARPS = fwd_bt, fwd_warps
                rows.append({"prec": prec, "fwd_bt": fwd_bt, "fwd_warps": fwd_warps, "fwd_ms": do_bench_ms(fwd),
                             "out_rel_err_vs_fp64": err})
                print(rows[-1])
            hh.FWD_BT, hh.FWD_WARPS = saved[:2]
            fwd_ms = do_bench_ms(fwd)
            for bwd_bt, bwd_warps in [(32, 8), (16, 4), (32, 4), (64, 8), (16, 8), (64, 16)]:
                hh.BWD_BT, hh.BWD_WARPS = bwd_bt, bwd_warps
                try:
                    rows.append({"prec": prec, "bwd_bt": bwd_bt, "bwd_warps": bwd_warps,
                                 "bwd_ms": do_bench_ms(fwd_bwd) - fwd_ms})
                except Exception as exc:  # noqa: BLE001 - e.g. out of registers / shared memory for one config
                    rows.append({"prec": prec, "bwd_bt": bwd_bt, "bwd_warps": bwd_warps, "error": str(exc)[:200]})
                print(rows[-1])
    finally:
        hh.FWD_BT, hh.FWD_WARPS, hh.BWD_BT, hh.BWD_WARPS, hh.DOT_PREC = saved
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks of --steps steps; the median is kept")
    parser.add_argument("--kernels", nargs="+", default=["triton", "reference"])
    parser.add_argument("--windows", nargs="+", type=int, default=[64, 0])
    parser.add_argument("--feature-maps", nargs="+", default=["triton", "torch"], choices=["triton", "torch"],
                        help="Hedgehog map on the triton backend: fused Triton kernel or the PyTorch FeatureMap")
    parser.add_argument("--breakdown", action="store_true",
                        help="per-component do_bench times and a torch.profiler kernel table (triton backend)")
    parser.add_argument("--host-profile", action="store_true", help="host-side (CPU) op table of one step")
    parser.add_argument("--feature-map-sweep", action="store_true", help="block/warp sweep of the fused map")
    parser.add_argument("--transfer-mse", choices=["default", "eager", "compiled"], default="default",
                        help="per-layer loss: the model's transfer_mse, plain F.mse_loss on fp32 casts (before), "
                             "or torch.compile of the latter")
    parser.add_argument("--mixers", nargs="+", default=["ungated", "default"], choices=["ungated", "default"],
                        help="ungated: no gate, no sinks (the kernels' path before gates); default: linearize's "
                             "defaults (data-dependent gate; 4 sinks with a window)")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device("cuda")
    if args.transfer_mse != "default":
        import effconv.modeling.modeling_effconv as modeling

        def eager_mse(y_pred, y_true):
            return torch.nn.functional.mse_loss(y_pred.float(), y_true.float())

        modeling.transfer_mse = eager_mse if args.transfer_mse == "eager" else torch.compile(eager_mse)
    torch.manual_seed(0)
    config = smollm2_config()
    config._attn_implementation = "sdpa"
    teacher = tf.LlamaForCausalLM(config).to(device, torch.bfloat16).eval()
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device)
    tokens = batch.numel()
    results = {"device": torch.cuda.get_device_name(), "batch": args.batch, "seq_len": args.seq_len,
               "transfer_mse": args.transfer_mse, "runs": []}

    with torch.no_grad():
        sec = timed(lambda: teacher(batch, use_cache=False), args.steps, args.warmup, args.repeats)
    results["teacher_forward_tokens_per_s"] = tokens / sec
    print(f"teacher forward: {tokens / sec:,.0f} tokens/s")

    mixer_settings = {"ungated": dict(gate=False, sinks=0), "default": {}}
    for window, kernel, mixer in ((w, k, m) for w in args.windows for k in args.kernels for m in args.mixers):
        cfg = LinearizeConfig(window=window, kernel=kernel, **mixer_settings[mixer])
        cfg.validate()
        student = make_student(teacher, cfg, device)
        params = [p for p in student.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)

        def step():
            loss = attention_transfer_loss(student, batch, last_layer=config.num_hidden_layers - 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        # the reference backend never takes the fused map: one run for it
        feature_maps = args.feature_maps if kernel == "triton" else ["torch"]
        for feature_map in feature_maps:
            ctx = torch_feature_map() if feature_map == "torch" else contextlib.nullcontext()
            row = {"window": window, "kernel": kernel, "feature_map": feature_map, "mixer": mixer,
                   "gate": bool(cfg.gate), "sinks": cfg.effective_sinks()}
            torch.cuda.reset_peak_memory_stats()
            with ctx:
                try:
                    sec = timed(step, args.steps, args.warmup, args.repeats)
                    row.update({"tokens_per_s": tokens / sec, "step_ms": sec * 1e3,
                                "peak_gb": torch.cuda.max_memory_allocated() / 1e9})
                    if args.breakdown and kernel == "triton":
                        row["profile_top_kernels"], row["profile_ms_by_component"] = profile_step(step)
                        # below 1: the GPU idles part of the step (host-side launch overhead or syncs)
                        row["gpu_busy_fraction"] = row["profile_top_kernels"][0]["ms_per_step"] / row["step_ms"]
                        row["host_ms_per_step"] = host_time_ms(step)
                    if args.host_profile and kernel == "triton":
                        row["host_profile_top"] = host_profile(step)
                        for entry in row["host_profile_top"][:25]:
                            print(f"    host {entry['self_cpu_ms_per_step']:8.2f} ms  x{entry['calls_per_step']:6.0f}  "
                                  f"{entry['op'][:80]}")
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "OOM"
            print({key: val for key, val in row.items() if not key.startswith("profile_")})
            for entry in row.get("profile_top_kernels", [])[:8]:
                print(f"    {entry['ms_per_step']:8.2f} ms  {entry['kernel'][:90]}")
            if "profile_ms_by_component" in row:
                print("    GPU ms per step by component:",
                      {key: round(val, 2) for key, val in row["profile_ms_by_component"].items()})
            results["runs"].append(row)
        if args.breakdown and kernel == "triton":
            comp = component_times(student, batch, window, config.num_hidden_layers)
            comp["window"] = window
            print("components (all layers, ms):", {k: round(v, 2) for k, v in comp["all_layers_ms"].items()})
            results.setdefault("components", []).append(comp)
        if args.feature_map_sweep and kernel == "triton" and "feature_map_sweep" not in results:
            results["feature_map_sweep"] = feature_map_sweep(student, batch)
        del student, opt, params
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
