"""Length evaluation on tiny models: multi-context perplexity equals a direct cross-entropy over the same windows,
the chunked NLL equals the full logits, windows stay inside documents, contexts beyond a model's positions are
skipped, loss-by-position buckets add up, the passkey generator is deterministic and puts the needle where asked,
an oracle retrieves every key while a constant model retrieves none, and the report renders."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import load_bench_script, tiny_teacher
from helpers_tokenizer import make_tiny_tokenizer

from effconv.eval import length as le
from effconv.errors import EffconvError
from effconv.pipelines.linearize import LinearizeConfig
from effconv.conversion.student import make_student

VOCAB = 400


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher("llama")  # max_position_embeddings 512


def _student(teacher, layers=None):
    student = make_student(teacher, LinearizeConfig(window=4, layers=layers), torch.device("cpu"))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return student.eval()


@pytest.fixture(scope="module")
def student(teacher):
    """Every layer linear (hybrid window 4): no positional limit."""
    return _student(teacher)


@pytest.fixture(scope="module")
def documents() -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(4, VOCAB, (n,), generator=generator).tolist() for n in (20, 70, 150, 300, 33)]


def _direct(model, documents, context: int, max_windows: int | None = None) -> dict:
    """Cross-entropy over the windows of C + 1 tokens, written out independently of the module."""
    nll, half_nll, tokens, windows, docs = 0.0, 0.0, 0, 0, 0
    for doc in documents:
        count = len(doc) // (context + 1)
        if max_windows is not None:
            count = min(count, max_windows)
        docs += count > 0
        for k in range(count):
            window = torch.tensor(doc[k * (context + 1) : (k + 1) * (context + 1)])
            with torch.no_grad():
                logits = model(input_ids=window[None, :-1]).logits[0].float()
            losses = F.cross_entropy(logits, window[1:], reduction="none").double()
            nll += float(losses.sum())
            half_nll += float(losses[context // 2 :].sum())
            tokens += context
            windows += 1
    return {"nll": nll / tokens, "last_half_nll": half_nll / (windows * (context - context // 2)), "tokens": tokens,
            "windows": windows, "documents": docs}


# ---------------------------------------------------------------------------------------------------------------
# Perplexity by context
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_windows", [None, 2])
def test_multi_context_nll_equals_direct_cross_entropy(teacher, student, documents, max_windows):
    for model in (teacher, student):
        rows = le.perplexity_by_context(model, documents, [64, 16, 33], max_windows_per_document=max_windows,
                                        bootstrap_samples=50)
        assert [r["context"] for r in rows] == [16, 33, 64]
        for row in rows:
            want = _direct(model, documents, row["context"], max_windows)
            assert row["status"] == "ok"
            assert (row["tokens"], row["windows"], row["documents"]) == (want["tokens"], want["windows"],
                                                                          want["documents"])
            assert row["nll"] == pytest.approx(want["nll"], rel=1e-5)
            assert row["ppl"] == pytest.approx(math.exp(want["nll"]), rel=1e-5)
            assert row["last_half"]["nll"] == pytest.approx(want["last_half_nll"], rel=1e-5)
            lo, hi = row["ppl_ci95"]
            assert lo < row["ppl"] < hi
            assert sum(row["per_document"]["tokens"]) == row["tokens"]


def test_common_documents_scores_the_same_documents_at_every_context(teacher, documents):
    rows = le.perplexity_by_context(teacher, documents, [16, 64], common_documents=True, bootstrap_samples=0)
    assert [r["per_document"]["index"] for r in rows] == [[1, 2, 3], [1, 2, 3]]  # the documents of >= 65 tokens
    assert rows[0]["nll_se"] is None and rows[0]["ppl_ci95"] is None  # bootstrap off


def test_chunked_nll_equals_full_logits(teacher, student):
    window = torch.randint(4, VOCAB, (2, 41), generator=torch.Generator().manual_seed(3))
    for model in (teacher, student):
        assert le.nll_method(model) == "chunked"
        chunked = le.token_nll(model, window, method="chunked", chunk_size=7)
        full = le.token_nll(model, window, method="full_logits", chunk_size=5)
        with torch.no_grad():
            logits = model(input_ids=window[:, :-1]).logits
        direct = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten(), reduction="none").view(2, 40)
        torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(chunked, direct, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(le.token_nll(model, window[1]), direct[1], rtol=1e-5, atol=1e-5)


class _ScaledLogits(torch.nn.Module):
    """A model whose logits are 2 x lm_head(hidden): the hidden-state path would be wrong for it."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    @property
    def base_model(self):
        return self.inner.model

    def get_output_embeddings(self):
        return self.inner.lm_head

    def forward(self, input_ids, use_cache=False, **kwargs):
        return SimpleNamespace(logits=2 * self.inner(input_ids=input_ids, use_cache=False).logits)


def test_models_whose_logits_are_not_the_head_of_the_hidden_state_use_full_logits():
    assert le.nll_method(_ScaledLogits(tiny_teacher("llama"))) == "full_logits"  # found by the probe
    capped = tiny_teacher("llama")
    capped.config.final_logit_softcapping = 30.0
    assert le.nll_method(capped) == "full_logits"  # known from the config


class _Recorder(torch.nn.Module):
    """Uniform logits; remembers every input row."""

    def __init__(self, vocab: int = 1000, max_positions: int = 4096):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab, max_position_embeddings=max_positions, model_type="stub")
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.inputs: list[list[int]] = []

    def forward(self, input_ids, use_cache=False, **kwargs):
        self.inputs += input_ids.tolist()
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.config.vocab_size))


def test_windows_never_cross_documents():
    for n in (0, 5, 16, 17, 34, 100):
        for context, cap in ((16, None), (16, 2), (4, 3)):
            spans = le.context_windows(n, context, cap)
            assert all(e - b == context + 1 and 0 <= b < e <= n for b, e in spans)
            assert all(e0 <= b1 for (_, e0), (b1, _) in zip(spans, spans[1:]))  # non-overlapping, in order
            assert len(spans) == min(n // (context + 1), cap or n)
    # each document draws its ids from its own range, so a window crossing a boundary would mix ranges
    lengths = [40, 7, 100, 18, 64]
    docs = [list(range(100 * d, 100 * d + n)) for d, n in enumerate(lengths)]
    model = _Recorder()
    rows = le.perplexity_by_context(model, docs, [8, 17], bootstrap_samples=0)
    assert len(model.inputs) == sum(r["windows"] for r in rows)
    for row_ids in model.inputs:
        doc = row_ids[0] // 100
        assert row_ids[-1] // 100 == doc
        assert (row_ids[0] - 100 * doc) % (len(row_ids) + 1) == 0  # window starts are multiples of C + 1
    assert rows[0]["nll"] == pytest.approx(math.log(1000))  # uniform logits: NLL = log(vocab)


def test_contexts_beyond_max_positions_are_skipped_with_a_reason(teacher, student, tokenizer):
    docs = [list(range(4, 300)) * 4]  # 1184 tokens
    rows = le.perplexity_by_context(teacher, docs, [256, 1024], bootstrap_samples=0)
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"] == "skipped" and "512" in rows[1]["reason"]
    assert le.perplexity_by_context(teacher, docs, [1024], allow_beyond_positions=True)[0]["status"] == "ok"
    # effconv: pure linear runs past its positions; a hybrid keeping a softmax layer does not, unless allowed
    assert le.position_limit(student).tokens is None
    assert le.perplexity_by_context(student, docs, [1024], bootstrap_samples=0)[0]["status"] == "ok"
    hybrid = _student(teacher, layers=[0, 1])
    assert le.position_limit(hybrid).tokens == 512 and "softmax" in le.position_limit(hybrid).reason
    assert le.perplexity_by_context(hybrid, docs, [1024])[0]["status"] == "skipped"
    assert le.position_limit(hybrid, True).tokens is None
    assert le.position_limit(student, False).tokens == 512
    curve = le.loss_by_position(teacher, docs, 1024)
    assert curve["status"] == "skipped" and "512" in curve["reason"]
    passkey = le.passkey_retrieval(teacher, tokenizer, contexts=[1024], depths=[0.5], trials=1)
    assert passkey["per_context"][0]["status"] == "skipped" and passkey["trials"] == []
    # per-model override in the comparison
    result = le.evaluate_length({"teacher": teacher, "student": student}, {"teacher": tokenizer, "student": tokenizer},
                                ["x " * 10], le.LengthEvalConfig(contexts=[1024], passkey_contexts=[],
                                                                  allow_beyond_positions={"student": False}))
    assert result["models"]["student"]["position_limit"] == 512


def test_too_short_documents_are_reported(teacher, documents):
    row = le.perplexity_by_context(teacher, documents, [400])[0]
    assert row["status"] == "skipped" and "401" in row["reason"] and "longest: 300" in row["reason"]


# ---------------------------------------------------------------------------------------------------------------
# Loss by position
# ---------------------------------------------------------------------------------------------------------------


def test_position_buckets_partition_the_positions():
    for length in (1, 2, 3, 100, 1024, 8192):
        for per_octave in (1, 4):
            buckets = le.position_buckets(length, per_octave)
            assert buckets[0][0] == 0 and buckets[-1][1] == length
            assert all(e0 == s1 for (_, e0), (s1, _) in zip(buckets, buckets[1:]))
    labels = [le._bucket_label(s, e) for s, e in le.position_buckets(8192)]
    assert labels[:4] == ["0", "1", "2-4", "4-8"] and labels[-1] == "4K-8K"


def test_loss_by_position_buckets_add_up(teacher, documents):
    length = 64
    curve = le.loss_by_position(teacher, documents, length)
    long_docs = [d for d in documents if len(d) >= length + 1]
    assert curve["status"] == "ok" and curve["documents"] == len(long_docs)
    for key in ("buckets", "curve"):
        assert sum(b["tokens"] for b in curve[key]) == len(long_docs) * length
        weighted = sum(b["nll"] * b["tokens"] for b in curve[key]) / sum(b["tokens"] for b in curve[key])
        assert weighted == pytest.approx(curve["nll"], rel=1e-6)
    per_position = torch.stack([le.token_nll(teacher, torch.tensor(d[: length + 1])) for d in long_docs]).mean(0)
    last = curve["buckets"][-1]
    assert (last["start"], last["end"]) == (32, 64)
    assert last["nll"] == pytest.approx(float(per_position[32:].mean()), rel=1e-5)
    assert curve["buckets"][0]["nll"] == pytest.approx(float(per_position[0]), rel=1e-5)
    # the first windows of the perplexity pass at context L are the same windows: the shared pass agrees
    result = le.evaluate_length({"teacher": teacher}, make_tiny_tokenizer(), None,
                                le.LengthEvalConfig(contexts=[], passkey_contexts=[]))
    assert "position_curve" not in result["models"]["teacher"]
    rows, positions = le._perplexity_pass(
        teacher, documents, [16, length], max_windows_per_document=None, common_documents=False,
        limit=le.position_limit(teacher), bootstrap_samples=0, seed=0, chunk_size=1024, tokens_per_batch=8192,
        record_positions_for=length, progress=None, label="")
    shared = le._position_result(positions, length, None)
    assert [b["nll"] for b in shared["buckets"]] == pytest.approx([b["nll"] for b in curve["buckets"]], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Passkey
# ---------------------------------------------------------------------------------------------------------------


def test_passkey_prompt_is_deterministic_and_has_the_requested_length_and_depth(tokenizer):
    target = 1000
    unit = max(len(tokenizer(" " + s, add_special_tokens=False)["input_ids"]) for s in le.SENTENCE_FILLER)
    for filler in ("classic", "sentences"):
        first = le.make_passkey_prompt(tokenizer, target_tokens=target, depth=0.5, seed=7, filler=filler)
        again = le.make_passkey_prompt(tokenizer, target_tokens=target, depth=0.5, seed=7, filler=filler)
        other = le.make_passkey_prompt(tokenizer, target_tokens=target, depth=0.5, seed=8, filler=filler)
        assert (first.input_ids, first.passkey) == (again.input_ids, again.passkey)
        assert first.passkey != other.passkey and first.input_ids != other.input_ids
        for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
            p = le.make_passkey_prompt(tokenizer, target_tokens=target, depth=depth, seed=1, filler=filler)
            assert target - unit <= len(p.input_ids) <= target
            assert p.input_ids[0] == tokenizer.bos_token_id
            assert p.input_ids == [tokenizer.bos_token_id] + tokenizer(p.text, add_special_tokens=False)["input_ids"]
            start, end = p.haystack_tokens
            # the needle is where its tokens say, and at the requested depth within one filler sentence
            needle_text = tokenizer.decode(p.input_ids[p.needle_token_offset : p.needle_token_offset + p.needle_tokens])
            assert needle_text.strip() == le.PASSKEY_NEEDLE.format(key=p.passkey)
            assert abs(p.token_depth - depth) <= unit / (end - start) + 0.01
            assert p.text.endswith(le.PASSKEY_QUESTION) and len(p.passkey) == 5
    with pytest.raises(EffconvError, match="at least"):
        le.make_passkey_prompt(tokenizer, target_tokens=20, depth=0.5)


def _longest_earlier_match(history: list[int]) -> int | None:
    """Induction: the token that followed the longest earlier occurrence of the history's suffix."""
    best, best_len = None, 0
    n = len(history)
    for j in range(n - 2, -1, -1):  # history[j] would align with history[-1]; history[j + 1] is the prediction
        k = 0
        while k <= j and history[j - k] == history[n - 1 - k]:
            k += 1
        if k > best_len:
            best, best_len = history[j + 1], k
    return best


class _Stub(torch.nn.Module):
    """A causal LM with its own list-of-ids cache. oracle: the logit of the induction prediction is +30 (copies the
    pass key from the needle); else all logits are 0."""

    def __init__(self, oracle: bool, vocab: int = VOCAB):
        super().__init__()
        self.oracle = oracle
        self.config = SimpleNamespace(vocab_size=vocab, max_position_embeddings=4096, model_type="stub")
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, cache=None, use_cache=False, logits_to_keep=0, **kwargs):
        history = list(cache or []) + input_ids[0].tolist()
        t = input_ids.shape[1]
        keep = range(t - logits_to_keep if logits_to_keep else 0, t)
        logits = torch.zeros(1, len(keep), self.config.vocab_size)
        if self.oracle:
            for row, i in enumerate(keep):
                token = _longest_earlier_match(history[: len(history) - t + i + 1])
                if token is not None:
                    logits[0, row, token] = 30.0
        return SimpleNamespace(logits=logits, cache=history if use_cache else None)


def test_oracle_retrieves_every_key_and_a_constant_model_none(tokenizer):
    kwargs = dict(contexts=[256, 400], depths=[0.0, 0.5, 1.0], trials=2, distractors=4)
    oracle = le.passkey_retrieval(_Stub(oracle=True), tokenizer, **kwargs)
    assert [r["generation_accuracy"] for r in oracle["per_context"]] == [1.0, 1.0]
    assert [r["rank_accuracy"] for r in oracle["per_context"]] == [1.0, 1.0]
    assert all(c["trials"] == 2 and c["mean_rank"] == 1.0 for c in oracle["cells"])
    assert len(oracle["trials"]) == 2 * 3 * 2
    assert all(t["prompt_tokens"] <= t["context"] - 8 for t in oracle["trials"])
    constant = le.passkey_retrieval(_Stub(oracle=False), tokenizer, **kwargs)
    assert [r["generation_accuracy"] for r in constant["per_context"]] == [0.0, 0.0]
    assert [r["rank_accuracy"] for r in constant["per_context"]] == [0.0, 0.0]  # ties count against the key
    assert all(t["rank"] == 5 for t in constant["trials"])
    # the same seeded prompts for every model
    assert [t["passkey"] for t in oracle["trials"]] == [t["passkey"] for t in constant["trials"]]


def test_passkey_on_real_models_uses_the_cache_consistently(teacher, student, tokenizer):
    """The rank score through a copied cache equals a full teacher-forced forward of prompt + answer."""
    for model in (teacher, student):
        prompt = le.make_passkey_prompt(tokenizer, target_tokens=200, depth=0.5, seed=2)
        answer = le._continuation_ids(tokenizer, prompt, " " + prompt.passkey, tokenizer.bos_token_id)
        last, cache = le._prefill(model, prompt.input_ids)
        via_cache = le._continuation_logprob(model, prompt.input_ids, last, cache, answer)
        full = torch.tensor([prompt.input_ids + answer])
        direct = -float(le.token_nll(model, full[0])[-len(answer):].sum())
        assert via_cache == pytest.approx(direct, rel=1e-4)
        outcome = le.passkey_trial(model, tokenizer, prompt)
        with torch.no_grad():
            reference = model.generate(input_ids=torch.tensor([prompt.input_ids]), do_sample=False, max_new_tokens=8,
                                       pad_token_id=0, eos_token_id=2)
        assert outcome["generated"] == tokenizer.decode(reference[0, len(prompt.input_ids):], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------------------
# Statistics, comparison, report
# ---------------------------------------------------------------------------------------------------------------


def test_bootstrap_standard_error():
    generator = torch.Generator().manual_seed(0)
    per_doc = (torch.randn(200, generator=generator) + 3.0).tolist()
    se = le.bootstrap_se(per_doc, [1] * 200, samples=2000, seed=0)
    assert se == pytest.approx(torch.tensor(per_doc).std().item() / math.sqrt(200), rel=0.1)
    assert le.bootstrap_se([1.0], [1]) is None
    shift = (torch.randn(200, generator=generator) * 0.05).tolist()  # b = a + small noise: pairing cancels a's spread
    paired = le.paired_bootstrap_se(per_doc, [1] * 200, [a + s for a, s in zip(per_doc, shift)], [1] * 200)
    assert paired < se / 5


def test_evaluate_length_report_markdown_and_plots(teacher, student, tokenizer, tmp_path):
    docs = [" ".join(["The quick brown fox jumps over the lazy dog."] * k) for k in (6, 20, 40)]
    config = le.LengthEvalConfig(contexts=[32, 64], passkey_contexts=[256], passkey_depths=[0.0, 1.0],
                                 passkey_trials=1, bootstrap_samples=100)
    result = le.evaluate_length({"teacher": teacher, "student": student}, tokenizer, docs, config)
    result = json.loads(json.dumps(result))  # JSON-serialisable as is
    assert result["reference"] == "teacher"
    ppl = {n: {r["context"]: r for r in result["models"][n]["perplexity"]} for n in ("teacher", "student")}
    for ratio in result["comparisons"]["student"]["perplexity"]:
        c = ratio["context"]
        assert ratio["paired"]
        assert ratio["ppl_ratio"] == pytest.approx(ppl["student"][c]["ppl"] / ppl["teacher"][c]["ppl"], rel=1e-9)
        lo, hi = ratio["ppl_ratio_ci95"]
        assert lo < ratio["ppl_ratio"] < hi
    curve = result["models"]["student"]["position_curve"]
    assert curve["length"] == 64 and curve["status"] == "ok"
    assert len(result["comparisons"]["student"]["position_curve"]) == len(curve["buckets"])
    markdown = le.render_length_markdown(result, ["length_perplexity.png"])
    for needle in ("| 32 |", "| 64 |", "student / teacher", "| 32-64 |", "| 256 |", "teacher generation",
                   "![length_perplexity.png](length_perplexity.png)"):
        assert needle in markdown
    assert markdown.count("\n| ") >= 2 + 2 + len(curve["buckets"]) + 1
    written = le.write_length_plots(result, tmp_path)
    assert written == list(le.PLOTS)
    for name in written:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one model, no documents: passkey only, still renders
    alone = le.evaluate_length({"student": student}, tokenizer, None,
                               le.LengthEvalConfig(passkey_contexts=[256], passkey_depths=[0.5], passkey_trials=1))
    assert le.write_length_plots(alone, tmp_path / "..") == ["length_passkey.png", "length_passkey_heatmap.png"]
    assert "| 256 |" in le.render_length_markdown(alone) and "no documents" in alone["notes"][0]


def test_config_validation():
    with pytest.raises(EffconvError, match="depths"):
        le.LengthEvalConfig(passkey_depths=[1.5]).validate()
    with pytest.raises(EffconvError, match="filler"):
        le.LengthEvalConfig(passkey_filler="lorem").validate()
    with pytest.raises(EffconvError, match="contexts"):
        le.LengthEvalConfig(contexts=[0]).validate()


@pytest.mark.parametrize("decay", [False, True])
def test_linear_share_of_the_normaliser(teacher, decay):
    """bench/linear_share.py: no linear share inside the first window, a share in (0, 1) past it, equal to the
    share written out from the layer's window and linear weights; the model's output is left unchanged."""
    bench = load_bench_script("linear_share")
    window = 4
    student = make_student(teacher, LinearizeConfig(window=window, decay=decay, gate=False, sinks=0),
                           torch.device("cpu")).eval()
    ids = torch.randint(4, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = student(input_ids=ids).logits
    result = bench.measure(student, [ids[0].tolist()], 40)
    with torch.no_grad():
        after = student(input_ids=ids).logits
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert set(result) == {str(a.layer_idx) for a in student.converted_attentions()}
    for row in result.values():
        shares = row["share"]
        assert all(shares[label] == 0 for label in ("0", "1", "2-4"))  # positions < window: no linear part
        assert all(0 < shares[label] < 1 for label in ("8-16", "16-32", "32-40"))
        assert (row["decay_memory"] is not None) == decay

    # the share written out for one layer: (1-a) * linear weights / ((1-a) * linear + a * window weights)
    attn = student.converted_attentions()[0]
    q, k = torch.randn(1, attn.num_heads, 12, attn.head_dim), torch.randn(1, attn.num_kv_heads, 12, attn.head_dim)
    with torch.no_grad():
        share = bench.linear_share(attn, q, k)[0]
        fq, fk = attn.feature_map_q(q), attn.feature_map_k(k)
        g = attn.num_heads // attn.num_kv_heads
        a = torch.sigmoid(attn.window_mix.float())
        log_decay = attn.log_decay()
        expected = torch.zeros(12)
        for i in range(12):
            per_head = []
            for h in range(attn.num_heads):
                kh = h // g
                s = torch.stack([q[0, h, i] @ k[0, kh, j] * attn.scale for j in range(max(0, i - window + 1), i + 1)])
                win = torch.exp(s - s.max()).sum()
                lin = sum((fq[0, h, i] @ fk[0, kh, j]) * (1.0 if log_decay is None else float(log_decay[kh].exp()) ** (i - j))
                          for j in range(0, i - window + 1))
                lin = torch.as_tensor(lin, dtype=torch.float32)
                per_head.append((1 - a[h]) * lin / ((1 - a[h]) * lin + a[h] * win))
            expected[i] = torch.stack(per_head).mean()
    torch.testing.assert_close(share, expected, rtol=1e-4, atol=1e-6)
