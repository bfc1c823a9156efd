"""effconv eval on tiny models: every reported number is checked against a direct computation (perplexity,
strided perplexity, cache bytes, decode throughput, generations), OOM cells are recorded, bad input is one
clear error, lm-eval is optional, and the installed lm-eval runs a local task offline with the numbers its own API
gives."""

from __future__ import annotations

import json
import math
import statistics
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from effconv.eval import run as ev
from effconv.eval import speed
from effconv.eval import tasks as eval_tasks
from effconv.errors import EffconvError
from effconv.eval.run import EvalConfig, evaluate
from effconv.eval.quality import window_spans
from effconv.io.export import export_model
from effconv.pipelines.linearize import LinearizeConfig
from effconv.conversion.student import make_student

QUIET = dict(progress=False, generations=False)
TEXT = (
    "Linear attention keeps a running sum of key and value products, so the cost of a new token does not grow "
    "with the length of the text. Softmax attention must look back at every earlier token instead."
)
LINEARIZE_META = dict(generate_tokens=300, generation_batch_size=8, seq_len=24, val_fraction=0.25, seed=0,
                      max_val_blocks=3)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a second busy process cannot stall an OpenMP barrier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def student_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A linearized tiny student (hybrid, window 4) exported with a tokenizer and linearize metadata."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    student = make_student(teacher, LinearizeConfig(window=4), torch.device("cpu"))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    out = tmp_path_factory.mktemp("student") / "model"
    meta = {"command": "linearize", "config": {"model": str(tiny_model_dir), "data": None, **LINEARIZE_META}}
    export_model(student.requires_grad_(False), AutoTokenizer.from_pretrained(tiny_model_dir), out, metadata=meta)
    return out


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _ids(tokenizer, text: str) -> list[int]:
    return [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]


def _hf_strided_nll(model, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """The strided-perplexity loop of the Hugging Face docs, with labels masked to -100 and summed losses."""
    ids_t = torch.tensor([ids])
    n = ids_t.shape[1]
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        trg_len = end - prev_end
        window = ids_t[:, begin:end]
        labels = window.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(input_ids=window, use_cache=False).logits
        shift_logits, shift_labels = logits[0, :-1], labels[0, 1:]
        total += F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum").item()
        count += int((shift_labels != -100).sum())
        prev_end = end
        if end == n:
            break
    return total, count


def test_window_spans_score_every_token_once_with_bounded_context():
    for n in (2, 3, 17, 64, 65, 200):
        for context, stride in ((4, 1), (8, 3), (16, 8), (16, 15), (300, 150)):
            scored = []
            for begin, first, end in window_spans(n, context, stride):
                assert end - begin <= context and begin < first < end
                scored += list(range(first, end))
            assert scored == list(range(1, n)), (n, context, stride)


def test_perplexity_of_short_text_is_exp_of_mean_next_token_loss(tiny_model_dir, tmp_path):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    report = evaluate(EvalConfig(model=str(tiny_model_dir), data=str(text_file), context=256, speed=False,
                                 out=str(tmp_path / "report"), **QUIET))
    model, tokenizer = _load(tiny_model_dir)
    ids = _ids(tokenizer, TEXT)
    assert len(ids) < 256  # one window: plain next-token loss over the whole text
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    loss = F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()
    got = report["perplexity"]["student"]
    assert got["tokens"] == len(ids) - 1
    assert got["loss"] == pytest.approx(loss, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(loss * (len(ids) - 1) / math.log(2) / len(TEXT.encode()), rel=1e-5)
    on_disk = json.loads((tmp_path / "report" / "report.json").read_text())
    assert on_disk["perplexity"]["student"]["perplexity"] == pytest.approx(got["perplexity"])
    assert f"| perplexity | {got['perplexity']:.3f} |" in (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".report.*")), "temporary directory left behind"


def test_strided_perplexity_matches_the_manual_loop(tiny_model_dir, student_dir, tmp_path):
    text = " ".join([TEXT] * 2)
    text_file = tmp_path / "long.txt"
    text_file.write_text(text)
    context, stride = 32, 12
    report = evaluate(EvalConfig(model=str(student_dir), teacher=str(tiny_model_dir), data=str(text_file),
                                 context=context, stride=stride, speed=False, **QUIET))
    for role, path in (("teacher", tiny_model_dir), ("student", student_dir)):
        model, tokenizer = _load(path)
        ids = _ids(tokenizer, text)
        assert len(ids) > 3 * context
        nll, count = _hf_strided_nll(model, ids, context, stride)
        got = report["perplexity"][role]
        assert got["tokens"] == count == len(ids) - 1, role
        assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5), role
    # a strided window really limits the context: the full-context loss differs
    full = evaluate(EvalConfig(model=str(student_dir), data=str(text_file), context=512, speed=False, **QUIET))
    assert full["perplexity"]["student"]["loss"] != pytest.approx(report["perplexity"]["student"]["loss"], rel=1e-4)


def test_speed_report_against_direct_computation(tiny_model_dir, student_dir, tmp_path):
    out = tmp_path / "report"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\nWrite a short story about a robot.\n\nThe quick brown fox\n")
    cfg = EvalConfig(model=str(student_dir), teacher=str(tiny_model_dir), contexts=[16, 32], batch_sizes=[1, 2],
                     decode_tokens=3, repeats=3, warmup=1, prompts=str(prompts), max_new_tokens=6, out=str(out),
                     progress=False)
    report = evaluate(cfg)
    for name in ("report.json", "report.md", "decode_tokens_per_s.png", "prefill_ms.png", "memory.png"):
        assert (out / name).is_file(), name
    assert (out / "memory.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "report.json").read_text())
    rows = {(r["model"], r["batch_size"], r["context"]): r for r in saved["speed"]["rows"]}
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows.values())
    for (_, b, c), r in rows.items():
        assert r["decode_tokens"] == b * 3
        assert len(r["decode_seconds_all"]) == 3 and r["decode_seconds"] == statistics.median(r["decode_seconds_all"])
        assert r["decode_tokens_per_s"] > 0
        assert r["decode_tokens_per_s"] == pytest.approx(r["decode_tokens"] / r["decode_seconds"], rel=1e-12)
        assert r["prefill_ms"] == statistics.median(r["prefill_ms_all"]) > 0
        assert r["cache_bytes_per_token"] == pytest.approx(r["cache_bytes"] / (b * c))
        assert isinstance(r["peak_memory_bytes"], int) and r["peak_memory_bytes"] >= 0

    teacher, _ = _load(tiny_model_dir)
    tc = teacher.config
    head_dim = tc.hidden_size // tc.num_attention_heads
    student, _ = _load(student_dir)
    for b in (1, 2):
        # teacher: keys + values of every layer, fp32, grows linearly with the context
        for c in (16, 32):
            expected = 2 * tc.num_hidden_layers * b * tc.num_key_value_heads * c * head_dim * 4
            assert rows[("teacher", b, c)]["cache_bytes"] == expected
        assert rows[("teacher", b, 32)]["cache_bytes"] == 2 * rows[("teacher", b, 16)]["cache_bytes"]
        # student: recurrent state + window, the same at both contexts, and what the model's cache reports
        assert rows[("student", b, 16)]["cache_bytes"] == rows[("student", b, 32)]["cache_bytes"]
        with torch.no_grad():
            cache = student(torch.randint(3, 400, (b, 32)), use_cache=True).past_key_values
        assert rows[("student", b, 32)]["cache_bytes"] == cache.nbytes() > 0

    md = (out / "report.md").read_text()
    assert "| teacher | 2 | 32 |" in md and "| student | 2 | 32 |" in md and saved["speed"]["memory_method"] in md
    # greedy generations, both models, equal to a direct greedy generate on the chat-formatted prompt
    assert [g["prompt"] for g in report["generations"]] == ["Write a short story about a robot.", "The quick brown fox"]
    _, tokenizer = _load(student_dir)
    for g in report["generations"]:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": g["prompt"]}], tokenize=False,
                                             add_generation_prompt=True)
        ids = torch.tensor([tokenizer(chat, add_special_tokens=False)["input_ids"]])
        assert ids[0, 0] == tokenizer.bos_token_id
        with torch.no_grad():
            gen = student.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert g["student"] == tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
        assert "teacher" in g


def test_oom_cell_is_recorded_and_the_rest_continues(tiny_model_dir, tmp_path, monkeypatch):
    real = speed.bench_cell

    def flaky(model, **kw):
        if kw["context"] == 32:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, **kw)

    monkeypatch.setattr(speed, "bench_cell", flaky)
    out = tmp_path / "r"
    report = evaluate(EvalConfig(model=str(tiny_model_dir), contexts=[16, 32, 48], batch_sizes=[1], decode_tokens=2,
                                 repeats=1, warmup=0, out=str(out), **QUIET))
    status = {r["context"]: r["status"] for r in report["speed"]["rows"]}
    assert status == {16: "ok", 32: "OOM", 48: "ok"}
    assert "| student | 1 | 32 | OOM |" in (out / "report.md").read_text()

    def broken(model, **kw):
        raise RuntimeError("shape mismatch")  # a bug, not memory: must not be hidden as OOM

    monkeypatch.setattr(speed, "bench_cell", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        evaluate(EvalConfig(model=str(tiny_model_dir), contexts=[16], batch_sizes=[1], **QUIET))


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(model="/nonexistent/model"), "model not found"),
        (dict(teacher="/nonexistent/teacher"), "model not found"),
        (dict(data="EMPTY"), "no text"),
        (dict(data="/nonexistent/text.txt"), "not found"),
        (dict(contexts=[64, 1024]), r"--contexts 1024 plus 4 decode tokens exceed the student's max_position_embeddings \(512\)"),
        (dict(data="TEXT", context=1024, speed=False), r"--context 1024 is longer than the student's max_position_embeddings \(512\)"),
        (dict(data="TEXT", context=16, stride=16), "must be smaller than --context"),
        (dict(batch_sizes=[0]), "--batch-sizes must be positive"),
        (dict(prompts="/nonexistent/prompts.txt", generations=True), "prompts file not found"),
        (dict(data="teacher", speed=False), "--data teacher needs --teacher"),
        (dict(dtype="float8"), "unknown --dtype"),
    ],
)
def test_bad_input_is_one_clear_error(tiny_model_dir, tmp_path, change, message):
    (tmp_path / "empty.txt").write_text("  \n\n")
    (tmp_path / "text.txt").write_text(TEXT)
    change = {k: ({"EMPTY": str(tmp_path / "empty.txt"), "TEXT": str(tmp_path / "text.txt")}.get(v, v)
                  if isinstance(v, str) else v) for k, v in change.items()}
    settings = dict(model=str(tiny_model_dir), contexts=[16], batch_sizes=[1], decode_tokens=4, repeats=1,
                    out=str(tmp_path / "out"), **QUIET)
    settings.update(change)
    with pytest.raises(EffconvError, match=message) as info:
        evaluate(EvalConfig(**settings))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_other_cpu_load_sees_a_busy_process():
    import subprocess

    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        import time

        time.sleep(0.3)  # let it start
        with speed.OtherCpuLoad() as load:
            time.sleep(1.0)
    finally:
        busy.kill()
        busy.wait()
    assert load.value is not None and 0.5 < load.value < 2.5  # one busy core (plus whatever else runs)


def test_existing_out_needs_overwrite(tiny_model_dir, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(EffconvError, match="already exists; pass --overwrite"):
        evaluate(EvalConfig(model=str(tiny_model_dir), out=str(tmp_path / "out"), speed=False, **QUIET))
    evaluate(EvalConfig(model=str(tiny_model_dir), out=str(tmp_path / "out"), speed=False, overwrite=True, **QUIET))
    assert (tmp_path / "out" / "report.json").is_file()


def test_tasks_without_lm_eval_say_how_to_install(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError, as when not installed
    monkeypatch.setattr(eval_tasks, "_network_available", lambda *a, **k: False)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    with pytest.raises(EffconvError, match=r"not installed: pip install lm-eval"):
        # checked before any model is loaded: the bad model path is never reached
        evaluate(EvalConfig(model="/nonexistent/model", tasks=["piqa"], **QUIET))
    assert eval_tasks.os.environ["HF_DATASETS_OFFLINE"] == "1" and eval_tasks.os.environ["HF_HUB_OFFLINE"] == "1"


def _fake_lm_eval(monkeypatch, simple_evaluate):
    calls = []
    lm_eval = types.ModuleType("lm_eval")
    tasks = types.ModuleType("lm_eval.tasks")
    tasks.TaskManager = lambda: types.SimpleNamespace(all_tasks=["piqa", "arc_easy"])
    lm_eval.tasks = tasks

    def record(**kw):
        calls.append(kw)
        return simple_evaluate(**kw)

    lm_eval.simple_evaluate = record
    models = types.ModuleType("lm_eval.models")
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = lambda pretrained, tokenizer, **kw: types.SimpleNamespace(model=pretrained, tok=tokenizer)
    modules = (("lm_eval", lm_eval), ("lm_eval.tasks", tasks), ("lm_eval.models", models),
               ("lm_eval.models.huggingface", hf))
    for name, module in modules:
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(eval_tasks, "_network_available", lambda *a, **k: True)
    return calls


def test_lm_eval_tasks_unknown_failing_and_reported(tiny_model_dir, student_dir, tmp_path, monkeypatch):
    _fake_lm_eval(monkeypatch, lambda **kw: None)
    with pytest.raises(EffconvError, match="unknown lm-eval task\\(s\\): no_such_task"):
        evaluate(EvalConfig(model=str(tiny_model_dir), tasks=["piqa", "no_such_task"], **QUIET))

    def offline(**kw):
        raise ConnectionError("Couldn't reach 'baber/piqa' on the Hub (LocalEntryNotFoundError)")

    _fake_lm_eval(monkeypatch, offline)
    with pytest.raises(EffconvError, match="lm-eval failed on piqa: Couldn't reach"):
        evaluate(EvalConfig(model=str(tiny_model_dir), tasks=["piqa"], speed=False, **QUIET))

    def fake_results(**kw):
        acc = 0.75 if type(kw["model"].model).__name__ == "EffconvForCausalLM" else 0.5
        return {"results": {"piqa": {"alias": "piqa", "acc,none": acc, "acc_stderr,none": 0.1}}}

    calls = _fake_lm_eval(monkeypatch, fake_results)
    report = evaluate(EvalConfig(model=str(student_dir), teacher=str(tiny_model_dir), tasks=["piqa"], task_limit=5,
                                 speed=False, out=str(tmp_path / "r"), **QUIET))
    assert report["tasks"] == {"teacher": {"piqa": {"acc,none": 0.5, "acc_stderr,none": 0.1}},
                               "student": {"piqa": {"acc,none": 0.75, "acc_stderr,none": 0.1}}}
    assert [c["limit"] for c in calls] == [5, 5] and calls[0]["tasks"] == ["piqa"]
    assert "| piqa acc,none | 0.5000 | 0.7500 |" in (tmp_path / "r" / "report.md").read_text()


def test_data_teacher_uses_the_students_held_out_split(tiny_model_dir, student_dir):
    from effconv import data as data_lib
    from effconv.io.sources import cache_root, load_causal_lm
    from effconv.eval.quality import next_token_loss

    report = evaluate(EvalConfig(model=str(student_dir), teacher=str(tiny_model_dir), data="teacher", context=64,
                                 speed=False, **QUIET))
    teacher, tokenizer, _ = load_causal_lm(str(tiny_model_dir))
    m = LINEARIZE_META
    _, val, _ = data_lib.prepare_data(None, tokenizer, m["seq_len"], teacher_factory=lambda: (teacher, tokenizer),
                                      num_tokens=m["generate_tokens"], cache_dir=cache_root() / "data",
                                      val_fraction=m["val_fraction"], seed=m["seed"],
                                      generation_batch_size=m["generation_batch_size"], progress=False)
    val = val[: m["max_val_blocks"]]
    student, _ = _load(student_dir)
    for role, model in (("teacher", teacher), ("student", student)):
        got = report["perplexity"][role]
        assert got["tokens"] == val.shape[0] * (m["seq_len"] - 1)
        assert got["loss"] == pytest.approx(next_token_loss(model, val), rel=1e-5), role
    assert "held-out teacher-generated text" in report["perplexity"]["data"]


def test_cli_register_adds_eval(tiny_model_dir, tmp_path):
    import typer
    from typer.testing import CliRunner

    from effconv.cli import register_commands

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    register_commands(app)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    runner = CliRunner()
    r = runner.invoke(app, ["eval", str(tiny_model_dir), "--data", str(text), "--contexts", "16,24", "--batch-sizes",
                            "1", "--decode-tokens", "2", "--repeats", "1", "--warmup", "0", "--no-generations",
                            "--no-progress", "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [row["context"] for row in saved["speed"]["rows"]] == [16, 24]
    assert saved["config"]["decode_tokens"] == 2 and saved["perplexity"]["student"]["tokens"] > 0
    r = runner.invoke(app, ["eval", str(tiny_model_dir), "--contexts", "16,abc"])
    assert isinstance(r.exception, EffconvError) and "comma-separated" in str(r.exception)


def test_length_evaluation_in_eval_report(tiny_model_dir, student_dir, tmp_path):
    """--contexts-ppl and --passkey-contexts add a length section (student beside teacher, ratios per context) to
    report.json, report.md and the plots; contexts past the teacher's positions are skipped for it, not errors."""
    docs = tmp_path / "long.jsonl"
    words = [f"word{i % 53} and thing{i % 17}." for i in range(700)]
    docs.write_text("\n".join(json.dumps({"text": " ".join(words[k:] + words[:k])}) for k in range(4)) + "\n")
    report = evaluate(EvalConfig(model=str(student_dir), teacher=str(tiny_model_dir), data=str(docs),
                                 contexts_ppl=[32, 128, 1024], passkey_contexts=[256], passkey_trials=1, speed=False,
                                 generations=False, progress=False, out=str(tmp_path / "r")))
    length = report["length"]
    teacher_rows = {r["context"]: r for r in length["models"]["teacher"]["perplexity"]}
    student_rows = {r["context"]: r for r in length["models"]["student"]["perplexity"]}
    assert teacher_rows[32]["status"] == student_rows[32]["status"] == "ok"
    assert teacher_rows[1024]["status"] == "skipped"  # beyond the tiny teacher's 512 positions
    # the loss-by-position curve runs to the largest context each model allows: 1024 for the student, 128 for the
    # teacher (the two curves average other documents, so no per-bucket difference is reported between them)
    assert length["models"]["student"]["position_curve"]["length"] == 1024
    teacher_curve = length["models"]["teacher"]["position_curve"]
    assert teacher_curve["status"] == "ok" and teacher_curve["length"] == 128
    assert length["comparisons"]["student"]["position_curve"] == []
    ratios = {r["context"]: r for r in length["comparisons"]["student"]["perplexity"]}
    assert ratios[32]["ppl_ratio"] == pytest.approx(student_rows[32]["ppl"] / teacher_rows[32]["ppl"])
    assert [c["context"] for c in length["models"]["student"]["passkey"]["per_context"]] == [256]
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert saved["length"]["comparisons"]["student"]["perplexity"][0]["context"] == 32
    assert "length_perplexity.png" in saved["files"] and (tmp_path / "r" / "length_perplexity.png").is_file()
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert all(f"### {section}" in markdown for section in ("Perplexity by context", "Loss by position",
                                                             "Passkey retrieval"))


TINY_TASK = """task: effconv_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
TINY_TASK_DOCS = [
    {"question": "The quick brown fox jumps over the", "choices": ["lazy dog.", "blue sky.", "red car."], "answer": 0},
    {"question": "Linear attention replaces softmax with a kernel", "choices": ["feature map.", "green apple.",
                                                                                "train station."], "answer": 0},
    {"question": "A train travels 60 miles per hour for", "choices": ["quiet rivers.", "2.5 hours.", "the old mill."],
     "answer": 1},
    {"question": "Write a short story about a robot who learns to", "choices": ["sleep.", "bake.", "paint."],
     "answer": 2},
]


def test_real_lm_eval_on_a_local_task(student_dir, tmp_path, monkeypatch):
    """`effconv eval --tasks NAME --task-path DIR` runs the installed lm-eval offline on a four-question
    multiple-choice task read from a local JSONL file, and reports what lm-eval's own API computes on the same
    model (loglikelihood accuracy, plain and length-normalised)."""
    lm_eval = pytest.importorskip("lm_eval")
    from typer.testing import CliRunner

    from effconv.cli import app
    from effconv.io.sources import load_causal_lm

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(eval_tasks, "_network_available", lambda *a, **k: False)
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    data = tasks_dir / "effconv_tiny_mc.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in TINY_TASK_DOCS))
    (tasks_dir / "effconv_tiny_mc.yaml").write_text(TINY_TASK.format(data=data, cache=tmp_path / "hf-datasets"))

    r = CliRunner().invoke(app, ["eval", str(student_dir), "--tasks", "effconv_tiny_mc", "--task-path", str(tasks_dir),
                                 "--task-batch-size", "4", "--no-speed", "--no-generations", "--no-progress",
                                 "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, (r.output, r.exception)
    reported = json.loads((tmp_path / "r" / "report.json").read_text())["tasks"]["student"]["effconv_tiny_mc"]
    for metric in ("acc,none", "acc_norm,none"):
        value = reported[metric]
        assert isinstance(value, float) and 0.0 <= value <= 1.0, metric
        assert (value * len(TINY_TASK_DOCS)).is_integer(), metric  # a fraction of the four questions

    from lm_eval.models.huggingface import HFLM

    model, tokenizer, _ = load_causal_lm(str(student_dir))
    manager = lm_eval.tasks.TaskManager(include_path=str(tasks_dir), include_defaults=False)
    direct = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, backend="causal"),
                                     tasks=["effconv_tiny_mc"], task_manager=manager, random_seed=0,
                                     numpy_random_seed=0, torch_random_seed=0, log_samples=False)
    expected = direct["results"]["effconv_tiny_mc"]
    assert expected["sample_len"] == len(TINY_TASK_DOCS)
    assert {k: v for k, v in reported.items() if k != "sample_len"} == {
        k: v for k, v in expected.items() if isinstance(v, float)}


def test_check_tasks_indexes_only_the_task_path_when_it_holds_every_task(tmp_path):
    """Local tasks skip lm-eval's built-in index; a built-in task, a group or a tag next to them needs the full one."""
    made = []

    def task_manager(include_path=None, include_defaults=True):
        made.append(include_defaults)
        local = ["mine"] if include_path else []
        builtin = ["piqa", "a_group"] if include_defaults else []
        groups = ["my_group"] if include_path else []
        return types.SimpleNamespace(all_tasks=local + builtin + groups, all_subtasks=local + builtin[:1])

    fake = types.SimpleNamespace(tasks=types.SimpleNamespace(TaskManager=task_manager))
    assert eval_tasks.check_tasks(fake, ["mine"], str(tmp_path)).all_tasks == ["mine", "my_group"] and made == [False]
    made.clear()
    assert "piqa" in eval_tasks.check_tasks(fake, ["mine", "piqa"], str(tmp_path)).all_tasks and made == [False, True]
    made.clear()
    eval_tasks.check_tasks(fake, ["my_group"], str(tmp_path))
    assert made == [False, True]
    made.clear()
    eval_tasks.check_tasks(fake, ["piqa"])
    assert made == [True]
    with pytest.raises(EffconvError, match="unknown lm-eval task"):
        eval_tasks.check_tasks(fake, ["nope"], str(tmp_path))


def test_speed_through_generate_reports_each_models_path(tiny_model_dir, student_dir, tmp_path):
    """--speed-method generate (the CUDA default): model.generate per cell, the teacher on the faster of its
    default and static cache (the other kept in other_paths), one PNG per figure."""
    out = tmp_path / "report"
    report = evaluate(EvalConfig(model=str(student_dir), teacher=str(tiny_model_dir), contexts=[16], batch_sizes=[2],
                                 decode_tokens=2, repeats=1, speed_method="generate", out=str(out), **QUIET))
    assert report["speed"]["method"] == "generate"
    rows = {r["model"]: r for r in report["speed"]["rows"]}
    assert set(rows) == {"teacher", "student"} and all(r["status"] == "ok" for r in rows.values())
    assert rows["teacher"]["path"].startswith("transformers") and len(rows["teacher"]["other_paths"]) == 1
    assert rows["student"]["path"] == "transformers loop, eager (growing cache)"  # CPU: transformers' usual loop
    assert all(r["decode_tokens_per_s"] > 0 and r["cache_bytes"] > 0 for r in rows.values())
    for name in ("decode_tokens_per_s.png", "prefill_ms.png", "memory.png", "cache_bytes.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    assert "through `model.generate`" in (out / "report.md").read_text()
    with pytest.raises(EffconvError, match="unknown --speed-method"):
        evaluate(EvalConfig(model=str(student_dir), speed_method="fast", **QUIET))


def test_parameter_rows_give_active_parameters_beside_the_teachers_ffn():
    from effconv.eval.report import parameter_rows

    models = {"teacher": {"parameters": 100, "active_parameters": 100, "ffn_parameters": 60, "active_ffn_parameters": 60},
              "student": {"parameters": 101, "active_parameters": 71, "ffn_parameters": 61, "active_ffn_parameters": 31}}
    header, rows = parameter_rows({"models": models})
    assert header[-1] == "FFN active / teacher FFN"
    assert rows == [["teacher", "100", "100", "60", "60", "100.0%"], ["student", "101", "71", "61", "31", "51.7%"]]


def test_copy_loss_scores_only_the_second_copy(tiny_model_dir):
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from effconv.eval.quality import copy_loss, repeated_halves

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    blocks = torch.randint(0, model.config.vocab_size, (3, 17))
    copies = repeated_halves(blocks)
    assert copies.shape == (3, 16) and torch.equal(copies[:, :8], copies[:, 8:]) and torch.equal(copies[:, :8], blocks[:, :8])
    with torch.no_grad():
        logits = model(copies).logits
    want = F.cross_entropy(logits[:, 8:-1].flatten(0, 1), copies[:, 9:].flatten())
    assert copy_loss(model, copies, batch_size=2) == pytest.approx(float(want), rel=1e-5)
