"""Triton chunked linear attention (+ decode step) against the fp32 O(T^2) oracle.

Runs on CUDA when present, otherwise through TRITON_INTERPRET=1 (set by conftest.py before import).
Shapes are tiny on purpose: the interpreter executes every program instance in numpy.
"""
from __future__ import annotations

import pytest
import torch

import effconv_kernels as ek
from effconv_kernels.linear_attn.naive import naive_linear_attention, recurrent_linear_attention_ref
from effconv_kernels.linear_attn.torch_chunk import chunk_linear_attention_ref

TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (1e-2, 2e-2), torch.float16: (3e-3, 6e-3)}  # (output, grads)


def rel_err(a, b, floor=1e-2):
    """||a - b|| / ||b||; `floor` keeps gradients that are exactly zero in theory (window 1: dq, dk) finite."""
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


def make_inputs(B, H, Hkv, T, F, Dv, dtype, device, init=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Hedgehog-like features: positive, softmax-normalised (so the normaliser is well conditioned)
    fq = torch.randn(B, H, T, F, generator=g).softmax(-1)
    fk = torch.randn(B, Hkv, T, F, generator=g).softmax(-1)
    v = torch.randn(B, Hkv, T, Dv, generator=g)
    xs = [x.to(device=device, dtype=dtype).requires_grad_() for x in (fq, fk, v)]
    state = None
    if init:
        S0 = (torch.rand(B, Hkv, F, Dv, generator=g) * 0.5).to(device).requires_grad_()
        z0 = torch.rand(B, Hkv, F, generator=g).to(device).requires_grad_()
        state = (S0, z0)
    return xs, state


CASES = [
    # B, H, Hkv, T, F, Dv, dtype, normalize, init
    (1, 2, 2, 1, 64, 32, torch.float32, True, True),
    (1, 3, 1, 37, 64, 32, torch.float32, True, False),
    (1, 8, 1, 100, 64, 32, torch.float32, False, True),
    (2, 2, 1, 70, 128, 64, torch.float32, True, True),
    (1, 2, 2, 100, 128, 64, torch.float32, False, False),
    (1, 3, 3, 37, 32, 48, torch.float32, True, True),  # non power-of-two value dim
    (1, 3, 1, 100, 64, 32, torch.bfloat16, True, True),
    (1, 8, 1, 37, 128, 64, torch.bfloat16, False, False),
    (1, 2, 1, 65, 256, 128, torch.bfloat16, True, True),
    (1, 1, 1, 128, 256, 128, torch.float32, True, False),
    (1, 2, 1, 50, 64, 32, torch.float16, True, True),
    (1, 2, 2, 300, 128, 64, torch.bfloat16, True, True),  # the benchmark's shape class, several chunks, G = 1
]


@pytest.mark.parametrize("B,H,Hkv,T,F,Dv,dtype,normalize,init", CASES)
def test_linear_attention_matches_naive(B, H, Hkv, T, F, Dv, dtype, normalize, init, device):
    (fq, fk, v), state = make_inputs(B, H, Hkv, T, F, Dv, dtype, device, init)
    kw = dict(normalize=normalize, initial_state=state, output_final_state=True)
    o, (S, z) = ek.linear_attention(fq, fk, v, backend="triton", **kw)
    o_ref, (S_ref, z_ref) = naive_linear_attention(fq, fk, v, **kw)
    tol_o, tol_g = TOL[dtype]
    assert o.dtype == dtype and S.dtype == torch.float32
    assert rel_err(o, o_ref) < tol_o
    assert rel_err(S, S_ref) < 1e-5 and rel_err(z, z_ref) < 1e-5

    # gradients through the output and the final state
    g = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=g).to(device)
    dS = torch.randn(S.shape, generator=g).to(device)
    dz = torch.randn(z.shape, generator=g).to(device)
    leaves = [fq, fk, v] + (list(state) if init else [])
    loss = lambda o, S, z: (o.float() * do).sum() + (S * dS).sum() + (z * dz).sum()  # noqa: E731
    grads = torch.autograd.grad(loss(o, S, z), leaves)
    grads_ref = torch.autograd.grad(loss(o_ref, S_ref, z_ref), leaves)
    for name, a, b in zip(["fq", "fk", "v", "S0", "z0"], grads, grads_ref):
        assert a.dtype == b.dtype
        assert rel_err(a, b, floor=0.1) < tol_g, name


def test_linear_grad_output_only(device):
    """No final state requested: only do flows back (and no initial state)."""
    (fq, fk, v), _ = make_inputs(1, 2, 1, 37, 64, 32, torch.float32, device)
    o, st = ek.linear_attention(fq, fk, v, backend="triton")
    assert st is None
    o_ref, _ = naive_linear_attention(fq, fk, v)
    w = torch.randn(o.shape).to(device)
    ga = torch.autograd.grad((o * w).sum(), [fq, fk, v])
    gb = torch.autograd.grad((o_ref * w).sum(), [fq, fk, v])
    for a, b in zip(ga, gb):
        assert rel_err(a, b) < 1e-4


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_state_chaining(normalize, device):
    """Two halves with the state carried across equal one run (outputs, final state and gradients)."""
    (fq, fk, v), state = make_inputs(1, 4, 2, 100, 64, 32, torch.float32, device, init=True)
    kw = dict(normalize=normalize, output_final_state=True, backend="triton")
    o, (S, z) = ek.linear_attention(fq, fk, v, initial_state=state, **kw)
    cut = 45  # not a multiple of the chunk
    o1, st1 = ek.linear_attention(fq[:, :, :cut], fk[:, :, :cut], v[:, :, :cut], initial_state=state, **kw)
    o2, (S2, z2) = ek.linear_attention(fq[:, :, cut:], fk[:, :, cut:], v[:, :, cut:], initial_state=st1, **kw)
    oc = torch.cat([o1, o2], 2)
    assert rel_err(oc, o) < 1e-5 and rel_err(S2, S) < 1e-5 and rel_err(z2, z) < 1e-5
    w = torch.randn(o.shape).to(device)
    leaves = [fq, fk, v, *state]
    ga = torch.autograd.grad((o * w).sum() + S.sum(), leaves)
    gb = torch.autograd.grad((oc * w).sum() + S2.sum(), leaves)
    for a, b in zip(ga, gb):
        assert rel_err(a, b) < 1e-4


@pytest.mark.parametrize("Hkv,normalize,dtype", [(1, True, torch.float32), (3, False, torch.float32),
                                                 (1, True, torch.bfloat16)])
def test_linear_decode_matches_parallel(Hkv, normalize, dtype, device):
    B, H, T, F, Dv = 2, 3, 20, 64, 32
    (fq, fk, v), state = make_inputs(B, H, Hkv, T, F, Dv, dtype, device, init=True)
    with torch.no_grad():
        o_par, (S_par, z_par) = naive_linear_attention(fq, fk, v, normalize=normalize, initial_state=state,
                                                       output_final_state=True)
        S, z = state[0].detach().clone(), state[1].detach().clone()
        for t in range(T):
            o_t, (S_out, _) = ek.linear_decode_step(fq[:, :, t], fk[:, :, t], v[:, :, t], (S, z),
                                                    normalize=normalize, backend="triton")
            assert S_out is S  # updated in place
            assert rel_err(o_t, o_par[:, :, t]) < TOL[dtype][0], t
        assert rel_err(S, S_par) < 1e-5 and rel_err(z, z_par) < 1e-5


@pytest.mark.parametrize("normalize", [True, False])
def test_torch_references_agree(normalize):
    """Chunked pure-PyTorch reference (the CPU training path) and the recurrence against the O(T^2) oracle."""
    (fq, fk, v), state = make_inputs(2, 6, 2, 77, 32, 16, torch.float32, "cpu", init=True)
    kw = dict(normalize=normalize, initial_state=state)
    o_ref, (S_ref, z_ref) = naive_linear_attention(fq, fk, v, output_final_state=True, **kw)
    o, (S, z) = chunk_linear_attention_ref(fq, fk, v, output_final_state=True, chunk_size=16, **kw)
    o_rec, (S_rec, z_rec) = recurrent_linear_attention_ref(fq, fk, v, **kw)
    for a, b in ((o, o_ref), (S, S_ref), (z, z_ref), (o_rec, o_ref), (S_rec, S_ref)):
        assert rel_err(a, b) < 1e-5
    w = torch.randn(o.shape)
    ga = torch.autograd.grad((o * w).sum() + S.sum() + z.sum(), [fq, fk, v, *state])
    gb = torch.autograd.grad((o_ref * w).sum() + S_ref.sum() + z_ref.sum(), [fq, fk, v, *state])
    for a, b in zip(ga, gb):
        assert rel_err(a, b) < 1e-5


def test_auto_backend_on_cpu_is_reference():
    (fq, fk, v), _ = make_inputs(1, 2, 1, 10, 32, 16, torch.float32, "cpu")
    o_auto, _ = ek.linear_attention(fq, fk, v)  # CPU tensors -> chunked torch reference
    o_ref, _ = naive_linear_attention(fq, fk, v)
    assert rel_err(o_auto, o_ref) < 1e-5
    with pytest.raises(ValueError):
        ek.linear_attention(fq, fk, v, backend="cuda")
    with pytest.raises(TypeError):  # mixed operand dtypes: a clear error, not a Triton compile failure
        ek.linear_attention(fq, fk.bfloat16(), v, backend="triton")
    with pytest.raises(ValueError):  # 3 query heads cannot share 2 kv heads
        ek.linear_attention(fq[:, :1].expand(1, 3, 10, 32), fk.expand(1, 2, 10, 32), v.expand(1, 2, 10, 16))


def test_self_check_passes_and_catches_a_wrong_kernel(monkeypatch):
    """The one-time CUDA self-check (forced here on CPU) accepts the kernel and rejects a perturbed one."""
    from effconv_kernels.linear_attn import chunk as lc
    # the kernels run on CUDA tensors on a GPU machine and on CPU tensors under the interpreter
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    fq, fk, v = (torch.rand(*s, device=dev) for s in ((1, 3, 5, 64), (1, 1, 5, 64), (1, 1, 5, 32)))
    monkeypatch.setattr(lc, "_CHECKED", {})
    lc._self_check(fq, fk, v, True, force=True)
    assert len(lc._CHECKED) == 1
    orig = lc.linear_fwd
    monkeypatch.setattr(lc, "linear_fwd", lambda *a, **k: (orig(*a, **k)[0] * 1.05,) + orig(*a, **k)[1:])
    monkeypatch.setattr(lc, "_CHECKED", {})
    with pytest.raises(RuntimeError):
        lc._self_check(fq, fk, v, True, force=True)
    # a wrong backward is caught too
    monkeypatch.setattr(lc, "linear_fwd", orig)
    orig_bwd = lc.linear_bwd
    monkeypatch.setattr(lc, "linear_bwd", lambda *a, **k: (lambda r: (r[0] * 1.1,) + r[1:])(orig_bwd(*a, **k)))
    with pytest.raises(RuntimeError):
        lc._self_check(fq, fk, v, True, force=True)
