"""Fused sliding-window + linear hybrid attention (+ decode step) against the fp32 O(T^2) oracle.

Runs on CUDA when present, otherwise through TRITON_INTERPRET=1 (set by conftest.py before import).
"""
from __future__ import annotations

import pytest
import torch

import effconv_kernels as ek
from effconv_kernels import HybridDecodeCache
from effconv_kernels.hybrid_attn.naive import naive_hybrid_attention, recurrent_hybrid_attention_ref

TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (1e-2, 2e-2)}  # (output, grads)
TOL_LD = {torch.float32: 1e-4, torch.bfloat16: 5e-2}  # d(log_decay): see test_linear_attention.py
NEAR1, STRONG = -1e-4, -0.5  # log_decay values: g = 0.9999 and g = 0.61


def make_decay(Hkv, values, device):
    """(Hkv,) fp32 log_decay cycling through `values`, as a leaf that wants gradients."""
    return torch.tensor([values[i % len(values)] for i in range(Hkv)], device=device).requires_grad_()


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
    # B, H, Hkv, T, D, F, W, dtype, init, log_decay values (None: no decay)
    (1, 2, 2, 1, 32, 64, 64, torch.float32, True, None),       # single token
    (1, 3, 1, 37, 32, 64, 1, torch.float32, False, None),      # window 1: softmax part is the token itself
    (1, 3, 1, 100, 32, 64, 64, torch.float32, True, None),     # GQA 3, W = chunk
    (2, 8, 1, 100, 32, 64, 5, torch.float32, False, None),     # GQA 8, small window
    (1, 2, 1, 150, 64, 128, 70, torch.float32, True, None),    # W > chunk, not a multiple
    (1, 2, 2, 60, 32, 64, 200, torch.float32, True, None),     # W > T: no linear part at all
    (1, 2, 1, 140, 32, 32, 130, torch.float32, False, None),   # W > 2 chunks
    (1, 2, 1, 100, 128, 256, 64, torch.float32, False, None),  # head dim 128, feature dim 256
    (1, 3, 1, 100, 64, 128, 64, torch.bfloat16, True, None),
    (1, 8, 1, 37, 32, 64, 16, torch.bfloat16, False, None),
    (1, 2, 1, 80, 128, 256, 20, torch.bfloat16, True, None),
    # per-head decay of the linear part: near 1 and strong in one call, awkward T, GQA 1/3, W 1/5/64 (T < and > W)
    (1, 3, 3, 1, 16, 32, 5, torch.float32, True, (STRONG, NEAR1)),
    (1, 6, 2, 37, 16, 32, 1, torch.float32, True, (NEAR1, STRONG)),
    (1, 9, 3, 130, 16, 32, 5, torch.float32, True, (STRONG, NEAR1, -0.05)),
    (1, 2, 1, 130, 16, 32, 64, torch.float32, False, (-0.05,)),         # fp32 chunk 32: d = 2
    (1, 2, 2, 50, 16, 32, 64, torch.float32, True, (NEAR1, STRONG)),   # W > T: only the initial state decays
    (1, 2, 1, 65, 16, 32, 1, torch.float32, True, (STRONG,)),          # L = 2 full chunks: read as a boundary
    (1, 6, 2, 100, 32, 64, 16, torch.bfloat16, True, (-0.05, NEAR1)),
]


@pytest.mark.parametrize("B,H,Hkv,T,D,F,W,dtype,init,decay", CASES)
def test_hybrid_attention_matches_naive(B, H, Hkv, T, D, F, W, dtype, init, decay, device):
    (q, k, v, fq, fk), mix, state = make_inputs(B, H, Hkv, T, D, F, dtype, device, init)
    ld = make_decay(Hkv, decay, device) if decay else None
    kw = dict(window=W, scale=D ** -0.5, initial_state=state, output_final_state=True, log_decay=ld)
    o, (S, z) = ek.hybrid_attention(q, k, v, fq, fk, mix, backend="triton", **kw)
    o_ref, (S_ref, z_ref) = naive_hybrid_attention(q, k, v, fq, fk, mix, **kw)
    tol_o, tol_g = TOL[dtype]
    assert o.dtype == dtype
    assert rel_err(o, o_ref) < tol_o
    assert rel_err(S, S_ref) < 1e-5 and rel_err(z, z_ref) < 1e-5
    if decay and T > 1:  # the decay must matter here, or this test could not catch a kernel that ignores it
        o_nodecay, _ = naive_hybrid_attention(q, k, v, fq, fk, mix, **{**kw, "log_decay": None})
        assert rel_err(o_nodecay, o_ref) > min(0.1, 1000 * tol_o)

    g = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=g).to(device)
    dS = torch.randn(S.shape, generator=g).to(device)
    dz = torch.randn(z.shape, generator=g).to(device)
    leaves = [q, k, v, fq, fk, mix] + (list(state) if init else []) + ([ld] if decay else [])
    names = ["q", "k", "v", "fq", "fk", "mix"] + (["S0", "z0"] if init else []) + (["log_decay"] if decay else [])
    loss = lambda o, S, z: (o.float() * do).sum() + (S * dS).sum() + (z * dz).sum()  # noqa: E731
    grads = torch.autograd.grad(loss(o, S, z), leaves)
    grads_ref = torch.autograd.grad(loss(o_ref, S_ref, z_ref), leaves)
    for name, a, b in zip(names, grads, grads_ref):
        assert a.dtype == b.dtype, name
        assert rel_err(a, b, floor=0.1) < (TOL_LD[dtype] if name == "log_decay" else tol_g), name


@pytest.mark.parametrize("decay", [None, (STRONG, -0.02)])
def test_hybrid_prefix_chaining(decay, device):
    """Continue from (final_state, last W keys) like the model's cache does: equals one full run (with a decay too:
    the state sits at the last token that left the window, which is position -1 of the second segment)."""
    B, H, Hkv, T, D, F, W = 1, 4, 2, 130, 32, 64, 20
    (q, k, v, fq, fk), mix, state = make_inputs(B, H, Hkv, T, D, F, torch.float32, device, init=True)
    ld = make_decay(Hkv, decay, device) if decay else None
    kw = dict(window=W, scale=D ** -0.5, output_final_state=True, backend="triton", log_decay=ld)
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
    leaves = [q, k, v, fq, fk, mix, *state] + ([ld] if decay else [])
    ga = torch.autograd.grad((o * w).sum() + S.sum() + z.sum(), leaves)
    gb = torch.autograd.grad((oc * w).sum() + S2.sum() + z2.sum(), leaves)
    for a, b in zip(ga, gb):
        assert rel_err(a, b) < 1e-4


@pytest.mark.parametrize("impl", ["triton", "attention_ops"])
def test_hybrid_decay_continuation_in_pieces(impl, attention_ops, device):
    """What the model's cache does with multi-token steps: each piece re-reads the min(seen, W) keys still in the
    window and starts from the previous piece's final state, also while fewer than W tokens have been seen (the state
    is then still the initial one, at position -1). With a decay the pieces together equal one run."""
    B, H, Hkv, T, D, F, W = 1, 4, 2, 40, 16, 32, 10
    (q, k, v, fq, fk), mix, state = make_inputs(B, H, Hkv, T, D, F, torch.float32, device, init=True)
    ld = make_decay(Hkv, (STRONG, -0.05), device).detach()
    kw = dict(window=W, scale=D ** -0.5, output_final_state=True, log_decay=ld)
    if impl == "triton":
        run = lambda *a, **k: ek.hybrid_attention(*a, backend="triton", **k)  # noqa: E731
    else:
        run = attention_ops.hybrid_attention
    with torch.no_grad():
        o_ref, (S_ref, _) = naive_hybrid_attention(q, k, v, fq, fk, mix, initial_state=state, **kw)
        pieces, seen = [], 0
        for cut in (3, 7, 25, 40):
            held = min(seen, W)
            lo = seen - held
            o, state = run(q[:, :, lo:cut], k[:, :, lo:cut], v[:, :, lo:cut], fq[:, :, lo:cut], fk[:, :, lo:cut], mix,
                           initial_state=state, **kw)
            pieces.append(o[:, :, held:])
            seen = cut
    assert rel_err(torch.cat(pieces, 2), o_ref) < 1e-5 and rel_err(state[0], S_ref) < 1e-5


@pytest.mark.parametrize("Hkv,W,prefill,dtype,decay", [
    (1, 8, 0, torch.float32, None), (3, 5, 11, torch.float32, None), (1, 64, 30, torch.float32, None),
    (1, 6, 9, torch.bfloat16, None),
    (3, 5, 11, torch.float32, (STRONG, NEAR1, -0.05)), (1, 6, 9, torch.bfloat16, (-0.05,)),
])
def test_hybrid_decode_matches_parallel(Hkv, W, prefill, dtype, decay, device):
    """Prefill (or an empty cache), then one token at a time: each output equals the parallel forward."""
    B, H, T, D, F = 2, 3, 24, 32, 64
    (q, k, v, fq, fk), mix, state = make_inputs(B, H, Hkv, T, D, F, dtype, device, init=True)
    ld = make_decay(Hkv, decay, device).detach() if decay else None
    scale = D ** -0.5
    with torch.no_grad():
        o_par, (S_par, z_par) = naive_hybrid_attention(q, k, v, fq, fk, mix, window=W, scale=scale,
                                                       initial_state=state, output_final_state=True, log_decay=ld)
        if prefill:
            _, fs = ek.hybrid_attention(q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill], fq[:, :, :prefill],
                                        fk[:, :, :prefill], mix, window=W, scale=scale, initial_state=state,
                                        output_final_state=True, log_decay=ld, backend="triton")
            cache = HybridDecodeCache.from_prefill(k[:, :, :prefill], v[:, :, :prefill], fk[:, :, :prefill],
                                                   window=W, final_state=fs)
            ref = HybridDecodeCache.from_prefill(k[:, :, :prefill], v[:, :, :prefill], fk[:, :, :prefill],
                                                 window=W, initial_state=state, log_decay=ld)
            assert rel_err(cache.S, ref.S) < 1e-5 and rel_err(cache.z, ref.z) < 1e-5
        else:
            cache = HybridDecodeCache.empty(B, Hkv, W, D, F, dtype=dtype, device=device, initial_state=state)
        for t in range(prefill, T):
            o_t = ek.hybrid_decode_step(q[:, :, t], k[:, :, t], v[:, :, t], fq[:, :, t], fk[:, :, t], mix, cache,
                                        window=W, scale=scale, log_decay=ld, backend="triton")
            assert rel_err(o_t, o_par[:, :, t]) < TOL[dtype][0], t
        assert cache.seen == T
        # after the last token the cache's linear state is the parallel final state
        assert rel_err(cache.S, S_par) < 1e-5 and rel_err(cache.z, z_par) < 1e-5


@pytest.mark.parametrize("backend,decay", [("triton", None), ("reference", None), ("triton", (STRONG, -0.05)),
                                           ("reference", (STRONG, -0.05))])
def test_hybrid_decode_with_device_position(backend, decay, device):
    """`position` (a device tensor, as in CUDA-graph decoding) gives the same outputs as the cache's counter and
    leaves `cache.seen` alone; the caller advances it. W=5 < T exercises wrap-around and eviction (and the decay
    factor g^min(W, t+1), computed from the device position)."""
    B, H, Hkv, T, D, F, W, prefill = 2, 4, 2, 17, 32, 32, 5, 3
    (q, k, v, fq, fk), mix, state = make_inputs(B, H, Hkv, T, D, F, torch.float32, device, init=True)
    ld = make_decay(Hkv, decay, device).detach() if decay else None
    scale = D ** -0.5
    with torch.no_grad():
        o_par, _ = naive_hybrid_attention(q, k, v, fq, fk, mix, window=W, scale=scale, initial_state=state,
                                          log_decay=ld)
        cache = HybridDecodeCache.from_prefill(k[:, :, :prefill], v[:, :, :prefill], fk[:, :, :prefill], window=W,
                                               initial_state=state, log_decay=ld)
        position = torch.tensor([prefill], dtype=torch.int64, device=device)
        for t in range(prefill, T):
            o_t = ek.hybrid_decode_step(q[:, :, t], k[:, :, t], v[:, :, t], fq[:, :, t], fk[:, :, t], mix, cache,
                                        window=W, scale=scale, log_decay=ld, backend=backend, position=position)
            position += 1
            assert rel_err(o_t, o_par[:, :, t]) < TOL[torch.float32][0], t
        assert cache.seen == prefill


@pytest.mark.parametrize("backend,decay", [("triton", None), ("reference", None), ("triton", (STRONG, -0.05))])
def test_hybrid_decode_with_left_padding(backend, decay, device, attention_ops):
    """`first` (per-row left padding, as in a batch of prompts of different lengths): the decode steps equal the
    chunked op with a key padding mask, whether the padded tokens are still in the window or already evicted
    (their fk and v are zero in the cache, as the model keeps them)."""
    B, H, Hkv, T, D, F, W, prefill = 3, 4, 2, 15, 32, 32, 5, 4
    (q, k, v, fq, fk), mix, _ = make_inputs(B, H, Hkv, T, D, F, torch.float32, device)
    ld = make_decay(Hkv, decay, device).detach() if decay else None
    first = torch.tensor([0, 2, 4], device=device)  # row 2: the whole prompt is padding but its last token
    real = torch.arange(T, device=device)[None, :] >= first[:, None]
    scale = D ** -0.5
    with torch.no_grad():
        o_par, _ = attention_ops.hybrid_attention(q, k, v, fq, fk, mix, window=W, scale=scale, log_decay=ld,
                                                  key_padding_mask=real)
        keep = real[:, None, :, None].to(v.dtype)
        cache = HybridDecodeCache.from_prefill(k[:, :, :prefill], (v * keep)[:, :, :prefill],
                                               (fk * keep)[:, :, :prefill], window=W, log_decay=ld)
        position = torch.tensor([prefill], dtype=torch.int64, device=device)
        for t in range(prefill, T):
            o_t = ek.hybrid_decode_step(q[:, :, t], k[:, :, t], v[:, :, t], fq[:, :, t], fk[:, :, t], mix, cache,
                                        window=W, scale=scale, log_decay=ld, backend=backend, position=position,
                                        first=first)
            position += 1
            assert torch.isfinite(o_t).all() and rel_err(o_t, o_par[:, :, t]) < TOL[torch.float32][0], t


@pytest.mark.parametrize("W,decay", [(1, None), (7, None), (16, None), (40, None), (100, None),
                                     (1, (STRONG, NEAR1)), (16, (-0.05, STRONG)), (40, (STRONG, -0.05))])
def test_attention_ops_and_recurrence_agree(W, decay, attention_ops):
    """effconv/modeling/attention_ops.py (the chunked PyTorch path: the model's CPU path and the only chunked PyTorch
    formulation) and the decode recurrence against the oracle; with a decay also the O(T^2) attention weights."""
    (q, k, v, fq, fk), mix, state = make_inputs(2, 6, 2, 53, 16, 32, torch.float32, "cpu", init=True)
    ld = make_decay(2, decay, "cpu") if decay else None
    kw = dict(window=W, scale=0.25, initial_state=state, log_decay=ld)
    o_ref, (S_ref, z_ref) = naive_hybrid_attention(q, k, v, fq, fk, mix, output_final_state=True, **kw)
    o, (S, z) = attention_ops.hybrid_attention(q, k, v, fq, fk, mix, output_final_state=True, chunk_size=16, **kw)
    with torch.no_grad():
        o_rec, cache = recurrent_hybrid_attention_ref(q, k, v, fq, fk, mix, **kw)
    for a, b in ((o, o_ref), (S, S_ref), (z, z_ref), (o_rec, o_ref), (cache.S, S_ref)):
        assert rel_err(a, b) < 1e-5
    leaves = [q, k, v, fq, fk, mix, *state] + ([ld] if decay else [])
    w = torch.randn(o.shape)
    ga = torch.autograd.grad((o * w).sum() + S.sum() + z.sum(), leaves)
    gb = torch.autograd.grad((o_ref * w).sum() + S_ref.sum() + z_ref.sum(), leaves)
    for a, b in zip(ga, gb):
        assert rel_err(a, b) < 1e-5
    if decay:  # the (B, H, T, T) weights of attention transfer's attention-map loss (no initial state there)
        o0, _ = naive_hybrid_attention(q, k, v, fq, fk, mix, window=W, scale=0.25, log_decay=ld, eps=0.0)
        wts = attention_ops.hybrid_attention_weights(q, k, fq, fk, mix, window=W, scale=0.25, eps=0.0, log_decay=ld)
        assert rel_err(wts @ v.repeat_interleave(3, 1), o0) < 1e-5


def test_hybrid_argument_checks():
    (q, k, v, fq, fk), mix, _ = make_inputs(1, 2, 1, 8, 16, 32, torch.float32, "cpu")
    with pytest.raises(ValueError):
        ek.hybrid_attention(q, k, v, fq, fk, mix, window=0, scale=0.25)
    o_auto, _ = ek.hybrid_attention(q, k, v, fq, fk, mix, window=3, scale=0.25)  # CPU -> the O(T^2) oracle
    o_ref, _ = naive_hybrid_attention(q, k, v, fq, fk, mix, window=3, scale=0.25)
    assert torch.equal(o_auto, o_ref)
    with pytest.raises(ValueError, match="attention_ops"):  # the chunked PyTorch path lives in effconv only
        ek.hybrid_attention(q, k, v, fq, fk, mix, window=3, scale=0.25, backend="reference")
    with pytest.raises(ValueError, match="log_decay"):
        ek.hybrid_attention(q, k, v, fq, fk, mix, window=3, scale=0.25, log_decay=torch.zeros(1, 1))


@pytest.mark.parametrize("W,dtype,decay", [(5, torch.float32, None), (64, torch.float32, None),
                                           (16, torch.bfloat16, None), (5, torch.float32, (-0.05,))])
def test_hybrid_feature_grads_without_qkv_grads(W, dtype, decay, device):
    """Attention transfer: q, k, v come without grad, so the backward skips dq/dk/dv (NEED_QKV=False);
    dfq, dfk and dmix (and d log_decay) must equal those of the full backward (same sums; only the compiled code
    differs)."""
    (q, k, v, fq, fk), mix, _ = make_inputs(1, 3, 1, 100, 32, 64, dtype, device, seed=3)
    do = torch.randn(1, 3, 100, 32, generator=torch.Generator().manual_seed(4)).to(device, dtype)
    ld = make_decay(1, decay, device) if decay else None
    kw = dict(window=W, scale=32 ** -0.5, backend="triton", log_decay=ld)
    wrt = [fq, fk, mix] + ([ld] if decay else [])
    o, _ = ek.hybrid_attention(q, k, v, fq, fk, mix, **kw)
    full = torch.autograd.grad(o, wrt, do)
    q0, k0, v0 = (x.detach() for x in (q, k, v))
    o0, _ = ek.hybrid_attention(q0, k0, v0, fq, fk, mix, **kw)
    part = torch.autograd.grad(o0, wrt, do)
    assert torch.equal(o0, o)
    tol = 1e-6 if dtype == torch.float32 else 4e-3  # bf16: at most a rounding step apart
    for name, a, b in zip(["fq", "fk", "mix", "log_decay"], part, full):
        assert rel_err(a, b, floor=1e-6) < tol, name


@pytest.mark.parametrize("W,prefill,padded", [(5, 0, False), (5, 11, False), (16, 7, False), (5, 4, True)])
def test_gated_decode_matches_the_chunked_gated_op(W, prefill, padded, attention_ops):
    """Per-token gates (log_gate): a prefill through the chunked op (its final state and the held keys' gates in
    the cache), then one token at a time with a device position, equals the chunked op on the whole sequence,
    with wrap-around, GQA and left padding; the state after the last token is the chunked final state, and the
    eager counter gives the same outputs (the PyTorch step; the Triton step is checked against it below)."""
    B, H, Hkv, T, D, F = 3, 4, 2, 23, 16, 32
    (q, k, v, fq, fk), mix, state = make_inputs(B, H, Hkv, T, D, F, torch.float32, "cpu", init=True)
    lg = -torch.rand(B, Hkv, T, generator=torch.Generator().manual_seed(5)) * 0.4
    first = torch.tensor([0, 2, 4]) if padded else None
    real = torch.arange(T)[None, :] >= first[:, None] if padded else torch.ones(B, T, dtype=torch.bool)
    keep = real[:, None, :, None].float()
    v0, fk0 = v * keep, fk * keep
    init = None if padded else state
    scale = D ** -0.5
    with torch.no_grad():
        o_par, (S_par, z_par) = attention_ops.hybrid_attention(
            q, k, v, fq, fk, mix, window=W, scale=scale, log_gate=lg, initial_state=init, output_final_state=True,
            key_padding_mask=real if padded else None)
        for counter in ("device", "eager"):
            if prefill:
                _, fs = attention_ops.hybrid_attention(
                    q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill], fq[:, :, :prefill], fk[:, :, :prefill],
                    mix, window=W, scale=scale, log_gate=lg[..., :prefill], initial_state=init,
                    output_final_state=True, key_padding_mask=real[:, :prefill] if padded else None)
                cache = HybridDecodeCache.from_prefill(k[:, :, :prefill], v0[:, :, :prefill], fk0[:, :, :prefill],
                                                       window=W, final_state=fs, key_gates=lg[..., :prefill])
            else:
                cache = HybridDecodeCache.empty(B, Hkv, W, D, F, dtype=torch.float32, initial_state=init, gated=True)
            position = torch.tensor([prefill]) if counter == "device" else None
            for t in range(prefill, T):
                o_t = ek.hybrid_decode_step(q[:, :, t], k[:, :, t], v0[:, :, t], fq[:, :, t], fk0[:, :, t], mix,
                                            cache, window=W, scale=scale, log_gate=lg[:, :, t], position=position,
                                            first=first)
                if position is not None:
                    position += 1
                assert rel_err(o_t, o_par[:, :, t]) < 1e-5, (counter, t)
            assert rel_err(cache.S, S_par) < 1e-5 and rel_err(cache.z, z_par) < 1e-5


def test_gated_linear_decode_matches_the_chunked_gated_op(attention_ops):
    """Pure linear attention with per-token gates: the decode recurrence S = g_t S + fk_t v_t^T equals the chunked
    op token by token and ends at its final state."""
    from effconv_kernels.linear_attn.naive import linear_decode_step_ref

    B, H, Hkv, T, F, Dv = 2, 4, 2, 19, 16, 8
    fq, fk = torch.rand(B, H, T, F), torch.rand(B, Hkv, T, F)
    v = torch.randn(B, Hkv, T, Dv)
    lg = -torch.rand(B, Hkv, T) * 0.5
    o_par, (S_par, z_par) = attention_ops.linear_attention(fq, fk, v, log_gate=lg, output_final_state=True,
                                                           chunk_size=8)
    state = (torch.zeros(B, Hkv, F, Dv), torch.zeros(B, Hkv, F))
    for t in range(T):
        o_t, state = linear_decode_step_ref(fq[:, :, t], fk[:, :, t], v[:, :, t], state, log_gate=lg[:, :, t])
        assert rel_err(o_t, o_par[:, :, t]) < 1e-5, t
    assert rel_err(state[0], S_par) < 1e-5 and rel_err(state[1], z_par) < 1e-5


def _copy_cache(cache: HybridDecodeCache) -> HybridDecodeCache:
    return HybridDecodeCache(**{f: (x.clone() if isinstance(x, torch.Tensor) else x) for f, x in vars(cache).items()})


@pytest.mark.parametrize("B,H,Hkv,W,sinks,gated,padded,dtype", [
    (2, 4, 2, 5, 0, True, False, torch.float32),      # gates, wrap-around, GQA 2
    (3, 4, 2, 7, 3, True, True, torch.float32),       # gates + sinks + left padding (sinks at first[b] + s)
    (1, 3, 1, 20, 4, False, False, torch.float32),    # sinks alone, GQA 3, W not a power of two
    (2, 2, 2, 3, 5, True, True, torch.float32),       # more sinks than the window
    (2, 4, 1, 6, 4, True, True, torch.bfloat16),      # bf16 ring and sinks, GQA 4
])
def test_triton_decode_step_with_gates_and_sinks_equals_the_pytorch_step(B, H, Hkv, W, sinks, gated, padded, dtype,
                                                                         device):
    """The Triton decode step with per-token gates and / or attention sinks: from the same cache, token by token
    with a device position (as under CUDA graphs), its outputs and every cache tensor (state, rings, gates, sinks)
    equal the PyTorch step's (hybrid_decode_step_ref, itself checked against the chunked op above and in
    tests/test_modeling.py), across evictions, sink filling and rows whose whole prompt is padding."""
    T, D, F = 23, 16, 32
    (q, k, v, fq, fk), mix, _ = make_inputs(B, H, Hkv, T, D, F, dtype, device, seed=3)
    q, k, v, fq, fk, mix = (x.detach() for x in (q, k, v, fq, fk, mix))
    g = torch.Generator().manual_seed(7)
    lg = (-torch.rand(B, Hkv, T, generator=g) * 0.4).to(device) if gated else None
    qs = torch.randn(B, H, T, D, generator=g).to(device, dtype) if sinks else None  # the capped-rope queries
    first = torch.tensor([0, 2, 9][:B], device=device) if padded else None
    if padded:  # the model keeps padded tokens' fk and v zero
        real = (torch.arange(T, device=device)[None, :] >= first[:, None])[:, None, :, None].to(dtype)
        v, fk = v * real, fk * real
    cache = HybridDecodeCache.empty(B, Hkv, W, D, F, dtype=dtype, device=device, gated=gated, sinks=sinks)
    ref_cache = _copy_cache(cache)
    position = torch.tensor([0], device=device)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    with torch.no_grad():
        for t in range(T):
            kw = dict(window=W, scale=D ** -0.5, position=position, first=first,
                      log_gate=lg[:, :, t] if gated else None, sink_queries=qs[:, :, t] if sinks else None)
            args = (q[:, :, t], k[:, :, t], v[:, :, t], fq[:, :, t], fk[:, :, t], mix)
            o = ek.hybrid_decode_step(*args, cache, backend="triton", **kw)
            o_ref = ek.hybrid_decode_step(*args, ref_cache, backend="reference", **kw)
            position += 1
            assert torch.isfinite(o).all() and rel_err(o, o_ref) < tol, t
            for name in ("S", "z", "k", "v", "fk", "lg", "sk", "sv"):
                a, b = getattr(cache, name), getattr(ref_cache, name)
                if b is not None:
                    assert rel_err(a, b, floor=1e-6) < 1e-5, (t, name)


def test_decode_step_with_separate_normalisers_refuses_the_triton_backend():
    cache = ek.HybridDecodeCache.empty(1, 1, 4, 8, 8, 8, dtype=torch.float32, device="cpu")
    x = torch.randn(1, 1, 8)
    with pytest.raises(ValueError, match="separate normalisers run backend='reference'"):
        ek.hybrid_decode_step(x, x, x, x.abs(), x.abs(), torch.zeros(1), cache, window=4, scale=0.3,
                              backend="triton", separate=True)
    out = ek.hybrid_decode_step(x, x, x, x.abs(), x.abs(), torch.zeros(1), cache, window=4, scale=0.3,
                                separate=True)  # auto: the reference step
    assert out.shape == (1, 1, 8) and torch.isfinite(out).all()
