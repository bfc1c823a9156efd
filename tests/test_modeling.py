"""The effconv model against the teachers it replaces, and its attention paths against each other."""

from __future__ import annotations

import pytest
import torch

from conftest import random_effconv_model, tiny_teacher
from effconv.conversion.student import build_student, effconv_config_from_teacher
from effconv.modeling.attention_ops import FeatureMap, hybrid_attention, hybrid_attention_weights, linear_attention
from effconv.distill.transfer import set_attention_mode


def student_of(arch, window=4, attention_types=None, feature_map="hedgehog"):
    teacher = tiny_teacher(arch)
    config = effconv_config_from_teacher(
        teacher.config, window_size=window, attention_types=attention_types, feature_map=feature_map
    )
    student = build_student(teacher, config)
    # perturb the new parameters so that tests do not run only on the identity initialisation
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "feature_map" in name or "window_mix" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return teacher, student


def test_teacher_mode_reproduces_hf_logits(arch):
    teacher, student = student_of(arch)
    set_attention_mode(student.converted_attentions(), "teacher")
    x = torch.randint(0, 400, (2, 40))  # longer than the Mistral/Qwen2 sliding window of 16
    with torch.no_grad():
        expected, got = teacher(x).logits, student(x, use_cache=False).logits
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [0, 1, 4, 64])
def test_decode_equals_parallel_forward(arch, window):
    _, student = student_of(arch, window=window, attention_types=["linear", "softmax", "linear"])
    x = torch.randint(0, 400, (2, 23))
    with torch.no_grad():
        full = student(x, use_cache=False).logits
        out = student(x[:, :5], use_cache=True)
        cache, pieces = out.past_key_values, [out.logits]
        for i in range(5, 23, 3):  # chunks of 3, then the tail: multi-token steps continue the state too
            step = student(x[:, i : i + 3], past_key_values=cache, use_cache=True)
            pieces.append(step.logits)
        incremental = torch.cat(pieces, 1)
    torch.testing.assert_close(incremental, full, rtol=1e-4, atol=1e-5)


def _oracle(q, k, v, fq, fk, mix, window, scale):
    g = q.shape[1] // k.shape[1]
    w = hybrid_attention_weights(q, k, fq, fk, mix, window=window, scale=scale, eps=0.0)
    return w @ v.float().repeat_interleave(g, 1)


@pytest.mark.parametrize("t,window,chunk", [(1, 4, 64), (37, 4, 16), (100, 16, 16), (70, 64, 32), (50, 80, 64)])
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (6, 2), (8, 1)])
def test_chunked_hybrid_matches_quadratic_oracle(t, window, chunk, heads, kv_heads):
    torch.manual_seed(t + window)
    d = 16
    q, k, v = torch.randn(2, heads, t, d), torch.randn(2, kv_heads, t, d), torch.randn(2, kv_heads, t, d)
    fmq, fmk = FeatureMap("hedgehog", heads, d), FeatureMap("hedgehog", kv_heads, d)
    fq, fk = fmq(q), fmk(k)
    mix = torch.randn(heads)
    got, _ = hybrid_attention(q, k, v, fq, fk, mix, window=window, scale=d**-0.5, eps=0.0, chunk_size=chunk)
    torch.testing.assert_close(got, _oracle(q, k, v, fq, fk, mix, window, d**-0.5), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("t,chunk", [(1, 64), (37, 16), (100, 32)])
def test_chunked_linear_matches_quadratic_oracle(t, chunk):
    torch.manual_seed(t)
    q, k, v = torch.randn(1, 6, t, 8), torch.randn(1, 3, t, 8), torch.randn(1, 3, t, 8)
    fq, fk = FeatureMap("elu", 6, 8)(q), FeatureMap("elu", 3, 8)(k)
    got, state = linear_attention(fq, fk, v, eps=0.0, chunk_size=chunk, output_final_state=True)
    torch.testing.assert_close(got, _oracle(q, k, v, fq, fk, torch.zeros(6), 0, 1.0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state[0], torch.einsum("bktf,bktd->bkfd", fk, v), rtol=1e-4, atol=1e-5)


def test_gradients_reach_feature_maps_and_mix():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 30, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    fmq, fmk = FeatureMap("hedgehog", 4, 8), FeatureMap("hedgehog", 2, 8)
    mix = torch.zeros(4, requires_grad=True)
    o, _ = hybrid_attention(q, k, v, fmq(q), fmk(k), mix, window=4, scale=8**-0.5)
    o.square().sum().backward()
    for p in (fmq.weight, fmk.weight, fmq.bias, mix):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("kind,out_dim", [("hedgehog", 32), ("t2r", 16), ("elu", 16)])
def test_feature_maps(kind, out_dim):
    fm = FeatureMap(kind, 3, 16)
    x = torch.randn(2, 3, 5, 16)
    y = fm(x)
    assert y.shape == (2, 3, 5, out_dim) and fm.output_dim == out_dim
    assert (y >= 0).all()
    if kind == "hedgehog":  # identity init: each half is a softmax of +-x
        torch.testing.assert_close(y[..., :16], torch.softmax(x, -1))
        torch.testing.assert_close(y[..., 16:], torch.softmax(-x, -1))
    with pytest.raises(ValueError, match="unknown feature map"):
        FeatureMap("cosformer", 3, 16)


def test_generate_matches_manual_greedy_and_keeps_constant_memory():
    _, student = student_of("llama", window=0)
    x = torch.randint(3, 400, (1, 6))
    with torch.no_grad():
        generated = student.generate(x, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        seq = x
        for _ in range(12):
            seq = torch.cat([seq, student(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(generated, seq)
    sizes = []
    with torch.no_grad():
        for t in (8, 64, 200):
            sizes.append(student(torch.randint(3, 400, (1, t)), use_cache=True).past_key_values.nbytes())
    assert sizes[0] == sizes[1] == sizes[2] > 0  # pure linear: the state does not grow with context


def test_hybrid_cache_is_bounded_by_the_window():
    _, student = student_of("qwen3", window=8)
    with torch.no_grad():
        short = student(torch.randint(3, 400, (1, 8)), use_cache=True).past_key_values.nbytes()
        long = student(torch.randint(3, 400, (1, 300)), use_cache=True).past_key_values.nbytes()
    assert short == long


def test_left_padded_batch_generation_matches_single_sequences():
    _, student = student_of("mistral", window=4, attention_types=["linear", "softmax", "linear"])
    a, b = torch.randint(3, 400, (1, 9)), torch.randint(3, 400, (1, 5))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    with torch.no_grad():
        together = student.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        alone_a = student.generate(a, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        alone_b = student.generate(b, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert torch.equal(together[0, -6:], alone_a[0, -6:])
    assert torch.equal(together[1, -6:], alone_b[0, -6:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transfer_mse_matches_fp32_mse_loss(dtype):
    from effconv.distill.transfer import transfer_mse

    torch.manual_seed(0)
    y_pred = torch.randn(3, 17, 40, dtype=dtype, requires_grad=True)
    y_true = torch.randn(3, 17, 40, dtype=dtype, requires_grad=True)
    before = y_pred.detach().clone()
    loss = transfer_mse(y_pred, y_true)
    grads = torch.autograd.grad(2.5 * loss, [y_pred, y_true])
    ref = torch.nn.functional.mse_loss(y_pred.float(), y_true.float())
    ref_grads = torch.autograd.grad(2.5 * ref, [y_pred, y_true])
    assert torch.equal(y_pred.detach(), before)  # the input is never modified in place
    assert torch.allclose(loss, ref, rtol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype and torch.allclose(g.float(), r.float(), rtol=1e-5, atol=1e-9)


def test_decay_student_trains_decays_and_decodes_like_its_forward():
    """--decay: each linear layer has a per-KV-head decay logit (trainable in stage 1, initialised at memories
    around decay_memory), the linear part forgets (outputs differ from the undecayed model) and cached decoding
    equals the full forward, for the hybrid and for pure linear attention."""
    from effconv.conversion.student import make_student
    from effconv.pipelines.linearize import LinearizeConfig

    teacher = tiny_teacher("llama")
    ids = torch.randint(0, 400, (2, 40))
    for window in (4, 0):
        plain = make_student(teacher, LinearizeConfig(window=window), torch.device("cpu"))
        decayed = make_student(teacher, LinearizeConfig(window=window, decay=True, decay_memory=8.0),
                               torch.device("cpu"))
        attn = decayed.model.layers[0].self_attn
        tau = 1 / (1 - torch.sigmoid(attn.decay_logit.detach()))
        torch.testing.assert_close(tau, torch.tensor([2.0, 32.0])[: attn.num_kv_heads], rtol=1e-4, atol=1e-4)
        assert attn.decay_logit.requires_grad and attn.decay_logit.dtype == torch.float32
        with torch.no_grad():
            full = decayed(ids, use_cache=False).logits
            assert not torch.allclose(full, plain(ids, use_cache=False).logits, atol=1e-4)
            out = decayed(ids[:, :25], use_cache=True)
            steps = [out.logits[:, -1]]
            cache = out.past_key_values
            for t in range(25, 40):
                out = decayed(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                steps.append(out.logits[:, -1])
        torch.testing.assert_close(torch.stack(steps[:-1], 1), full[:, 24:39], rtol=1e-4, atol=1e-4)


def test_unrotated_features_make_the_linear_part_shift_invariant():
    """--no-linear-rope: the feature maps read q and k before RoPE, so the pure linear model's output does not
    depend on where the sequence starts (position ids shifted by 5000 give the same logits), unlike with RoPE'd
    features; cached decoding still equals the full forward, and attention transfer trains the maps."""
    from effconv.conversion.student import make_student
    from effconv.distill.transfer import attention_transfer_loss
    from effconv.pipelines.linearize import LinearizeConfig

    teacher = tiny_teacher("llama")
    ids = torch.randint(0, 400, (1, 30))
    shifted = torch.arange(5000, 5030)[None]
    rope = make_student(teacher, LinearizeConfig(window=0, linear_rope=True), torch.device("cpu"))
    free = make_student(teacher, LinearizeConfig(window=0, linear_rope=False, decay=True), torch.device("cpu"))
    for model in (rope, free):  # give the maps something to be position-dependent with
        for attn in model.converted_attentions():
            torch.nn.init.normal_(attn.feature_map_q.weight, std=0.5)
            torch.nn.init.normal_(attn.feature_map_k.weight, std=0.5)
    with torch.no_grad():
        torch.testing.assert_close(free(ids, use_cache=False).logits,
                                   free(ids, position_ids=shifted, use_cache=False).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(rope(ids, use_cache=False).logits,
                                  rope(ids, position_ids=shifted, use_cache=False).logits, atol=1e-3)
        full = free(ids, use_cache=False).logits
        out = free(ids[:, :20], use_cache=True)
        cache, steps = out.past_key_values, []
        for t in range(20, 30):
            out = free(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
        torch.testing.assert_close(torch.stack(steps, 1), full[:, 20:], rtol=1e-4, atol=1e-4)
    loss = attention_transfer_loss(free, ids, len(free.model.layers) - 1)
    loss.backward()
    assert free.model.layers[0].self_attn.feature_map_k.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("window,chunk", [(0, 16), (8, 16), (16, 32)])
def test_gated_chunked_paths_equal_the_quadratic_weights_and_continue(window, chunk):
    """Per-token gates (log_gate): the chunked linear / hybrid paths equal the O(T^2) weights, a run in two pieces
    (the second starting from the first's final state, the hybrid re-reading its window) equals one run, a constant
    gate equals the per-head decay, and gradients reach the gates."""
    torch.manual_seed(0)
    b, h, hkv, t, d, f = 2, 4, 2, 77, 8, 12  # 77: not a multiple of the chunk; GQA 2:1
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    fq, fk = torch.rand(b, h, t, f), torch.rand(b, hkv, t, f)
    mix = torch.randn(h)
    log_gate = (-torch.rand(b, hkv, t) * 0.5).requires_grad_(True)

    def run(q, k, v, fq, fk, lg, **kw):
        if window == 0:
            return linear_attention(fq, fk, v, chunk_size=chunk, **kw)
        return hybrid_attention(q, k, v, fq, fk, mix, window=window, scale=0.3, chunk_size=chunk, **kw)

    o, _ = run(q, k, v, fq, fk, None, log_gate=log_gate, eps=0.0)
    w = hybrid_attention_weights(q, k, fq, fk, mix, window=window, scale=0.3, eps=0.0, log_gate=log_gate)
    torch.testing.assert_close(o, w @ v.repeat_interleave(2, 1), rtol=1e-4, atol=1e-5)
    run(q, k, v, fq, fk, None, log_gate=log_gate)[0].square().sum().backward()  # default eps: padded rows stay finite
    assert log_gate.grad.isfinite().all() and log_gate.grad.abs().sum() > 0

    lg = log_gate.detach()
    with torch.no_grad():
        full, _ = run(q, k, v, fq, fk, None, log_gate=lg)
        t1 = 40
        first, state = run(q[:, :, :t1], k[:, :, :t1], v[:, :, :t1], fq[:, :, :t1], fk[:, :, :t1], None,
                           log_gate=lg[..., :t1], output_final_state=True)
        s = t1 - window  # the hybrid re-reads the last `window` keys; their query rows are dropped
        zq = torch.zeros_like(q[:, :, s:t1]), torch.zeros_like(fq[:, :, s:t1])
        second, _ = run(torch.cat([zq[0], q[:, :, t1:]], 2), k[:, :, s:], v[:, :, s:],
                        torch.cat([zq[1], fq[:, :, t1:]], 2), fk[:, :, s:], None, log_gate=lg[..., s:],
                        initial_state=state)
        torch.testing.assert_close(torch.cat([first, second[:, :, window:]], 2), full, rtol=1e-4, atol=1e-5)

        lam = torch.tensor([-0.2, -0.01])
        const = lam[None, :, None].expand(b, hkv, t)
        a, sa = run(q, k, v, fq, fk, None, log_gate=const, output_final_state=True)
        d_, sd = run(q, k, v, fq, fk, None, log_decay=lam, output_final_state=True)
        torch.testing.assert_close(a, d_, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sa[0], sd[0], rtol=1e-5, atol=1e-5)


def test_gated_student_starts_as_the_decay_trains_its_gate_and_decodes_like_its_forward():
    """--gate: each linear layer gets a zero-initialised forget gate on top of the decay logits, so the untrained
    model equals the --decay model; attention transfer trains the gate; cached decoding (prefill, one-token steps,
    a multi-token step) equals the full forward once the gate is data-dependent, for the hybrid and pure linear."""
    from effconv.conversion.student import make_student
    from effconv.distill.transfer import attention_transfer_loss
    from effconv.pipelines.linearize import LinearizeConfig

    teacher = tiny_teacher("llama")
    ids = torch.randint(0, 400, (2, 40))
    for window in (4, 0):
        decayed = make_student(teacher, LinearizeConfig(window=window, decay=True, decay_memory=8.0),
                               torch.device("cpu"))
        gated = make_student(teacher, LinearizeConfig(window=window, gate=True, decay_memory=8.0),
                             torch.device("cpu"))
        attn = gated.model.layers[0].self_attn
        assert attn.is_gated and attn.log_decay() is None and attn.forget_gate.weight.requires_grad
        with torch.no_grad():
            torch.testing.assert_close(gated(ids, use_cache=False).logits, decayed(ids, use_cache=False).logits,
                                       rtol=1e-4, atol=1e-4)
        loss = attention_transfer_loss(gated, ids, len(gated.model.layers) - 1)
        loss.backward()
        assert attn.forget_gate.weight.grad.abs().sum() > 0
        with torch.no_grad():
            for a in gated.converted_attentions():
                a.forget_gate.weight.normal_(std=0.5)
            full = gated(ids, use_cache=False).logits
            assert not torch.allclose(full, decayed(ids, use_cache=False).logits, atol=1e-3)
            out = gated(ids[:, :20], use_cache=True)
            cache, pieces = out.past_key_values, [out.logits]
            for t in range(20, 30):
                out = gated(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                pieces.append(out.logits)
            pieces.append(gated(ids[:, 30:], past_key_values=cache, use_cache=True).logits)
        torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("window,chunk,count", [(8, 16, 4), (16, 32, 1), (4, 16, 20)])
def test_sinks_chunked_and_recurrent_equal_the_quadratic_weights(window, chunk, count):
    """Attention sinks: the first `count` tokens are softmax terms of every later query and never linear ones.
    The chunked hybrid (plain and gated) and the token-by-token decode steps equal the O(T^2) weights; gradients
    reach the sink keys and values; with left padding the first real tokens are the sinks."""
    from effconv.modeling.attention_ops import take_sinks
    from effconv_kernels.hybrid_attn.naive import recurrent_hybrid_attention_ref

    torch.manual_seed(count)
    b, h, hkv, t, d, f = 2, 4, 2, 77, 8, 12  # 77: not a multiple of the chunk; GQA 2:1
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, hkv, t, d, requires_grad=True), torch.randn(b, hkv, t, d)
    fq, fk = torch.rand(b, h, t, f), torch.rand(b, hkv, t, f)
    mix = torch.randn(h)
    for log_gate in (None, -torch.rand(b, hkv, t) * 0.5):
        sinks = take_sinks(k, v, count)
        o, _ = hybrid_attention(q, k, v, fq, fk, mix, window=window, scale=0.3, chunk_size=chunk, eps=0.0,
                                sinks=sinks, log_gate=log_gate)
        w = hybrid_attention_weights(q, k, fq, fk, mix, window=window, scale=0.3, eps=0.0, sinks=count,
                                     log_gate=log_gate)
        expected = w @ v.repeat_interleave(2, 1)
        torch.testing.assert_close(o, expected, rtol=1e-4, atol=1e-5)
        plain = hybrid_attention_weights(q, k, fq, fk, mix, window=window, scale=0.3, eps=0.0, log_gate=log_gate)
        assert not torch.allclose(plain @ v.repeat_interleave(2, 1), expected, atol=1e-3)  # the sinks matter
        with torch.no_grad():
            rec, _ = recurrent_hybrid_attention_ref(q, k, v, fq, fk, mix, window=window, scale=0.3, eps=0.0,
                                                    log_gate=log_gate, sinks=count)
        torch.testing.assert_close(rec, expected, rtol=1e-4, atol=1e-5)
    k.grad = None
    o.square().sum().backward()
    assert k.grad[:, :, :count].abs().sum() > 0

    pad = 5  # row 1 gets 5 padding tokens in front: its sinks are its first real tokens
    mask = torch.ones(b, t + pad, dtype=torch.bool)
    mask[1, :pad] = False
    shift = lambda x: torch.cat([torch.zeros_like(x[:, :, :pad]), x], 2)  # noqa: E731
    kp, vp = shift(k.detach()), shift(v)
    sinks = take_sinks(kp, vp, count, key_mask=mask)
    assert sinks.key_is_sink[1, pad : pad + count].all() and sinks.key_is_sink[1].sum() == min(count, t)
    with torch.no_grad():
        got, _ = hybrid_attention(shift(q), kp, vp, shift(fq), shift(fk), mix, window=window, scale=0.3,
                                  chunk_size=chunk, eps=0.0, sinks=sinks, key_padding_mask=mask)
        alone, _ = hybrid_attention(q[1:], k[1:].detach(), v[1:], fq[1:], fk[1:], mix, window=window, scale=0.3,
                                    chunk_size=chunk, eps=0.0, sinks=take_sinks(k[1:].detach(), v[1:], count))
    torch.testing.assert_close(got[1:, :, pad:], alone, rtol=1e-4, atol=1e-5)


def assert_mixed_steps_equal_forward(model, ids, full, *, splits):
    """For each prefill length in `splits`: the prefill, then one-token ring steps and three-token steps (which
    unroll the ring), give the logits of one forward over `ids` (`full`)."""
    for split in splits:
        out = model(ids[:, :split], use_cache=True)
        cache, pieces, t = out.past_key_values, [out.logits], split
        while t < ids.shape[1]:
            step = 1 if t % 5 else 3
            out = model(ids[:, t : t + step], past_key_values=cache, use_cache=True)
            cache, t = out.past_key_values, t + step
            pieces.append(out.logits)
        torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-4)


def test_sink_model_decodes_like_its_forward_and_refuses_sinks_without_a_window():
    """linear_sinks: prefill, one-token ring steps and multi-token steps (which unroll the ring) continue the
    sinks exactly, whatever the prompt length (shorter than the sinks included), gated or not; past
    max_position_embeddings (16 here) the sinks are read with queries rotated at the last position, so the model
    equals one with more positions up to there and differs after."""
    from effconv.modeling import EffconvConfig, EffconvForCausalLM

    for extra in ({}, {"linear_gate": True, "decay_memory": 8.0}):
        model = random_effconv_model(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, window_size=4, linear_sinks=3,
                                     max_position_embeddings=16, **extra)
        config = model.config
        ids = torch.randint(3, 400, (2, 30))
        with torch.no_grad():
            full = model(ids, use_cache=False).logits
            unsunk = EffconvForCausalLM(EffconvConfig(**{**config.to_dict(), "linear_sinks": 0})).eval()
            unsunk.load_state_dict(model.state_dict())
            assert not torch.allclose(unsunk(ids, use_cache=False).logits, full, atol=1e-3)
            uncapped = EffconvForCausalLM(EffconvConfig(**{**config.to_dict(), "max_position_embeddings": 64})).eval()
            uncapped.load_state_dict(model.state_dict())
            wide = uncapped(ids, use_cache=False).logits
            torch.testing.assert_close(wide[:, :16], full[:, :16])
            assert not torch.allclose(wide[:, 16:], full[:, 16:], atol=1e-3)
            assert_mixed_steps_equal_forward(model, ids, full, splits=(1, 2, 9))
    with pytest.raises(ValueError, match="linear_sinks needs window_size"):
        EffconvConfig(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, window_size=0, linear_sinks=3)


@pytest.mark.parametrize("mixer", ["plain", "decay", "gated"])
@pytest.mark.parametrize("split", [40, 5])
def test_hybrid_continuation_reads_earlier_keys_without_their_query_rows(mixer, split):
    """A continuation passes its re-read window as keys that lead the queries (k longer than q): in two calls (the
    second from the first's final state, with up to `window` earlier keys and only the new queries) the output and
    the final state equal one run's, with left padding too; more than `window` earlier keys is refused."""
    torch.manual_seed(1)
    b, h, hkv, t, d, f, window = 2, 4, 2, 77, 8, 12, 8
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    fq, fk = torch.rand(b, h, t, f), torch.rand(b, hkv, t, f)
    mix = torch.randn(h)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, :3] = False  # a left-padded row
    kw = {"decay": dict(log_decay=torch.tensor([-0.2, -0.01])), "plain": {},
          "gated": dict(log_gate=-torch.rand(b, hkv, t) * 0.5)}[mixer]

    def run(lo, hi, earlier, **extra):
        args = {key: (x[..., lo - earlier : hi] if key == "log_gate" else x) for key, x in kw.items()}
        return hybrid_attention(q[:, :, lo:hi], k[:, :, lo - earlier : hi], v[:, :, lo - earlier : hi],
                                fq[:, :, lo:hi], fk[:, :, lo - earlier : hi], mix, window=window, scale=0.3,
                                chunk_size=16, key_padding_mask=mask[:, lo - earlier : hi], **args, **extra)

    full, full_state = run(0, t, 0, output_final_state=True)
    first, state = run(0, split, 0, output_final_state=True)
    earlier = min(split, window)
    second, second_state = run(split, t, earlier, initial_state=state if split > window else None,
                               output_final_state=True)
    torch.testing.assert_close(torch.cat([first, second], 2), full, rtol=1e-4, atol=1e-5)
    for got, want in zip(second_state, full_state):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="earlier keys"):
        run(window + 10, t, window + 1)


def test_hybrid_continuation_takes_sinks_after_earlier_keys():
    """Sinks first taken in a continuation (a row whose first call was all padding) sit among keys that an earlier
    window leads: each query reads the sinks at or before it, as in one run."""
    import torch.nn.functional as F

    from effconv.modeling.attention_ops import take_sinks

    torch.manual_seed(2)
    b, h, hkv, t, d, f, window, split, count = 2, 4, 2, 50, 8, 12, 8, 20, 3
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    fq, fk = torch.rand(b, h, t, f), torch.rand(b, hkv, t, f)
    mix = torch.randn(h)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, :split + 2] = False  # row 1: nothing real in the first call, its sinks come at split + 2, + 3, + 4
    opts = dict(window=window, scale=0.3, chunk_size=16)

    whole = take_sinks(k, v, count, key_mask=mask)
    full, _ = hybrid_attention(q, k, v, fq, fk, mix, key_padding_mask=mask, sinks=whole, **opts)

    first_sinks = take_sinks(k[:, :, :split], v[:, :, :split], count, key_mask=mask[:, :split])
    first, state = hybrid_attention(q[:, :, :split], k[:, :, :split], v[:, :, :split], fq[:, :, :split],
                                    fk[:, :, :split], mix, key_padding_mask=mask[:, :split], sinks=first_sinks,
                                    output_final_state=True, **opts)
    lo = split - window
    sinks = take_sinks(k[:, :, lo:], v[:, :, lo:], count, key_mask=F.pad(mask[:, split:], (window, 0), value=False),
                       earlier=first_sinks)
    sinks = sinks._replace(key_is_sink=sinks.key_is_sink | F.pad(first_sinks.key_is_sink[:, lo:], (0, t - split)))
    second, _ = hybrid_attention(q[:, :, split:], k[:, :, lo:], v[:, :, lo:], fq[:, :, split:], fk[:, :, lo:], mix,
                                 key_padding_mask=mask[:, lo:], sinks=sinks, initial_state=state, **opts)
    torch.testing.assert_close(torch.cat([first, second], 2)[1, :, split + 2 :], full[1, :, split + 2 :],
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(second[0], full[0, :, split:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window,chunk,count", [(8, 16, 0), (8, 16, 3), (16, 32, 2)])
def test_separate_normalisers_chunked_and_recurrent_equal_the_quadratic_weights(window, chunk, count):
    """linear_normalizer separate: each branch a weighted mean of its own, mixed by the per-head weight, and the
    first `window` rows (no linear term yet) the softmax branch alone. The chunked hybrid (plain and gated, with and
    without sinks), the token-by-token decode steps and a continuation equal the O(T^2) weights, which differ from
    the shared normaliser's."""
    from effconv.modeling.attention_ops import take_sinks
    from effconv_kernels.hybrid_attn.naive import recurrent_hybrid_attention_ref

    torch.manual_seed(window + count)
    b, h, hkv, t, d, f = 2, 4, 2, 77, 8, 12
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    fq, fk = torch.rand(b, h, t, f), torch.rand(b, hkv, t, f)
    mix = torch.randn(h)
    values = v.repeat_interleave(2, 1)
    for log_gate in (None, -torch.rand(b, hkv, t) * 0.5):
        sinks = take_sinks(k, v, count) if count else None
        o, state = hybrid_attention(q, k, v, fq, fk, mix, window=window, scale=0.3, chunk_size=chunk, sinks=sinks,
                                    log_gate=log_gate, separate=True, output_final_state=count == 0)
        w = hybrid_attention_weights(q, k, fq, fk, mix, window=window, scale=0.3, sinks=count, log_gate=log_gate,
                                     separate=True)
        torch.testing.assert_close(o, w @ values, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)), rtol=1e-4, atol=1e-4)
        shared = hybrid_attention_weights(q, k, fq, fk, mix, window=window, scale=0.3, sinks=count,
                                          log_gate=log_gate)
        assert not torch.allclose(shared @ values, o, atol=1e-3)
        # before any linear term a row is the softmax branch alone, in both forms
        torch.testing.assert_close(o[:, :, :window], (shared @ values)[:, :, :window], rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            rec, _ = recurrent_hybrid_attention_ref(q, k, v, fq, fk, mix, window=window, scale=0.3,
                                                    log_gate=log_gate, sinks=count, separate=True)
        torch.testing.assert_close(rec, o, rtol=1e-4, atol=1e-5)
        if count == 0:  # a continuation from the first part's state equals the one run
            split = 40
            first, st = hybrid_attention(q[:, :, :split], k[:, :, :split], v[:, :, :split], fq[:, :, :split],
                                         fk[:, :, :split], mix, window=window, scale=0.3, chunk_size=chunk,
                                         log_gate=None if log_gate is None else log_gate[..., :split],
                                         separate=True, output_final_state=True)
            lo = split - window
            second, st2 = hybrid_attention(q[:, :, split:], k[:, :, lo:], v[:, :, lo:], fq[:, :, split:],
                                           fk[:, :, lo:], mix, window=window, scale=0.3, chunk_size=chunk,
                                           log_gate=None if log_gate is None else log_gate[..., lo:],
                                           separate=True, initial_state=st, output_final_state=True)
            torch.testing.assert_close(torch.cat([first, second], 2), o, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(st2[0], state[0], rtol=1e-4, atol=1e-5)


def test_separate_normaliser_model_decodes_like_its_forward():
    """A model with linear_normalizer separate (gated, sinks): prefill, one-token ring steps and multi-token steps
    equal its forward; it differs from the shared-normaliser model with the same weights; a pure linear model
    (nothing to normalise apart) and an unknown value are refused."""
    from effconv.modeling import EffconvConfig, EffconvForCausalLM

    model = random_effconv_model(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, window_size=4, linear_sinks=2,
                                 linear_gate=True, decay_memory=8.0, linear_normalizer="separate")
    ids = torch.randint(3, 400, (2, 30))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        shared = EffconvForCausalLM(EffconvConfig(**{**model.config.to_dict(), "linear_normalizer": "shared"})).eval()
        shared.load_state_dict(model.state_dict())
        assert not torch.allclose(shared(ids, use_cache=False).logits, full, atol=1e-3)
        assert_mixed_steps_equal_forward(model, ids, full, splits=(2, 9))
    for bad in (dict(window_size=0), dict(linear_normalizer="both")):
        with pytest.raises(ValueError, match="linear_normalizer"):
            EffconvConfig(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, **{"window_size": 4,
                                                                           "linear_normalizer": "separate", **bad})
