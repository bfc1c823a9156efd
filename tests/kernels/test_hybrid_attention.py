"""Fused sliding-window + linear hybrid attention (+ decode step) against the fp32 O(T^2) oracle.

Runs on CUDA when present, otherwise through TRITON_INTERPRET=1 (set by conftest.py before import).
"""
from __future__ import annotations

import pytest
import torch

import effconv_kernels as ek
from effconv_kernels import HybridDecodeCache
from effconv_kernels.hybrid_attn.naive import naive_hybrid_attention, recurrent_hybrid_attention_ref
from effconv_kernels.hybrid_attn.torch_chunk import chunk_hybrid_attention_ref

TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (1e-2, 2e-2)}  # (output, grads)


def rel_err(a, b, floor=1e-2):
    """||a - b|| / ||b||; `floor` keeps gradients that are exactly zero in theory (window 1: dq, dk) finite."""
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


def make_inputs(B, H, Hkv, T, D, F, dtype, device, init=False, seed=0, Dv=None):
    Dv = D if Dv is None else Dv
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    v = torch.randn(B, Hkv, T, Dv, generator=g)
    fq = torch.randn(B, H, T, F, generator=g).softmax(-1)
    fk = torch.randn(B, Hkv, T, F, generator=g).softmax(-1)
    xs = [x.to(device=device, dtype=dtype).requires_grad_() for x in (q, k, v, fq, fk)]
    mix = torch.randn(H, generator=g).to(device).requires_grad_()
    state = None
    if init:
        state = ((torch.rand(B, Hkv, F, Dv, generator=g) * 0.5).to(device).requires_grad_(),
                 torch.rand(B, Hkv, F, generator=g).to(device).requires_grad_())
    return xs, mix, state


CASES = [
    # B, H, Hkv, T, D, F, W, dtype, init
    (1, 2, 2, 1, 32, 64, 64, torch.float32, True),       # single token
    (1, 3, 1, 37, 32, 64, 1, torch.float32, False),      # window 1: softmax part is the token itself
    (1, 3, 1, 100, 32, 64, 64, torch.float32, True),     # GQA 3, W = chunk
    (2, 8, 1, 100, 32, 64, 5, torch.float32, False),     # GQA 8, small window
    (1, 2, 1, 150, 64, 128, 70, torch.float32, True),    # W > chunk, not a multiple
    (1, 2, 2, 60, 32, 64, 200, torch.float32, True),     # W > T: no linear part at all
    (1, 2, 1, 140, 32, 32, 130, torch.float32, False),   # W > 2 chunks
    (1, 2, 1, 100, 128, 256, 64, torch.float32, False),  # head dim 128, feature dim 256
    (1, 3, 1, 100, 64, 128, 64, torch.bfloat16, True),
    (1, 8, 1, 37, 32, 64, 16, torch.bfloat16, False),
    (1, 2, 1, 80, 128, 256, 20, torch.bfloat16, True),
]


@pytest.mark.parametrize("B,H,Hkv,T,D,F,W,dtype,init", CASES)
def test_hybrid_attention_matches_naive(B, H, Hkv, T, D, F, W, dtype, init, device):
    (q, k, v, fq, fk), mix, state = make_inputs(B, H, Hkv, T, D, F, dtype, device, init)
    kw = dict(window=W, scale=D ** -0.5, initial_state=state, output_final_state=True)
    o, (S, z) = ek.hybrid_attention(q, k, v, fq, fk, mix, backend="triton", **kw)
    o_ref, (S_ref, z_ref) = naive_hybrid_attention(q, k, v, fq, fk, mix, **kw)
    tol_o, tol_g = TOL[dtype]
    assert o.dtype == dtype
    assert rel_err(o, o_ref) < tol_o
    assert rel_err(S, S_ref) < 1e-5 and rel_err(z, z_ref) < 1e-5

    g = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=g).to(device)
    dS = torch.randn(S.shape, generator=g).to(device)
    dz = torch.randn(z.shape, generator=g).to(device)
    leaves = [q, k, v, fq, fk, mix] + (list(state) if init else [])
    loss = lambda o, S, z: (o.float() * do).sum() + (S * dS).sum() + (z * dz).sum()  # noqa: E731
    grads = torch.autograd.grad(loss(o, S, z), leaves)
    grads_ref = torch.autograd.grad(loss(o_ref, S_ref, z_ref), leaves)
    for name, a, b in zip(["q", "k", "v", "fq", "fk", "mix", "S0", "z0"], grads, grads_ref):
        assert a.dtype == b.dtype, name
        assert rel_err(a, b, floor=0.1) < tol_g, name


def test_hybrid_prefix_chaining(device):
    """Continue from (final_state, last W keys) like the model's cache does: equals one full run."""
    B, H, Hkv, T, D, F, W = 1, 4, 2, 130, 32, 64, 20
    (q, k, v, fq, fk), mix, state = make_inputs(B, H, Hkv, T, D, F, torch.float32, device, init=True)
    kw = dict(window=W, scale=D ** -0.5, output_final_state=True, backend="triton")
    o, (S, z) = ek.hybrid_attention(q, k, v, fq, fk, mix, initial_state=state, **kw)
    cut = 77
    o1, st1 = ek.hybrid_attention(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], fq[:, :, :cut], fk[:, :, :cut], mix,
                                  initial_state=state, **kw)
    # second segment: prepend the W keys still in the window; their query rows are computed and dropped
    lo = cut - W
    o2, (S2, z2) = ek.hybrid_attention(q[:, :, lo:], k[:, :, lo:], v[:, :, lo:], fq[:, :, lo:], fk[:, :, lo:], mix,
                                       initial_state=st1, **kw)
    oc = torch.cat([o1, o2[:, :, W:]], 2)
    assert rel_err(oc, o) < 1e-5 and rel_err(S2, S) < 1e-5 and rel_err(z2, z) < 1e-5
    w = torch.randn(o.shape).to(device)
    leaves = [q, k, v, fq, fk, mix, *state]
    ga = torch.autograd.grad((o * w).sum() + S.sum() + z.sum(), leaves)
    gb = torch.autograd.grad((oc * w).sum() + S2.sum() + z2.sum(), leaves)
    for a, b in zip(ga, gb):
        assert rel_err(a, b) < 1e-4


@pytest.mark.parametrize("Hkv,W,prefill,dtype", [(1, 8, 0, torch.float32), (3, 5, 11, torch.float32),
                                                 (1, 64, 30, torch.float32), (1, 6, 9, torch.bfloat16)])
def test_hybrid_decode_matches_parallel(Hkv, W, prefill, dtype, device):
    """Prefill (or an empty cache), then one token at a time: each output equals the parallel forward."""
    B, H, T, D, F = 2, 3, 24, 32, 64
    (q, k, v, fq, fk), mix, state = make_inputs(B, H, Hkv, T, D, F, dtype, device, init=True)
    scale = D ** -0.5
    with torch.no_grad():
        o_par, (S_par, z_par) = naive_hybrid_attention(q, k, v, fq, fk, mix, window=W, scale=scale,
                                                       initial_state=state, output_final_state=True)
        if prefill:
            _, fs = ek.hybrid_attention(q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill], fq[:, :, :prefill],
                                        fk[:, :, :prefill], mix, window=W, scale=scale, initial_state=state,
                                        output_final_state=True, backend="triton")
            cache = HybridDecodeCache.from_prefill(k[:, :, :prefill], v[:, :, :prefill], fk[:, :, :prefill],
                                                   window=W, final_state=fs)
            ref = HybridDecodeCache.from_prefill(k[:, :, :prefill], v[:, :, :prefill], fk[:, :, :prefill],
                                                 window=W, initial_state=state)
            assert rel_err(cache.S, ref.S) < 1e-5
        else:
            cache = HybridDecodeCache.empty(B, Hkv, W, D, F, dtype=dtype, device=device, initial_state=state)
        for t in range(prefill, T):
            o_t = ek.hybrid_decode_step(q[:, :, t], k[:, :, t], v[:, :, t], fq[:, :, t], fk[:, :, t], mix, cache,
                                        window=W, scale=scale, backend="triton")
            assert rel_err(o_t, o_par[:, :, t]) < TOL[dtype][0], t
        assert cache.seen == T
        # after the last token the cache's linear state is the parallel final state
        assert rel_err(cache.S, S_par) < 1e-5 and rel_err(cache.z, z_par) < 1e-5


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_hybrid_decode_with_device_position(backend, device):
    """`position` (a device tensor, as in CUDA-graph decoding) gives the same outputs as the cache's counter and
    leaves `cache.seen` alone; the caller advances it. W=5 < T exercises wrap-around and eviction."""
    B, H, Hkv, T, D, F, W, prefill = 2, 4, 2, 17, 32, 32, 5, 3
    (q, k, v, fq, fk), mix, state = make_inputs(B, H, Hkv, T, D, F, torch.float32, device, init=True)
    scale = D ** -0.5
    with torch.no_grad():
        o_par, _ = naive_hybrid_attention(q, k, v, fq, fk, mix, window=W, scale=scale, initial_state=state)
        cache = HybridDecodeCache.from_prefill(k[:, :, :prefill], v[:, :, :prefill], fk[:, :, :prefill], window=W,
                                               initial_state=state)
        position = torch.tensor([prefill], dtype=torch.int64, device=device)
        for t in range(prefill, T):
            o_t = ek.hybrid_decode_step(q[:, :, t], k[:, :, t], v[:, :, t], fq[:, :, t], fk[:, :, t], mix, cache,
                                        window=W, scale=scale, backend=backend, position=position)
            position += 1
            assert rel_err(o_t, o_par[:, :, t]) < TOL[torch.float32][0], t
        assert cache.seen == prefill


@pytest.mark.parametrize("W", [1, 7, 16, 40, 100])
def test_torch_references_agree(W):
    """Chunked pure-PyTorch reference (CPU training path) and the decode recurrence against the oracle."""
    (q, k, v, fq, fk), mix, state = make_inputs(2, 6, 2, 53, 16, 32, torch.float32, "cpu", init=True)
    kw = dict(window=W, scale=0.25, initial_state=state)
    o_ref, (S_ref, z_ref) = naive_hybrid_attention(q, k, v, fq, fk, mix, output_final_state=True, **kw)
    o, (S, z) = chunk_hybrid_attention_ref(q, k, v, fq, fk, mix, output_final_state=True, chunk_size=16, **kw)
    with torch.no_grad():
        o_rec, cache = recurrent_hybrid_attention_ref(q, k, v, fq, fk, mix, **kw)
    for a, b in ((o, o_ref), (S, S_ref), (z, z_ref), (o_rec, o_ref), (cache.S, S_ref)):
        assert rel_err(a, b) < 1e-5
    leaves = [q, k, v, fq, fk, mix, *state]
    w = torch.randn(o.shape)
    ga = torch.autograd.grad((o * w).sum() + S.sum() + z.sum(), leaves)
    gb = torch.autograd.grad((o_ref * w).sum() + S_ref.sum() + z_ref.sum(), leaves)
    for a, b in zip(ga, gb):
        assert rel_err(a, b) < 1e-5


def test_hybrid_argument_checks():
    (q, k, v, fq, fk), mix, _ = make_inputs(1, 2, 1, 8, 16, 32, torch.float32, "cpu")
    with pytest.raises(ValueError):
        ek.hybrid_attention(q, k, v, fq, fk, mix, window=0, scale=0.25)
    o_auto, _ = ek.hybrid_attention(q, k, v, fq, fk, mix, window=3, scale=0.25)  # CPU -> chunked reference
    o_ref, _ = naive_hybrid_attention(q, k, v, fq, fk, mix, window=3, scale=0.25)
    assert rel_err(o_auto, o_ref) < 1e-5


@pytest.mark.parametrize("W,dtype", [(5, torch.float32), (64, torch.float32), (16, torch.bfloat16)])
def test_hybrid_feature_grads_without_qkv_grads(W, dtype, device):
    """Attention transfer: q, k, v come without grad, so the backward skips dq/dk/dv (NEED_QKV=False);
    dfq, dfk and dmix must equal those of the full backward (same sums; only the compiled code differs)."""
    (q, k, v, fq, fk), mix, _ = make_inputs(1, 3, 1, 100, 32, 64, dtype, device, seed=3)
    do = torch.randn(1, 3, 100, 32, generator=torch.Generator().manual_seed(4)).to(device, dtype)
    kw = dict(window=W, scale=32 ** -0.5, backend="triton")
    o, _ = ek.hybrid_attention(q, k, v, fq, fk, mix, **kw)
    full = torch.autograd.grad(o, [fq, fk, mix], do)
    q0, k0, v0 = (x.detach() for x in (q, k, v))
    o0, _ = ek.hybrid_attention(q0, k0, v0, fq, fk, mix, **kw)
    part = torch.autograd.grad(o0, [fq, fk, mix], do)
    assert torch.equal(o0, o)
    tol = 1e-6 if dtype == torch.float32 else 4e-3  # bf16: at most a rounding step apart
    for name, a, b in zip(["fq", "fk", "mix"], part, full):
        assert rel_err(a, b, floor=1e-6) < tol, name
