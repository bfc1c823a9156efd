"""Triton MoE experts (forward + backward) against transformers' style per-expert loop.

Runs on CUDA when present, otherwise through TRITON_INTERPRET=1 (set by conftest.py before import).
"""
from __future__ import annotations

import pytest
import torch

import effconv_kernels as ek
from effconv_kernels.moe.naive import naive_moe_experts

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


CASES = [
    # N, D, I, E, k, dtype, experts that receive no token
    (37, 32, 48, 4, 2, torch.float32, ()),
    (19, 24, 20, 6, 1, torch.float32, (1, 4)),  # D, I not multiples of the tiles; empty experts
    (50, 40, 32, 8, 2, torch.float32, (0, 7)),
    (1, 16, 16, 4, 2, torch.float32, ()),
    (45, 32, 48, 5, 2, torch.bfloat16, (2,)),
    (70, 48, 24, 8, 1, torch.bfloat16, ()),
]


@pytest.mark.parametrize("N,D,I,E,k,dtype,skip", CASES)
def test_moe_triton_matches_naive_loop(N, D, I, E, k, dtype, skip, device):
    x, idx, w, gu, dn, dout = make_inputs(N, D, I, E, k, dtype, device, skip_experts=skip)
    out, grads = run(ek.moe_experts, x, idx, w, gu, dn, dout, backend="triton")
    # the oracle in fp32 from the same (rounded) inputs
    ref_leaves = [t.detach().float().requires_grad_() for t in (x, w, gu, dn)]
    ref, ref_grads = run(naive_moe_experts, ref_leaves[0], idx, *ref_leaves[1:], dout.float())
    assert out.dtype == dtype and out.shape == (N, D)
    tol_o, tol_g = TOL[dtype]
    assert rel_err(out, ref) < tol_o
    for name, g, rg in zip(("hidden", "top_k_weights", "gate_up_proj", "down_proj"), grads, ref_grads):
        assert g.dtype == dtype, name
        assert rel_err(g, rg) < tol_g, name
    for e in skip:  # experts without tokens get exactly zero weight gradients
        assert grads[2][e].abs().max() == 0 and grads[3][e].abs().max() == 0


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
