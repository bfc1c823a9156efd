"""effconv.graph_sampling: the static-cache teacher sampler (CUDA graph on GPUs, the same step eagerly here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # --import-mode=importlib: make helpers importable

from helpers_tokenizer import make_tiny_tokenizer  # noqa: E402

from effconv import data  # noqa: E402
from effconv.data import corpus, teacher_text  # noqa: E402
from effconv.generation.graph_sampling import GraphSampler  # noqa: E402

STOP, PAD = 5, 0


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=STOP,
                    pad_token_id=PAD)
    settings.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**settings)).eval()


# prompts of different lengths: the batch is left-padded, so padding must not leak into any row
PROMPTS = [[1, 7, 8, 9, 10, 11], [1, 20, 21], [1, 30, 31, 32, 33, 34, 35, 36, 37], [1, 44]]


def reference_greedy(model, prompt, max_new_tokens, stop_ids):
    """Each prompt alone (no padding at all) through model.generate, cut after the first stop token."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD,
                         eos_token_id=list(stop_ids))[0, len(prompt):].tolist()
    end = next((i + 1 for i, token in enumerate(out) if token in stop_ids), len(out))
    return out[:end]


def test_greedy_matches_generate_on_padded_batches_and_reuses_its_cache():
    model = tiny_llama()
    # batch 6 > 4 prompts: the sampler pads the batch with repeats and drops them
    sampler = GraphSampler(model, batch_size=6, max_prompt_len=10, max_new_tokens=20, stop_ids=[STOP], pad_id=PAD,
                           do_sample=False)
    expected = [reference_greedy(model, prompt, 20, [STOP]) for prompt in PROMPTS]
    assert len({tuple(response) for response in expected}) == len(PROMPTS)  # distinct: the check can fail
    assert sampler.generate(PROMPTS) == expected
    # a second batch (other order, other widths) reuses the preallocated cache: stale slots must not leak in
    assert sampler.generate(PROMPTS[::-1][:3]) == expected[::-1][:3]
    assert sampler.generate([PROMPTS[3]]) == [expected[3]]


def test_stop_tokens_end_responses_and_the_batch():
    model = tiny_llama()
    greedy = reference_greedy(model, PROMPTS[0], 20, [STOP])
    stop = greedy[3]  # a token the model writes mid-response becomes a stop token
    sampler = GraphSampler(model, batch_size=4, max_prompt_len=10, max_new_tokens=20, stop_ids=[STOP, stop],
                           pad_id=PAD, do_sample=False, check_every=2)
    calls = []
    original = sampler._step
    sampler._step = lambda: calls.append(1) or original()
    responses = sampler.generate([PROMPTS[0]] * 4)
    assert responses == [greedy[:4]] * 4
    # the host sees every row finished at the next check and stops instead of running all 20 steps
    assert len(calls) < 8


def test_sampling_draws_from_the_processed_distribution():
    """Temperature, top-k and top-p as transformers' warpers define them: empirical frequencies of 60K draws."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    vocab, rows = 40, 60_000
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(3)) * 2.0
    processed = logits.clone()
    for warper in (TemperatureLogitsWarper(0.8), TopKLogitsWarper(12), TopPLogitsWarper(0.9)):
        processed = warper(None, processed)
    expected = processed.softmax(-1)[0]
    assert 3 <= int((expected > 0).sum()) < 12  # top-p cut inside the top-k set: both limits are exercised

    sampler = GraphSampler.__new__(GraphSampler)  # only _choose: no model needed
    sampler.do_sample, sampler.temperature, sampler.top_k, sampler.top_p = True, 0.8, 12, 0.9
    torch.manual_seed(0)
    tokens = sampler._choose(logits.expand(rows, vocab)).flatten()
    frequencies = torch.bincount(tokens, minlength=vocab).double() / rows
    assert float((frequencies - expected.double()).abs().max()) < 0.012  # ~5 standard errors at p = 0.5
    assert bool((frequencies[expected == 0] == 0).all())  # nothing outside the kept set is ever drawn


def test_sampling_is_seeded_and_varies():
    model = tiny_llama()
    sampler = GraphSampler(model, batch_size=4, max_prompt_len=10, max_new_tokens=16, stop_ids=[STOP], pad_id=PAD,
                           do_sample=True, temperature=1.0, top_k=50, top_p=0.95)
    torch.manual_seed(0)
    first = sampler.generate(PROMPTS)
    torch.manual_seed(0)
    assert sampler.generate(PROMPTS) == first
    torch.manual_seed(1)
    assert sampler.generate(PROMPTS) != first
    greedy = [reference_greedy(model, prompt, 16, [STOP]) for prompt in PROMPTS]
    assert first != greedy


def test_prompt_longer_than_the_cache_is_refused():
    sampler = GraphSampler(tiny_llama(), batch_size=2, max_prompt_len=4, max_new_tokens=4, stop_ids=[STOP],
                           pad_id=PAD, do_sample=False)
    with pytest.raises(ValueError, match="does not fit"):
        sampler.generate([list(range(1, 30))])
    with pytest.raises(ValueError, match="takes 1..2 prompts"):
        sampler.generate([[1, 2]] * 3)


def test_teacher_text_in_graph_mode_matches_static_greedy(tmp_path):
    tokenizer = make_tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    kwargs = dict(num_tokens=60, max_new_tokens=12, batch_size=3, seed=0, progress=False, do_sample=False,
                  prompts=["Explain why the sky is blue.", "Write a haiku.", "What is 2 + 3?", "Tell a story."])
    static = teacher_text.generate_teacher_samples(model, tokenizer, cache_dir=tmp_path / "s", **kwargs)
    graph = teacher_text.generate_teacher_samples(model, tokenizer, cache_dir=tmp_path / "g", generation_mode="graph", **kwargs)
    assert graph == static
    assert sum(sample.generated_tokens for sample in graph) >= 60
    # sampled: a cache entry of its own, deterministic for the seed
    sampled = dict(kwargs, do_sample=True)
    first = teacher_text.generate_teacher_samples(model, tokenizer, cache_dir=tmp_path / "a", generation_mode="graph", **sampled)
    again = teacher_text.generate_teacher_samples(model, tokenizer, cache_dir=tmp_path / "b", generation_mode="graph", **sampled)
    assert first == again and first != graph


def test_decode_attention_equals_repeated_kv_sdpa():
    """The packed one-token path against plain SDPA on key/value heads repeated per query head (GQA 9/3)."""
    from effconv.generation.graph_sampling import decode_attention

    torch.manual_seed(0)
    b, heads, kv_heads, slots, dim = 3, 9, 3, 37, 16
    query = torch.randn(b, heads, 1, dim)
    key, value = torch.randn(b, kv_heads, slots, dim), torch.randn(b, kv_heads, slots, dim)
    mask = torch.rand(b, 1, 1, slots) > 0.4
    mask[..., 0] = True
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    out, _ = decode_attention(module, query, key, value, mask, scaling=0.3)
    repeat = heads // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1), attn_mask=mask, scale=0.3)
    assert out.shape == (b, 1, heads, dim)
    torch.testing.assert_close(out, expected.transpose(1, 2))


def test_graph_mode_refuses_generation_settings_it_cannot_apply(tmp_path):
    from effconv.errors import EffconvError

    tokenizer = make_tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    model.generation_config.repetition_penalty = 1.3
    with pytest.raises(EffconvError, match="repetition_penalty=1.3: use --generation-mode static"):
        teacher_text.generate_teacher_samples(model, tokenizer, num_tokens=8, cache_dir=tmp_path, max_new_tokens=4,
                                      batch_size=2, progress=False, prompts=["Hi."], generation_mode="graph")
    model.generation_config.repetition_penalty = 1.0  # neutral: accepted
    samples = teacher_text.generate_teacher_samples(model, tokenizer, num_tokens=8, cache_dir=tmp_path, max_new_tokens=4,
                                            batch_size=2, progress=False, prompts=["Hi."], generation_mode="graph")
    assert sum(sample.generated_tokens for sample in samples) >= 8


def test_greedy_matches_generate_on_every_architecture(arch):
    """Llama, Mistral and Qwen2 (sliding-window layers, whose cache is built full while sequences fit the window),
    Qwen3 (q/k norms, attention bias): the sampler's greedy tokens are generate's."""
    from conftest import tiny_teacher

    model = tiny_teacher(arch)
    prompts = [[1] + list(range(10, 10 + n)) for n in (5, 2, 9, 1)]
    sampler = GraphSampler(model, batch_size=4, max_prompt_len=10, max_new_tokens=6, stop_ids=[], pad_id=0,
                           do_sample=False)
    expected = [model.generate(torch.tensor([p]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    assert sampler.generate(prompts) == expected
    if arch in ("mistral", "qwen2"):  # window 16: a longer sequence is refused, not attended wrongly
        with pytest.raises(ValueError, match="fit the window"):
            GraphSampler(model, batch_size=4, max_prompt_len=12, max_new_tokens=6, stop_ids=[], pad_id=0)


def test_auto_generation_mode_picks_graph_only_where_it_applies():
    """auto = graph for a transformers model on CUDA whose generation settings and window graph mode covers."""
    import copy
    import types

    from conftest import tiny_teacher

    tokenizer = make_tiny_tokenizer()
    prompts = ["Explain why the sky is blue.", "Write a haiku."]

    def on(device, model):
        stub = types.SimpleNamespace(config=model.config, generation_config=copy.deepcopy(model.generation_config))
        stub.parameters = lambda: iter([types.SimpleNamespace(device=torch.device(device))])
        return stub

    llama = tiny_teacher("llama")
    resolve = teacher_text.resolve_generation_mode
    assert resolve(llama, tokenizer, "auto", prompts, 8) == "static"  # CPU
    assert resolve(on("cuda", llama), tokenizer, "auto", prompts, 8) == "graph"
    for explicit in ("static", "continuous", "graph"):
        assert resolve(on("cuda", llama), tokenizer, explicit, prompts, 8) == explicit
    penalised = on("cuda", llama)
    penalised.generation_config.repetition_penalty = 1.2
    assert resolve(penalised, tokenizer, "auto", prompts, 8) == "static"
    effconv_like = on("cuda", llama)
    effconv_like.converted_attentions = lambda: []
    assert resolve(effconv_like, tokenizer, "auto", prompts, 8) == "static"
    mistral = on("cuda", tiny_teacher("mistral"))  # window 16
    assert resolve(mistral, tokenizer, "auto", ["Hi"], 4) == "graph"
    assert resolve(mistral, tokenizer, "auto", prompts, 64) == "static"


def test_graph_mode_refuses_an_effconv_model():
    import types

    from effconv.errors import EffconvError

    stub = types.SimpleNamespace(converted_attentions=lambda: [])
    with pytest.raises(EffconvError, match="effconv model .* --generation-mode static"):
        teacher_text._generate_samples_graph(stub, make_tiny_tokenizer(), prompts=["Hi."], num_tokens=4, max_new_tokens=4,
                                     batch_size=2, sampling={"do_sample": False}, seed=0, progress=False)
