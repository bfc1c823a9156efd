"""hybridize on tiny models: layer selection (measured, interval, first, last, explicit), the measured scores
pick a layer made hard to linearize, the export keeps the chosen softmax layers and decodes exactly like its
parallel forward, resume reuses the scores, and bad input fails with one clear line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from conftest import tiny_teacher
from helpers_tokenizer import make_tiny_tokenizer

import effconv.pipelines.hybridize as hybridize_mod
from effconv.errors import EffconvError
from effconv.pipelines.hybridize import HybridizeConfig, hybridize, state_dir_for
from effconv.distill.layer_scores import kept_count, select_layers

TINY = dict(seq_len=32, batch_size=4, window=4, eval_every=4, checkpoint_every=2, progress=False, score="transfer",
            score_tokens=32 * 4 * 6, stage1_tokens=32 * 4 * 4, stage2_tokens=32 * 4 * 2)


def test_default_score_is_next_token():
    assert HybridizeConfig().score == "next-token"  # the measured better choice (docs/hybridize.md)


def _save_teacher(path: Path, model) -> Path:
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def six_layer_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A tiny 6-layer Llama teacher (the conftest one has 3 layers), trained on the same text."""
    return _save_teacher(tmp_path_factory.mktemp("tiny-llama-6"), tiny_teacher("llama", num_hidden_layers=6))


@pytest.fixture(scope="module")
def hard_layer_dir(tmp_path_factory) -> Path:
    """6 layers; layer 3's q/k projections scaled by 4 (logits x16): a very peaked softmax, hard to linearize."""
    model = tiny_teacher("llama", num_hidden_layers=6)
    with torch.no_grad():
        model.model.layers[3].self_attn.q_proj.weight.mul_(4.0)
        model.model.layers[3].self_attn.k_proj.weight.mul_(4.0)
    return _save_teacher(tmp_path_factory.mktemp("tiny-llama-hard"), model)


def cfg_for(model_dir: Path, data_dir: Path, out: Path, **kw) -> HybridizeConfig:
    settings = dict(TINY, model=str(model_dir), data=str(data_dir / "train.txt"), out=str(out))
    settings.update(kw)
    return HybridizeConfig(**settings)


# --- selection rules ------------------------------------------------------------------------------------------


def test_kept_count_rounds_half_up_and_leaves_both_kinds():
    assert kept_count(0.25, 30) == 8  # 7.5 -> 8 (Python's round would give 8 here but 2 for 2.5)
    assert kept_count(0.5, 5) == 3 and kept_count(0.34, 6) == 2 and kept_count(0.5, 3) == 2
    for ratio, n in ((0.1, 3), (0.9, 3)):  # 0 kept / all kept
        with pytest.raises(EffconvError, match="use a ratio in"):
            kept_count(ratio, n)


def test_fixed_selections():
    assert select_layers("first", 6, ratio=0.34) == [0, 1]
    assert select_layers("last", 6, ratio=0.34) == [4, 5]
    assert select_layers("interval", 6, ratio=0.34) == [1, 4]  # middle of each half
    assert select_layers("interval", 30, ratio=0.25) == [1, 5, 9, 13, 16, 20, 24, 28]
    assert select_layers("interval", 6, ratio=0.5) == [1, 3, 5]
    assert select_layers("explicit", 6, softmax_layers=[5, 2, 2]) == [2, 5]
    scores = [0.1, 0.9, 0.3, 0.9, 0.05, 0.5]
    assert select_layers("measured", 6, ratio=0.5, scores=scores) == [1, 3, 5]
    assert select_layers("measured", 6, ratio=0.17, scores=scores) == [1]  # tie 1/3: lower index first
    with pytest.raises(EffconvError, match="out of range"):
        select_layers("explicit", 6, softmax_layers=[0, 6])
    with pytest.raises(EffconvError, match="nothing to convert"):
        select_layers("explicit", 3, softmax_layers=[0, 1, 2])
    with pytest.raises(EffconvError, match="not finite"):
        select_layers("measured", 3, ratio=0.34, scores=[0.1, math.nan, 0.2])


# --- end to end -----------------------------------------------------------------------------------------------


def test_measured_keeps_the_top_scoring_layers_and_the_export_decodes(six_layer_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    result = hybridize(cfg_for(six_layer_dir, tiny_model_dir, out, ratio=0.5))
    report = json.loads((out / "scores.json").read_text())
    scores = [row["score"] for row in report["layers"]]
    assert report["metric"] == "transfer_mse" and len(scores) == 6
    assert report["score_tokens"] == TINY["score_tokens"]
    top3 = sorted(sorted(range(6), key=lambda i: -scores[i])[:3])
    assert report["softmax_layers"] == top3 == result.softmax_layers  # round(0.5 * 6) = 3, the top-scoring ones
    assert report["converted_layers"] == [i for i in range(6) if i not in top3] == result.converted_layers
    assert [row["kept_softmax"] for row in report["layers"]] == [i in top3 for i in range(6)]
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "effconv.json").read_text())
    assert meta["command"] == "hybridize" and meta["hybridize"] == report
    assert meta["config"]["layers"] == result.converted_layers
    assert not list(tmp_path.glob(".out.*")), "run or state directories left behind"

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    expected_types = ["softmax" if i in top3 else "linear" for i in range(6)]
    assert model.config.attention_types == expected_types
    assert [layer.self_attn.layer_type for layer in model.model.layers] == expected_types
    ids = torch.randint(3, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        # token by token: softmax layers grow a KV cache, linear layers carry state + window (window 4 < 24)
        out_step, steps = None, []
        for t in range(ids.shape[1]):
            out_step = model(ids[:, t : t + 1], past_key_values=out_step.past_key_values if out_step else None,
                             use_cache=True)
            steps.append(out_step.logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
        # prefill then decode
        pre = model(ids[:, :10], use_cache=True)
        rest = [pre.logits]
        cache = pre.past_key_values
        for t in range(10, ids.shape[1]):
            o = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = o.past_key_values
            rest.append(o.logits)
        torch.testing.assert_close(torch.cat(rest, 1), full, rtol=1e-4, atol=1e-4)
        # greedy generate == argmax of repeated full forwards
        gen = model.generate(ids[:1, :6], max_new_tokens=8, min_new_tokens=8, do_sample=False)
        seq = ids[:1, :6]
        for _ in range(8):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
        assert torch.equal(gen, seq)


def test_measured_selection_keeps_the_layer_made_hard_to_linearize(hard_layer_dir, tiny_model_dir, tmp_path):
    result = hybridize(cfg_for(hard_layer_dir, tiny_model_dir, tmp_path / "out", ratio=0.17,
                               stage1_tokens=0, stage2_tokens=0))
    assert result.softmax_layers == [3]
    mse = result.scores.transfer_mse
    assert mse[3] > 2 * max(m for i, m in enumerate(mse) if i != 3)  # clearly, not by a hair


def test_next_token_score(hard_layer_dir, tiny_model_dir, tmp_path):
    result = hybridize(cfg_for(hard_layer_dir, tiny_model_dir, tmp_path / "out", ratio=0.17, score="next-token",
                               stage1_tokens=0, stage2_tokens=0))
    report = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert report["metric"] == "next_token_delta" and report["teacher_val_loss"] > 0
    deltas = [row["next_token_delta"] for row in report["layers"]]
    assert [row["score"] for row in report["layers"]] == deltas == result.scores.next_token_delta
    # the selection follows the deltas (on a random tiny model they are noise-level: its loss is ~uniform)
    assert result.softmax_layers == [max(range(6), key=lambda i: (deltas[i], -i))]


@pytest.mark.parametrize("score", ["copy", "next-token+copy"])
def test_copy_scores(hard_layer_dir, tiny_model_dir, tmp_path, score):
    from effconv.distill.layer_scores import _shares

    result = hybridize(cfg_for(hard_layer_dir, tiny_model_dir, tmp_path / "out", ratio=0.34, score=score,
                               stage1_tokens=0, stage2_tokens=0))
    report = json.loads((tmp_path / "out" / "scores.json").read_text())
    copy = [row["copy_delta"] for row in report["layers"]]
    assert copy == result.scores.copy_delta and report["teacher_copy_loss"] > 0
    if score == "copy":
        assert report["metric"] == "copy_delta" and "next_token_delta" not in report["layers"][0]
        expected = copy
    else:
        nt = [row["next_token_delta"] for row in report["layers"]]
        assert report["metric"] == "next_token+copy"
        expected = [a + b for a, b in zip(_shares(nt), _shares(copy))]
    assert [row["score"] for row in report["layers"]] == pytest.approx(expected)
    assert result.softmax_layers == sorted(sorted(range(6), key=lambda i: (-expected[i], i))[:2])


def test_shares_clip_negative_rises_and_sum_to_one():
    from effconv.distill.layer_scores import _shares

    assert _shares([1.0, -2.0, 3.0]) == pytest.approx([0.25, 0.0, 0.75])
    assert _shares([-1.0, 0.0]) == [0.0, 0.0]


def _cli_app() -> typer.Typer:
    from effconv.cli import register_commands

    app = typer.Typer(pretty_exceptions_enable=False)

    @app.callback()
    def _root() -> None:
        """test app"""

    register_commands(app)
    return app


@pytest.mark.parametrize(
    "args,kept",
    [
        (["--select", "interval", "--ratio", "0.34"], [1, 4]),
        (["--select", "first", "--ratio", "0.34"], [0, 1]),
        (["--select", "last", "--ratio", "0.5"], [3, 4, 5]),
        (["--layers", "5,0"], [0, 5]),
    ],
)
def test_cli_fixed_selections(six_layer_dir, tiny_model_dir, tmp_path, args, kept):
    out = tmp_path / "out"
    common = ["hybridize", "--model", six_layer_dir, "--data", tiny_model_dir / "train.txt", "--out", out,
              "--window", "4", "--seq-len", "32", "--batch-size", "4", "--score-tokens", "128",
              "--stage1-tokens", "128", "--stage2-tokens", "0", "--no-progress"]
    r = CliRunner().invoke(_cli_app(), [*map(str, common), *args])
    assert r.exit_code == 0, (r.output, r.exception)
    report = json.loads((out / "scores.json").read_text())
    assert report["softmax_layers"] == kept and len(report["layers"]) == 6  # scores recorded for comparison
    config = json.loads((out / "config.json").read_text())
    assert config["attention_types"] == ["softmax" if i in kept else "linear" for i in range(6)]


def test_score_none_skips_scoring(six_layer_dir, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(hybridize_mod, "score_layers", lambda cfg: pytest.fail("scored with --score none"))
    result = hybridize(cfg_for(six_layer_dir, tiny_model_dir, tmp_path / "out", select="interval", ratio=0.34,
                               score="none", stage2_tokens=0))
    assert result.softmax_layers == [1, 4] and result.scores is None
    assert not (tmp_path / "out" / "scores.png").exists()
    assert json.loads((tmp_path / "out" / "scores.json").read_text())["softmax_layers"] == [1, 4]


def test_resume_reuses_the_scores(six_layer_dir, tiny_model_dir, tmp_path, monkeypatch):
    cfg = cfg_for(six_layer_dir, tiny_model_dir, tmp_path / "out", ratio=0.34, stage2_tokens=0)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hybridize_mod, "linearize", killed)
    with pytest.raises(KeyboardInterrupt):
        hybridize(cfg)
    saved = json.loads((state_dir_for(tmp_path / "out") / "scores.json").read_text())
    with pytest.raises(EffconvError, match="--resume"):
        hybridize(cfg_for(six_layer_dir, tiny_model_dir, tmp_path / "out", ratio=0.34, stage2_tokens=0))
    with pytest.raises(EffconvError, match="different settings.*ratio"):
        hybridize(cfg_for(six_layer_dir, tiny_model_dir, tmp_path / "out", ratio=0.5, stage2_tokens=0, resume=True))
    monkeypatch.undo()
    monkeypatch.setattr(hybridize_mod, "score_layers", lambda cfg: pytest.fail("re-scored on --resume"))
    result = hybridize(cfg_for(six_layer_dir, tiny_model_dir, tmp_path / "out", ratio=0.34, stage2_tokens=0,
                               resume=True))
    assert result.scores.transfer_mse == saved["transfer_mse"]
    assert result.softmax_layers == select_layers("measured", 6, ratio=0.34, scores=saved["transfer_mse"])
    assert not state_dir_for(tmp_path / "out").exists()


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(ratio=0.0), r"--ratio must be in \(0, 1\)"),
        (dict(ratio=1.0), r"--ratio must be in \(0, 1\)"),
        (dict(ratio=-0.5), r"--ratio must be in \(0, 1\)"),
        (dict(ratio=None), "--ratio is required"),
        (dict(ratio=0.05), "keeps 0 of 6 layers"),
        (dict(ratio=0.95), "nothing to convert"),
        (dict(ratio=None, softmax_layers=[1, 6]), "out of range"),
        (dict(ratio=None, softmax_layers=[-1]), "out of range"),
        (dict(ratio=None, softmax_layers=[]), "--layers is empty"),
        (dict(softmax_layers=[1]), "drop --ratio"),
        (dict(select="first", softmax_layers=[1], ratio=None), "conflicts with --select first"),
        (dict(window=64), "--window 64 is not smaller than --seq-len 32"),
        (dict(window=32), "--window 32 is not smaller than --seq-len 32"),
        (dict(select="best"), "unknown --select"),
        (dict(score="entropy"), "unknown --score"),
        (dict(score="none"), "--select measured needs scores"),
        (dict(layers=[0, 1]), "softmax_layers"),
        (dict(score_tokens=-1), "--score-tokens must be >= 0"),
        (dict(feature_map="cosformer"), "unknown feature map"),
        (dict(model="/nonexistent/model"), "model not found"),
    ],
)
def test_bad_input_is_one_clear_error(six_layer_dir, tiny_model_dir, tmp_path, change, message):
    settings = dict(ratio=0.5)
    settings.update(change)
    with pytest.raises(EffconvError, match=message) as e:
        hybridize(cfg_for(six_layer_dir, tiny_model_dir, tmp_path / "out", **settings))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not state_dir_for(tmp_path / "out").exists()


def test_cli_error_is_one_line(six_layer_dir, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "effconv.cli", "hybridize", "--model", str(six_layer_dir), "--out",
         str(tmp_path / "x"), "--ratio", "1.5"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "effconv: error: --ratio must be in (0, 1) (the fraction of layers kept as softmax), got 1.5"
    ]


def test_recipe_keys(tmp_path):
    from effconv.config import build_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("about: {device: cpu}\nratio: 0.25\nscore: next-token\nwindow: 32\nsoftmax_layers: null\n")
    cfg = build_config(HybridizeConfig, recipe, {"window": 16, "score_tokens": 1024})
    assert (cfg.ratio, cfg.score, cfg.window, cfg.score_tokens, cfg.selection) == (0.25, "next-token", 16, 1024, "measured")
    cfg.validate()
    recipe.write_text("softmax_layers: [3, 7]\n")
    cfg = build_config(HybridizeConfig, recipe, {})
    assert cfg.selection == "explicit" and cfg.softmax_layers == [3, 7]
    recipe.write_text("ratio: a quarter\n")
    with pytest.raises(EffconvError, match="must be"):
        build_config(HybridizeConfig, recipe, {})


def test_hybridize_trains_over_tbptt_pieces(six_layer_dir, tiny_model_dir, tmp_path):
    """--tbptt-piece reaches hybridize's linearize stages: kept softmax layers carry their keys across pieces."""
    out = tmp_path / "out"
    result = hybridize(cfg_for(six_layer_dir, tiny_model_dir, out, ratio=0.5, tbptt_piece=16, kl_weight=1.0,
                               ce_weight=0.0, gate=True, sinks=2))
    meta = json.loads((out / "effconv.json").read_text())
    assert meta["config"]["tbptt_piece"] == 16 and len(result.softmax_layers) == 3
    assert meta["metrics"]["stage1"]["tokens"] == TINY["stage1_tokens"]
    assert meta["metrics"]["stage2_val_ppl"] > 0
