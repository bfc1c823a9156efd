"""Block-wise attention transfer (linearize --layers-per-block K): the same trained weights and loss curves as
full-model stage 1, per-block resume after a crash (also while a boundary is being written), bad K."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from effconv.distill import blockwise
from effconv.errors import EffconvError
from effconv.pipelines.linearize import LinearizeConfig, linearize

TINY = dict(seq_len=32, batch_size=4, eval_every=4, checkpoint_every=2, progress=False, window=4,
            stage1_tokens=32 * 4 * 12, stage2_tokens=0)


def cfg_for(model_dir, out, **kw) -> LinearizeConfig:
    return LinearizeConfig(**{**TINY, "model": str(model_dir), "data": str(model_dir / "train.txt"), "out": str(out), **kw})


def trained_weights(out) -> dict[str, torch.Tensor]:
    """The parameters stage 1 trains: feature maps, window mixes and (gqa) the merged K/V projections."""
    state = load_file(str(out / "model.safetensors"))
    return {n: t for n, t in state.items() if "feature_map" in n or "window_mix" in n or "k_proj" in n or "v_proj" in n}


def assert_same_run(a, b, out_a, out_b, rtol=1e-5):
    wa, wb = trained_weights(out_a), trained_weights(out_b)
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=rtol, atol=1e-6, msg=name)
    sa, sb = a.metrics["stage1"], b.metrics["stage1"]
    assert sa["steps"] == sb["steps"] and sa["tokens"] == sb["tokens"]
    assert sa["final_train_mse"] == pytest.approx(sb["final_train_mse"], rel=rtol)
    assert [s for s, _ in sa["val_mse"]] == [s for s, _ in sb["val_mse"]]
    assert [v for _, v in sa["val_mse"]] == pytest.approx([v for _, v in sb["val_mse"]], rel=rtol)
    for key in ("teacher_val_loss", "stage1_val_loss"):
        assert a.metrics[key] == pytest.approx(b.metrics[key], rel=rtol)


@pytest.mark.parametrize(
    "k,extra",
    [(1, {}), (2, {"layers": [0, 2]}), (1, {"layers": [0, 2]}), (2, {"attention": "gqa", "kv_heads": 1}), (3, {})],
    ids=["k1-all", "k2-layers02", "k1-layers02-unconverted-block", "k2-gqa", "k3-one-block"],
)
def test_blockwise_matches_full_model_stage1(tiny_model_dir, tmp_path, k, extra):
    full = linearize(cfg_for(tiny_model_dir, tmp_path / "full", **extra))
    block = linearize(cfg_for(tiny_model_dir, tmp_path / "block", layers_per_block=k, **extra))
    assert_same_run(full, block, tmp_path / "full", tmp_path / "block")
    info = block.metrics["stage1_blockwise"]
    assert [b["layers"] for b in info["blocks"]] == blockwise.plan_blocks(max(extra.get("layers", [2])), k)
    if extra.get("layers") == [0, 2] and k == 1:
        assert [b["trained"] for b in info["blocks"]] == [True, False, True]  # layer 1 keeps softmax: forward only
    assert not list(tmp_path.glob(".block.*")), "run directory (and its boundary files) left behind"


def test_gradient_clipping_is_per_block(tiny_model_dir, tmp_path, monkeypatch):
    """With a clip threshold every step exceeds, one block (K = all layers) still equals full-model mode, while
    K = 1 clips each layer by its own norm: the documented (only) difference."""
    import effconv.pipelines.linearize as lin

    real_spec = lin.StageSpec
    monkeypatch.setattr(lin, "StageSpec", lambda *a, **kw: real_spec(*a, **{**kw, "grad_clip": 1e-4}))
    full = linearize(cfg_for(tiny_model_dir, tmp_path / "full"))
    one_block = linearize(cfg_for(tiny_model_dir, tmp_path / "k3", layers_per_block=3))
    assert_same_run(full, one_block, tmp_path / "full", tmp_path / "k3")
    per_layer = linearize(cfg_for(tiny_model_dir, tmp_path / "k1", layers_per_block=1))
    wf, w1 = trained_weights(tmp_path / "full"), trained_weights(tmp_path / "k1")
    assert max((wf[n] - w1[n]).abs().max().item() for n in wf) > 1e-4
    assert per_layer.metrics["stage1"]["steps"] == full.metrics["stage1"]["steps"]


class Crash(Exception):
    pass


def test_resume_per_block_matches_unbroken_run(tiny_model_dir, tmp_path, monkeypatch):
    unbroken = linearize(cfg_for(tiny_model_dir, tmp_path / "ref", layers_per_block=1))

    real_run_stage = blockwise.run_stage
    trained_steps: list[tuple[str, int]] = []

    def crash_in_second_block(model, spec, **kw):
        result = real_run_stage(model, spec, stop_after_steps=5 if "block 2/" in spec.name else None, **kw)
        trained_steps.append((spec.name, result.steps))
        if "block 2/" in spec.name:
            raise Crash("killed in the middle of block 2")
        return result

    monkeypatch.setattr(blockwise, "run_stage", crash_in_second_block)
    cfg = cfg_for(tiny_model_dir, tmp_path / "out", layers_per_block=1)
    with pytest.raises(Crash):
        linearize(cfg)
    run_dir = tmp_path / ".out.effconv-run"
    assert (run_dir / "stage1-block000.pt").is_file() and (run_dir / "stage1-block001.pt").is_file()
    assert torch.load(run_dir / "stage1-block001.pt", weights_only=True)["step"] == 4  # last checkpoint before the crash
    assert not (run_dir / "blockwise" / "boundary-000").exists()  # deleted once boundary 1 was whole
    assert (run_dir / "blockwise" / "boundary-001" / "complete").is_file()

    monkeypatch.setattr(blockwise, "run_stage", real_run_stage)
    loaded: list[str] = []
    real_load = blockwise.load_checkpoint
    monkeypatch.setattr(blockwise, "load_checkpoint", lambda path: loaded.append(path.name) or real_load(path))
    resumed = linearize(dataclasses.replace(cfg, resume=True))
    assert loaded == ["stage1-block000.pt", "stage1-block001.pt"]  # block 1 from its final checkpoint, block 2 mid-way
    assert_same_run(unbroken, resumed, tmp_path / "ref", tmp_path / "out")
    assert resumed.metrics["stage1"]["steps"] == 12


def test_crash_while_writing_a_boundary_rebuilds_it(tiny_model_dir, tmp_path, monkeypatch):
    unbroken = linearize(cfg_for(tiny_model_dir, tmp_path / "ref", layers_per_block=1))
    real_write = blockwise.BoundaryStore.write_step

    def crash_on_boundary_2(self, j, step, hidden):
        if j == 2 and step == 5:
            raise Crash("killed while writing boundary 2")
        real_write(self, j, step, hidden)

    monkeypatch.setattr(blockwise.BoundaryStore, "write_step", crash_on_boundary_2)
    cfg = cfg_for(tiny_model_dir, tmp_path / "out", layers_per_block=1)
    with pytest.raises(Crash):
        linearize(cfg)
    boundaries = tmp_path / ".out.effconv-run" / "blockwise"
    assert not (boundaries / "boundary-002" / "complete").exists()
    assert (boundaries / "boundary-001" / "complete").is_file()  # kept until boundary 2 is whole
    monkeypatch.setattr(blockwise.BoundaryStore, "write_step", real_write)
    resumed = linearize(dataclasses.replace(cfg, resume=True))
    assert_same_run(unbroken, resumed, tmp_path / "ref", tmp_path / "out")


def test_bad_layers_per_block(tiny_model_dir, tmp_path):
    with pytest.raises(EffconvError, match="--layers-per-block must be >= 1"):
        linearize(cfg_for(tiny_model_dir, tmp_path / "a", layers_per_block=0))
    with pytest.raises(EffconvError, match="--layers-per-block 4 is more than the model's 3 layers"):
        linearize(cfg_for(tiny_model_dir, tmp_path / "b", layers_per_block=4))
    proc = subprocess.run(
        [sys.executable, "-m", "effconv.cli", "linearize", "--model", str(tiny_model_dir), "--out", str(tmp_path / "c"),
         "--data", str(tiny_model_dir / "train.txt"), "--layers-per-block", "0", "--no-progress"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["effconv: error: --layers-per-block must be >= 1, got 0"]
    assert not (tmp_path / "c").exists()


def test_blockwise_stage1_then_lora_matches_full_model(tiny_model_dir, tmp_path):
    """Stage 2 runs on the whole model after a block-wise stage 1 and ends where full-model mode ends."""
    full = linearize(cfg_for(tiny_model_dir, tmp_path / "full", stage2_tokens=32 * 4 * 3))
    block = linearize(cfg_for(tiny_model_dir, tmp_path / "block", stage2_tokens=32 * 4 * 3, layers_per_block=2))
    assert_same_run(full, block, tmp_path / "full", tmp_path / "block")
    assert block.metrics["stage2_val_loss"] == pytest.approx(full.metrics["stage2_val_loss"], rel=1e-5)
    wf, wb = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "block" / "model.safetensors"))
    for name in wf:  # LoRA merged into q/k/v/o: every weight agrees
        torch.testing.assert_close(wf[name], wb[name], rtol=1e-5, atol=1e-6, msg=name)
