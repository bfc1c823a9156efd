"""linearize end to end on tiny models: training reduces the transfer loss, export round-trips, resume after
kill -9 reproduces an unbroken run, and bad input fails with one clear line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from effconv.errors import EffconvError
from effconv.io.export import export_model
from effconv.pipelines.linearize import LinearizeConfig, linearize
from effconv.conversion.student import make_student
from effconv.distill.transfer import set_attention_mode
from helpers_no_effconv import WITHOUT_EFFCONV  # noqa: E402

TINY = dict(seq_len=32, batch_size=4, eval_every=4, checkpoint_every=2, progress=False)


def tiny_cfg(model_dir: Path, out: Path, **kw) -> LinearizeConfig:
    settings = dict(TINY, model=str(model_dir), data=str(model_dir / "train.txt"), out=str(out), window=4,
                    stage1_tokens=32 * 4 * 12, stage2_tokens=32 * 4 * 4)
    settings.update(kw)
    return LinearizeConfig(**settings)


def test_linearize_trains_and_exports(tiny_model_dir, tmp_path):
    result = linearize(tiny_cfg(tiny_model_dir, tmp_path / "out", stage1_lr=3e-2))
    m = result.metrics
    val_mse = [v for _, v in m["stage1"]["val_mse"]]
    assert val_mse[-1] < val_mse[0]  # attention transfer learns
    assert m["stage1"]["tokens"] == 32 * 4 * 12 and m["stage1"]["tokens_per_second"] > 0
    out = tmp_path / "out"
    for name in ("config.json", "model.safetensors", "modeling_effconv.py", "attention_ops.py",
                 "configuration_effconv.py", "tokenizer.json", "effconv.json"):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob(".out.*")), "temporary or run directories left behind"
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)  # registered Auto class: no trust_remote_code
    assert type(reloaded).__name__ == "EffconvForCausalLM"
    assert reloaded.config.attention_types == ["linear"] * 3


ROUND_TRIP = WITHOUT_EFFCONV + textwrap.dedent(
    """
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    ids = torch.load(sys.argv[2], weights_only=True)
    with torch.no_grad():
        torch.save(model(ids, use_cache=False).logits, sys.argv[3])
        gen = model.generate(ids[:1, :5], max_new_tokens=8, do_sample=False, min_new_tokens=8)
    torch.save(gen, sys.argv[4])
    """
)


def test_export_round_trip_without_effconv(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    student = make_student(teacher, LinearizeConfig(window=4, layers=[0, 2]), torch.device("cpu"))
    with torch.no_grad():
        for name, p in student.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)  # trained-looking, not identity
    ids = torch.randint(3, 400, (2, 20))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = student(ids, use_cache=False).logits
        expected_gen = student.generate(ids[:1, :5], max_new_tokens=8, do_sample=False, min_new_tokens=8)
    export_model(student, None, tmp_path / "model")
    script = tmp_path / "load.py"
    script.write_text(ROUND_TRIP)
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "model"), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt"),
         str(tmp_path / "gen.pt")], check=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), expected, rtol=0, atol=0)
    assert torch.equal(torch.load(tmp_path / "gen.pt", weights_only=True), expected_gen)


def test_lora_is_merged_on_export(tiny_model_dir, tmp_path, monkeypatch):
    """The export's logits are those of the student with its trained adapters (the unmerged peft model, recorded
    just before linearize merges it), to float rounding, and not those of the student without them."""
    from transformers import AutoModelForCausalLM

    import effconv.pipelines.linearize as pipeline

    ids = torch.randint(3, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    recorded = {}
    attach_lora = pipeline.attach_lora

    def attach_and_record(*args, **kwargs):
        peft_model = attach_lora(*args, **kwargs)
        merge = peft_model.merge_and_unload

        def record_then_merge(*a, **k):
            with torch.no_grad():
                recorded["adapted"] = peft_model(input_ids=ids, use_cache=False).logits.clone()
                with peft_model.disable_adapter():
                    recorded["base"] = peft_model(input_ids=ids, use_cache=False).logits.clone()
            return merge(*a, **k)

        peft_model.merge_and_unload = record_then_merge
        return peft_model

    monkeypatch.setattr(pipeline, "attach_lora", attach_and_record)
    linearize(tiny_cfg(tiny_model_dir, tmp_path / "out", stage1_tokens=0, stage2_lr=5e-2))
    assert recorded.keys() == {"adapted", "base"}  # linearize merged the adapters once
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert not any("lora" in k for k in weights)
    original = load_file(tiny_model_dir / "model.safetensors")
    torch.testing.assert_close(weights["model.layers.0.mlp.up_proj.weight"], original["model.layers.0.mlp.up_proj.weight"])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        logits = merged(input_ids=ids, use_cache=False).logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, recorded["adapted"], rtol=1e-5, atol=1e-5)  # merged == base + adapters
    assert (logits - recorded["base"]).abs().max() > 0.1  # the adapters changed the model, far beyond that tolerance


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "effconv.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_resume_after_kill_matches_unbroken_run(tiny_model_dir, tmp_path):
    common = ["linearize", "--model", tiny_model_dir, "--data", tiny_model_dir / "train.txt", "--window", "4",
              "--seq-len", "32", "--batch-size", "4", "--stage1-tokens", str(32 * 4 * 30),
              "--stage2-tokens", str(32 * 4 * 10), "--checkpoint-every", "2", "--no-progress"]
    unbroken = _cli(*common, "--out", tmp_path / "a")
    assert unbroken.returncode == 0, unbroken.stderr

    proc = subprocess.Popen([sys.executable, "-m", "effconv.cli", *map(str, common), "--out", tmp_path / "b"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / ".b.effconv-run" / "stage1.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["step"] >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b").exists()  # nothing at --out after a kill
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert 10 <= killed_at < 30

    again = _cli(*common, "--out", tmp_path / "b")
    assert again.returncode == 1 and "--resume" in again.stderr
    resumed = _cli(*common, "--out", tmp_path / "b", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # same batches, same optimizer state: identical up to CPU float non-determinism (none seen)
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(feature_map="cosformer"), "unknown feature map"),
        (dict(window=-1), "--window must be >= 0"),
        (dict(model="/nonexistent/model"), "model not found"),
        (dict(data="/nonexistent/data.txt"), "not found"),
        (dict(kernel="cuda-magic"), "unknown --kernel"),
        (dict(layers=[0, 7]), "out of range"),
    ],
)
def test_bad_input_is_one_clear_error(tiny_model_dir, tmp_path, change, message):
    with pytest.raises(EffconvError, match=message):
        linearize(tiny_cfg(tiny_model_dir, tmp_path / "out", **change))
    assert not (tmp_path / "out").exists()


def test_bad_files(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(EffconvError, match="empty|no text"):
        linearize(tiny_cfg(tiny_model_dir, tmp_path / "o1", data=str(empty)))
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(EffconvError, match="could not load the weights"):
        linearize(tiny_cfg(broken, tmp_path / "o2"))
    fake_gguf = tmp_path / "model.gguf"
    fake_gguf.write_bytes(b"NOPE" + b"\x00" * 100)
    with pytest.raises(EffconvError, match="not a GGUF file"):
        linearize(tiny_cfg(fake_gguf, tmp_path / "o3"))
    for out in ("o1", "o2", "o3"):
        assert not (tmp_path / out).exists()


def test_cli_errors_are_one_line(tiny_model_dir, tmp_path):
    (tmp_path / "exists").mkdir()
    r = _cli("linearize", "--model", tiny_model_dir, "--out", tmp_path / "exists")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"effconv: error: output directory {tmp_path / 'exists'} already exists; pass --overwrite to replace it"]
    r = _cli("linearize", "--model", tiny_model_dir, "--out", tmp_path / "x", "--feature-map", "nope")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = _cli("linearize", "--model", tiny_model_dir, "--out", tmp_path / "x", "--generation-mode", "fast")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "effconv: error: --generation-mode must be one of auto, static, continuous, graph, got 'fast'"]
    assert not (tmp_path / "x").exists()


def test_generation_mode_setting(monkeypatch):
    from typer.testing import CliRunner

    from effconv.pipelines import linearize as lin
    from effconv.cli import app
    from effconv.pipelines.hybridize import HybridizeConfig
    from effconv.pipelines.moe_upcycle import MoeUpcycleConfig

    for config_class in (LinearizeConfig, MoeUpcycleConfig):
        with pytest.raises(EffconvError, match="--generation-mode must be one of auto, static, continuous, graph, got 'fast'"):
            config_class(generation_mode="fast").validate()
        config_class(generation_mode="continuous").validate()
        # static, the mode of runs from before the setting existed, is left out so that they still resume; the default
        # auto may mean graph on a GPU, so it stays in
        assert "generation_mode" not in config_class(generation_mode="static").identity()
        assert config_class().identity()["generation_mode"] == "auto"
        assert config_class(generation_mode="continuous").identity()["generation_mode"] == "continuous"
    hybrid = HybridizeConfig(ratio=0.5, generation_mode="continuous")
    assert hybrid.linearize_config([0]).generation_mode == "continuous"
    # The CLI flag reaches the config and its check, for each command that generates teacher text.
    for command in (["linearize"], ["hybridize", "--ratio", "0.5"], ["moe-upcycle"]):
        result = CliRunner().invoke(app, [*command, "--generation-mode", "fast", "--out", "unused-out"])
        assert isinstance(result.exception, EffconvError), result.output
        assert "--generation-mode must be one of auto, static, continuous, graph" in str(result.exception)
    seen = {}
    from effconv.training import run as run_lib

    monkeypatch.setattr(run_lib, "prepare_data", lambda *args, **kwargs: seen.update(kwargs))
    for cfg in (LinearizeConfig(generation_mode="continuous"), MoeUpcycleConfig(generation_mode="continuous"), hybrid):
        seen.clear()
        run_lib.prepare_run_data(cfg, None, None)
        assert seen["generation_mode"] == "continuous"


def test_recipe_is_used_and_options_override(tiny_model_dir, tmp_path):
    from effconv.config import build_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("about: {device: cpu}\nwindow: 16\nfeature_map: t2r\nstage1_lr: 0.5\n")
    cfg = build_config(LinearizeConfig, recipe, {"window": 8, "feature_map": None})
    assert (cfg.window, cfg.feature_map, cfg.stage1_lr) == (8, "t2r", 0.5)
    recipe.write_text("windw: 16\n")
    with pytest.raises(EffconvError, match="unknown settings"):
        build_config(LinearizeConfig, recipe, {})
    recipe.write_text("window: sixteen\n")
    with pytest.raises(EffconvError, match="must be"):
        build_config(LinearizeConfig, recipe, {})


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parent.parent / "recipes").glob("*-linearize-*.yaml")))
def test_every_recipe_is_a_valid_linearize_config(recipe):
    from effconv.config import build_config

    cfg = build_config(LinearizeConfig, recipe, {})
    cfg.validate()
    assert cfg.out.startswith("out/")


def test_stage2_loss_weights(tiny_model_dir, tmp_path):
    """finetune_loss = ce_weight x next-token loss + kl_weight x KL(teacher || student): each term alone, and their
    sum; pure distillation (ce_weight 0) trains and exports; no loss at all is refused."""
    import torch.nn.functional as F

    from effconv.distill.lora import attach_lora
    from effconv.distill.losses import finetune_loss
    from effconv.io.sources import load_teacher

    cfg = tiny_cfg(tiny_model_dir, tmp_path / "unused", kl_weight=1.0, ce_weight=0.0)
    teacher, _, _ = load_teacher(str(tiny_model_dir), dtype=torch.float32, device="cpu")
    student = make_student(teacher, cfg, torch.device("cpu"))
    peft_model = attach_lora(student, range(len(student.model.layers)), rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                             seed=cfg.seed)
    batch = torch.randint(0, teacher.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = peft_model(input_ids=batch, use_cache=False).logits.float()
        with peft_model.disable_adapter():
            set_attention_mode(student.converted_attentions(), "teacher")
            teacher_logits = student(input_ids=batch, use_cache=False).logits.float()
            set_attention_mode(student.converted_attentions(), "student")
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        kl = F.kl_div(F.log_softmax(logits, -1).flatten(0, 1), F.log_softmax(teacher_logits, -1).flatten(0, 1),
                      log_target=True, reduction="batchmean")
        assert float(kl) > 1e-4  # the converted student differs from its teacher: the check can fail
        torch.testing.assert_close(finetune_loss(peft_model, student, batch, 0.0, 1.0), ce)
        torch.testing.assert_close(finetune_loss(peft_model, student, batch, 1.0, 0.0), kl)
        torch.testing.assert_close(finetune_loss(peft_model, student, batch, 0.5, 2.0), 2.0 * ce + 0.5 * kl)

    result = linearize(tiny_cfg(tiny_model_dir, tmp_path / "out", kl_weight=1.0, ce_weight=0.0))
    assert (tmp_path / "out" / "model.safetensors").is_file() and result.metrics["stage2"]["tokens"] == 32 * 4 * 4
    assert LinearizeConfig(ce_weight=0.5).identity()["ce_weight"] == 0.5 and "ce_weight" not in LinearizeConfig().identity()
    with pytest.raises(EffconvError, match="leave stage 2 without a loss"):
        linearize(tiny_cfg(tiny_model_dir, tmp_path / "none", ce_weight=0.0))
    with pytest.raises(EffconvError, match="--ce-weight must be >= 0"):
        linearize(tiny_cfg(tiny_model_dir, tmp_path / "neg", ce_weight=-1.0))


def test_long_context_settings_train_decay_on_teacher_conversations(tiny_model_dir, tmp_path):
    """The long-context recipe's settings end to end: teacher conversations (--generation-turns), blocks within
    documents, --decay trained by attention transfer (its logits move) and a chunked KL stage 2; the export
    loads with its decay and the training text really was multi-turn."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_cfg(tiny_model_dir, tmp_path / "out", data=None, generate_tokens=400, generation_turns=3, generation_new_tokens=24,
                   generation_batch_size=4, packing="documents", decay=True, decay_memory=16.0, stage1_lr=3e-2,
                   kl_weight=1.0, ce_weight=0.0)
    result = linearize(cfg)
    assert "3-turn teacher conversations" in result.metrics["data"] and "within documents" in result.metrics["data"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    logits = model.model.layers[0].self_attn.decay_logit.detach()
    initial = torch.log(16.0 * torch.logspace(-2, 2, logits.numel(), base=2.0) - 1)
    assert model.config.linear_decay and not torch.allclose(logits, initial, atol=1e-4)


def test_gate_trains_and_exports(tiny_model_dir, tmp_path):
    """--gate end to end: attention transfer moves the zero-initialised forget gates, the export loads with them
    (config.linear_gate) and its cached decoding equals its forward."""
    from transformers import AutoModelForCausalLM

    linearize(tiny_cfg(tiny_model_dir, tmp_path / "out", gate=True, decay_memory=16.0, stage1_lr=3e-2))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    attn = model.model.layers[0].self_attn
    assert model.config.linear_gate and attn.is_gated and attn.forget_gate.weight.abs().max() > 0
    assert_cached_decoding_equals_forward(model, torch.randint(0, 400, (1, 24)))


def assert_cached_decoding_equals_forward(model, ids, prefill: int = 16):
    """A prefill of `prefill` tokens, then one-token steps: the logits equal one forward over `ids`."""
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :prefill], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    return full


def test_sinks_train_and_export_and_are_refused_where_they_cannot_work(tiny_model_dir, tmp_path):
    """--sinks with the window hybrid: the export keeps them (config.linear_sinks, transformers loads it), its
    cached decoding equals its forward, and they change the model; --sinks without a window is one clear error."""
    from transformers import AutoModelForCausalLM

    linearize(tiny_cfg(tiny_model_dir, tmp_path / "out", sinks=2))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.linear_sinks == 2 and model.model.layers[0].self_attn.sinks == 2
    ids = torch.randint(0, 400, (1, 24))
    full = assert_cached_decoding_equals_forward(model, ids)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks = 0
        assert not torch.allclose(model(ids, use_cache=False).logits, full, atol=1e-3)
    for bad, message in ((dict(sinks=2, window=0), "--sinks needs --window >= 1"),
                         (dict(sinks=-1), "--sinks must be >= 0"),
                         (dict(sinks=2, attention="block_sparse"), "--sinks applies to")):
        with pytest.raises(EffconvError, match=message):
            linearize(tiny_cfg(tiny_model_dir, tmp_path / "bad", **bad))
        assert not (tmp_path / "bad").exists()


def test_separate_normaliser_trains_and_exports(tiny_model_dir, tmp_path):
    """--normalizer separate end to end: the export keeps it (config.linear_normalizer), loads with plain
    transformers, decodes like its forward; without a window there is nothing to normalise apart: refused."""
    from transformers import AutoModelForCausalLM

    linearize(tiny_cfg(tiny_model_dir, tmp_path / "out", normalizer="separate", sinks=2))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.linear_normalizer == "separate" and model.model.layers[0].self_attn.separate
    assert_cached_decoding_equals_forward(model, torch.randint(0, 400, (1, 24)))
    with pytest.raises(EffconvError, match="--normalizer separate needs"):
        linearize(tiny_cfg(tiny_model_dir, tmp_path / "w0", normalizer="separate", window=0))
    with pytest.raises(EffconvError, match="--normalizer must be"):
        linearize(tiny_cfg(tiny_model_dir, tmp_path / "bad", normalizer="both"))
