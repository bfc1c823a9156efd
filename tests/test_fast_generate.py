"""model.generate's fast path (effconv/modeling/fast_generate.py) on the CPU: the static decode cache runs eagerly
here (no CUDA graph), with the same buffers and device-counter steps the graph captures on CUDA; it must give
transformers' usual loop's tokens."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from conftest import random_effconv_model
from effconv.modeling import EffconvForCausalLM
from helpers_no_effconv import WITHOUT_EFFCONV  # noqa: E402

VOCAB = 400
KINDS = {
    "linear": dict(window_size=0),
    "hybrid": dict(window_size=4),
    "decay": dict(window_size=4, linear_decay=True, decay_memory=8.0),
    "gated": dict(window_size=4, linear_gate=True, decay_memory=8.0),
    "gated-linear": dict(window_size=0, linear_gate=True, decay_memory=8.0),
    "sinks": dict(window_size=4, linear_sinks=2, max_position_embeddings=16),  # generation runs past the cap
    "gated-sinks": dict(window_size=4, linear_gate=True, decay_memory=8.0, linear_sinks=3),
    "softmax-layers": dict(window_size=4, attention_types=["linear", "softmax", "linear"]),
    "gqa-sliding-teacher": dict(window_size=0, attention_types=["softmax", "linear", "gqa"], gqa_kv_heads=1,
                                sliding_window=6, teacher_sliding_layers=[True, False, False]),
    "moe": dict(window_size=4, attention_types=["softmax", "linear", "linear"], num_experts=4,
                num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=16),
}


def tiny_model(seed: int = 0, **overrides) -> EffconvForCausalLM:
    """A random 3-layer effconv model whose weights are large enough that attention shapes the logits."""
    return random_effconv_model(seed, norms=True, vocab_size=VOCAB, hidden_size=96, intermediate_size=128,
                                num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, bos_token_id=1,
                                eos_token_id=2, pad_token_id=0, **{"max_position_embeddings": 512, **overrides})


def generate(model, mode: str, monkeypatch, *args, **kwargs):
    monkeypatch.setenv("EFFCONV_FAST_GENERATE", mode)
    with torch.no_grad():
        return model.generate(*args, **kwargs)


def prompts(batch: int, length: int, padded: bool, seed: int = 3):
    ids = torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if padded:  # left padding of different lengths, one row longer than the window of 4
        for row in range(1, batch):
            mask[row, : min(row * 3, length - 1)] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


@pytest.mark.parametrize("padded", [False, True], ids=["same-length", "left-padded"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_fast_greedy_equals_eager_generate(kind, padded, monkeypatch):
    model = tiny_model(**KINDS[kind])
    ids, mask = prompts(3, 11, padded)
    args = dict(attention_mask=mask, max_new_tokens=14, min_new_tokens=14, do_sample=False, pad_token_id=0)
    eager = generate(model, "off", monkeypatch, ids, **args)
    assert getattr(model, "_effconv_generation_cache", None) is None
    fast = generate(model, "on", monkeypatch, ids, **args)
    cache = model._effconv_generation_cache
    assert cache.frozen and cache.static_context is not None  # the static steps ran
    if any(t in ("softmax", "gqa") for t in model.config.attention_types):
        assert all(c.static_keys is not None for c, t in zip(cache.layer_caches, model.config.attention_types)
                   if t in ("softmax", "gqa"))
    assert torch.equal(fast, eager)


def test_cache_is_reused_across_calls_of_other_shapes(monkeypatch):
    """A later call with another batch size or a longer prompt gets fresh buffers; one of the same batch size and a
    length that fits reuses them. Every call gives the eager loop's tokens."""
    model = tiny_model(**KINDS["softmax-layers"])
    caches = []
    for batch, length, new in [(2, 9, 6), (2, 12, 5), (3, 9, 6), (3, 300, 4)]:
        ids, mask = prompts(batch, length, padded=False, seed=length)
        args = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        assert torch.equal(generate(model, "on", monkeypatch, ids, **args),
                           generate(model, "off", monkeypatch, ids, **args))
        cache = model._effconv_generation_cache
        caches.append((cache, cache.layer_caches[1].static_keys))
    assert caches[0][0] is caches[1][0] and caches[0][1] is caches[1][1]  # same buffers for the second call
    assert caches[2][1] is not caches[1][1]  # another batch size: new buffers
    assert caches[3][0].max_cache_len >= 304 and caches[3][0] is not caches[2][0]  # longer: a larger cache


def test_sampling_with_a_seed_is_reproducible(monkeypatch):
    model = tiny_model(**KINDS["softmax-layers"])
    ids, mask = prompts(4, 10, padded=True)
    args = dict(attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=0.9, top_p=0.9, pad_token_id=0)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(generate(model, "on", monkeypatch, ids, **args))
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(8)
    assert not torch.equal(generate(model, "on", monkeypatch, ids, **args), runs[0])  # the seed matters


class Collect(BaseStreamer):
    def __init__(self):
        self.pieces = []
        self.ended = False

    def put(self, value):
        self.pieces.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_eos_and_streamer_behave_as_in_the_eager_loop(monkeypatch):
    model = tiny_model(**KINDS["hybrid"])
    ids, mask = prompts(1, 8, padded=False)
    free = generate(model, "off", monkeypatch, ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                    pad_token_id=0)
    eos = int(free[0, ids.shape[1] + 4])  # the fifth new token as end of sequence
    outputs, streams = {}, {}
    for mode in ("off", "on"):
        streamer = Collect()
        outputs[mode] = generate(model, mode, monkeypatch, ids, attention_mask=mask, max_new_tokens=10,
                                 do_sample=False, eos_token_id=eos, pad_token_id=0, streamer=streamer)
        assert streamer.ended
        streams[mode] = streamer.pieces
    assert torch.equal(outputs["on"], outputs["off"])
    assert int(outputs["on"][0, -1]) == eos and outputs["on"].shape[1] < free.shape[1]
    assert streams["on"] == streams["off"]


def _spy_loop(monkeypatch) -> list:
    """Count the calls of effconv's own generation loop (fast_generate.fast_loop)."""
    from effconv.modeling import fast_generate

    calls, loop = [], fast_generate.fast_loop
    monkeypatch.setattr(fast_generate, "fast_loop", lambda *a, **k: calls.append(1) or loop(*a, **k))
    return calls


@pytest.mark.parametrize("kind", list(KINDS))
def test_effconv_loop_equals_transformers_loop(kind, monkeypatch):
    """Greedy search through effconv's loop (static cache, stop decision read one step late) gives transformers'
    tokens, lengths and padding: left-padded rows, an EOS that ends rows at different steps (and all rows before
    max_new_tokens), and none."""
    model = tiny_model(**KINDS[kind])
    ids, mask = prompts(3, 9, padded=True)
    base = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    free = generate(model, "off", monkeypatch, ids, **base)
    new = free[:, ids.shape[1]:]
    # end of sequence: a token row 0 produces early (the others may or may not), then each row's own second token
    eos_sets = [None, int(new[0, 2]), [int(new[r, 1]) for r in range(3)]]
    calls = _spy_loop(monkeypatch)
    for eos in eos_sets:
        args = {**base, **({} if eos is None else {"eos_token_id": eos})}
        expected = generate(model, "off", monkeypatch, ids, **args)
        got = generate(model, "on", monkeypatch, ids, **args)
        assert got.shape == expected.shape and torch.equal(got, expected), (kind, eos)
    assert len(calls) == len(eos_sets)  # effconv's loop ran each "on" call
    stopped = generate(model, "on", monkeypatch, ids, **{**base, "eos_token_id": eos_sets[2]})
    assert stopped.shape[1] < free.shape[1]  # every row ended early: the loop stopped early too


def test_effconv_loop_samples_like_transformers(monkeypatch):
    """Sampling from the same random state: effconv's loop applies transformers' warpers (temperature, top-k,
    top-p) and draws once per step, so it gives transformers' tokens."""
    model = tiny_model(**KINDS["hybrid"])
    ids, mask = prompts(4, 10, padded=True)
    for extra in ({"temperature": 0.7, "top_k": 20, "top_p": 0.9}, {"top_k": 0}, {"temperature": 1.3}):
        args = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, pad_token_id=0, **extra)
        runs = {}
        for mode in ("off", "on"):
            torch.manual_seed(11)
            runs[mode] = generate(model, mode, monkeypatch, ids, **args)
        assert torch.equal(runs["on"], runs["off"]), extra


@pytest.mark.parametrize("extra", [{"repetition_penalty": 1.3}, {"num_beams": 2}, {"no_repeat_ngram_size": 2},
                                   {"return_dict_in_generate": True, "output_scores": True}])
def test_other_generation_settings_run_transformers_loop(extra, monkeypatch):
    """Settings effconv's loop does not implement go to transformers' loop (static cache where it serves), with
    transformers' results."""
    model = tiny_model(**KINDS["hybrid"])
    ids, mask = prompts(2, 8, padded=True)
    args = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, **extra)
    expected = generate(model, "off", monkeypatch, ids, **args)
    calls = _spy_loop(monkeypatch)
    got = generate(model, "on", monkeypatch, ids, **args)
    assert not calls
    if isinstance(got, torch.Tensor):
        assert torch.equal(got, expected)
    else:
        assert torch.equal(got.sequences, expected.sequences)


def test_loop_setting_keeps_transformers_loop_on_the_static_cache(monkeypatch):
    """EFFCONV_GENERATE_LOOP=transformers: transformers' own loop, still on the static cache, same tokens; min_new_tokens
    (EOS barred for the first steps) in effconv's loop equals it; a bad value is one clear error."""
    model = tiny_model(**KINDS["gated-sinks"])
    ids, mask = prompts(3, 9, padded=True)
    free = generate(model, "off", monkeypatch, ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                    pad_token_id=0)
    eos = int(free[1, ids.shape[1] + 1])
    args = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=6, do_sample=False, pad_token_id=0,
                eos_token_id=eos)
    expected = generate(model, "off", monkeypatch, ids, **args)
    calls = _spy_loop(monkeypatch)
    assert torch.equal(generate(model, "on", monkeypatch, ids, **args), expected) and len(calls) == 1
    monkeypatch.setenv("EFFCONV_GENERATE_LOOP", "transformers")
    assert torch.equal(generate(model, "on", monkeypatch, ids, **args), expected) and len(calls) == 1
    assert model._effconv_generation_cache.frozen  # transformers' loop ran on the static cache
    monkeypatch.setenv("EFFCONV_GENERATE_LOOP", "mine")
    with pytest.raises(ValueError, match="EFFCONV_GENERATE_LOOP must be one of effconv, transformers"):
        generate(model, "on", monkeypatch, ids, **args)


def test_generation_config_object_takes_the_effconv_loop(monkeypatch):
    from transformers import GenerationConfig

    model = tiny_model(**KINDS["hybrid"])
    ids, mask = prompts(2, 8, padded=True)
    config = GenerationConfig(max_new_tokens=9, do_sample=True, top_k=5, pad_token_id=0)
    runs = {}
    calls = _spy_loop(monkeypatch)
    for mode in ("off", "on"):
        torch.manual_seed(3)
        runs[mode] = generate(model, mode, monkeypatch, ids, attention_mask=mask, generation_config=config)
    assert len(calls) == 1 and torch.equal(runs["on"], runs["off"])


def test_models_without_a_static_cache_say_so_and_decode_eagerly(monkeypatch, caplog):
    model = tiny_model(window_size=4, attention_types=["linear", "sliding", "linear"], sink_tokens=1)
    ids, mask = prompts(2, 9, padded=False)
    args = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    fast = generate(model, "on", monkeypatch, ids, **args)
    assert getattr(model, "_effconv_generation_cache", None) is None
    assert "sliding layers have no static decode cache" in caplog.text
    assert torch.equal(fast, generate(model, "off", monkeypatch, ids, **args))


def test_fast_generate_setting_is_checked(monkeypatch):
    model = tiny_model(window_size=0)
    ids, mask = prompts(1, 5, padded=False)
    with pytest.raises(ValueError, match="EFFCONV_FAST_GENERATE must be one of auto, on, off"):
        generate(model, "fast", monkeypatch, ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)


NO_EFFCONV = WITHOUT_EFFCONV + """
import json, os, torch
os.environ["EFFCONV_FAST_GENERATE"] = "on"
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                         do_sample=False, pad_token_id=0)
backend = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".backend"]
print(json.dumps({"tokens": out.tolist(), "kernels": backend.KERNELS_SOURCE,
                  "static": bool(model._effconv_generation_cache.frozen)}))
"""


@pytest.mark.parametrize("kind", ["softmax-layers", "gated", "gated-sinks"])
def test_export_runs_its_bundled_kernels_without_effconv(kind, tmp_path, monkeypatch):
    """The export carries the kernels as flat sibling files; loaded by plain transformers with effconv unimportable,
    the model uses them (static generate included; a gated model's PyTorch decode steps too) and gives the same
    tokens as effconv's own model."""
    import json
    import subprocess
    import sys

    from transformers.dynamic_module_utils import get_imports

    from effconv.io.export import export_model

    model = tiny_model(**KINDS[kind])
    export_model(model, None, tmp_path / "export")
    bundled = sorted(p.name for p in (tmp_path / "export").glob("effconv_kernels*.py"))
    assert "effconv_kernels_bundle.py" in bundled and "effconv_kernels_hybrid_attn_recurrent.py" in bundled
    assert not (tmp_path / "export" / "kernels.py").exists()
    for name in bundled:  # transformers' import check must not demand triton (or effconv)
        assert set(get_imports(tmp_path / "export" / name)) <= {"torch", "__future__", "dataclasses", "functools",
                                                               "os", "warnings", "math", "json", "re", "collections",
                                                               "pathlib", "sys"}, name
    ids, _ = prompts(2, 7, padded=False)
    expected = generate(model, "on", monkeypatch, ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                        min_new_tokens=8, do_sample=False, pad_token_id=0)
    run = subprocess.run([sys.executable, "-c", NO_EFFCONV, str(tmp_path / "export"), json.dumps(ids.tolist())],
                         capture_output=True, text=True, cwd=tmp_path, env={**__import__("os").environ,
                                                                            "HF_MODULES_CACHE": str(tmp_path / "hf")})
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["kernels"] == "bundled with the model" and result["static"]
    assert result["tokens"] == expected.tolist()


def test_generate_bench_runs_on_cpu_tiny(tmp_path):
    """bench/generate.py end to end on random tiny models: rows for every model (the export also without effconv,
    on its bundled kernels), the memory cells and the summary."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "generate.json"
    cmd = [sys.executable, str(root / "bench" / "generate.py"), "--tiny", "--device", "cpu", "--dtype", "float32",
           "--batches", "1", "--contexts", "12", "--new-tokens", "2", "--memory-contexts", "8", "16",
           "--memory-batch", "1", "--memory-prefill-chunk", "8", "--models", "student", "student-no-effconv",
           "teacher-dynamic", "--out", str(out)]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {r["model"] for r in rows} == {"student", "student-no-effconv", "teacher-dynamic"}
    assert all(r["status"] == "ok" and r["decode_tokens_per_s"] > 0 and r["prefill_ms"] > 0 for r in rows)
    assert sum(r.get("memory_cell", False) for r in rows) == 6
    assert result["no_effconv_kernels"]["kernels"] == "bundled with the model"
    assert set(result["summary"]["decode_speedup_over_faster_teacher"]) == {"student b1 c12",
                                                                             "student-no-effconv b1 c12"}


def test_cache_sets_its_length_where_transformers_makes_it_read_only(monkeypatch):
    # transformers 5.17 defines Cache.max_cache_len as a property without a setter
    from transformers.cache_utils import Cache

    from effconv.modeling.modeling_effconv import EffconvCache

    monkeypatch.setattr(Cache, "max_cache_len", property(lambda self: 0), raising=False)
    cache = EffconvCache(2, static=True, max_cache_len=64)
    assert cache.max_cache_len == 64
    cache.max_cache_len = 128
    assert cache.max_cache_len == 128


@pytest.mark.parametrize("kind", ["gated", "gated-sinks"])
def test_batch_reordering_moves_every_part_of_the_cache(kind):
    """Beam search and batch expansion (reorder_cache / batch_repeat_interleave) move the gates and sinks with the
    rest of the cache: a repeated cache continues each copy as the original, both from a prefill (window keys,
    sinks) and from one-token steps (ring buffer)."""
    model = tiny_model(**KINDS[kind])
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for decoded in (0, 2):
            cache = model(ids[:, :9], use_cache=True).past_key_values
            for t in range(9, 9 + decoded):
                cache = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).past_key_values
            rest = ids[:, 9 + decoded :]
            expected = model(rest, past_key_values=cache, use_cache=True).logits
            cache = model(ids[:, : 9 + decoded], use_cache=True).past_key_values
            if decoded:  # rebuild the ring: one-token steps after an 8-token prefill
                cache = model(ids[:, : 8 + decoded], use_cache=True).past_key_values
                cache = model(ids[:, 8 + decoded : 9 + decoded], past_key_values=cache, use_cache=True).past_key_values
            cache.batch_repeat_interleave(2)
            got = model(rest.repeat_interleave(2, 0), past_key_values=cache, use_cache=True).logits
            torch.testing.assert_close(got, expected.repeat_interleave(2, 0), rtol=1e-4, atol=1e-5)
            cache.reorder_cache(torch.tensor([1, 0, 3, 2]))
            again = model(ids[:, :1].repeat_interleave(2, 0), past_key_values=cache, use_cache=True).logits
            torch.testing.assert_close(again[0::2], again[1::2], rtol=1e-4, atol=1e-5)
