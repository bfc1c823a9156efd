"""Triton MoE experts (forward + backward) against transformers' style per-expert loop.

Runs on CUDA when present, otherwise through TRITON_INTERPRET=1 (set by conftest.py before import).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

import effconv_kernels as ek
from effconv_kernels.moe.naive import naive_moe_experts

ON_CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")

TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1.5e-2, 2.5e-2)}  # (output, grads), relative norm error


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-8)).item()


def make_inputs(N, D, I, E, k, dtype, device, seed=0, skip_experts=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    allowed = torch.tensor([e for e in range(E) if e not in skip_experts])
    scores = torch.randn(N, len(allowed), generator=g)
    top_w, pos = scores.softmax(-1).topk(k, dim=-1)  # distinct experts per token, like a router
    idx = allowed[pos]
    gu = torch.randn(E, 2 * I, D, generator=g) * D ** -0.5
    dn = torch.randn(E, D, I, generator=g) * I ** -0.5
    dout = torch.randn(N, D, generator=g)
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, top_w, gu, dn)]
    return leaves[0], idx.to(device), leaves[1], leaves[2], leaves[3], dout.to(device=device, dtype=dtype)


def run(fn, x, idx, w, gu, dn, dout, **kw):
    out = fn(x, idx, w, gu, dn, **kw)
    grads = torch.autograd.grad(out, [x, w, gu, dn], dout)
    return out, grads


GRAD_NAMES = ("hidden", "top_k_weights", "gate_up_proj", "down_proj")


def loop_reference(x, idx, w, gu, dn, dout):
    """The per-expert loop in fp32 on the same (rounded) inputs: (out, grads)."""
    leaves = [t.detach().float().requires_grad_() for t in (x, w, gu, dn)]
    return run(naive_moe_experts, leaves[0], idx, *leaves[1:], dout.float())


def assert_matches_loop(out, grads, ref, ref_grads, dtype):
    assert rel_err(out, ref) < TOL[dtype][0]
    for name, g, rg in zip(GRAD_NAMES, grads, ref_grads):
        assert rel_err(g, rg) < TOL[dtype][1], name


CASES = [
    # N, D, I, E, k, dtype, experts that receive no token
    (37, 32, 48, 4, 2, torch.float32, ()),
    (19, 24, 20, 6, 1, torch.float32, (1, 4)),  # D, I not multiples of the tiles; empty experts
    (50, 40, 32, 8, 2, torch.float32, (0, 7)),
    (1, 16, 16, 4, 2, torch.float32, ()),
    (45, 32, 48, 5, 2, torch.bfloat16, (2,)),
    (70, 48, 24, 8, 1, torch.bfloat16, ()),
    (150, 24, 40, 4, 2, torch.float32, (1,)),  # >= 64 rows per expert: weight grads split in two (interpreter)
]


@pytest.mark.parametrize("N,D,I,E,k,dtype,skip", CASES)
def test_moe_triton_matches_naive_loop(N, D, I, E, k, dtype, skip, device):
    x, idx, w, gu, dn, dout = make_inputs(N, D, I, E, k, dtype, device, skip_experts=skip)
    out, grads = run(ek.moe_experts, x, idx, w, gu, dn, dout, backend="triton")
    # the oracle in fp32 from the same (rounded) inputs
    ref, ref_grads = loop_reference(x, idx, w, gu, dn, dout)
    assert out.dtype == dtype and out.shape == (N, D)
    tol_o, tol_g = TOL[dtype]
    assert rel_err(out, ref) < tol_o
    for name, g, rg in zip(GRAD_NAMES, grads, ref_grads):
        assert g.dtype == dtype, name
        assert rel_err(g, rg) < tol_g, name
    for e in skip:  # experts without tokens get exactly zero weight gradients
        assert grads[2][e].abs().max() == 0 and grads[3][e].abs().max() == 0


BACKWARD_PLANS = [("triton", "grouped_mm"), ("grouped_mm", "fused"), ("grouped_mm", "grouped_mm")]


@pytest.mark.parametrize("wgrad,dgrad", BACKWARD_PLANS)
@pytest.mark.parametrize("N,D,I,E,k,dtype,skip", [CASES[1], CASES[2], CASES[4], CASES[5]])
def test_backward_plans_match_loop(N, D, I, E, k, dtype, skip, wgrad, dgrad, device, monkeypatch):
    """torch._grouped_mm for the weight grads and/or dA (+ the SwiGLU backward kernel) equals the loop, empty
    experts included (their weight grads exactly zero)."""
    if device == "cuda" and (dtype != torch.bfloat16 or D % 8 or I % 8):
        pytest.skip("CUDA grouped GEMM: bf16 with 16-byte row strides only (auto never picks it otherwise)")
    monkeypatch.setenv("EFFCONV_MOE_WGRAD", wgrad)
    monkeypatch.setenv("EFFCONV_MOE_DGRAD", dgrad)
    x, idx, w, gu, dn, dout = make_inputs(N, D, I, E, k, dtype, device, skip_experts=skip)
    out, grads = run(ek.moe_experts, x, idx, w, gu, dn, dout, backend="triton")
    assert_matches_loop(out, grads, *loop_reference(x, idx, w, gu, dn, dout), dtype)
    for name, g in zip(GRAD_NAMES, grads):
        assert g.dtype == dtype, name
    for e in skip:
        assert grads[2][e].abs().max() == 0 and grads[3][e].abs().max() == 0


@pytest.mark.parametrize("dgrad", ["fused", "grouped_mm"])
@pytest.mark.parametrize("mode", ["auto", "sum"])
def test_slot_add_matches_slot_sum_and_loop(mode, dgrad, device, monkeypatch, poisoned):
    """k = 2: the down / dx kernels adding both slots into the zeroed token rows (atomics) give the loop's result,
    bitwise equal to the slot-sum path in fp32, with no slot-sum launch; zeroed() filling the outputs (on both
    backward plans) is what makes NaN-poisoned buffers pass."""
    from effconv_kernels.moe import triton as mt
    if device == "cuda" and dgrad == "grouped_mm":
        pytest.skip("CUDA grouped GEMM: bf16 only (test_backward_plans_match_loop covers it)")
    monkeypatch.setenv("EFFCONV_MOE_DGRAD", dgrad)
    x, idx, w, gu, dn, dout = make_inputs(53, 40, 24, 5, 2, torch.float32, device, skip_experts=(1,))
    monkeypatch.setenv("EFFCONV_MOE_SLOT", "sum")
    ref_out, ref_grads = run(ek.moe_experts, x, idx, w, gu, dn, dout, backend="triton")
    monkeypatch.setenv("EFFCONV_MOE_SLOT", mode)
    poisoned()
    before = mt.LAUNCHES["slot_sum"]
    out, grads = run(ek.moe_experts, x, idx, w, gu, dn, dout, backend="triton")
    assert mt.LAUNCHES["slot_sum"] - before == (0 if mode == "auto" else 2)
    assert_matches_loop(out, grads, *loop_reference(x, idx, w, gu, dn, dout), torch.float32)
    assert torch.equal(out, ref_out) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


def test_zeroed_buffer(device, poisoned):
    """The slot adds' output is zero once joined (on CUDA the side stream that zeroes it races the kernels queued
    before the join if the join is missing: a NaN-poisoned buffer shows it)."""
    from effconv_kernels.moe import triton as mt
    poisoned()
    buf, join = mt.zeroed(300, 70, torch.bfloat16, torch.device(device))
    join()
    assert buf.shape == (300, 70) and buf.dtype == torch.bfloat16 and not buf.any()


def test_slot_add_choice(monkeypatch):
    from effconv_kernels.moe import triton as mt
    assert mt.slot_add_on(2, torch.float32) and mt.slot_add_on(2, torch.float16)
    assert not mt.slot_add_on(1, torch.float32)  # one slot: the rows are the output already
    assert not mt.slot_add_on(3, torch.float32)  # three adds into zero: the order would change the rounding
    assert mt.slot_add_on(2, torch.bfloat16) == (not mt.interpreting())  # the interpreter has no bf16 atomics
    monkeypatch.setenv("EFFCONV_MOE_SLOT", "sum")
    assert not mt.slot_add_on(2, torch.float32)
    for bad in ("atomics", "add"):  # "add" was a second name of auto
        monkeypatch.setenv("EFFCONV_MOE_SLOT", bad)
        with pytest.raises(ValueError, match=f"EFFCONV_MOE_SLOT='{bad}'"):
            mt.slot_add_on(2, torch.float32)


@pytest.mark.parametrize("needs", [(False, True, True, True), (True, False, False, True), (False, True, False, False)])
def test_grouped_dgrad_partial_grads(needs, device, monkeypatch):
    """The grouped-GEMM dA path with some inputs frozen (d_topw from the SwiGLU kernel, no dx launch)."""
    if device == "cuda":
        pytest.skip("covered on CUDA by test_backward_plans_match_loop (bf16 only there)")
    monkeypatch.setenv("EFFCONV_MOE_WGRAD", "grouped_mm")
    monkeypatch.setenv("EFFCONV_MOE_DGRAD", "grouped_mm")
    x, idx, w, gu, dn, dout = make_inputs(29, 24, 20, 5, 2, torch.float32, device, skip_experts=(2,))
    leaves = [t.detach().requires_grad_(r) for t, r in zip((x, w, gu, dn), needs)]
    out = ek.moe_experts(leaves[0], idx, *leaves[1:], backend="triton")
    grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], dout)
    ref_leaves = [t.detach().requires_grad_(r) for t, r in zip((x, w, gu, dn), needs)]
    ref = naive_moe_experts(ref_leaves[0], idx, *ref_leaves[1:])
    ref_grads = torch.autograd.grad(ref, [t for t in ref_leaves if t.requires_grad], dout)
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < TOL[torch.float32][1]


def test_backward_plan_choice(monkeypatch):
    from effconv_kernels.moe import triton as mt
    x = torch.zeros(2, 16, dtype=torch.bfloat16)
    monkeypatch.delenv("EFFCONV_MOE_WGRAD", raising=False)
    monkeypatch.delenv("EFFCONV_MOE_DGRAD", raising=False)
    assert mt.backward_plan(x, 16, 16) == ("triton", "fused")  # auto off CUDA: this file's kernels
    monkeypatch.setenv("EFFCONV_MOE_WGRAD", "grouped_mm")
    assert mt.backward_plan(x, 16, 16) == ("grouped_mm", "fused")
    monkeypatch.setenv("EFFCONV_MOE_DGRAD", "cublas")
    with pytest.raises(ValueError, match="EFFCONV_MOE_DGRAD"):
        mt.backward_plan(x, 16, 16)


@pytest.mark.parametrize("N,D,k", [(1, 8, 2), (37, 40, 2), (33, 130, 3), (16, 32, 4)])
def test_slot_sum_matches_torch(N, D, k, device):
    from effconv_kernels.moe.triton import slot_sum
    for dtype in (torch.float32, torch.bfloat16):
        y = torch.randn(N * k, D, generator=torch.Generator().manual_seed(N)).to(device=device, dtype=dtype)
        slots = y.view(N, k, D).float()
        want = slots[:, 0]
        for j in range(1, k):  # the kernel's order: slot 0 + slot 1 + ... in fp32
            want = want + slots[:, j]
        want = want.to(dtype)
        assert torch.equal(slot_sum(y, N, k, D), want)


@pytest.mark.parametrize("needs", [(False, True, True, True), (True, False, False, True), (False, True, False, False)])
def test_triton_partial_grads(needs, device):
    """Only some inputs need grads (frozen weights, no d_hidden): the d_topw fallback path and skipped GEMMs."""
    x, idx, w, gu, dn, dout = make_inputs(29, 24, 20, 5, 2, torch.float32, device, skip_experts=(2,))
    leaves = [t.detach().requires_grad_(r) for t, r in zip((x, w, gu, dn), needs)]
    out = ek.moe_experts(leaves[0], idx, *leaves[1:], backend="triton")
    want = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(out, want, dout)
    ref_leaves = [t.detach().requires_grad_(r) for t, r in zip((x, w, gu, dn), needs)]
    ref = naive_moe_experts(ref_leaves[0], idx, *ref_leaves[1:])
    ref_grads = torch.autograd.grad(ref, [t for t in ref_leaves if t.requires_grad], dout)
    assert rel_err(out, ref) < TOL[torch.float32][0]
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < TOL[torch.float32][1]


def test_reference_and_auto_match_naive(device):
    x, idx, w, gu, dn, dout = make_inputs(23, 20, 12, 5, 2, torch.float32, device, skip_experts=(3,))
    out_ref, g_ref = run(ek.moe_experts, x, idx, w, gu, dn, dout, backend="reference")
    out_naive, g_naive = run(ek.moe_experts, x, idx, w, gu, dn, dout, backend="naive")
    assert rel_err(out_ref, out_naive) < 1e-6
    for a, b in zip(g_ref, g_naive):
        assert rel_err(a, b) < 1e-6
    if device == "cpu":  # "auto" on CPU tensors is the reference
        torch.testing.assert_close(ek.moe_experts(x, idx, w, gu, dn), out_ref)


def test_naive_matches_transformers_mixtral_experts():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    x, idx, w, gu, dn, _ = make_inputs(17, 24, 16, 4, 2, torch.float32, "cpu")
    cfg = MixtralConfig(num_local_experts=4, hidden_size=24, intermediate_size=16)
    experts = MixtralExperts(cfg)
    with torch.no_grad():
        experts.gate_up_proj.copy_(gu)
        experts.down_proj.copy_(dn)
        torch.testing.assert_close(naive_moe_experts(x, idx, w, gu, dn), experts(x, idx, w))


def test_forward_without_grad_and_empty_input(device):
    x, idx, w, gu, dn, _ = make_inputs(9, 16, 16, 4, 2, torch.float32, device)
    with torch.no_grad():
        out = ek.moe_experts(x, idx, w, gu, dn, backend="triton")
        torch.testing.assert_close(out, naive_moe_experts(x, idx, w, gu, dn), rtol=1e-5, atol=1e-5)
        empty = ek.moe_experts(x[:0], idx[:0], w[:0], gu, dn, backend="triton")
    assert empty.shape == (0, 16)


def test_bad_shapes_raise():
    x, idx, w, gu, dn, _ = make_inputs(4, 16, 8, 4, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="gate_up_proj"):
        ek.moe_experts(x, idx, w, gu[:, :-1], dn)
    with pytest.raises(ValueError, match="top_k_weights"):
        ek.moe_experts(x, idx, w[:, :1], gu, dn)


# --- fused routing (two Triton launches) == the torch op chain, exactly ---
def _ids(kind, N, k, E, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "one":  # every assignment to one expert
        return torch.full((N, k), E - 1, dtype=torch.int64)
    if kind == "skewed":  # most to expert 0, several experts empty
        ids = torch.randint(0, E, (N, k), generator=g)
        ids[torch.rand(N, k, generator=g) < 0.7] = 0
        return ids.clamp(max=max(0, E - 3))
    return torch.randint(0, E, (N, k), generator=g)  # k may repeat an expert: the sort does not care


ROUTE_CASES = [
    # N, k, E, kind, BM
    (1, 1, 1, "rand", 16),
    (37, 2, 4, "rand", 16),
    (33, 1, 1, "rand", 64),      # E = 1
    (50, 2, 5, "skewed", 16),    # E not a power of two, empty experts
    (129, 3, 7, "rand", 64),
    (200, 2, 8, "one", 16),      # all tokens in one expert
    (1000, 2, 6, "skewed", 128),  # several chunks of several sub-tiles
    (777, 1, 128, "rand", 16),   # E = MAX_EXPERTS
    (300, 4, 100, "skewed", 64),
    pytest.param(70000, 4, 8, "rand", 128, marks=pytest.mark.skipif(not ON_CUDA, reason="big: GPU chunking")),
    pytest.param(9000, 2, 128, "skewed", 64, marks=pytest.mark.skipif(not ON_CUDA, reason="big: GPU chunking")),
]


@pytest.mark.parametrize("N,k,E,kind,bm", ROUTE_CASES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_fused_routing_matches_torch_reference(N, k, E, kind, bm, dtype, device):
    from effconv_kernels.moe.triton import route, route_reference
    ids = _ids(kind, N, k, E).to(device=device, dtype=dtype)
    got = route(ids, E, bm)
    ref = route_reference(ids, E, bm)
    for name, a, b in zip(("order", "offsets", "table"), got, ref):
        assert a.dtype == torch.int32 and a.shape == b.shape, name
        assert torch.equal(a.cpu(), b.cpu()), name


def test_routing_rejects_too_many_experts(device):
    from effconv_kernels.moe.triton import MAX_EXPERTS, route
    with pytest.raises(ValueError, match="experts"):
        route(torch.zeros(4, 2, dtype=torch.int64, device=device), MAX_EXPERTS + 1, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA, reason="GPU: programs run concurrently in a varying order only there")
def test_triton_is_deterministic_on_gpu():
    """Repeated runs give bitwise-equal outputs and gradients (slot-add atomics for k = 2 included)."""
    for dtype in (torch.bfloat16, torch.float32):
        x, idx, w, gu, dn, dout = make_inputs(4100, 64, 48, 6, 2, dtype, "cuda", skip_experts=(5,))
        a_out, a_g = run(ek.moe_experts, x, idx, w, gu, dn, dout, backend="triton")
        for _ in range(3):
            b_out, b_g = run(ek.moe_experts, x, idx, w, gu, dn, dout, backend="triton")
            assert torch.equal(a_out, b_out) and all(torch.equal(a, b) for a, b in zip(a_g, b_g)), dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_result_does_not_depend_on_program_order(dtype, program_order, monkeypatch):
    """The interpreter's programs run in grid, reversed and shuffled order give bitwise-equal outputs and gradients
    (fp32: the k = 2 slot adds by atomics, two adds into zero commute; the weight grads in two row splits; both
    equal to the loop). The check can fail: slot adds for k = 3 (three adds into zero, which the kernels never do
    because the order changes the rounding) give other bits once the order changes."""
    from effconv_kernels.moe import triton as mt
    x, idx, w, gu, dn, dout = make_inputs(150, 40, 24, 6, 2, dtype, "cpu", skip_experts=(5,))
    assert mt.slot_add_on(2, dtype) == (dtype == torch.float32)  # the interpreter has no bf16 atomics
    results = {}
    for kind in ("grid", "reversed", "shuffled"):
        program_order(kind)
        results[kind] = run(ek.moe_experts, x, idx, w, gu, dn, dout, backend="triton")
    out, grads = results["grid"]
    assert_matches_loop(out, grads, *loop_reference(x, idx, w, gu, dn, dout), dtype)
    for kind in ("reversed", "shuffled"):
        assert torch.equal(results[kind][0], out), kind
        assert all(torch.equal(a, b) for a, b in zip(results[kind][1], grads)), kind
    if dtype == torch.float32:  # the perturbed kernels: order-dependent atomics
        monkeypatch.setattr(mt, "slot_add_on", lambda k, dt: True)
        x3, idx3, w3, gu3, dn3, dout3 = make_inputs(150, 40, 24, 6, 3, dtype, "cpu")
        outs = []
        for kind in ("grid", "reversed"):
            program_order(kind)
            outs.append(ek.moe_experts(x3, idx3, w3, gu3, dn3, backend="triton"))
        assert rel_err(outs[0], outs[1]) < 1e-6 and not torch.equal(outs[0], outs[1])


def _n_configs():
    from effconv_kernels.moe import triton as mt
    return max(len(v) for v in mt.CONFIGS.values())


@pytest.mark.skipif(not ON_CUDA, reason="CUDA: every tile config of the autotuner's lists (bf16, BM 128)")
@pytest.mark.parametrize("D,I", [(576, 192), (512, 256)])
@pytest.mark.parametrize("cfg", range(_n_configs()))
def test_every_tile_config_matches_loop(cfg, D, I, monkeypatch, poisoned):
    """The shapes' divisibility matches bench/moe.py (D, I multiples of 16, E 8, k 2, N*k a multiple of 16), and
    the two (D, I) give every (EVEN_K, EVEN_N) specialization the bench shapes (576 x 192, 576 x 1536, 2048 x
    1024) need (test_even_specializations_cover_the_bench), so the compiled kernels are shared with the
    benchmark through Triton's cache."""
    from effconv_kernels.moe import triton as mt
    monkeypatch.setattr(mt, "FORCE_CONFIG", cfg)
    monkeypatch.setenv("EFFCONV_MOE_WGRAD", "triton")  # this file's backward kernels, not the grouped GEMMs
    monkeypatch.setenv("EFFCONV_MOE_DGRAD", "fused")
    N, E, k = 2056, 8, 2
    x, idx, w, gu, dn, dout = make_inputs(N, D, I, E, k, torch.bfloat16, "cuda", skip_experts=(3,))
    assert mt.block_rows(N * k, E) == 128
    from triton.runtime.errors import OutOfResources
    try:
        out, grads = run(ek.moe_experts, x, idx, w, gu, dn, dout, backend="triton")
    except OutOfResources as e:  # the autotuner skips such a config (timed as inf): report, do not fail
        pytest.skip(f"config {cfg} out of resources on this GPU (the autotuner drops it): {str(e)[:120]}")
    with torch.no_grad():
        out_ng = ek.moe_experts(x, idx, w, gu, dn, backend="triton")
    assert torch.equal(out, out_ng)
    ref = loop_reference(x, idx, w, gu, dn, dout)
    assert_matches_loop(out, grads, *ref, torch.bfloat16)
    assert grads[2][3].abs().max() == 0 and grads[3][3].abs().max() == 0
    # the weight grads in two row splits (the bench's N 16384 path), NaN-filled partials and outputs
    monkeypatch.setenv("EFFCONV_MOE_WGRAD_SPLITS", "2")
    poisoned()
    for _ in range(2):
        out2, grads2 = run(ek.moe_experts, x, idx, w, gu, dn, dout, backend="triton")
        assert torch.equal(out2, out)
        assert_matches_loop(out2, grads2, *ref, torch.bfloat16)


@pytest.mark.skipif(ON_CUDA, reason="CPU smoke test of the benchmark script")
def test_moe_bench_runs_tiny_on_cpu(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "moe.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, str(root / "bench" / "moe.py"), "--tiny", "--count-launches", "--out",
                    str(out)], check=True, cwd=root, env=env, capture_output=True, timeout=300)
    rep = json.loads(out.read_text())
    row = rep["results"][0]
    assert all(row[m]["fwd_ms"] > 0 and row[m]["fwdbwd_ms"] > 0 for m in ("triton", "loop", "dense"))
    assert rep["correctness"]["triton"]["out"] < 1e-4
    # Triton launches: route x2, up, down (adds both slots into the zero-filled out): no slot-sum launch
    assert rep["launches"]["triton"]["fwd_triton"] == 4


def _as_on_gpu(monkeypatch, mt, bm=128):
    """Take the CUDA code path (BM, tile configs, autotuner glue) while the kernels still run interpreted."""
    monkeypatch.setattr(mt, "interpreting", lambda: False)
    monkeypatch.setattr(mt, "block_rows", lambda m, e: bm)


@pytest.mark.skipif(ON_CUDA, reason="the CUDA run covers this natively (test_every_tile_config_matches_loop)")
@pytest.mark.parametrize("cfg", range(_n_configs()))
def test_every_tile_config_interpreted(cfg, monkeypatch):
    """The autotuner's big tiles (BN up to 256, BK 128, BP/BQ 128/256) on awkward dims: masks and indexing."""
    from effconv_kernels.moe import triton as mt
    _as_on_gpu(monkeypatch, mt)
    monkeypatch.setattr(mt, "FORCE_CONFIG", cfg)
    x, idx, w, gu, dn, dout = make_inputs(90, 40, 36, 3, 2, torch.float32, "cpu", skip_experts=(1,))
    out, grads = run(ek.moe_experts, x, idx, w, gu, dn, dout, backend="triton")
    assert_matches_loop(out, grads, *loop_reference(x, idx, w, gu, dn, dout), torch.float32)


@pytest.mark.skipif(ON_CUDA, reason="CPU check of the autotuner glue with a fake timer")
def test_autotune_glue_interpreted(monkeypatch):
    """triton.autotune over CONFIGS with our keys / pruning (a fake do_bench that runs each config once), the config
    cache on repeats, the n_part of dw partials taken from the chosen down_bwd config, tuned_configs(), and the
    zeroing of the slot-add outputs between the tuning runs (without it they add up once per config)."""
    from effconv_kernels.moe import triton as mt
    _as_on_gpu(monkeypatch, mt, bm=64)
    monkeypatch.setenv("EFFCONV_MOE_AUTOTUNE", "1")
    timings = iter(range(1, 10 ** 6))

    def fake_bench(fn, quantiles):
        fn()
        t = float(next(timings) % 7)  # some config other than the first wins
        return [t, t, t]
    for name, k in mt.KERNELS.items():
        monkeypatch.setattr(k, "tuned", mt.autotuned(name, k.fn, fake_bench))
        monkeypatch.setattr(k, "chosen", {})
    x, idx, w, gu, dn, dout = make_inputs(70, 40, 36, 3, 2, torch.float32, "cpu")
    ref, ref_grads = loop_reference(x, idx, w, gu, dn, dout)
    for _ in range(2):  # tuning call, then the cached configs
        out, grads = run(ek.moe_experts, x, idx, w, gu, dn, dout, backend="triton")
        assert_matches_loop(out, grads, ref, ref_grads, torch.float32)
    tuned = mt.tuned_configs()
    assert {c["kernel"] for c in tuned} == set(mt.KERNELS) and all(len(k.chosen) >= 1 for k in mt.KERNELS.values())
    assert len([c for c in tuned if c["kernel"] == "wgrad"]) == 2  # dW_gu and dW_d keys differ


def test_pinned_configs(monkeypatch):
    """The pinned table answers only bf16 on the GPU it was measured on (its file named from the GPU's name),
    EFFCONV_MOE_PINNED=0 turns it off (bad values: one clear error), and every pinned config is one of the
    autotuner's candidates (so the CUDA tile-config test compiles and checks it)."""
    from effconv_kernels.moe import triton as mt
    assert mt.pinned_file("NVIDIA H200") == mt.PINNED_DIR / "nvidia-h200.json"
    assert mt.pinned_file("NVIDIA H100 80GB HBM3").name == "nvidia-h100-80gb-hbm3.json"
    key = (576, 192, 4096, 128, True, True)
    want = mt.pinned_table("NVIDIA H200")[("dx", key)]
    assert (want.kwargs, want.num_warps, want.num_stages) == ({"BN": 128, "BK": 32}, 8, 5)
    assert mt.pinned_config("dx", key, torch.bfloat16, "NVIDIA H200") is want
    assert mt.pinned_config("dx", key, torch.float32, "NVIDIA H200") is None
    assert mt.pinned_config("dx", key, torch.bfloat16, "NVIDIA H100 80GB HBM3") is None
    assert mt.pinned_config("dx", (576, 192, 4096, 64, True, True), torch.bfloat16, "NVIDIA H200") is None
    assert mt.device_name(torch.zeros(1)) == ""
    monkeypatch.setenv("EFFCONV_MOE_PINNED", "0")
    assert mt.pinned_config("dx", key, torch.bfloat16, "NVIDIA H200") is None
    monkeypatch.setenv("EFFCONV_MOE_PINNED", "off")
    with pytest.raises(ValueError, match="EFFCONV_MOE_PINNED='off'"):
        mt.pinned_config("dx", key, torch.bfloat16, "NVIDIA H200")
    monkeypatch.delenv("EFFCONV_MOE_PINNED")

    def sig(c):
        return sorted(c.kwargs.items()), c.num_warps, c.num_stages
    files = sorted(mt.PINNED_DIR.glob("*.json"))
    assert files and mt.PINNED_DIR / "nvidia-h200.json" in files
    for path in files:
        gpu = json.loads(path.read_text())["gpu"]
        assert mt.pinned_file(gpu) == path  # loaded by the name torch gives the GPU
        table = mt.pinned_table(gpu)
        assert table, path
        for (name, key_values), cfg in table.items():
            assert len(key_values) == len(mt.KEYS[name]), name
            assert sig(cfg) in [sig(c) for c in mt.CONFIGS[name]], (name, key_values)


def test_pinned_config_files_are_package_data_and_checked(tmp_path, monkeypatch):
    """pyproject ships configs/*.json with the package; a file with a wrong key name is one error naming it."""
    from pathlib import Path

    from effconv_kernels.moe import triton as mt
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    root = Path(__file__).resolve().parents[2]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = root / "kernels" / "effconv_kernels"
    shipped = {p for pattern in data["effconv_kernels"] for p in package.glob(pattern)}
    assert set(mt.PINNED_DIR.glob("*.json")) <= shipped
    monkeypatch.setattr(mt, "PINNED_DIR", tmp_path)
    mt.pinned_table.cache_clear()
    row = {"kernel": "up", "key": {"D": 8, "I": 8, "ROWS": 16, "BM": 16, "SAVE_GU": True},
           "config": {"BN": 32, "BK": 16}, "num_warps": 4, "num_stages": 1}
    (tmp_path / "test-gpu.json").write_text(json.dumps({"gpu": "Test GPU", "configs": [row]}))
    try:
        with pytest.raises(ValueError, match=r"test-gpu\.json.*key names"):
            mt.pinned_table("Test GPU")
        assert mt.pinned_table("Other GPU") == {}
    finally:
        mt.pinned_table.cache_clear()


@pytest.mark.skipif(ON_CUDA, reason="CPU check of the pinned-config glue")
def test_pinned_config_skips_the_autotuner(monkeypatch):
    """A key with a pinned config launches it without tuning (reported as "pinned"); the other keys still tune."""
    from effconv_kernels.moe import triton as mt
    _as_on_gpu(monkeypatch, mt, bm=64)
    monkeypatch.setenv("EFFCONV_MOE_AUTOTUNE", "1")

    def fake_bench(fn, quantiles):
        fn()
        return [1.0, 1.0, 1.0]
    for name, k in mt.KERNELS.items():
        monkeypatch.setattr(k, "tuned", mt.autotuned(name, k.fn, fake_bench))
        monkeypatch.setattr(k, "chosen", {})
        monkeypatch.setattr(k, "source", {})
    pin = mt.CONFIGS["up"][2]
    seen = []

    def fake_pinned(name, key_values, dtype, gpu):
        seen.append((name, dtype, gpu))
        return pin if name == "up" else None
    monkeypatch.setattr(mt, "pinned_config", fake_pinned)
    x, idx, w, gu, dn, dout = make_inputs(70, 40, 36, 3, 2, torch.float32, "cpu")
    out, grads = run(ek.moe_experts, x, idx, w, gu, dn, dout, backend="triton")
    assert_matches_loop(out, grads, *loop_reference(x, idx, w, gu, dn, dout), torch.float32)
    by_kernel = {c["kernel"]: c for c in mt.tuned_configs()}
    assert by_kernel["up"]["source"] == "pinned" and by_kernel["up"]["config"] == pin.kwargs
    assert not mt.KERNELS["up"].tuned.cache  # the autotuner never ran for it
    assert all(by_kernel[n]["source"] == "autotuned" for n in ("down", "down_bwd", "dx", "wgrad"))
    assert ("up", torch.float32, "") in seen


@pytest.mark.skipif(ON_CUDA, reason="CPU check of the autotuner-failure fallback")
def test_autotune_failure_falls_back_to_default(monkeypatch):
    from effconv_kernels.moe import triton as mt
    _as_on_gpu(monkeypatch, mt, bm=64)
    monkeypatch.setenv("EFFCONV_MOE_AUTOTUNE", "1")

    class Broken:  # a tuning that adds into the output (as its timed runs of a slot-add kernel would), then fails
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*a, **k):
                for i in self.kernel.reset_pos:
                    a[i].add_(1.0)
                raise RuntimeError("config does not compile")
            return launch
    assert mt.KERNELS["down"].reset_pos and mt.KERNELS["dx"].reset_pos
    for k in mt.KERNELS.values():
        monkeypatch.setattr(k, "tuned", Broken(k))
        monkeypatch.setattr(k, "chosen", {})
    x, idx, w, gu, dn, dout = make_inputs(30, 24, 20, 3, 2, torch.float32, "cpu")
    with pytest.warns(UserWarning, match="autotuning"):
        out, grads = run(ek.moe_experts, x, idx, w, gu, dn, dout, backend="triton")
    assert_matches_loop(out, grads, *loop_reference(x, idx, w, gu, dn, dout), torch.float32)


def test_even_specializations_cover_the_bench():
    """Every (kernel, config, EVEN_K, EVEN_N) the bench shapes compile is compiled by the CUDA tile-config test's
    two shapes first (so the bench's autotuner only times cached kernels)."""
    from effconv_kernels.moe import triton as mt
    bench, tests = [(576, 192), (576, 1536), (2048, 1024)], [(576, 192), (512, 256)]
    for name in mt.EVEN_DIMS:
        for c in mt.CONFIGS[name]:
            def flags(shapes):
                return {mt.even_flags(name, dict(D=d, I=i), c.kwargs["BK"], c.kwargs["BN"]) for d, i in shapes}
            assert flags(bench) <= flags(tests), (name, c)


EVEN_SHAPES = [(64, 32), (32, 48), (40, 32), (24, 20), (32, 24), (32, 20)]


def test_even_shapes_cover_all_specializations():
    from effconv_kernels.moe import triton as mt
    for name, c in mt.INTERP.items():
        if name in mt.EVEN_DIMS:
            got = {mt.even_flags(name, dict(D=d, I=i), c.kwargs["BK"], c.kwargs["BN"]) for d, i in EVEN_SHAPES}
            assert len(got) == 4, (name, got)


@pytest.mark.parametrize("D,I", EVEN_SHAPES)
def test_even_k_n_specializations_match_loop(D, I, device):
    """D, I multiples and non-multiples of the tiles: each row-block GEMM runs with unmasked (EVEN_K / EVEN_N)
    and masked weight loads (all four combinations over these shapes under the interpreter's tiles)."""
    x, idx, w, gu, dn, dout = make_inputs(44, D, I, 3, 2, torch.float32, device, skip_experts=(2,))
    out, grads = run(ek.moe_experts, x, idx, w, gu, dn, dout, backend="triton")
    assert_matches_loop(out, grads, *loop_reference(x, idx, w, gu, dn, dout), torch.float32)


def test_tuning_knobs(monkeypatch, device):
    """EFFCONV_MOE_BM / EFFCONV_MOE_WGRAD_SPLITS override the block rows and weight-grad splits (bench knobs),
    bad values raise one clear error, and the forced splits still match the loop."""
    from effconv_kernels.moe import triton as mt
    monkeypatch.setattr(mt, "interpreting", lambda: False)
    assert mt.block_rows(100_000, 8) == 128
    monkeypatch.setenv("EFFCONV_MOE_BM", "64")
    assert mt.block_rows(100_000, 8) == 64
    monkeypatch.setenv("EFFCONV_MOE_BM", "48")
    with pytest.raises(ValueError, match="EFFCONV_MOE_BM='48'"):
        mt.block_rows(100_000, 8)
    monkeypatch.undo()
    monkeypatch.setenv("EFFCONV_MOE_WGRAD_SPLITS", "3")
    assert mt._weight_grad_splits(4, 32, 24, 400, torch.device("cpu")) == 3
    monkeypatch.setenv("EFFCONV_MOE_WGRAD", "triton")
    x, idx, w, gu, dn, dout = make_inputs(70, 40, 36, 4, 2, torch.float32, device, skip_experts=(2,))
    before = mt.LAUNCHES["split_sum"]
    out, grads = run(ek.moe_experts, x, idx, w, gu, dn, dout, backend="triton")
    assert mt.LAUNCHES["split_sum"] == before + 2  # dW_gu and dW_d both reduced their 3 row splits
    assert_matches_loop(out, grads, *loop_reference(x, idx, w, gu, dn, dout), torch.float32)
    monkeypatch.setenv("EFFCONV_MOE_PREFETCH", "0")  # down_bwd loading g / u after its k loop (the ablation)
    out0, grads0 = run(ek.moe_experts, x, idx, w, gu, dn, dout, backend="triton")
    assert torch.equal(out0, out)  # the forward does not change; the backward compiles differently (FMA contraction)
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(grads0, grads))
    monkeypatch.setenv("EFFCONV_MOE_PREFETCH", "2")
    with pytest.raises(ValueError, match="EFFCONV_MOE_PREFETCH='2'"):
        run(ek.moe_experts, x, idx, w, gu, dn, dout, backend="triton")
    monkeypatch.delenv("EFFCONV_MOE_PREFETCH")
    monkeypatch.setenv("EFFCONV_MOE_WGRAD_SPLITS", "two")
    with pytest.raises(ValueError, match="EFFCONV_MOE_WGRAD_SPLITS"):
        mt._weight_grad_splits(4, 32, 24, 400, torch.device("cpu"))
    ids = _ids("skewed", 300, 2, 6).to(device)
    monkeypatch.setenv("EFFCONV_MOE_ROUTE_SUB", "64")  # 64 ids per sub-tile (the interpreter's default is 32)
    for got, ref in zip(mt.route(ids, 6, 16), mt.route_reference(ids, 6, 16)):
        assert torch.equal(got, ref)
    monkeypatch.setenv("EFFCONV_MOE_ROUTE_SUB", "100")
    with pytest.raises(ValueError, match="EFFCONV_MOE_ROUTE_SUB='100'"):
        mt.route(ids, 6, 16)
    monkeypatch.setenv("EFFCONV_MOE_AUTOTUNE", "1")  # the tuned path for every call, or for none
    assert mt._autotune_on(16)
    monkeypatch.setenv("EFFCONV_MOE_AUTOTUNE", "0")
    assert not mt._autotune_on(10 ** 6)
    monkeypatch.delenv("EFFCONV_MOE_AUTOTUNE")
    assert mt._autotune_on(mt.AUTOTUNE_MIN_ROWS) and not mt._autotune_on(mt.AUTOTUNE_MIN_ROWS - 1)
    monkeypatch.setenv("EFFCONV_MOE_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="EFFCONV_MOE_AUTOTUNE='yes'"):
        mt._autotune_on(16)


@pytest.mark.skipif(not ON_CUDA, reason="CUDA: side streams")
@pytest.mark.parametrize("wgrad,dtype", [("triton", torch.float32), ("triton", torch.bfloat16),
                                         ("grouped_mm", torch.bfloat16)])
def test_weight_grads_on_side_stream_match(wgrad, dtype, monkeypatch, poisoned):
    """EFFCONV_MOE_WGRAD_STREAM=1 / 2 (dW_d, then also dW_gu, on a side stream beside the dgrad kernels) give
    bitwise the gradients of the serial order, eagerly and in a CUDA graph (captured once, replayed twice on
    fresh inputs); the Triton weight grads in three row splits (partials summed by a launch on the same stream)."""
    if wgrad == "grouped_mm" and not (hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability()[0] == 9):
        pytest.skip("torch._grouped_mm: Hopper")
    poisoned()
    monkeypatch.setenv("EFFCONV_MOE_WGRAD", wgrad)
    monkeypatch.setenv("EFFCONV_MOE_WGRAD_SPLITS", "3")
    x, idx, w, gu, dn, dout = make_inputs(2048, 64, 48, 4, 2, dtype, "cuda")
    monkeypatch.setenv("EFFCONV_MOE_WGRAD_STREAM", "0")
    ref_out, ref_grads = run(ek.moe_experts, x, idx, w, gu, dn, dout, backend="triton")
    for mode in ("1", "2"):
        monkeypatch.setenv("EFFCONV_MOE_WGRAD_STREAM", mode)
        out, grads = run(ek.moe_experts, x, idx, w, gu, dn, dout, backend="triton")
        assert torch.equal(out, ref_out)
        assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads)), mode
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, gu, dn)]

    def step():
        y = ek.moe_experts(leaves[0], idx, leaves[1], leaves[2], leaves[3], backend="triton")
        y.backward(dout)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    for t in leaves:
        t.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    for seed in (1, 2):
        x2, idx2, w2, gu2, dn2, dout2 = make_inputs(2048, 64, 48, 4, 2, dtype, "cuda", seed=seed)
        for t, v in zip(leaves, (x2, w2, gu2, dn2)):
            t.data.copy_(v.detach())
        idx.copy_(idx2)
        dout.copy_(dout2)
        g.replay()
        monkeypatch.setenv("EFFCONV_MOE_WGRAD_STREAM", "0")
        _, want = run(ek.moe_experts, x2, idx2, w2, gu2, dn2, dout2, backend="triton")
        monkeypatch.setenv("EFFCONV_MOE_WGRAD_STREAM", "2")
        assert all(torch.equal(t.grad, r) for t, r in zip(leaves, want)), seed


def test_wgrad_stream_knob(monkeypatch):
    """The side-stream knob: 2 on CUDA by default, off the GPU always 0 (no streams), bad values one clear error."""
    from effconv_kernels.moe import triton as mt
    monkeypatch.delenv("EFFCONV_MOE_WGRAD_STREAM", raising=False)
    assert mt.wgrad_stream_mode(torch.device("cpu")) == 0
    assert mt.wgrad_stream_mode(torch.device("cuda", 0)) == 2  # the default on CUDA
    monkeypatch.setenv("EFFCONV_MOE_WGRAD_STREAM", "1")
    assert mt.wgrad_stream_mode(torch.device("cpu")) == 0
    assert mt.wgrad_stream_mode(torch.device("cuda", 0)) == 1
    monkeypatch.setenv("EFFCONV_MOE_WGRAD_STREAM", "3")
    with pytest.raises(ValueError, match="EFFCONV_MOE_WGRAD_STREAM='3'"):
        mt.wgrad_stream_mode(torch.device("cpu"))


def test_weight_grad_split_rule(monkeypatch):
    """The CUDA rule (132 SMs as on an H100 / H200): splits only under four waves of 64 x 64 tiles and with >= 2048
    rows per split, so smol_split splits at 4096 rows per expert and not at 1024, the wide shapes never."""
    from effconv_kernels.moe import triton as mt
    monkeypatch.setattr(mt, "interpreting", lambda: False)
    monkeypatch.setattr(mt, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    d, i, e, k = 576, 192, 8, 2
    for n, want in ((4096, 1), (16384, 2), (65536, 2)):  # cdiv(4 * 132, 432) = 2 at most
        assert mt._weight_grad_splits(e, 2 * i, d, n * k, cuda) == want, n  # dW_gu: 432 tiles
    assert mt._weight_grad_splits(e, d, i, 16384 * k, cuda) == 2  # dW_d: 216 tiles, 4096 rows
    assert mt._weight_grad_splits(e, d, i, 65536 * k, cuda) == 3  # cdiv(528, 216) = 3
    assert mt._weight_grad_splits(e, 2 * 1024, 2048, 16384 * k, cuda) == 1  # large: 8192 tiles
    assert mt._weight_grad_splits(e, 2 * 1536, 576, 16384 * k, cuda) == 1  # smol_copy: 3456 tiles
    monkeypatch.setenv("EFFCONV_MOE_WGRAD_MIN_ROWS", "1024")  # the rule's knobs
    assert mt._weight_grad_splits(e, d, i, 16384 * k, cuda) == 3  # cdiv(528, 216) = 3, 4096 // 1024 = 4
    monkeypatch.setenv("EFFCONV_MOE_WGRAD_WAVES", "8")
    assert mt._weight_grad_splits(e, d, i, 16384 * k, cuda) == 4  # cdiv(1056, 216) = 5, 4
    assert mt._weight_grad_splits(e, 2 * i, d, 16384 * k, cuda) == 3  # cdiv(1056, 432) = 3
    assert mt._weight_grad_splits(e, 2 * i, d, 4096 * k, cuda) == 1  # 1024 rows per expert
    monkeypatch.setenv("EFFCONV_MOE_WGRAD_WAVES", "3")
    with pytest.raises(ValueError, match="EFFCONV_MOE_WGRAD_WAVES='3'"):
        mt._weight_grad_splits(e, d, i, 16384 * k, cuda)
