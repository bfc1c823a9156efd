"""Triton chunked linear attention (+ decode step) against the fp32 O(T^2) oracle.

Runs on CUDA when present, otherwise through TRITON_INTERPRET=1 (set by conftest.py before import).
Shapes are tiny on purpose: the interpreter executes every program instance in numpy.
"""
from __future__ import annotations

import pytest
import torch

import effconv_kernels as ek
from effconv_kernels.linear_attn.naive import naive_linear_attention, recurrent_linear_attention_ref

TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (1e-2, 2e-2), torch.float16: (3e-3, 6e-3)}  # (output, grads)
# d(log_decay) in bf16: with the normaliser every query row's sum_j w_ij dL/dw_ij is exactly 0, so
# d(log_decay) = sum (i-j) w_ij dL/dw_ij cancels by ~2-3 orders of magnitude (measured: sum |terms| ~ 6000 for a
# total of 3-25 at T = 130); the kernel's absolute error stays ~5e-5 of sum |terms|, i.e. up to ~2e-2 relative
TOL_LD = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
NEAR1, STRONG = -1e-4, -0.5  # log_decay values: g = 0.9999 (long memory) and g = 0.61


def make_decay(Hkv, values, device):
    """(Hkv,) fp32 log_decay cycling through `values`, as a leaf that wants gradients."""
    return torch.tensor([values[i % len(values)] for i in range(Hkv)], device=device).requires_grad_()


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
    # B, H, Hkv, T, F, Dv, dtype, normalize, init, log_decay values (None: no decay)
    (1, 2, 2, 1, 64, 32, torch.float32, True, True, None),
    (1, 3, 1, 37, 64, 32, torch.float32, True, False, None),
    (1, 8, 1, 100, 64, 32, torch.float32, False, True, None),
    (2, 2, 1, 70, 128, 64, torch.float32, True, True, None),
    (1, 2, 2, 100, 128, 64, torch.float32, False, False, None),
    (1, 3, 3, 37, 32, 48, torch.float32, True, True, None),  # non power-of-two value dim
    (1, 3, 1, 100, 64, 32, torch.bfloat16, True, True, None),
    (1, 8, 1, 37, 128, 64, torch.bfloat16, False, False, None),
    (1, 2, 1, 65, 256, 128, torch.bfloat16, True, True, None),
    (1, 1, 1, 128, 256, 128, torch.float32, True, False, None),
    (1, 2, 1, 50, 64, 32, torch.float16, True, True, None),
    (1, 2, 2, 300, 128, 64, torch.bfloat16, True, True, None),  # the benchmark's shape class, several chunks, G = 1
    # per-head decay: near 1 and strong in the same call (kv heads alternate), awkward T, GQA 1/3
    (1, 3, 3, 1, 32, 16, torch.float32, True, True, (STRONG, NEAR1)),
    (1, 6, 2, 37, 32, 16, torch.float32, True, True, (NEAR1, STRONG)),
    (1, 9, 3, 130, 32, 16, torch.float32, True, True, (STRONG, NEAR1, -0.05)),
    (1, 3, 3, 128, 32, 48, torch.float32, False, False, (-0.05, STRONG, NEAR1)),  # T a multiple of the chunk
    (1, 6, 2, 100, 64, 32, torch.bfloat16, True, True, (-0.05, NEAR1)),
]


@pytest.mark.parametrize("B,H,Hkv,T,F,Dv,dtype,normalize,init,decay", CASES)
def test_linear_attention_matches_naive(B, H, Hkv, T, F, Dv, dtype, normalize, init, decay, device):
    (fq, fk, v), state = make_inputs(B, H, Hkv, T, F, Dv, dtype, device, init)
    ld = make_decay(Hkv, decay, device) if decay else None
    kw = dict(normalize=normalize, initial_state=state, output_final_state=True, log_decay=ld)
    o, (S, z) = ek.linear_attention(fq, fk, v, backend="triton", **kw)
    o_ref, (S_ref, z_ref) = naive_linear_attention(fq, fk, v, **kw)
    tol_o, tol_g = TOL[dtype]
    assert o.dtype == dtype and S.dtype == torch.float32
    assert rel_err(o, o_ref) < tol_o
    assert rel_err(S, S_ref) < 1e-5 and rel_err(z, z_ref) < 1e-5
    if decay and T > 1:  # the decay must matter here, or this test could not catch a kernel that ignores it
        o_nodecay, (S_nodecay, _) = naive_linear_attention(fq, fk, v, **{**kw, "log_decay": None})
        assert rel_err(o_nodecay, o_ref) > min(0.1, 1000 * tol_o) and rel_err(S_nodecay, S_ref) > 0.1

    # gradients through the output and the final state
    g = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=g).to(device)
    dS = torch.randn(S.shape, generator=g).to(device)
    dz = torch.randn(z.shape, generator=g).to(device)
    leaves = [fq, fk, v] + (list(state) if init else []) + ([ld] if decay else [])
    names = ["fq", "fk", "v"] + (["S0", "z0"] if init else []) + (["log_decay"] if decay else [])
    loss = lambda o, S, z: (o.float() * do).sum() + (S * dS).sum() + (z * dz).sum()  # noqa: E731
    grads = torch.autograd.grad(loss(o, S, z), leaves)
    grads_ref = torch.autograd.grad(loss(o_ref, S_ref, z_ref), leaves)
    for name, a, b in zip(names, grads, grads_ref):
        assert a.dtype == b.dtype
        assert rel_err(a, b, floor=0.1) < (TOL_LD[dtype] if name == "log_decay" else tol_g), name


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


@pytest.mark.parametrize("normalize,decay", [(True, None), (False, None), (True, (STRONG, NEAR1))])
def test_linear_state_chaining(normalize, decay, device):
    """Two halves with the state carried across equal one run (outputs, final state and gradients, log_decay's too)."""
    (fq, fk, v), state = make_inputs(1, 4, 2, 100, 64, 32, torch.float32, device, init=True)
    ld = make_decay(2, decay, device) if decay else None
    kw = dict(normalize=normalize, output_final_state=True, backend="triton", log_decay=ld)
    o, (S, z) = ek.linear_attention(fq, fk, v, initial_state=state, **kw)
    cut = 45  # not a multiple of the chunk
    o1, st1 = ek.linear_attention(fq[:, :, :cut], fk[:, :, :cut], v[:, :, :cut], initial_state=state, **kw)
    o2, (S2, z2) = ek.linear_attention(fq[:, :, cut:], fk[:, :, cut:], v[:, :, cut:], initial_state=st1, **kw)
    oc = torch.cat([o1, o2], 2)
    assert rel_err(oc, o) < 1e-5 and rel_err(S2, S) < 1e-5 and rel_err(z2, z) < 1e-5
    w = torch.randn(o.shape).to(device)
    leaves = [fq, fk, v, *state] + ([ld] if decay else [])
    ga = torch.autograd.grad((o * w).sum() + S.sum(), leaves)
    gb = torch.autograd.grad((oc * w).sum() + S2.sum(), leaves)
    for a, b in zip(ga, gb):
        assert rel_err(a, b) < 1e-4


@pytest.mark.parametrize("Hkv,normalize,dtype,decay", [(1, True, torch.float32, None), (3, False, torch.float32, None),
                                                       (1, True, torch.bfloat16, None),
                                                       (3, True, torch.float32, (STRONG, NEAR1, -0.05)),
                                                       (1, True, torch.bfloat16, (-0.05,))])
def test_linear_decode_matches_parallel(Hkv, normalize, dtype, decay, device):
    B, H, T, F, Dv = 2, 3, 20, 64, 32
    (fq, fk, v), state = make_inputs(B, H, Hkv, T, F, Dv, dtype, device, init=True)
    ld = make_decay(Hkv, decay, device).detach() if decay else None
    with torch.no_grad():
        o_par, (S_par, z_par) = naive_linear_attention(fq, fk, v, normalize=normalize, initial_state=state,
                                                       output_final_state=True, log_decay=ld)
        S, z = state[0].detach().clone(), state[1].detach().clone()
        for t in range(T):
            o_t, (S_out, _) = ek.linear_decode_step(fq[:, :, t], fk[:, :, t], v[:, :, t], (S, z),
                                                    normalize=normalize, log_decay=ld, backend="triton")
            assert S_out is S  # updated in place
            assert rel_err(o_t, o_par[:, :, t]) < TOL[dtype][0], t
        assert rel_err(S, S_par) < 1e-5 and rel_err(z, z_par) < 1e-5


@pytest.mark.parametrize("normalize,decay", [(True, None), (False, None), (True, (STRONG, NEAR1)),
                                             (False, (-0.05, STRONG))])
@pytest.mark.parametrize("T", [1, 77])
def test_attention_ops_and_recurrence_agree(normalize, decay, T, attention_ops):
    """effconv/modeling/attention_ops.py (the chunked PyTorch path: the model's CPU path and the only chunked PyTorch
    formulation) and the decode recurrence against the O(T^2) oracle, outputs, final state and gradients."""
    (fq, fk, v), state = make_inputs(2, 6, 2, T, 32, 16, torch.float32, "cpu", init=True)
    ld = make_decay(2, decay, "cpu") if decay else None
    kw = dict(normalize=normalize, initial_state=state, log_decay=ld)
    o_ref, (S_ref, z_ref) = naive_linear_attention(fq, fk, v, output_final_state=True, **kw)
    o, (S, z) = attention_ops.linear_attention(fq, fk, v, output_final_state=True, chunk_size=16, **kw)
    o_rec, (S_rec, z_rec) = recurrent_linear_attention_ref(fq, fk, v, **kw)
    for a, b in ((o, o_ref), (S, S_ref), (z, z_ref), (o_rec, o_ref), (S_rec, S_ref)):
        assert rel_err(a, b) < 1e-5
    leaves = [fq, fk, v, *state] + ([ld] if decay else [])
    w = torch.randn(o.shape)
    ga = torch.autograd.grad((o * w).sum() + S.sum() + z.sum(), leaves)
    gb = torch.autograd.grad((o_ref * w).sum() + S_ref.sum() + z_ref.sum(), leaves)
    for a, b in zip(ga, gb):
        assert rel_err(a, b) < 1e-5


def test_attention_ops_decay_long_sequence_stays_finite(attention_ops):
    """T = 8192 in 128 chunks: g near 1 (the state keeps nearly everything) and g = e^-20 (g^64 underflows to 0) give
    finite outputs and gradients, and the chunked state equals the one-shot decayed sum."""
    (fq, fk, v), state = make_inputs(1, 2, 2, 8192, 8, 8, torch.float32, "cpu", init=True)
    ld = torch.tensor([-1e-4, -20.0], requires_grad=True)
    o, (S, z) = attention_ops.linear_attention(fq, fk, v, initial_state=state, output_final_state=True, log_decay=ld)
    pos = torch.arange(8192)
    wgt = torch.exp(ld.detach()[:, None] * (8191 - pos)[None, :])  # (Hkv, T), exponents <= 0
    S_direct = torch.einsum("bhjf,bhjd->bhfd", fk.detach() * wgt[None, :, :, None], v.detach()) \
        + torch.exp(ld.detach() * 8192)[None, :, None, None] * state[0].detach()
    assert rel_err(S, S_direct) < 1e-4
    grads = torch.autograd.grad(o.sum() + S.sum(), [fq, fk, v, ld])
    assert torch.isfinite(o).all() and all(torch.isfinite(g).all() for g in grads)
    # the strong head forgets everything but the current token: o_i = v_i (normalised by fq_i.fk_i)
    assert rel_err(o[:, 1:2], v[:, 1:2].expand(1, 1, 8192, 8)) < 1e-4


def test_auto_backend_on_cpu_is_naive():
    (fq, fk, v), _ = make_inputs(1, 2, 1, 10, 32, 16, torch.float32, "cpu")
    o_auto, _ = ek.linear_attention(fq, fk, v)  # CPU tensors -> the O(T^2) oracle
    o_ref, _ = naive_linear_attention(fq, fk, v)
    assert torch.equal(o_auto, o_ref)
    with pytest.raises(ValueError, match="attention_ops"):  # the chunked PyTorch path lives in effconv only
        ek.linear_attention(fq, fk, v, backend="reference")
    with pytest.raises(ValueError, match=r"log_decay must be a tensor of shape \(1,\)"):
        ek.linear_attention(fq, fk, v, log_decay=torch.zeros(2))
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
    # the first call can come from evaluation under inference mode: the check still runs its backward
    monkeypatch.setattr(lc, "_CHECKED", {})
    with torch.inference_mode():
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


GATED_CASES = [
    # B, H, Hkv, T, F, Dv, dtype, normalize, init, gate strength (log gates uniform in [-strength, 0])
    (1, 2, 2, 1, 32, 16, torch.float32, True, True, 0.3),       # single token
    (2, 4, 2, 45, 32, 16, torch.float32, True, True, 0.3),      # GQA 2, partial last chunk
    (1, 3, 1, 100, 64, 32, torch.float32, False, False, 0.05),  # GQA 3, no normaliser, weak gates, 4 chunks
    (1, 2, 1, 70, 64, 48, torch.float32, True, True, 2.0),      # strong gates (a token forgets fast)
    (1, 3, 1, 100, 64, 32, torch.bfloat16, True, True, 0.1),    # bf16: two chunks of 64
    (2, 2, 2, 37, 32, 32, torch.bfloat16, False, False, 0.3),
]


@pytest.mark.parametrize("B,H,Hkv,T,F,Dv,dtype,normalize,init,strength", GATED_CASES)
def test_gated_chunk_kernel_matches_naive(B, H, Hkv, T, F, Dv, dtype, normalize, init, strength, device):
    """Per-token gates (log_gate (B, Hkv, T)) in the chunked kernels: output, final state and the gradients of
    fq, fk, v, the gates and the initial state against the O(T^2) gated oracle."""
    from effconv_kernels.linear_attn.naive import naive_gated_linear_attention

    (fq, fk, v), state = make_inputs(B, H, Hkv, T, F, Dv, dtype, device, init=init, seed=4)
    lg = (-torch.rand(B, Hkv, T, generator=torch.Generator().manual_seed(9)) * strength).to(device)
    lg.requires_grad_()
    g = torch.Generator().manual_seed(2)
    do = torch.randn(B, H, T, Dv, generator=g).to(device)
    dS, dz = torch.randn(B, Hkv, F, Dv, generator=g).to(device), torch.randn(B, Hkv, F, generator=g).to(device)
    leaves = [fq, fk, v, lg] + (list(state) if init else [])

    def run(fn):
        for x in leaves:
            x.grad = None
        o, (S, z) = fn()
        ((o.float() * do).sum() + (S * dS).sum() + (z * dz).sum()).backward()
        return [o, S, z] + [x.grad.clone() for x in leaves]

    kw = dict(normalize=normalize, initial_state=state, output_final_state=True, log_gate=lg)
    got = run(lambda: ek.linear_attention(fq, fk, v, backend="triton", **kw))
    ref = run(lambda: naive_gated_linear_attention(fq, fk, v, lg, normalize=normalize, initial_state=state,
                                                   output_final_state=True))
    tol_o, tol_g = TOL[dtype]
    names = ["o", "S", "z", "dfq", "dfk", "dv", "dgate", "dS0", "dz0"]
    for name, a, b in zip(names, got, ref):
        tol = tol_o if name in ("o", "S", "z") else (tol_g if name != "dgate" else TOL_LD[dtype])
        assert rel_err(a, b) < tol, (name, rel_err(a, b))


def test_gated_chunk_kernel_equals_the_model_op(device, attention_ops):
    """The Triton gated op and the model's chunked PyTorch gated op (attention_ops.linear_attention) agree, so a
    gated pure linear layer may run either; chaining two pieces through the state equals one run."""
    B, H, Hkv, T, F, Dv = 2, 4, 2, 90, 32, 16
    (fq, fk, v), state = make_inputs(B, H, Hkv, T, F, Dv, torch.float32, device, init=True, seed=5)
    lg = (-torch.rand(B, Hkv, T, generator=torch.Generator().manual_seed(1)) * 0.3).to(device)
    with torch.no_grad():
        o_t, (S_t, z_t) = ek.linear_attention(fq, fk, v, initial_state=state, output_final_state=True, log_gate=lg,
                                              backend="triton")
        o_p, (S_p, z_p) = attention_ops.linear_attention(fq, fk, v, initial_state=state, output_final_state=True,
                                                         log_gate=lg)
        assert rel_err(o_t, o_p) < 2e-5 and rel_err(S_t, S_p) < 2e-5 and rel_err(z_t, z_p) < 2e-5
        cut = 41
        o1, s1 = ek.linear_attention(fq[:, :, :cut], fk[:, :, :cut], v[:, :, :cut], initial_state=state,
                                     output_final_state=True, log_gate=lg[..., :cut], backend="triton")
        o2, s2 = ek.linear_attention(fq[:, :, cut:], fk[:, :, cut:], v[:, :, cut:], initial_state=s1,
                                     output_final_state=True, log_gate=lg[..., cut:], backend="triton")
        assert rel_err(torch.cat([o1, o2], 2), o_t) < 2e-5 and rel_err(s2[0], S_t) < 2e-5


def test_gated_self_check_runs_and_catches_a_wrong_gate_gradient(device, monkeypatch):
    """The first gated call on a GPU checks the kernels against the oracle (forced here on any device), the
    gates' gradient included: a kernel whose gate gradient is 10% off is refused."""
    from effconv_kernels.linear_attn import chunk

    (fq, fk, v), _ = make_inputs(1, 2, 1, 8, 32, 16, torch.float32, device)
    key = (fq.device, fq.dtype, 32, 16, 2, True, "gated")
    monkeypatch.setattr(chunk, "_CHECKED", {})
    chunk._self_check(fq, fk, v, True, gated=True, force=True)
    errs = chunk._CHECKED[key]
    assert len(errs) == 5 and max(errs) < 1e-3
    orig_bwd = chunk.linear_bwd
    monkeypatch.setattr(chunk, "linear_bwd", lambda *a, **k: (lambda r: r[:5] + (r[5] * 1.1,))(orig_bwd(*a, **k)))
    monkeypatch.setattr(chunk, "_CHECKED", {})
    with pytest.raises(RuntimeError, match="gated linear attention disagrees"):
        chunk._self_check(fq, fk, v, True, gated=True, force=True)


@pytest.mark.parametrize("dtype,Hkv", [(torch.float32, 2), (torch.bfloat16, 1)])
def test_gated_decode_kernel_follows_the_chunked_op(dtype, Hkv, device):
    """The Triton linear decode step with per-token gates (log_gate (B, Hkv)): token by token from the chunked
    kernel's state after a prefill, its outputs equal the gated chunk kernel's on the whole sequence, and its state
    after the last token equals the chunked final state."""
    B, H, T, F, Dv, prefill = 2, 4, 29, 32, 16, 11
    (fq, fk, v), state = make_inputs(B, H, Hkv, T, F, Dv, dtype, device, init=True, seed=6)
    lg = (-torch.rand(B, Hkv, T, generator=torch.Generator().manual_seed(3)) * 0.4).to(device)
    with torch.no_grad():
        o_par, (S_par, z_par) = ek.linear_attention(fq, fk, v, initial_state=state, output_final_state=True,
                                                    log_gate=lg, backend="triton")
        _, (S, z) = ek.linear_attention(fq[:, :, :prefill], fk[:, :, :prefill], v[:, :, :prefill],
                                        initial_state=state, output_final_state=True, log_gate=lg[..., :prefill],
                                        backend="triton")
        S, z = S.float().contiguous(), z.float().contiguous()
        for t in range(prefill, T):
            o_t, _ = ek.linear_decode_step(fq[:, :, t], fk[:, :, t], v[:, :, t], (S, z), log_gate=lg[:, :, t],
                                           backend="triton")
            assert rel_err(o_t, o_par[:, :, t]) < TOL[dtype][0], t
        assert rel_err(S, S_par) < 1e-4 and rel_err(z, z_par) < 1e-4
