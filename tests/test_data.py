"""Tests for effconv.data: loading, teacher generation, packing, splitting and batching."""

from __future__ import annotations

import builtins
import copy
import json
import sys
import time
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # --import-mode=importlib: make helpers importable

from helpers_tokenizer import make_tiny_tokenizer  # noqa: E402

from effconv import data  # noqa: E402
from effconv.data import corpus, teacher_text  # noqa: E402
from effconv.data import (  # noqa: E402
    BlockLoader,
    generate_teacher_samples,
    generate_teacher_texts,
    load_default_prompts,
    load_texts,
    pack_texts,
    prepare_data,
    split_train_val,
)
from effconv.errors import EffconvError  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------
# load_texts
# ------------------------------------------------------------------------------------------


def test_txt_file_is_one_document(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("First paragraph.\n\nSecond paragraph.\n", encoding="utf-8")
    assert load_texts(str(path)) == ["First paragraph.\n\nSecond paragraph."]


def test_long_txt_file_is_split_at_paragraphs(tmp_path):
    paragraphs = [f"Paragraph {i} " + "word " * 400 for i in range(30)]  # ~2k chars each, ~60k total
    path = tmp_path / "long.md"
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    documents = load_texts(str(path))
    assert len(documents) >= 3
    assert all(len(doc) <= corpus.MAX_DOCUMENT_CHARS for doc in documents)
    # Splits happen only between paragraphs: rejoining gives back every paragraph intact.
    rejoined = "\n\n".join(documents).split("\n\n")
    assert [p.strip() for p in rejoined] == [p.strip() for p in paragraphs]
    assert load_texts(str(path), max_documents=2) == documents[:2]


def test_jsonl_default_and_custom_field(tmp_path):
    path = write_jsonl(
        tmp_path / "corpus.jsonl",
        [{"text": "alpha", "body": "one"}, {"text": "beta", "body": "two"}, {"text": "   ", "body": "three"}],
    )
    assert load_texts(str(path)) == ["alpha", "beta"]  # whitespace-only documents are skipped
    assert load_texts(str(path), text_field="body") == ["one", "two", "three"]
    assert load_texts(str(path), text_field="body", max_documents=2) == ["one", "two"]


def test_max_documents_stops_reading_early(tmp_path):
    path = tmp_path / "tail_broken.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\nnot json\n', encoding="utf-8")
    assert load_texts(str(path), max_documents=2) == ["a", "b"]
    with pytest.raises(EffconvError, match=":3: not valid JSON"):
        load_texts(str(path))
    with pytest.raises(EffconvError, match="max_documents must be at least 1"):
        load_texts(str(path), max_documents=0)


def test_json_list(tmp_path):
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps([{"content": "x y"}, {"content": "z"}]), encoding="utf-8")
    assert load_texts(str(path), text_field="content") == ["x y", "z"]


def test_directory_reads_supported_files_sorted(tmp_path):
    (tmp_path / "b.txt").write_text("from b", encoding="utf-8")
    (tmp_path / "a.md").write_text("from a", encoding="utf-8")
    write_jsonl(tmp_path / "c.jsonl", [{"text": "from c1"}, {"text": "from c2"}])
    (tmp_path / "ignored.csv").write_text("not,read", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.txt").write_text("from sub/d", encoding="utf-8")
    assert load_texts(str(tmp_path)) == ["from a", "from b", "from c1", "from c2", "from sub/d"]
    assert load_texts(str(tmp_path), max_documents=3) == ["from a", "from b", "from c1"]


def test_missing_path(tmp_path):
    with pytest.raises(EffconvError, match="data file not found: .*nope.jsonl"):
        load_texts(str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("content", ["", "  \n\n \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(EffconvError, match="contains no text"):
        load_texts(str(path))


def test_empty_directory(tmp_path):
    with pytest.raises(EffconvError, match="no .* files in data directory"):
        load_texts(str(tmp_path))
    (tmp_path / "blank.txt").write_text("\n", encoding="utf-8")
    with pytest.raises(EffconvError, match="no text in any of the 1 data files"):
        load_texts(str(tmp_path))


def test_non_utf8_file(tmp_path):
    path = tmp_path / "binary.txt"
    path.write_bytes(b"ok \xff\xfe oops")
    with pytest.raises(EffconvError, match="not UTF-8"):
        load_texts(str(path))


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "locked.txt"
    path.write_text("secret", encoding="utf-8")

    def deny(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", deny)  # chmod does not stop root, so fake the OS error
    with pytest.raises(EffconvError, match="cannot read data file .*locked.txt: Permission denied"):
        load_texts(str(path))


def test_bad_json_line_reports_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(EffconvError, match=r"bad\.jsonl:4: not valid JSON") as raised:
        load_texts(str(path))
    assert "\n" not in str(raised.value)


def test_missing_text_field(tmp_path):
    path = write_jsonl(tmp_path / "fields.jsonl", [{"text": "ok"}, {"body": "no text here", "id": 7}])
    with pytest.raises(EffconvError, match=r"fields\.jsonl:2: no field 'text' \(fields present: body, id\)"):
        load_texts(str(path))


def test_non_object_and_non_string_records(tmp_path):
    path = write_jsonl(tmp_path / "list.jsonl", [["not", "an", "object"]])
    with pytest.raises(EffconvError, match=r"list\.jsonl:1: expected a JSON object, got list"):
        load_texts(str(path))
    path = write_jsonl(tmp_path / "int.jsonl", [{"text": 5}])
    with pytest.raises(EffconvError, match=r"int\.jsonl:1: field 'text' is int, expected a string"):
        load_texts(str(path))


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(EffconvError, match="unsupported data file type '.csv'"):
        load_texts(str(path))


def test_hf_spec_without_datasets_package(monkeypatch):
    real_import = builtins.__import__

    def import_without_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "datasets", raising=False)
    monkeypatch.setattr(builtins, "__import__", import_without_datasets)
    with pytest.raises(EffconvError, match="needs the 'datasets' package"):
        load_texts("hf:wikitext:wikitext-2-raw-v1")


def fake_datasets_module(load_dataset) -> types.ModuleType:
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    return module


def test_hf_spec_unreachable_dataset_fails_fast(monkeypatch):
    calls = []

    def unreachable(name, config, split):
        calls.append((name, config, split))
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setitem(sys.modules, "datasets", fake_datasets_module(unreachable))
    started = time.monotonic()
    with pytest.raises(EffconvError, match="could not load Hugging Face dataset 'hf:someone/corpus:cfg@validation'") as raised:
        load_texts("hf:someone/corpus:cfg@validation")
    assert time.monotonic() - started < 5
    assert calls == [("someone/corpus", "cfg", "validation")]
    assert "\n" not in str(raised.value)


def test_hf_spec_loads_rows(monkeypatch):
    rows = [{"text": "first"}, {"text": ""}, {"text": "second"}, {"text": "third"}]
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets_module(lambda name, config, split: rows))
    assert load_texts("hf:tiny") == ["first", "second", "third"]
    assert load_texts("hf:tiny", max_documents=2) == ["first", "second"]
    with pytest.raises(EffconvError, match="no field 'body'"):
        load_texts("hf:tiny", text_field="body")


def test_hf_spec_real_package_if_installed(monkeypatch, tmp_path):
    """With `datasets` installed and the Hub unreachable, a bogus dataset is an EffconvError."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(EffconvError, match="could not load Hugging Face dataset"):
        load_texts("hf:effconv-test/definitely-not-a-dataset")


def test_bad_hf_spec():
    with pytest.raises(EffconvError, match="expected hf:NAME"):
        load_texts("hf:")


# ------------------------------------------------------------------------------------------
# pack_texts
# ------------------------------------------------------------------------------------------


def test_pack_adds_bos_and_eos_per_document(tokenizer):
    documents = ["hello world", "the quick brown fox", "a"]
    encoded = [tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in documents]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream = [token for ids in encoded for token in [bos, *ids, eos]]

    seq_len = 4
    blocks = pack_texts(documents, tokenizer, seq_len)
    assert blocks.dtype == torch.long
    assert blocks.shape == (len(stream) // seq_len, seq_len)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]  # contiguous, ragged tail dropped
    eos_positions = [i for i, token in enumerate(stream) if token == eos]
    assert eos_positions == [sum(len(ids) + 2 for ids in encoded[: k + 1]) - 1 for k in range(3)]


def test_pack_does_not_duplicate_existing_bos_eos(tokenizer):
    text = "<s>user\nhello</s>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    blocks = pack_texts([text, text], tokenizer, len(ids))
    assert blocks.tolist() == [ids, ids]


def test_pack_too_little_text(tokenizer):
    with pytest.raises(EffconvError, match=r"not enough text: \d+ tokens found, at least 1000 needed"):
        pack_texts(["just a few words"], tokenizer, 1000)
    with pytest.raises(EffconvError, match="0 tokens found"):
        pack_texts([], tokenizer, 8)


# ------------------------------------------------------------------------------------------
# split_train_val
# ------------------------------------------------------------------------------------------


def test_split_sizes_and_determinism():
    blocks = torch.arange(100 * 3).view(100, 3)
    train, val = split_train_val(blocks, 0.1, seed=3)
    assert train.shape == (90, 3) and val.shape == (10, 3)
    # A partition of the original rows, shuffled.
    rows = sorted(map(tuple, torch.cat([train, val]).tolist()))
    assert rows == sorted(map(tuple, blocks.tolist()))
    assert train.tolist() != blocks[10:].tolist()

    train_again, val_again = split_train_val(blocks, 0.1, seed=3)
    assert torch.equal(train, train_again) and torch.equal(val, val_again)
    _, val_other_seed = split_train_val(blocks, 0.1, seed=4)
    assert not torch.equal(val, val_other_seed)


def test_split_minimums():
    blocks = torch.arange(10).view(5, 2)
    train, val = split_train_val(blocks, 0.01)  # rounds to 0 but min_val_blocks=1
    assert (train.shape[0], val.shape[0]) == (4, 1)
    train, val = split_train_val(blocks, 0.0, min_val_blocks=0)
    assert (train.shape[0], val.shape[0]) == (5, 0)
    with pytest.raises(EffconvError, match="not enough text to split: 1 blocks"):
        split_train_val(blocks[:1], 0.05)
    with pytest.raises(EffconvError, match="val_fraction"):
        split_train_val(blocks, 1.0)


# ------------------------------------------------------------------------------------------
# BlockLoader
# ------------------------------------------------------------------------------------------


def test_block_loader_epochs_cover_all_blocks():
    blocks = torch.arange(12 * 2).view(12, 2)
    loader = BlockLoader(blocks, batch_size=4, seed=0)
    assert loader.tokens_per_batch == 8
    epoch0 = torch.cat([loader.batch(step) for step in range(3)])
    epoch1 = torch.cat([loader.batch(step) for step in range(3, 6)])
    assert sorted(epoch0[:, 0].tolist()) == list(range(0, 24, 2))  # each block exactly once per epoch
    assert sorted(epoch1[:, 0].tolist()) == list(range(0, 24, 2))
    assert not torch.equal(epoch0, epoch1)  # a fresh permutation each epoch
    assert loader.epoch(2) == 0 and loader.epoch(3) == 1


def test_block_loader_resume_equivalence():
    blocks = torch.randn(10, 5, generator=torch.Generator().manual_seed(0))
    continuous = BlockLoader(blocks, batch_size=3, seed=7)
    seen = [continuous.batch(step) for step in range(12)]  # batches straddle epoch boundaries
    resumed = BlockLoader(blocks, batch_size=3, seed=7)
    for step in (9, 4, 11, 0):  # any order, without drawing earlier steps
        assert torch.equal(resumed.batch(step), seen[step])
    assert seen[3].shape == (3, 5)
    assert not torch.equal(BlockLoader(blocks, 3, seed=8).batch(0), seen[0])


def test_block_loader_batch_larger_than_dataset():
    blocks = torch.arange(3).view(3, 1)
    batch = BlockLoader(blocks, batch_size=7, seed=1).batch(0)
    assert batch.shape == (7, 1)
    assert sorted(batch[:3, 0].tolist()) == [0, 1, 2]
    assert sorted(batch[3:6, 0].tolist()) == [0, 1, 2]


def test_block_loader_rejects_bad_input():
    with pytest.raises(EffconvError):
        BlockLoader(torch.zeros(0, 4, dtype=torch.long), 2, 0)
    with pytest.raises(EffconvError):
        BlockLoader(torch.zeros(4, 4, dtype=torch.long), 0, 0)


# ------------------------------------------------------------------------------------------
# Teacher generation
# ------------------------------------------------------------------------------------------


def make_tiny_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    return make_tiny_model(tokenizer)


PROMPTS = ["Explain why the sky is blue.", "Write a haiku.", "What is 2 + 3?", "Tell a story.", "List three fruits."]


def generation_kwargs(tmp_path: Path, **overrides):
    kwargs = dict(
        num_tokens=120, cache_dir=tmp_path, max_new_tokens=12, batch_size=4, seed=0, prompts=PROMPTS, progress=False
    )
    kwargs.update(overrides)
    return kwargs


def test_default_prompts_file():
    prompts = load_default_prompts()
    assert 150 <= len(prompts) <= 300
    assert len(set(prompts)) == len(prompts)
    assert not any(prompt.startswith("#") for prompt in prompts)


def test_teacher_generation_token_count_and_format(tiny_model, tokenizer, tmp_path):
    kwargs = generation_kwargs(tmp_path)
    samples = generate_teacher_samples(tiny_model, tokenizer, **kwargs)
    total = sum(sample.generated_tokens for sample in samples)
    assert kwargs["num_tokens"] <= total < kwargs["num_tokens"] + kwargs["batch_size"] * kwargs["max_new_tokens"]
    assert all(1 <= sample.generated_tokens <= kwargs["max_new_tokens"] for sample in samples)
    # Chat-formatted prompt kept in the text, followed by the response.
    for sample in samples:
        assert sample.text.startswith(sample.prompt)
        assert sample.prompt.startswith("<s>user\n") and sample.prompt.endswith("</s>\n<s>assistant\n")
        assert len(sample.text) > len(sample.prompt)
    used = {sample.prompt.split("\n")[1].removesuffix("</s>") for sample in samples}
    assert used == set(PROMPTS)  # cycles through all prompts

    texts = generate_teacher_texts(tiny_model, tokenizer, **kwargs)
    assert texts == [sample.text for sample in samples]


def test_teacher_generation_raw_prompts_without_chat_template(tiny_model, tmp_path):
    plain_tokenizer = make_tiny_tokenizer()
    plain_tokenizer.chat_template = None
    texts = generate_teacher_texts(tiny_model, plain_tokenizer, **generation_kwargs(tmp_path, num_tokens=20))
    assert texts
    assert all(any(text.startswith("<s>" + prompt) for prompt in PROMPTS) for text in texts)


def test_teacher_generation_is_cached(tiny_model, tokenizer, tmp_path, monkeypatch):
    kwargs = generation_kwargs(tmp_path)
    first = generate_teacher_texts(tiny_model, tokenizer, **kwargs)
    cache_files = list(tmp_path.glob("teacher_text-*.jsonl"))
    assert len(cache_files) == 1
    assert not list(tmp_path.glob("*.tmp"))

    def must_not_generate(*args, **kwargs):
        raise AssertionError("generate called despite a cache hit")

    monkeypatch.setattr(tiny_model, "generate", must_not_generate)
    assert generate_teacher_texts(tiny_model, tokenizer, **kwargs) == first
    # A different generation parameter is a different cache entry (and so needs generate).
    with pytest.raises(AssertionError, match="generate called"):
        generate_teacher_texts(tiny_model, tokenizer, **generation_kwargs(tmp_path, temperature=0.5))


def test_teacher_cache_key_tracks_weights(tiny_model, tokenizer):
    params = {"num_tokens": 1}
    key = teacher_text._teacher_cache_key(tiny_model, tokenizer, params, PROMPTS)
    assert key == teacher_text._teacher_cache_key(tiny_model, tokenizer, params, PROMPTS)
    assert key != teacher_text._teacher_cache_key(tiny_model, tokenizer, params, PROMPTS[:-1])
    other_model = make_tiny_model(tokenizer)
    with torch.no_grad():
        other_model.get_input_embeddings().weight[0, 0] += 1.0
    assert key != teacher_text._teacher_cache_key(other_model, tokenizer, params, PROMPTS)


def test_teacher_generation_is_deterministic(tiny_model, tokenizer, tmp_path):
    rng_state = torch.get_rng_state()
    first = generate_teacher_texts(tiny_model, tokenizer, **generation_kwargs(tmp_path / "a"))
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's RNG is left alone
    torch.manual_seed(1234)  # global RNG state must not matter
    second = generate_teacher_texts(tiny_model, tokenizer, **generation_kwargs(tmp_path / "b"))
    assert first == second
    other_seed = generate_teacher_texts(tiny_model, tokenizer, **generation_kwargs(tmp_path / "c", seed=1))
    assert other_seed != first


def test_teacher_generation_restores_tokenizer_and_model(tiny_model, tmp_path):
    tokenizer = make_tiny_tokenizer()
    tokenizer.padding_side = "right"
    tiny_model.train()
    try:
        generate_teacher_texts(tiny_model, tokenizer, **generation_kwargs(tmp_path, num_tokens=10, progress=True))
        assert tokenizer.padding_side == "right"
        assert tiny_model.training
    finally:
        tiny_model.eval()


# ------------------------------------------------------------------------------------------
# prepare_data
# ------------------------------------------------------------------------------------------


def test_prepare_data_from_file_never_builds_teacher(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": f"document number {i} about foxes and dogs"} for i in range(40)])

    def no_teacher():
        raise AssertionError("teacher_factory must not be called when a data spec is given")

    train, val, description = prepare_data(
        str(path), tokenizer, 16, teacher_factory=no_teacher, num_tokens=0, cache_dir=tmp_path, val_fraction=0.1
    )
    assert train.shape[1] == val.shape[1] == 16
    assert val.shape[0] == max(1, round((train.shape[0] + val.shape[0]) * 0.1))
    assert "40 documents" in description and "blocks of 16" in description


def test_prepare_data_generates_with_teacher(tiny_model, tokenizer, tmp_path):
    calls = []

    def teacher_factory():
        calls.append(1)
        return tiny_model, tokenizer

    train, val, description = prepare_data(
        None,
        tokenizer,
        8,
        teacher_factory=teacher_factory,
        num_tokens=80,
        cache_dir=tmp_path,
        max_new_tokens=10,
        generation_batch_size=4,
        progress=False,
    )
    assert calls == [1]
    assert train.shape[0] >= 1 and val.shape[0] >= 1
    assert "teacher-generated" in description
    assert list(tmp_path.glob("teacher_text-*.jsonl"))


def test_teacher_generation_with_static_cache(tiny_model, tokenizer, tmp_path, monkeypatch):
    """EFFCONV_GENERATION_CACHE=static: same token accounting and format, a cache entry of its own."""
    dynamic = generate_teacher_samples(tiny_model, tokenizer, **generation_kwargs(tmp_path))
    monkeypatch.setenv("EFFCONV_GENERATION_CACHE", "static")
    calls = []
    original = tiny_model.generate
    monkeypatch.setattr(tiny_model, "generate", lambda **kw: calls.append(kw) or original(**kw))
    kwargs = generation_kwargs(tmp_path)
    static = generate_teacher_samples(tiny_model, tokenizer, **kwargs)
    assert calls and all(kw["cache_implementation"] == "static" and kw["disable_compile"] for kw in calls)
    assert len(list(tmp_path.glob("teacher_text-*.jsonl"))) == 2
    total = sum(sample.generated_tokens for sample in static)
    assert kwargs["num_tokens"] <= total < kwargs["num_tokens"] + kwargs["batch_size"] * kwargs["max_new_tokens"]
    assert all(sample.text.startswith(sample.prompt) for sample in static)
    assert {s.prompt for s in static} == {s.prompt for s in dynamic}
    monkeypatch.setenv("EFFCONV_GENERATION_CACHE", "paged")
    with pytest.raises(EffconvError, match="EFFCONV_GENERATION_CACHE"):
        generate_teacher_samples(tiny_model, tokenizer, **generation_kwargs(tmp_path / "x"))


# ------------------------------------------------------------------------------------------
# Continuous batching (generation_mode="continuous")
# ------------------------------------------------------------------------------------------


def record_token_ids(monkeypatch) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) of every sample built from now on, in order."""
    recorded: list[tuple[list[int], list[int]]] = []
    original = teacher_text._teacher_sample

    def spy(tokenizer, prompt_ids, response_ids):
        recorded.append((list(prompt_ids), list(response_ids)))
        return original(tokenizer, prompt_ids, response_ids)

    monkeypatch.setattr(teacher_text, "_teacher_sample", spy)
    return recorded


def test_continuous_greedy_matches_static(tiny_model, tokenizer, tmp_path, monkeypatch):
    """Greedy decoding writes the same responses in both modes; a stop token ends a response where static ends it."""
    ids = record_token_ids(monkeypatch)
    kwargs = generation_kwargs(tmp_path, do_sample=False)
    static = generate_teacher_samples(tiny_model, tokenizer, **kwargs)
    static_ids, ids[:] = list(ids), []
    continuous = generate_teacher_samples(tiny_model, tokenizer, generation_mode="continuous", **kwargs)
    assert len(list(tmp_path.glob("teacher_text-*.jsonl"))) == 2  # the mode is part of the cache key
    assert continuous == static and ids == static_ids  # same prompts in the same order, same tokens
    assert len({tuple(response) for _, response in ids}) > 1  # not a degenerate model writing one thing

    # A token the model writes mid-response becomes a stop token: responses end right after its first occurrence.
    stop = next(response[3] for _, response in static_ids if len(response) > 4 and response[3] != tokenizer.eos_token_id)
    stopping = copy.deepcopy(tiny_model)
    stopping.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    results = {}
    for mode in ("static", "continuous"):
        ids[:] = []
        generate_teacher_samples(stopping, tokenizer, generation_mode=mode, **generation_kwargs(tmp_path / mode, do_sample=False))
        results[mode] = list(ids)
    assert results["continuous"] == results["static"]
    cut = [response for _, response in results["continuous"] if stop in response]
    assert cut and all(response.index(stop) == len(response) - 1 for response in cut)
    assert all(len(response) <= 12 for _, response in results["continuous"])


def test_continuous_generation_token_count_format_and_determinism(tiny_model, tokenizer, tmp_path, monkeypatch):
    concurrency = []
    original = tiny_model.init_continuous_batching

    def spy(**kw):
        concurrency.append(kw["continuous_batching_config"].max_requests_per_batch)
        return original(**kw)

    monkeypatch.setattr(tiny_model, "init_continuous_batching", spy)
    kwargs = generation_kwargs(tmp_path / "a", generation_mode="continuous")
    rng_state = torch.get_rng_state()
    samples = generate_teacher_samples(tiny_model, tokenizer, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's RNG is left alone
    assert concurrency and set(concurrency) == {kwargs["batch_size"]}  # batch_size = sequences at once
    total = sum(sample.generated_tokens for sample in samples)
    wave = teacher_text.CONTINUOUS_WAVE_BATCHES * kwargs["batch_size"]
    assert kwargs["num_tokens"] <= total < kwargs["num_tokens"] + wave * kwargs["max_new_tokens"]
    assert all(1 <= sample.generated_tokens <= kwargs["max_new_tokens"] for sample in samples)
    for sample in samples:
        assert sample.text.startswith(sample.prompt) and len(sample.text) > len(sample.prompt)
        assert sample.prompt.startswith("<s>user\n") and sample.prompt.endswith("</s>\n<s>assistant\n")
    assert {sample.prompt.split("\n")[1].removesuffix("</s>") for sample in samples} == set(PROMPTS)

    torch.manual_seed(1234)  # global RNG state must not matter
    assert generate_teacher_samples(tiny_model, tokenizer, **{**kwargs, "cache_dir": tmp_path / "b"}) == samples
    assert generate_teacher_samples(tiny_model, tokenizer, **{**kwargs, "cache_dir": tmp_path / "c", "seed": 1}) != samples
    # A budget below max_new_tokens queues one request at a time, so it overshoots by less than one response.
    few = generate_teacher_samples(tiny_model, tokenizer, **{**kwargs, "cache_dir": tmp_path / "d", "num_tokens": 5})
    assert 5 <= sum(sample.generated_tokens for sample in few) < 5 + kwargs["max_new_tokens"]


def test_static_cache_key_is_unchanged_and_modes_are_checked(tiny_model, tokenizer, tmp_path):
    kwargs = generation_kwargs(tmp_path, num_tokens=10)
    generate_teacher_samples(tiny_model, tokenizer, **kwargs)
    # The static key is the one written before generation modes existed (existing caches stay valid).
    old_params = {name: kwargs[name] for name in ("num_tokens", "max_new_tokens", "batch_size", "seed")}
    old_params.update(temperature=0.8, top_p=0.95, top_k=50)
    old_key = teacher_text._teacher_cache_key(tiny_model, tokenizer, old_params, PROMPTS)
    assert [path.name for path in tmp_path.glob("teacher_text-*.jsonl")] == [f"teacher_text-{old_key}.jsonl"]
    with pytest.raises(EffconvError, match="--generation-mode must be one of auto, static, continuous, graph, got 'paged'"):
        generate_teacher_samples(tiny_model, tokenizer, generation_mode="paged", **kwargs)
    with pytest.raises(EffconvError, match="continuous batching"):
        teacher_text._continuous_batching_support(types.SimpleNamespace())


def test_documents_packing_never_crosses_a_document(tokenizer):
    """--packing documents: every block is a piece of one document (BOS at a document start only where a block
    begins a document), short documents and tails are left out; stream packing spans documents."""
    from effconv.data.packing import pack_texts

    long_doc = " ".join(f"alpha{i}" for i in range(120))
    short_doc = "tiny text"
    blocks = pack_texts([long_doc, short_doc, long_doc], tokenizer, 16, packing="documents")
    per_doc = len(tokenizer(long_doc, add_special_tokens=False)["input_ids"]) + 2  # + BOS, EOS
    assert blocks.shape == (2 * (per_doc // 16), 16)
    bos = tokenizer.bos_token_id
    starts = [int(row[0]) == bos for row in blocks]
    assert starts == [True] + [False] * (per_doc // 16 - 1) + [True] + [False] * (per_doc // 16 - 1)
    assert all(bos not in row[1:].tolist() for row in blocks)  # no block runs into a second document
    stream = pack_texts([long_doc, short_doc, long_doc], tokenizer, 16, packing="stream")
    assert any(bos in row[1:].tolist() for row in stream)
    with pytest.raises(EffconvError, match="no document has 4096 tokens"):
        pack_texts([short_doc], tokenizer, 4096, packing="documents")


def test_teacher_conversations_are_long_and_cached(tiny_model, tokenizer, tmp_path, monkeypatch):
    """--generation-turns N: each sample is an N-turn conversation written turn by turn with the conversation so
    far as the prompt (its text holds every turn, its count every response), deterministic and cached."""
    kwargs = generation_kwargs(tmp_path, num_tokens=60, max_new_tokens=6, batch_size=2, seed=3,
                               generation_mode="static")
    seen_prompts = []
    real = teacher_text._generate_batch
    monkeypatch.setattr(teacher_text, "_generate_batch",
                        lambda model, ids, *a: seen_prompts.append([len(x) for x in ids]) or real(model, ids, *a))
    samples = teacher_text.generate_teacher_samples(tiny_model, tokenizer, turns=3, **kwargs)
    assert sum(s.generated_tokens for s in samples) >= 60
    # turn by turn, each prompt holds the conversation so far: every row's prompt grows from turn to turn
    first_group = seen_prompts[:3]
    assert all(a < b for row in zip(*first_group) for a, b in zip(row, row[1:]))
    assert all(s.generated_tokens > 6 for s in samples)  # three responses each, more than one turn's worth
    monkeypatch.setattr(teacher_text, "_generate_batch", real)
    again = teacher_text.generate_teacher_samples(tiny_model, tokenizer, turns=3, **kwargs)  # from the cache
    assert [s.text for s in again] == [s.text for s in samples]
    single = teacher_text.generate_teacher_samples(tiny_model, tokenizer, turns=1, **kwargs)
    assert max(len(s.text) for s in single) < max(len(s.text) for s in samples)
