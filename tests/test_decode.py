"""One-token decoding of converted layers (recurrent state / window ring buffer) and the static greedy loop."""

from __future__ import annotations

import pytest
import torch

from effconv.generation.fast_decode import greedy_generate
from test_modeling import student_of


def _token_by_token(student, x, prefill):
    with torch.no_grad():
        out = student(x[:, :prefill], use_cache=True)
        cache, pieces = out.past_key_values, [out.logits]
        for i in range(prefill, x.shape[1]):
            pieces.append(student(x[:, i : i + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(pieces, 1), cache


@pytest.mark.parametrize(
    "window,types",
    [(0, None), (4, None), (64, None), (0, ["linear", "softmax", "linear"]), (4, ["softmax", "linear", "linear"])],
)
def test_token_by_token_decode_equals_parallel_forward(arch, window, types, monkeypatch):
    """GQA (6 query / 2 kv heads), fp32 on the CPU; windows shorter and longer than the sequence; mixed models."""
    import effconv_kernels

    calls = []
    for name in ("linear_decode_step", "hybrid_decode_step"):
        op = getattr(effconv_kernels, name)
        monkeypatch.setattr(effconv_kernels, name, lambda *a, _op=op, _n=name, **k: calls.append(_n) or _op(*a, **k))
    _, student = student_of(arch, window=window, attention_types=types)
    x = torch.randint(3, 400, (2, 21))
    with torch.no_grad():
        full = student(x, use_cache=False).logits
    incremental, cache = _token_by_token(student, x, prefill=6)
    n_converted = len(student.converted_attentions())
    assert calls == ["hybrid_decode_step" if window else "linear_decode_step"] * (n_converted * 15)
    torch.testing.assert_close(incremental, full, rtol=1e-4, atol=1e-5)
    converted = [c for c, layer in zip(cache.layer_caches, student.model.layers) if layer.self_attn.is_converted]
    # the dedicated decode path ran: hybrid layers moved their window into the ring buffer
    assert all((c.ring is not None) == (window > 0) for c in converted)


def test_multi_token_continuation_after_decode_steps():
    """Prefill, single-token steps (ring buffer), then a multi-token chunk (ring unrolled), then single steps."""
    _, student = student_of("qwen3", window=4)
    x = torch.randint(3, 400, (2, 24))
    with torch.no_grad():
        full = student(x, use_cache=False).logits
        out = student(x[:, :5], use_cache=True)
        cache, pieces = out.past_key_values, [out.logits]
        for a, b in [(5, 6), (6, 7), (7, 8), (8, 13), (13, 14), (14, 15), (15, 24)]:
            pieces.append(student(x[:, a:b], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [0, 8])
def test_cache_bytes_constant_in_context_while_decoding(window):
    _, student = student_of("llama", window=window)
    sizes = []
    with torch.no_grad():
        for t in (10, 40, 150):
            out = student(torch.randint(3, 400, (1, t)), use_cache=True)
            cache = out.past_key_values
            # held tensors own their storage: a view of the prefill's keys would keep all of them alive
            held = [x for c in cache.layer_caches for x in (c.keys, c.values, c.key_features, *(c.state or ()))
                    if x is not None]
            assert all(x.untyped_storage().nbytes() == x.numel() * x.element_size() for x in held)
            for _ in range(3):
                nxt = out.logits[:, -1:].argmax(-1)
                out = student(nxt, past_key_values=cache, use_cache=True)
            sizes.append(cache.nbytes())
    assert sizes[0] == sizes[1] == sizes[2] > 0


@pytest.mark.parametrize("window,types", [(0, None), (4, None), (4, ["linear", "softmax", "linear"])])
def test_generate_uses_decode_path_and_matches_manual_greedy(window, types):
    _, student = student_of("mistral", window=window, attention_types=types)
    x = torch.randint(3, 400, (2, 7))
    with torch.no_grad():
        generated = student.generate(x, max_new_tokens=10, do_sample=False, min_new_tokens=10)
        seq = x
        for _ in range(10):
            seq = torch.cat([seq, student(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(generated, seq)


@pytest.mark.parametrize("window,types", [(0, None), (4, None), (4, ["linear", "softmax", "linear"])])
def test_greedy_generate_eager_matches_generate(window, types):
    _, student = student_of("qwen2", window=window, attention_types=types)
    x = torch.randint(3, 400, (2, 9))
    with torch.no_grad():
        expected = student.generate(x, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    result = greedy_generate(student, x, max_new_tokens=8)
    assert not result.cuda_graph  # CPU: eager fallback
    assert torch.equal(result.tokens, expected)


@pytest.mark.parametrize("window", [5, 8, 64])
def test_device_position_ring_matches_generate(window):
    """The CUDA-graph bookkeeping on the CPU: after the first step the hybrid rings are rotated to absolute slot
    numbering and read their slot from the shared position tensor (reference op); tokens equal generate()."""
    from effconv.generation.fast_decode import StaticDecoder

    _, student = student_of("llama", window=window)
    x = torch.randint(3, 400, (2, 30))
    with torch.no_grad():
        expected = student.generate(x, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    decoder = StaticDecoder(student, use_cuda_graph=False, max_new_tokens=12)
    pieces = [x, decoder.prefill(x), decoder.step().clone()]
    decoder._attach_device_position()
    assert all(c.ring_position is decoder.position for c in decoder.cache.layer_caches)
    pieces += [decoder.step().clone() for _ in range(10)]
    assert torch.equal(torch.cat(pieces, 1), expected)


def test_greedy_generate_teacher_eager_matches_generate():
    from conftest import tiny_teacher

    teacher = tiny_teacher("llama")
    x = torch.randint(3, 400, (2, 9))
    with torch.no_grad():
        expected = teacher.generate(x, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    result = greedy_generate(teacher, x, max_new_tokens=8)
    assert torch.equal(result.tokens, expected)



@pytest.mark.parametrize("model_kind", ["teacher", "hybrid", "mixed"])
def test_cache_step_decode_matches_generate(model_kind):
    """decoding.py's loop (prefill, then CacheStep through the model's own cache) gives generate()'s greedy tokens
    for a softmax teacher (DynamicCache), a hybrid student and a student with a softmax layer (EffconvCache)."""
    from conftest import tiny_teacher

    from effconv.generation.decoding import CacheStep, decode, greedy_token, output_cache, prefill

    if model_kind == "teacher":
        model = tiny_teacher("llama")
    else:
        _, model = student_of("llama", window=4, attention_types=None if model_kind == "hybrid" else
                              ["linear", "softmax", "linear"])
    x = torch.randint(3, 400, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model.generate(x, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    out = prefill(model, x)
    first = greedy_token(out.logits)
    step = CacheStep(model, output_cache(out))
    tokens = decode(step, first, 7)
    assert torch.equal(torch.cat([x, first, *tokens], 1), expected)
    out = prefill(model, x)  # keep=False: the last token only, the same one
    last = decode(CacheStep(model, output_cache(out)), greedy_token(out.logits), 7, keep=False)
    assert len(last) == 1 and torch.equal(last[0], tokens[-1])


def test_decode_stops_once_every_row_has_a_stop_id():
    from effconv.generation.decoding import decode

    script = torch.tensor([[5, 9], [2, 7], [6, 2], [8, 8]])  # row 0 stops at step 2, row 1 at step 3
    steps = iter(script)

    def step(token):
        return next(steps)[:, None]

    tokens = decode(step, torch.zeros(2, 1, dtype=torch.long), 4, stop_ids={2})
    assert torch.cat(tokens, 1).tolist() == [[5, 2, 6], [9, 7, 2]]
    steps = iter(script)
    assert len(decode(step, torch.zeros(2, 1, dtype=torch.long), 4)) == 4  # no stop ids: every step


def test_passkey_greedy_tail_stops_at_eos_like_generate():
    """eval/length.py's greedy answer through the shared loop: generate()'s tokens up to and including the first
    end-of-sequence token, at most max_new_tokens."""
    from conftest import tiny_teacher

    from effconv.eval import length as le

    model = tiny_teacher("llama")
    ids = torch.randint(3, 400, (1, 12), generator=torch.Generator().manual_seed(4)).tolist()[0]
    last, cache = le._prefill(model, ids)
    free = le._greedy_tail(model, last, cache, 8, set())
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert free == expected[0, len(ids):].tolist()
    eos = free[3]  # a token of the answer as end of sequence: the answer ends at its first occurrence
    last, cache = le._prefill(model, ids)
    assert le._greedy_tail(model, last, cache, 8, {eos}) == free[: free.index(eos) + 1]
    assert le._greedy_tail(model, last, cache, 1, set()) == free[:1]


def test_decode_bench_runs_on_cpu_tiny(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "decode.json"
    cmd = [sys.executable, str(root / "bench" / "decode.py"), "--tiny", "--device", "cpu", "--dtype", "float32",
           "--contexts", "20", "40", "--batches", "1", "2", "--steps", "2", "--repeats", "1", "--warmup", "1",
           "--window", "8", "--prefill-chunk", "16", "--generate-steps", "2", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=root, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert len(result["runs"]) == 8  # 2 models x 2 batches x 2 contexts
    assert all(r["tokens_per_s"] > 0 and not r["cuda_graph"] for r in result["runs"])
    converted = [r for r in result["runs"] if r["model"] == "converted"]
    teacher = [r for r in result["runs"] if r["model"] == "teacher"]
    # the converted cache does not grow with context; the teacher's static KV cache does
    assert len({(r["batch"], r["cache_bytes"]) for r in converted}) == 2
    assert all(r["cache_bytes"] > 0 for r in converted)
    assert len({(r["batch"], r["cache_bytes"]) for r in teacher}) == 4
    assert set(result["generate_batch1"]) == {"teacher", "converted"}


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda_only
@pytest.mark.parametrize("window", [0, 8])
def test_cuda_token_by_token_decode_equals_parallel_forward(window):
    """Triton path: prefill kernels' final state + decode kernels (fp32: tf32x3 dots, near-fp32 accuracy)."""
    _, student = student_of("qwen3", window=window)
    student = student.cuda()
    x = torch.randint(3, 400, (2, 40), device="cuda")
    with torch.no_grad():
        full = student(x, use_cache=False).logits
    incremental, _ = _token_by_token(student, x, prefill=13)
    torch.testing.assert_close(incremental, full, rtol=1e-3, atol=1e-3)


@cuda_only
@pytest.mark.parametrize("window", [0, 8])
def test_cuda_graph_greedy_matches_eager_converted(window):
    _, student = student_of("llama", window=window)
    student = student.cuda()
    x = torch.randint(3, 400, (3, 30), device="cuda")
    eager = greedy_generate(student, x, 20, use_cuda_graph=False)
    graph = greedy_generate(student, x, 20, use_cuda_graph=True)
    assert graph.cuda_graph and not eager.cuda_graph
    assert torch.equal(graph.tokens, eager.tokens)


@cuda_only
def test_cuda_graph_greedy_matches_generate_teacher():
    from conftest import tiny_teacher

    teacher = tiny_teacher("llama").cuda()
    x = torch.randint(3, 400, (3, 30), device="cuda")
    with torch.no_grad():
        expected = teacher.generate(x, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    graph = greedy_generate(teacher, x, 20, use_cuda_graph=True)
    assert graph.cuda_graph
    assert torch.equal(graph.tokens, expected)


@cuda_only
@pytest.mark.parametrize("extra", [{"linear_sinks": 3}, {"linear_gate": True, "decay_memory": 8.0},
                                   {"linear_gate": True, "decay_memory": 8.0, "linear_sinks": 3},
                                   {"linear_gate": True, "decay_memory": 8.0, "window_size": 0}])
def test_cuda_gated_and_sink_decode_steps_equal_the_forward(extra):
    """The Triton hybrid step with gates and / or sinks, inside the model: cached one-token decoding equals the
    full forward (the chunked PyTorch path; for the gated pure linear model the gated chunk kernel, checked against
    the PyTorch path below), past the window and the sinks."""
    from conftest import random_effconv_model

    model = random_effconv_model(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, **{"window_size": 4, **extra}).cuda()
    x = torch.randint(3, 400, (2, 40), device="cuda")
    with torch.no_grad():
        full = model(x, use_cache=False).logits
    incremental, _ = _token_by_token(model, x, prefill=2)
    torch.testing.assert_close(incremental, full, rtol=1e-3, atol=1e-3)


@cuda_only
def test_cuda_gated_pure_linear_kernel_equals_the_pytorch_path():
    """A gated window-0 model on the gated chunk kernel (attention_backend auto) and on the PyTorch path
    (reference): same logits and same gradients of the gate weights."""
    from conftest import random_effconv_model

    grads, logits = [], []
    for backend in ("auto", "reference"):
        model = random_effconv_model(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, window_size=0, linear_gate=True,
                                     decay_memory=8.0, attention_backend=backend).cuda()
        x = torch.randint(3, 400, (2, 150), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        out = model(x, use_cache=False).logits
        out.float().square().mean().backward()
        logits.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "gate" in n and p.grad is not None]))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-3, atol=1e-5)
