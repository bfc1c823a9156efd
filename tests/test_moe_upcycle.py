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
from effconv.conversion.student import build_student, effconv_config_from_teacher
from effconv.pipelines.moe_upcycle import MoeUpcycleConfig, moe_upcycle
from effconv.conversion.moe import balanced_kmeans, collect_mlp_inputs, dense_effconv_model, upcycle
from effconv.modeling.moe import MoeMLP, experts_loop
from effconv.distill.transfer import set_attention_mode
from helpers_no_effconv import WITHOUT_EFFCONV  # noqa: E402


def _dense(arch: str):
    return dense_effconv_model(tiny_teacher(arch))


def _calibration(model, tokens: int = 256):
    blocks = torch.randint(3, 400, (4, 64), generator=torch.Generator().manual_seed(0))
    return collect_mlp_inputs(model, blocks, tokens, batch_size=4), blocks


# the tests' small layouts: 128 neurons do not take the default 16 shared + 48 routed experts
SMALL = dict(shared=0)


def _cfg(**kw) -> MoeUpcycleConfig:
    cfg = MoeUpcycleConfig(**{**SMALL, **kw})
    cfg.validate()
    return cfg


@pytest.mark.parametrize("split,weights", [("random", "softmax"), ("balanced", "renormalised"),
                                           ("coactivation", "softmax"), ("coactivation", "renormalised")])
def test_split_with_top_k_equal_experts_reproduces_dense(split, weights):
    dense = _dense("llama")
    calib, blocks = _calibration(dense)
    moe = upcycle(dense, calib, _cfg(method="split", split=split, experts=4, top_k=4, router_init="uniform",
                                     router_weights=weights))
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
    cfg = _cfg(method="split", experts=4, top_k=2, router_init_std=1.0)
    moe = upcycle(dense, calib, cfg)
    gate = moe.model.layers[0].mlp.gate.weight
    assert gate.abs().sum() > 0
    logits = calib[0] @ gate.detach().T
    # the logits' spread across experts is the configured router_init_std
    assert abs(float((logits.detach() - logits.mean(-1, keepdim=True)).std()) - cfg.router_init_std) < 1e-2
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


@pytest.mark.parametrize("arch,shared,weights,expected,train", [
    ("llama", 0, "renormalised", "mixtral", "experts"), ("llama", 2, "auto", "qwen2_moe", "experts"),
    ("llama", 0, "softmax", "qwen2_moe", "experts"), ("qwen3", 0, "auto", "qwen3_moe", "router"),
    ("qwen2", 2, "auto", "effconv", "experts"), ("mistral", 0, "renormalised", "mixtral", "router-lora"),
])
def test_export_round_trip_logits(tmp_path, arch, shared, weights, expected, train):
    teacher_dir = tmp_path / "teacher"
    tiny_teacher(arch).save_pretrained(teacher_dir)
    from helpers_tokenizer import make_tiny_tokenizer

    make_tiny_tokenizer().save_pretrained(teacher_dir)
    (teacher_dir / "train.txt").write_text(" ".join(f"word{i % 37} is here." for i in range(800)))
    cfg = MoeUpcycleConfig(model=str(teacher_dir), out=str(tmp_path / "moe"), data=str(teacher_dir / "train.txt"),
                           experts=8 - shared, top_k=2, shared=shared, seq_len=32, batch_size=4, calibration_tokens=256,
                           tokens=256, train=train, progress=False, device="cpu", load_balancing="aux",
                           router_weights=weights)
    result = moe_upcycle(cfg)
    assert result.export_format == expected
    meta = json.loads((tmp_path / "moe" / "effconv.json").read_text())
    assert meta["metrics"]["distillation"]["steps"] == 2
    assert meta["metrics"]["distillation"]["train"] == train
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


TINY = dict(seq_len=32, batch_size=4, calibration_tokens=256, progress=False, device="cpu", eval_every=2, checkpoint_every=2)


def _tiny(model_dir, out, **kw) -> MoeUpcycleConfig:
    return MoeUpcycleConfig(**{**TINY, **SMALL, "model": str(model_dir), "data": str(model_dir / "train.txt"), "out": str(out), **kw})


NO_EFFCONV_LOAD = WITHOUT_EFFCONV + """
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
"""


@pytest.mark.parametrize("gate", [False, True], ids=["ungated", "gated"])
def test_linear_moe_linearized_model_upcycles_exports_and_reloads(gate, tiny_model_dir, tmp_path):
    from effconv.pipelines.linearize import LinearizeConfig, linearize

    linearize(LinearizeConfig(model=str(tiny_model_dir), data=str(tiny_model_dir / "train.txt"), out=str(tmp_path / "lin"),
                              window=4, seq_len=32, batch_size=4, stage1_tokens=32 * 4 * 2, stage2_tokens=0, progress=False,
                              gate=gate, stage1_lr=3e-2))
    (tmp_path / "lin" / "train.txt").write_text((tiny_model_dir / "train.txt").read_text())
    result = moe_upcycle(_tiny(tmp_path / "lin", tmp_path / "lmoe", experts=4, top_k=2, tokens=32 * 4 * 2, train="router"))
    assert result.export_format == "effconv"  # linear attention needs effconv's modeling code
    config = json.loads((tmp_path / "lmoe" / "config.json").read_text())
    assert config["num_experts"] == 4 and config["attention_types"] == ["linear"] * 3
    assert config["linear_gate"] == gate  # the attention comes through unchanged
    assert (tmp_path / "lmoe" / "moe.py").is_file()
    ids = torch.randint(3, 400, (2, 20), generator=torch.Generator().manual_seed(2))
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", NO_EFFCONV_LOAD, str(tmp_path / "lmoe"), str(tmp_path / "ids.pt"),
                    str(tmp_path / "logits.pt")], check=True, cwd=tmp_path)
    with torch.no_grad():
        want = result.model(ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), want, rtol=1e-4, atol=1e-4)


def test_linear_moe_upcycled_model_linearizes_and_reloads(tiny_model_dir, tmp_path):
    from effconv.pipelines.linearize import LinearizeConfig, linearize
    from effconv.modeling import EffconvForCausalLM

    result = moe_upcycle(_tiny(tiny_model_dir, tmp_path / "moe", experts=4, top_k=2, tokens=32 * 4 * 4,
                                export_format="effconv"))
    assert result.export_format == "effconv"
    (tmp_path / "moe" / "train.txt").write_text((tiny_model_dir / "train.txt").read_text())
    linearize(LinearizeConfig(model=str(tmp_path / "moe"), data=str(tmp_path / "moe" / "train.txt"), out=str(tmp_path / "moelin"),
                              window=4, seq_len=32, batch_size=4, stage1_tokens=32 * 4 * 2, stage2_tokens=32 * 4, progress=False))
    combined = EffconvForCausalLM.from_pretrained(tmp_path / "moelin").eval()
    assert combined.config.attention_types == ["linear"] * 3 and combined.config.num_experts == 4
    upcycled = EffconvForCausalLM.from_pretrained(tmp_path / "moe").eval()
    ids = torch.randint(3, 400, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # the MoE FFNs and routers came through linearize unchanged: in teacher mode (softmax attention) the combined
        # model is the upcycled model; in student mode linear attention makes it differ
        for a, b in zip(combined.model.layers, upcycled.model.layers):
            torch.testing.assert_close(a.mlp.experts.gate_up_proj, b.mlp.experts.gate_up_proj)
            torch.testing.assert_close(a.mlp.gate.weight, b.mlp.gate.weight)
        student_logits = combined(ids).logits
        set_attention_mode(combined.converted_attentions(), "teacher")
        assert not torch.allclose(student_logits, combined(ids).logits, atol=1e-4)


def test_bad_input_errors(tiny_model_dir, tmp_path):
    dense = _dense("llama")
    with pytest.raises(EffconvError, match="divisible"):
        upcycle(dense, [], _cfg(method="split", experts=3, top_k=1, router_init="uniform"))  # 128 % 3
    with pytest.raises(EffconvError, match="top-k"):
        _cfg(experts=4, top_k=5)
    with pytest.raises(EffconvError, match="multiples of --granularity"):
        _cfg(method="copy", experts=6, top_k=3, granularity=2)
    with pytest.raises(EffconvError, match="granularity 3 does not divide"):
        upcycle(dense, [], _cfg(method="copy", experts=3, top_k=3, granularity=3, router_init="uniform"))
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(EffconvError, match="no recognised gated FFN"):
        dense_effconv_model(gpt2)
    moe = upcycle(dense, [], _cfg(experts=4, top_k=2, shared=0, split="random", router_init="uniform"))
    with pytest.raises(EffconvError, match="already a mixture of experts"):
        dense_effconv_model(moe)
    # shape errors come before any output is written
    with pytest.raises(EffconvError, match="divisible"):
        moe_upcycle(_tiny(tiny_model_dir, tmp_path / "bad", experts=5, top_k=2))
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


@pytest.mark.parametrize("args,message", [
    (["--experts", "8", "--top-k", "9"], "--top-k must be between 1 and --experts (8), got 9"),
    (["--method", "dense"], "--method must be one of split, copy"),
    (["--experts", "5", "--top-k", "2"], "divisible"),
])
def test_cli_one_line_errors(tiny_model_dir, tmp_path, args, message):
    cmd = [sys.executable, "-m", "effconv.cli", "moe-upcycle", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"),
           "--data", str(tiny_model_dir / "train.txt"), "--no-progress", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("effconv: error: ") and message in last
    assert "Traceback" not in proc.stderr


def test_resume_continues_interrupted_distillation(tiny_model_dir, tmp_path, monkeypatch):
    from effconv.pipelines import moe_upcycle as mod

    full = moe_upcycle(_tiny(tiny_model_dir, tmp_path / "full", experts=4, top_k=2, tokens=32 * 4 * 6, train="experts",
                             load_balancing="bias", lr=1e-3))
    real_run_stage = mod.run_stage

    def crash_after_3(*a, **kw):
        real_run_stage(*a, **{**kw, "stop_after_steps": 3})  # checkpoint at step 2, then "die"
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "run_stage", crash_after_3)
    cfg = _tiny(tiny_model_dir, tmp_path / "part", experts=4, top_k=2, tokens=32 * 4 * 6, train="experts", load_balancing="bias", lr=1e-3)
    with pytest.raises(KeyboardInterrupt):
        moe_upcycle(cfg)
    assert not (tmp_path / "part").exists() and (tmp_path / ".part.effconv-run" / "distill.pt").is_file()
    monkeypatch.setattr(mod, "run_stage", real_run_stage)
    with pytest.raises(EffconvError, match="different settings"):
        moe_upcycle(_tiny(tiny_model_dir, tmp_path / "part", experts=4, top_k=2, tokens=32 * 4 * 6, train="router",
                          load_balancing="bias", lr=1e-3, resume=True))
    cfg.resume = True
    resumed = moe_upcycle(cfg)
    assert resumed.metrics["distillation"]["steps"] == 6
    torch.testing.assert_close(resumed.metrics["distillation"]["final_train_loss"],
                               full.metrics["distillation"]["final_train_loss"], rtol=1e-4, atol=1e-5)
    for a, b in zip(resumed.model.model.layers, full.model.model.layers):
        torch.testing.assert_close(a.mlp.router_bias, b.mlp.router_bias)
        torch.testing.assert_close(a.mlp.experts.down_proj, b.mlp.experts.down_proj, rtol=1e-4, atol=1e-5)


def test_top_k_annealing_schedule_ends_at_the_target_k():
    from effconv.distill.moe import top_k_at

    ks = [top_k_at(s, 10, 8, 2, 0.5) for s in range(10)]
    assert ks[0] == 8 and ks[5:] == [2] * 5  # wide first, the target k over the last half of the planned steps
    assert all(a >= b for a, b in zip(ks, ks[1:]))
    assert [top_k_at(s, 10, 2, 2, 0.5) for s in range(10)] == [2] * 10  # no annealing asked


def test_routing_coverage_of_split_experts():
    from effconv.distill.moe import routing_coverage, set_top_k

    dense = _dense("llama")
    calib, blocks = _calibration(dense)
    moe = upcycle(dense, calib, _cfg(method="split", split="coactivation", experts=6, shared=2, top_k=2))
    some = routing_coverage(moe, dense, blocks, 4)
    assert 0 < some["coverage"] <= some["oracle_coverage"] < 1 and len(some["per_layer"]) == 3
    set_top_k(moe, 6)  # all experts chosen: every neuron of the dense FFN runs
    assert routing_coverage(moe, dense, blocks, 4)["coverage"] == pytest.approx(1.0, abs=1e-6)
    set_top_k(moe, 2)
    # by hand: per layer and token, the mass of the shared and the chosen experts' neurons over that of all neurons
    inputs = []
    hooks = [layer.mlp.register_forward_hook(lambda m, a, out: inputs.append(a[0].flatten(0, 1))) for layer in moe.model.layers]
    with torch.no_grad():
        moe(blocks)
    for h in hooks:
        h.remove()
    per_layer = []
    torch.set_grad_enabled(False)
    for x, layer_d, layer_m in zip(inputs, dense.model.layers, moe.model.layers):
        mlp, moe_mlp = layer_d.mlp, layer_m.mlp
        a = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
        mass = a.abs() * mlp.down_proj.weight.norm(dim=0)
        shared, routed = moe_mlp.dense_neurons
        chosen = moe_mlp.route(x)[2]
        covered = mass[:, shared].sum(1) + torch.stack([mass[t, routed[chosen[t]].flatten()].sum() for t in range(len(x))])
        per_layer.append(float((covered / mass.sum(1)).mean()))
    torch.set_grad_enabled(True)
    got = routing_coverage(moe, dense, blocks, len(blocks))
    assert got["coverage"] == pytest.approx(sum(per_layer) / len(per_layer), rel=1e-5)
    assert got["per_layer"] == pytest.approx(per_layer, abs=1e-4)


def test_parameter_counts_of_moe_and_its_native_export():
    from effconv.eval.params import parameter_counts
    from effconv.io.native_moe import native_model

    dense = _dense("llama")
    calib, _ = _calibration(dense)
    moe = upcycle(dense, calib, _cfg(method="split", experts=6, shared=2, top_k=2))
    c = parameter_counts(moe)
    d = parameter_counts(dense)
    assert d["active_parameters"] == d["parameters"] and d["active_ffn_fraction"] == 1.0
    experts = sum(m.experts.gate_up_proj.numel() + m.experts.down_proj.numel() for m in moe.model.layers
                  for m in [m.mlp])
    assert c["parameters"] - c["active_parameters"] == round(experts * (1 - 2 / 6))
    # 128 neurons: 32 shared + 2 of 6 x 16 routed run, plus the router
    router = sum(layer.mlp.gate.weight.numel() for layer in moe.model.layers)
    assert c["active_ffn_parameters"] == (d["ffn_parameters"] * 64) // 128 + router
    native = native_model(moe, "qwen2_moe")
    n = parameter_counts(native)
    # Qwen2-MoE adds its shared-expert gate (one row per layer) and zero q/k/v biases
    extra = sum(layer.mlp.shared_expert_gate.weight.numel() for layer in native.model.layers)
    assert n["active_ffn_parameters"] == c["active_ffn_parameters"] + extra
    assert n["parameters"] - n["active_parameters"] == c["parameters"] - c["active_parameters"]


def test_default_settings_run_at_most_half_of_smollm2s_ffn():
    """The default layout on SmolLM2-135M's FFN shape (576 -> 1536): at most 50% of the dense FFN's parameters
    (router included) run per token."""
    from effconv.conversion.moe import moe_config
    from effconv.eval.params import parameter_counts
    from effconv.modeling import EffconvConfig, EffconvForCausalLM

    dense_config = EffconvConfig(vocab_size=64, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                                 num_attention_heads=9, num_key_value_heads=3, attention_types=["softmax"])
    with torch.device("meta"):
        dense = EffconvForCausalLM(dense_config)
        moe = EffconvForCausalLM(moe_config(dense_config, MoeUpcycleConfig()))
    share = parameter_counts(moe)["active_ffn_parameters"] / parameter_counts(dense)["ffn_parameters"]
    assert 0.4 < share <= 0.5
    assert moe.config.shared_expert_intermediate_size > 0 and moe.config.num_experts >= 32  # shared + fine-grained


def test_top_k_annealing_in_a_run_and_the_exported_k(tiny_model_dir, tmp_path, monkeypatch):
    from effconv.pipelines import moe_upcycle as mod

    seen = []
    real = mod.set_top_k
    monkeypatch.setattr(mod, "set_top_k", lambda model, k: (seen.append(k), real(model, k)))
    result = moe_upcycle(_tiny(tiny_model_dir, tmp_path / "o", experts=6, shared=2, top_k=2, top_k_start=6,
                               tokens=32 * 4 * 6, train="experts"))
    assert seen[0] == 6 and seen[-2:] == [2, 2] and sorted(seen, reverse=True) == seen
    assert all(m.mlp.top_k == 2 for m in result.model.model.layers)
    m = result.metrics
    assert m["distillation"]["top_k_start"] == 6 and m["distillation"]["top_k_end"] == 2
    assert 1.0 <= m["distilled_load_balance"] <= 6
    assert 0 < m["upcycled_coverage"]["coverage"] <= m["upcycled_coverage"]["oracle_coverage"] <= 1
    assert m["parameters"]["active_ffn_fraction_of_dense"] < 1
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["num_experts_per_tok"] == 2
    assert config["norm_topk_prob"] is False


def test_masked_experts_match_the_loop_with_gradients():
    from effconv.modeling.moe import experts_masked

    torch.manual_seed(0)
    e, d, i, n, k = 6, 8, 5, 11, 3
    gate_up, down = torch.randn(e, 2 * i, d, requires_grad=True), torch.randn(e, d, i, requires_grad=True)
    x = torch.randn(n, d)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    w = torch.rand(n, k, requires_grad=True)
    got = experts_masked(x, idx, w, gate_up, down, torch.nn.functional.silu)
    want = experts_loop(x, idx, w, gate_up, down, torch.nn.functional.silu)
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got.square().sum(), [gate_up, down, w])
    g_want = torch.autograd.grad(want.square().sum(), [gate_up, down, w])
    for a, b in zip(g_got, g_want):  # sums in another order: fp32 rounding of values ~20
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_experts_compute_masked_trains_like_the_loop_and_exports_the_same_layout(tiny_model_dir, tmp_path, monkeypatch):
    from effconv.modeling import moe as moe_mod

    calls = []
    real = moe_mod.experts_masked
    monkeypatch.setattr(moe_mod, "experts_masked", lambda *a: (calls.append(torch.is_grad_enabled()), real(*a))[1])
    settings = dict(experts=8, shared=0, top_k=1, top_k_start=1, tokens=32 * 4 * 3, train="experts")
    looped = moe_upcycle(_tiny(tiny_model_dir, tmp_path / "loop", **settings))
    assert not calls  # auto on CPU with 4 * top-k < experts: the per-expert loop
    masked = moe_upcycle(_tiny(tiny_model_dir, tmp_path / "masked", experts_compute="masked", **settings))
    assert any(calls)  # distillation steps ran masked
    a, b = looped.metrics["distillation"], masked.metrics["distillation"]
    assert abs(a["final_train_loss"] - b["final_train_loss"]) < 1e-4 * max(1.0, abs(a["final_train_loss"]))
    assert all(m.mlp.experts.compute == "auto" for m in masked.model.model.layers)
    assert json.loads((tmp_path / "masked" / "config.json").read_text()) == \
        json.loads((tmp_path / "loop" / "config.json").read_text())
