"""Triton Hedgehog feature map (forward + backward) against the plain-PyTorch reference.

Runs on CUDA when present, otherwise through TRITON_INTERPRET=1 (set by conftest.py before import).
"""
from __future__ import annotations

import pytest
import torch

import effconv_kernels as ek
from effconv_kernels.feature_map.naive import hedgehog_feature_map_ref

TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 2e-2)}  # (output, grads), relative norm error


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-8)).item()


def make_inputs(B, H, T, D, P, dtype, device, bias=True, transposed=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if transposed:  # (B,T,H,D) memory viewed as (B,H,T,D), like q after the head split, transpose and RoPE
        x = torch.randn(B, T, H, D, generator=g).transpose(1, 2)
    else:
        x = torch.randn(B, H, T, D, generator=g)
    # identity plus noise, as the map looks early in training; scaled so the softmaxes are not flat
    w = torch.eye(D, P).expand(H, D, P) * 2 + 0.3 * torch.randn(H, D, P, generator=g)
    b = 0.5 * torch.randn(H, P, generator=g) if bias else None
    dout = torch.randn(B, H, T, 2 * P, generator=g)
    x = x.to(device=device, dtype=dtype).requires_grad_()
    w = w.to(device).requires_grad_()  # the maps' parameters stay fp32 in bf16 models
    b = b.to(device).requires_grad_() if bias else None
    return x, w, b, dout.to(device=device, dtype=dtype)


def run(fn, x, w, b, dout, **kw):
    out = fn(x, w, b, **kw)
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return out, grads


CASES = [
    # B, H, T, D, P, dtype, bias, transposed
    (1, 2, 37, 32, 32, torch.float32, True, False),
    (2, 3, 100, 64, 64, torch.float32, True, True),
    (1, 1, 1, 64, 64, torch.float32, False, False),
    (1, 3, 70, 32, 24, torch.float32, True, False),  # P not a power of two: masked feature columns
    (1, 2, 37, 64, 64, torch.bfloat16, True, True),
    (2, 1, 130, 32, 32, torch.bfloat16, True, False),
    (1, 2, 65, 64, 128, torch.bfloat16, False, False),
]


@pytest.mark.parametrize("B,H,T,D,P,dtype,bias,transposed", CASES)
def test_hedgehog_matches_reference(B, H, T, D, P, dtype, bias, transposed, device):
    x, w, b, dout = make_inputs(B, H, T, D, P, dtype, device, bias, transposed)
    out, grads = run(ek.hedgehog_feature_map, x, w, b, dout, backend="triton")
    ref, ref_grads = run(hedgehog_feature_map_ref, x, w, b, dout)
    tol_out, tol_grad = TOL[dtype]
    assert out.dtype == dtype and out.shape == (B, H, T, 2 * P)
    assert rel_err(out, ref) < tol_out
    names = ["dx", "dW", "db"]
    for name, gt, gr in zip(names, grads, ref_grads):
        assert gt.dtype == gr.dtype and gt.shape == gr.shape, name
        assert rel_err(gt, gr) < tol_grad, name
    # each half is a probability distribution over the features
    halves = out.float().unflatten(-1, (2, P)).sum(-1)
    assert torch.allclose(halves, torch.ones_like(halves), atol=2e-2 if dtype == torch.bfloat16 else 1e-5)


def test_hedgehog_without_input_grad_and_fp32_output(device):
    """Attention transfer: q and k come without grad (no dx is written); the features may be asked in fp32."""
    x, w, b, dout = make_inputs(2, 3, 45, 64, 64, torch.bfloat16, device, transposed=True, seed=1)
    x = x.detach()
    out, (dw, db) = run(ek.hedgehog_feature_map, x, w, b, dout, out_dtype=torch.float32, backend="triton")
    ref, (rdw, rdb) = run(hedgehog_feature_map_ref, x, w, b, dout, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5  # fp32 math on the same bf16 inputs
    assert rel_err(dw, rdw) < 1e-4 and rel_err(db, rdb) < 1e-4


def test_hedgehog_matches_model_feature_map(device):
    """The kernel computes what effconv's FeatureMap module computes (same parameters, fp32 math)."""
    from effconv.modeling.attention_ops import FeatureMap

    fm = FeatureMap("hedgehog", 2, 32).to(device)
    with torch.no_grad():
        fm.weight.add_(0.2 * torch.randn_like(fm.weight))
        fm.bias.add_(0.1 * torch.randn_like(fm.bias))
    x = torch.randn(1, 2, 19, 32, device=device)
    out = ek.hedgehog_feature_map(x, fm.weight, fm.bias, backend="triton")
    assert rel_err(out, fm(x)) < 1e-5


def test_hedgehog_argument_errors():
    x = torch.randn(1, 2, 5, 32)
    with pytest.raises(ValueError, match="weight"):
        ek.hedgehog_feature_map(x, torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="bias"):
        ek.hedgehog_feature_map(x, torch.randn(2, 32, 16), torch.randn(2, 32))
    with pytest.raises(TypeError):
        ek.hedgehog_feature_map(x.to(torch.int32), torch.randn(2, 32, 16))


@pytest.mark.parametrize("window", [8, 0])
def test_attention_transfer_with_fused_map_matches_reference(window, device, monkeypatch):
    """Stage-1 loss and feature-map gradients of a tiny student: Triton path (fused map + attention kernel)
    against the all-PyTorch reference path."""
    import transformers as tf

    from effconv.distill.transfer import attention_transfer_loss
    from effconv.conversion.student import build_student, effconv_config_from_teacher

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    teacher = tf.LlamaForCausalLM(cfg).eval()
    batch = torch.randint(0, 64, (2, 40), device=device)
    calls = []
    fused = ek.hedgehog_feature_map
    monkeypatch.setattr(ek, "hedgehog_feature_map", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    results = {}
    for backend in ("triton", "reference"):
        config = effconv_config_from_teacher(teacher.config, window_size=window, attention_backend=backend)
        student = build_student(teacher, config).to(device)
        torch.manual_seed(1)
        maps = [p for n, p in student.named_parameters() if "feature_map" in n]
        with torch.no_grad():
            for p in maps:
                p.add_(0.3 * torch.randn_like(p))
        loss = attention_transfer_loss(student, batch, last_layer=1)
        results[backend] = (loss, torch.autograd.grad(loss, maps))
    assert len(calls) == 2 * 2  # q and k map of both layers, Triton path only
    (loss_t, grads_t), (loss_r, grads_r) = results["triton"], results["reference"]
    assert abs(loss_t.item() - loss_r.item()) <= 1e-4 * abs(loss_r.item())
    for gt, gr in zip(grads_t, grads_r):
        assert rel_err(gt, gr) < 1e-3


@pytest.mark.parametrize("window", [4, 0])
def test_student_decode_with_fused_map_equals_parallel(window, device):
    """Student mode on the Triton path (fused map; the cache keeps the map's output for the window): prefill then
    multi-token steps give the parallel forward's logits, and the parallel forward matches the reference path."""
    import transformers as tf

    from effconv.conversion.student import build_student, effconv_config_from_teacher

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    teacher = tf.LlamaForCausalLM(cfg).eval()
    x = torch.randint(0, 64, (2, 19), device=device)
    logits = {}
    for backend in ("triton", "reference"):
        config = effconv_config_from_teacher(teacher.config, window_size=window, attention_backend=backend)
        student = build_student(teacher, config).to(device)
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in student.named_parameters():
                if "feature_map" in name:
                    p.add_(0.3 * torch.randn_like(p))
            logits[backend] = full = student(x, use_cache=False).logits
            if backend == "triton":
                out = student(x[:, :6], use_cache=True)
                cache, pieces = out.past_key_values, [out.logits]
                for i in range(6, 19, 5):
                    step = student(x[:, i:i + 5], past_key_values=cache, use_cache=True)
                    pieces.append(step.logits)
                torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits["triton"], logits["reference"], rtol=1e-4, atol=1e-4)
