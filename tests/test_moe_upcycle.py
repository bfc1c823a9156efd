"""effconv moe-upcycle: exactness of the upcycled FFNs, native / effconv export round trips, Linear-MoE, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers as tf

from conftest import tiny_teacher
from effconv.errors import EffconvError
from effconv.loading import build_student, effconv_config_from_teacher
from effconv.moe_upcycle import (
    MoeUpcycleConfig,
    balanced_kmeans,
    collect_mlp_inputs,
    dense_effconv_model,
    moe_upcycle,
    upcycle,
)
from effconv.modeling.moe import MoeMLP, experts_loop


def _dense(arch: str):
    return dense_effconv_model(tiny_teacher(arch))


def _calibration(model, tokens: int = 256):
    blocks = torch.randint(3, 400, (4, 64), generator=torch.Generator().manual_seed(0))
    return collect_mlp_inputs(model, blocks, tokens, batch_size=4), blocks


def _cfg(**kw) -> MoeUpcycleConfig:
    cfg = MoeUpcycleConfig(**kw)
    cfg.validate()
    return cfg


@pytest.mark.parametrize("split", ["random", "balanced", "coactivation"])
def test_split_with_top_k_equal_experts_reproduces_dense(split):
    dense = _dense("llama")
    calib, blocks = _calibration(dense)
    moe = upcycle(dense, calib, _cfg(method="split", split=split, experts=4, top_k=4, router_init="uniform"))
    with torch.no_grad():
        ref, got = dense(blocks).logits, moe(blocks).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the partition covers every neuron exactly once
    for layer_d, layer_m in zip(dense.model.layers, moe.model.layers):
        rows = layer_m.mlp.experts.gate_up_proj[:, :32].reshape(-1, 96)
        assert torch.equal(torch.sort(rows[:, 0]).values, torch.sort(layer_d.mlp.gate_proj.weight[:, 0]).values)


def test_split_with_shared_expert_and_top_k_all_reproduces_dense():
    dense = _dense("llama")
    calib, blocks = _calibration(dense)
    # 128 neurons = (6 routed + 2 shared) * 16
    moe = upcycle(dense, calib, _cfg(method="split", split="balanced", experts=6, shared=2, top_k=6, router_init="uniform"))
    assert moe.model.layers[0].mlp.shared_expert.gate_proj.weight.shape == (32, 96)
    with torch.no_grad():
        torch.testing.assert_close(moe(blocks).logits, dense(blocks).logits, rtol=1e-5, atol=1e-5)


def test_split_top2_with_activation_router_differs_but_routes_by_layer_input():
    dense = _dense("llama")
    calib, blocks = _calibration(dense)
    moe = upcycle(dense, calib, _cfg(method="split", experts=4, top_k=2))
    gate = moe.model.layers[0].mlp.gate.weight
    assert gate.abs().sum() > 0
    logits = calib[0] @ gate.detach().T
    # the logits' spread across experts is the configured router_init_std
    assert abs(float((logits.detach() - logits.mean(-1, keepdim=True)).std()) - 0.1) < 1e-3
    with torch.no_grad():
        assert not torch.allclose(moe(blocks).logits, dense(blocks).logits, atol=1e-3)


@pytest.mark.parametrize("granularity,experts,top_k,shared", [(1, 4, 2, 0), (2, 8, 2, 0), (2, 4, 4, 0), (1, 4, 1, 1)])
def test_copy_step0_output_equals_dense(arch, granularity, experts, top_k, shared):
    dense = _dense(arch)
    calib, blocks = _calibration(dense)
    moe = upcycle(dense, calib, _cfg(method="copy", experts=experts, top_k=top_k, granularity=granularity, shared=shared))
    mlp = moe.model.layers[1].mlp
    assert mlp.gate.weight.abs().sum() > 0  # k-means router, not zeros
    with torch.no_grad():
        torch.testing.assert_close(moe(blocks).logits, dense(blocks).logits, rtol=1e-4, atol=1e-4)


def test_experts_loop_matches_explicit_sum():
    torch.manual_seed(0)
    e, d, i, n = 3, 8, 5, 7
    gate_up, down = torch.randn(e, 2 * i, d), torch.randn(e, d, i)
    x = torch.randn(n, d)
    idx = torch.randint(0, e, (n, 2))
    w = torch.rand(n, 2)
    got = experts_loop(x, idx, w, gate_up, down, torch.nn.functional.silu)
    want = torch.zeros(n, d)
    for t in range(n):
        for s in range(2):
            g, u = (gate_up[idx[t, s]] @ x[t]).chunk(2)
            want[t] += w[t, s] * (down[idx[t, s]] @ (torch.nn.functional.silu(g) * u))
    torch.testing.assert_close(got, want)


def test_balanced_kmeans_gives_equal_clusters_and_separates_groups():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(4, 16) * 5
    feats = torch.cat([centers[c] + 0.1 * torch.randn(8, 16, generator=g) for c in range(4)])
    labels = balanced_kmeans(feats, 4, generator=g)
    assert torch.bincount(labels).tolist() == [8, 8, 8, 8]
    for c in range(4):
        assert len(set(labels[c * 8 : (c + 1) * 8].tolist())) == 1


@pytest.mark.parametrize("arch,shared,expected", [("llama", 0, "mixtral"), ("llama", 2, "qwen2_moe"), ("qwen3", 0, "qwen3_moe"),
                                                  ("qwen2", 2, "effconv"), ("mistral", 0, "mixtral")])
def test_export_round_trip_logits(tmp_path, arch, shared, expected):
    teacher_dir = tmp_path / "teacher"
    tiny_teacher(arch).save_pretrained(teacher_dir)
    from helpers_tokenizer import make_tiny_tokenizer

    make_tiny_tokenizer().save_pretrained(teacher_dir)
    (teacher_dir / "train.txt").write_text(" ".join(f"word{i % 37} is here." for i in range(3000)))
    cfg = MoeUpcycleConfig(model=str(teacher_dir), out=str(tmp_path / "moe"), data=str(teacher_dir / "train.txt"),
                           experts=8 - shared, top_k=2, shared=shared, seq_len=32, batch_size=4, calibration_tokens=256,
                           tokens=256, train="experts", progress=False, device="cpu", load_balancing="aux")
    result = moe_upcycle(cfg)
    assert result.export_format == expected
    meta = json.loads((tmp_path / "moe" / "effconv.json").read_text())
    assert meta["metrics"]["distillation"]["steps"] == 2
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    ids = torch.randint(3, 400, (2, 24), generator=torch.Generator().manual_seed(1))
    if expected == "effconv":
        assert "auto_map" in config
        model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "moe", trust_remote_code=True)
    else:
        assert "auto_map" not in config and config["model_type"] == expected
        model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "moe")  # plain transformers, no remote code
    with torch.no_grad():  # the exported network is the one the run ended with
        torch.testing.assert_close(model(ids).logits, result.model(ids).logits, rtol=1e-4, atol=1e-4)
