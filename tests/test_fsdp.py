"""FSDP (recipes/accelerate/fsdp-cpu.yaml: 2 CPU processes, gloo) and the multi-process hybridize / moe-upcycle:
each sharded or data-parallel 2-process run follows the 1-process run with the same global batch, a killed FSDP
run resumes to the unbroken result, the exports equal the 1-process ones, only one output directory is written,
and bad launches fail with one line."""

from __future__ import annotations

import json
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
from effconv.pipelines.hybridize import HybridizeConfig, hybridize
from effconv.pipelines.linearize import LinearizeConfig, linearize
from effconv.pipelines.moe_upcycle import MoeUpcycleConfig, moe_upcycle
from effconv.training import distributed
from effconv.training.loop import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
FSDP_CPU = REPO / "recipes" / "accelerate" / "fsdp-cpu.yaml"
DDP_CPU = REPO / "recipes" / "accelerate" / "ddp-cpu.yaml"


def _env() -> dict:
    pythonpath = os.pathsep.join([str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": ""}


def _launch_cmd(config: Path, *args) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
            *map(str, args)]


def _launch(config: Path, *args, timeout: int = 300):
    return subprocess.run(_launch_cmd(config, *args), capture_output=True, text=True, env=_env(), timeout=timeout)


def _flags(settings: dict) -> list[str]:
    return [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", v)]


def _api(settings: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}


def _assert_same_curves(a: dict, b: dict, rtol: float = 1e-5) -> None:
    assert len(a["train_losses"]) == len(b["train_losses"]) > 0
    assert a["tokens"] == b["tokens"]  # tokens count the global batch
    torch.testing.assert_close(torch.tensor(b["train_losses"]), torch.tensor(a["train_losses"]), rtol=rtol, atol=1e-7)
    assert [s for s, _ in a["val_losses"]] == [s for s, _ in b["val_losses"]]
    torch.testing.assert_close(torch.tensor([v for _, v in b["val_losses"]]),
                               torch.tensor([v for _, v in a["val_losses"]]), rtol=rtol, atol=1e-7)


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm())


def _assert_same_export(a: Path, b: Path, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert wb[key].dtype == wa[key].dtype and wb[key].shape == wa[key].shape, key
        torch.testing.assert_close(wb[key], wa[key], rtol=rtol, atol=atol, msg=key)


def _one_and_launched(root: Path, run_api, cfg_cls, command: str, settings: dict, config: Path,
                      launched: str = "two") -> subprocess.CompletedProcess:
    """The 1-process reference run in this process (root/one/out) and the same settings under accelerate launch
    (root/<launched>/out); returns the launch's result."""
    (root / "one").mkdir()
    run_api(cfg_cls(**_api(settings), out=str(root / "one" / "out"), keep_run=True, progress=False))
    (root / launched).mkdir()
    return _launch(config, "-m", "effconv.cli", command, *_flags(settings), "--out", root / launched / "out",
                   "--keep-run", "--no-progress")


def _only(parent: Path, *names: str) -> None:
    """Exactly these entries (one output directory, its run state; no temporary or duplicate directories)."""
    assert sorted(p.name for p in parent.iterdir()) == sorted(names)


# ---------------------------------------------------------------------------------------------------------------
# linearize under FSDP
# ---------------------------------------------------------------------------------------------------------------

STEPS1, STEPS2 = 12, 4


def _lin_settings(model_dir: Path) -> dict:
    # kl_weight: stage 2 also runs teacher-mode passes of the sharded student (the KL targets); the attention is
    # the default one (gated, 4 sinks)
    return dict(model=model_dir, data=model_dir / "train.txt", window=4, seq_len=32, batch_size=4,
                stage1_tokens=32 * 4 * STEPS1, stage2_tokens=32 * 4 * STEPS2, kl_weight=0.5, checkpoint_every=2,
                eval_every=4)


@pytest.fixture(scope="module")
def lin_runs(tiny_model_dir, tmp_path_factory):
    """The 1-process reference (in this process) and the unbroken 2-process FSDP run of the same settings."""
    root = tmp_path_factory.mktemp("fsdp-linearize")
    run = _one_and_launched(root, linearize, LinearizeConfig, "linearize", _lin_settings(tiny_model_dir), FSDP_CPU,
                            launched="fsdp")
    return root, run


def test_fsdp_two_processes_follow_one_process_and_export_the_same_model(lin_runs):
    root, run = lin_runs
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("teacher validation perplexity") == 1  # only the main process logs
    # the weights really are sharded: each process holds about half of the parameters
    line = next(x for x in run.stderr.splitlines() if x.startswith("FSDP:"))
    assert "sharded over 2 processes" in line
    local, full = (float(x) for x in line.split("per process ")[1].replace(" MiB", "").split(" of "))
    assert 0.45 * full < local < 0.55 * full, line
    for stage in ("stage1", "stage2"):
        one = load_checkpoint(root / "one" / ".out.effconv-run" / f"{stage}.pt")
        two = load_checkpoint(root / "fsdp" / ".out.effconv-run" / f"{stage}.pt")
        _assert_same_curves(one, two)  # measured: max relative difference ~1e-7
        assert one["trainable"].keys() == two["trainable"].keys()
        for key, value in one["trainable"].items():  # the checkpoint holds full (gathered) tensors
            assert two["trainable"][key].shape == value.shape, key
            # Adam turns float noise in a near-zero gradient into a step of up to the learning rate (2e-4 in
            # stage 2): measured, one element of 768 moved 4e-5 apart (a sink model's q_proj LoRA A, weights ~0.1),
            # and LoRA B (~4e-4, from zero) moved 1.6e-5 apart in norm; the tensor as a whole must agree to 1e-4 of
            # its norm (at least 1e-4 absolute)
            assert _diff(two["trainable"][key], value) <= 1e-4 * max(float(value.double().norm()), 1.0), key
            torch.testing.assert_close(two["trainable"][key], value, rtol=1e-4, atol=1e-4, msg=key)
        assert len(two["optimizer"]["state"]) == len(one["optimizer"]["state"])
        for idx, entry in one["optimizer"]["state"].items():
            for k, v in entry.items():
                assert two["optimizer"]["state"][idx][k].shape == v.shape, (idx, k)
    # the merged LoRA carries the noise above: measured up to 1.8e-6 on q_proj elements near zero
    _assert_same_export(root / "one" / "out", root / "fsdp" / "out", atol=5e-6)
    _only(root / "fsdp", "out", ".out.effconv-run")
    a = json.loads((root / "one" / "out" / "effconv.json").read_text())["metrics"]
    b = json.loads((root / "fsdp" / "out" / "effconv.json").read_text())["metrics"]
    for key in ("teacher_val_loss", "stage1_val_loss", "stage2_val_loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-5), key


def _workers(launcher_pid: int) -> list[int]:
    """The training processes: torchrun starts them in sessions of their own, as children of the launcher."""
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == launcher_pid:
                kids.append(int(d.name))
    return kids


def test_fsdp_run_killed_mid_stage_resumes_to_the_unbroken_result(lin_runs, tiny_model_dir):
    root, unbroken = lin_runs
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]
    out = root / "killed" / "out"
    out.parent.mkdir()
    args = ["-m", "effconv.cli", "linearize", *_flags(_lin_settings(tiny_model_dir)), "--out", out, "--keep-run",
            "--no-progress"]
    proc = subprocess.Popen(_launch_cmd(FSDP_CPU, *args), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = out.parent / ".out.effconv-run" / "stage1.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if ckpt.exists() and torch.load(ckpt, weights_only=True)["step"] >= 4:
                break
        except (RuntimeError, EOFError, OSError):
            pass  # being renamed into place
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed"
    workers = _workers(proc.pid)
    assert len(workers) == 2, workers
    for pid in workers:  # both training processes die at once, in the middle of stage 1
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not out.exists()
    killed_at = load_checkpoint(ckpt)["step"]
    assert 4 <= killed_at < STEPS1

    resumed = _launch(FSDP_CPU, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for stage in ("stage1", "stage2"):
        a = load_checkpoint(root / "fsdp" / ".out.effconv-run" / f"{stage}.pt")
        b = load_checkpoint(out.parent / ".out.effconv-run" / f"{stage}.pt")
        # same batches, same gathered optimizer state: identical up to float non-determinism (measured: bitwise)
        _assert_same_curves(a, b, rtol=1e-6)
        for key, value in a["trainable"].items():
            torch.testing.assert_close(b["trainable"][key], value, rtol=1e-6, atol=1e-7, msg=key)
    _assert_same_export(root / "fsdp" / "out", out, rtol=1e-6, atol=1e-7)
    _only(out.parent, "out", ".out.effconv-run")


CLIP_WORKER = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    from effconv.conversion.student import make_student
    from effconv.distill.lora import attach_lora
    from effconv.distill.losses import finetune_loss
    from effconv.distill.transfer import transfer_loss_fn
    from effconv.io.sources import load_teacher
    from effconv.pipelines.linearize import LinearizeConfig
    from effconv.training import distributed, fsdp
    from effconv.training.loop import StageSpec, run_stage, trainable_state

    model_dir, out = sys.argv[1], Path(sys.argv[2])
    norms = []
    clip = fsdp.clip_grad_norm_

    def recording_clip(params, max_norm):  # the norm each step is clipped by
        total = clip(params, max_norm)
        norms.append(float(total))
        return total

    fsdp.clip_grad_norm_ = recording_clip
    torch.manual_seed(0)
    teacher, _, _ = load_teacher(model_dir, dtype=torch.float32, device=torch.device("cpu"))
    cfg = LinearizeConfig(window=4, seq_len=32, batch_size=4)
    student = make_student(teacher, cfg, torch.device("cpu"))
    if distributed.fsdp_requested():
        fsdp.shard(student, torch.device("cpu"))
    data = torch.randint(3, 400, (64, 32), generator=torch.Generator().manual_seed(1))
    batch = lambda step: data[(step * 4) % 64 : (step * 4) % 64 + 4]
    loss_fn, backward = transfer_loss_fn(student, 2)
    # thresholds far below the gradient norms: every step is clipped
    r1 = run_stage(student, StageSpec("s1", 5, 3e-2, grad_clip=1e-4), loss_fn=loss_fn, next_batch=batch,
                   evaluate=None, checkpoint_path=None, progress=False, backward=backward)
    peft = attach_lora(student, range(len(student.model.layers)), rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                       seed=cfg.seed)  # LoRA adapters: plain (unsharded) parameters
    for name, p in peft.named_parameters():
        if "feature_map_" in name:  # and sharded ones in the same optimizer: the norm must cover both
            p.requires_grad_(True)
    r2 = run_stage(peft, StageSpec("s2", 3, 1e-3, grad_clip=1e-3), loss_fn=lambda b: (finetune_loss(peft, student, b, 0.0), {}),
                   next_batch=batch, evaluate=None, checkpoint_path=None, progress=False)
    state = trainable_state(peft)
    if distributed.is_main_process():
        torch.save({"losses": r1.train_losses + r2.train_losses, "norms": norms, "state": state}, out)
    distributed.shutdown()
    """
)


def test_fsdp_clips_by_the_global_gradient_norm(tiny_model_dir, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(CLIP_WORKER)
    one = subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(tmp_path / "one.pt")],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launch(FSDP_CPU, script, tiny_model_dir, tmp_path / "two.pt")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "sharded over 2 processes" in two.stderr
    a, b = torch.load(tmp_path / "one.pt", weights_only=True), torch.load(tmp_path / "two.pt", weights_only=True)
    assert len(a["norms"]) == len(b["norms"]) == 8
    assert min(a["norms"][:5]) > 1e-4 and min(a["norms"][5:]) > 1e-3  # clipping was active at every step
    # the sharded run clips by the norm of the whole gradient (sharded parts summed over processes + LoRA once)
    torch.testing.assert_close(torch.tensor(b["norms"]), torch.tensor(a["norms"]), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(b["losses"]), torch.tensor(a["losses"]), rtol=1e-5, atol=1e-7)
    assert a["state"].keys() == b["state"].keys()
    for key, value in a["state"].items():
        torch.testing.assert_close(b["state"][key], value, rtol=1e-4, atol=1e-6, msg=key)


# ---------------------------------------------------------------------------------------------------------------
# hybridize and moe-upcycle under 2 processes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [DDP_CPU, FSDP_CPU], ids=["ddp", "fsdp"])
def test_hybridize_under_two_processes_follows_one_process(tiny_model_dir, tmp_path, config):
    settings = dict(model=tiny_model_dir, data=tiny_model_dir / "train.txt", ratio=0.34, window=4, seq_len=32,
                    batch_size=4, score_tokens=32 * 4 * 4, stage1_tokens=32 * 4 * 4, stage2_tokens=32 * 4 * 2,
                    checkpoint_every=2, eval_every=4)
    two = _one_and_launched(tmp_path, hybridize, HybridizeConfig, "hybridize", settings, config)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count("keeping softmax attention in layers") == 1
    # FSDP: the scoring student and the linearize student are both sharded
    assert two.stderr.count("sharded over 2 processes") == (2 if config == FSDP_CPU else 0)
    sa = json.loads((tmp_path / "one" / "out" / "scores.json").read_text())
    sb = json.loads((tmp_path / "two" / "out" / "scores.json").read_text())
    assert sb["softmax_layers"] == sa["softmax_layers"] and sb["score_tokens"] == sa["score_tokens"] > 0
    torch.testing.assert_close(torch.tensor([x["transfer_mse"] for x in sb["layers"]]),
                               torch.tensor([x["transfer_mse"] for x in sa["layers"]]), rtol=1e-5, atol=0)
    for stage in ("stage1", "stage2"):
        _assert_same_curves(load_checkpoint(tmp_path / "one" / ".out.effconv-run" / f"{stage}.pt"),
                            load_checkpoint(tmp_path / "two" / ".out.effconv-run" / f"{stage}.pt"))
    _assert_same_export(tmp_path / "one" / "out", tmp_path / "two" / "out")
    _only(tmp_path / "two", "out", ".out.effconv-run", ".out.effconv-hybridize")


def test_moe_upcycle_under_fsdp_follows_one_process(tiny_model_dir, tmp_path):
    # --train experts: the trained experts and routers are sharded; aux load balancing over the global batch
    settings = dict(model=tiny_model_dir, data=tiny_model_dir / "train.txt", experts=4, top_k=2, shared=0,
                    router_weights="renormalised", train="experts",
                    load_balancing="aux", calibration_tokens=512, seq_len=32, batch_size=4, tokens=32 * 4 * 8,
                    checkpoint_every=2, eval_every=4)
    two = _one_and_launched(tmp_path, moe_upcycle, MoeUpcycleConfig, "moe-upcycle", settings, FSDP_CPU)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count("sharded over 2 processes") == 2  # the dense teacher and the MoE student
    assert two.stderr.count("after distillation") == 1
    a = load_checkpoint(tmp_path / "one" / ".out.effconv-run" / "distill.pt")
    b = load_checkpoint(tmp_path / "two" / ".out.effconv-run" / "distill.pt")
    _assert_same_curves(a, b)  # measured: max relative difference ~2e-7
    assert any(".experts." in k for k in b["trainable"])
    # Adam turns the two reductions' rounding differences into up to 2e-5 on a few expert weights whose gradients
    # are near zero (measured with transformers 5.24 / torch 2.13; 4e-7 before): loss curves match to 1e-5 above
    _assert_same_export(tmp_path / "one" / "out", tmp_path / "two" / "out", atol=5e-5)
    ja = json.loads((tmp_path / "one" / "out" / "effconv.json").read_text())
    jb = json.loads((tmp_path / "two" / "out" / "effconv.json").read_text())
    assert ja["export_format"] == jb["export_format"] == "mixtral"
    _only(tmp_path / "two", "out", ".out.effconv-run")


# ---------------------------------------------------------------------------------------------------------------
# bad launches
# ---------------------------------------------------------------------------------------------------------------


def test_batch_not_divisible_by_the_processes_is_one_error_line(tiny_model_dir, tmp_path):
    settings = _lin_settings(tiny_model_dir)
    settings["batch_size"] = 3
    r = _launch(FSDP_CPU, "-m", "effconv.cli", "linearize", *_flags(settings), "--out", tmp_path / "out", timeout=180)
    assert r.returncode != 0
    errors = [x for x in r.stderr.splitlines() if x.startswith("effconv: error:")]
    assert errors == ["effconv: error: --batch-size 3 (the global batch) must be divisible by the 2 processes; set it "
                      "to a multiple of 2"], r.stderr[-2000:]
    # no traceback from effconv's processes (the launcher prints its own for the failed child)
    assert not [x for x in r.stderr.splitlines() if x.strip().startswith("File ") and "effconv" in x], r.stderr[-2000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.effconv-run").exists()


@pytest.mark.parametrize(
    "env,change,message",
    [
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, dict(layers_per_block=1), "runs in one process"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, {}, "set fsdp_version: 2"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, {}, "fsdp_offload_params"),
        ({}, dict(batch_size=5), "must be divisible by the 2 processes"),
    ],
)
def test_launch_settings_are_checked_before_any_work(tiny_model_dir, tmp_path, monkeypatch, env, change, message):
    # as the launcher sets them for 2 processes; the checks run before any process group exists
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = {**_lin_settings(tiny_model_dir), **change}
    with pytest.raises(EffconvError, match=message):
        linearize(LinearizeConfig(**_api(settings), out=str(tmp_path / "out"), progress=False))
    assert not list(tmp_path.iterdir())
