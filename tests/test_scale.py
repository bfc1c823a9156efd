"""Scale-out and faults: 2 CPU processes (gloo) under `accelerate launch` follow the 1-process run with the same
global batch, a 2-process run resumes from its checkpoint, NaN stops cleanly, a full disk leaves no export."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from effconv.errors import EffconvError
from effconv.pipelines.linearize import LinearizeConfig, linearize
from effconv.training.loop import StageSpec, load_checkpoint, run_stage

REPO = Path(__file__).resolve().parents[1]
CPU_CONFIG = REPO / "recipes" / "accelerate" / "ddp-cpu.yaml"


def _env() -> dict:
    pythonpath = os.pathsep.join([str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": ""}


def _launch(*args, processes: int = 2, timeout: int = 120):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG),
           "--num_processes", str(processes), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)


def test_two_processes_follow_one_process_with_the_same_global_batch(tiny_model_dir, tmp_path):
    settings = dict(model=tiny_model_dir, data=tiny_model_dir / "train.txt", window=4, seq_len=32, batch_size=4,
                    stage1_tokens=32 * 4 * 8, stage2_tokens=32 * 4 * 4, checkpoint_every=2, eval_every=4)
    linearize(LinearizeConfig(**{k: str(v) if isinstance(v, Path) else v for k, v in settings.items()},
                              out=str(tmp_path / "one"), keep_run=True, progress=False))
    flags = [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", v)]
    two = _launch("-m", "effconv.cli", "linearize", *flags, "--out", tmp_path / "two", "--keep-run", "--no-progress")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count("teacher validation perplexity") == 1  # only the main process logs
    for stage in ("stage1", "stage2"):
        one_ckpt = load_checkpoint(tmp_path / ".one.effconv-run" / f"{stage}.pt")
        two_ckpt = load_checkpoint(tmp_path / ".two.effconv-run" / f"{stage}.pt")
        assert len(one_ckpt["train_losses"]) == len(two_ckpt["train_losses"]) > 0
        assert two_ckpt["tokens"] == one_ckpt["tokens"]  # tokens count the global batch
        # same global batch, averaged gradients: equal up to float summation order
        torch.testing.assert_close(torch.tensor(two_ckpt["train_losses"]), torch.tensor(one_ckpt["train_losses"]),
                                   rtol=1e-5, atol=1e-7)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)


WORKER = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    from effconv.training import distributed
    from effconv.training.loop import StageSpec, load_checkpoint, run_stage

    out, steps, stop = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    data = torch.randn(64, 9, generator=torch.Generator().manual_seed(1))
    next_batch = lambda step: data[(step * 8) % 64 : (step * 8) % 64 + 8]  # global batch of 8 rows
    loss_fn = lambda b: (torch.nn.functional.mse_loss(model(b[:, :8]).squeeze(-1), b[:, 8]), {})
    spec = StageSpec("toy", steps, 3e-2, checkpoint_every=2)
    ckpt = out / "toy.pt"
    run_stage(model, spec, loss_fn=loss_fn, next_batch=next_batch, evaluate=None, checkpoint_path=ckpt,
              progress=False, stop_after_steps=stop)  # "crash" after `stop` steps
    resumed = run_stage(model, spec, loss_fn=loss_fn, next_batch=next_batch, evaluate=None, checkpoint_path=ckpt,
                        resume_state=load_checkpoint(ckpt), progress=False)
    acc = distributed.get_accelerator()
    world = acc.num_processes if acc else 1
    (out / f"rank{acc.process_index if acc else 0}.json").write_text(json.dumps(
        {"world": world, "losses": resumed.train_losses, "weight": model[0].weight.sum().item()}))
    """
)


def test_two_process_run_resumes_from_its_checkpoint(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    result = _launch(script, tmp_path, 8, 5)  # 5 steps, last checkpoint at 4: step 4 is redone after resume
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2 and ranks[0] == ranks[1]  # both processes hold the same model

    # the 1-process, uninterrupted reference with the same global batch, in this process
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    data = torch.randn(64, 9, generator=torch.Generator().manual_seed(1))
    reference = run_stage(
        model, StageSpec("toy", 8, 3e-2, checkpoint_every=2),
        loss_fn=lambda b: (torch.nn.functional.mse_loss(model(b[:, :8]).squeeze(-1), b[:, 8]), {}),
        next_batch=lambda step: data[(step * 8) % 64 : (step * 8) % 64 + 8], evaluate=None,
        checkpoint_path=None, progress=False)
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(reference.train_losses),
                               rtol=1e-5, atol=1e-7)
    assert ranks[0]["weight"] == pytest.approx(model[0].weight.sum().item(), rel=1e-5, abs=1e-6)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    ckpt = tmp_path / "stage.pt"
    poison_at = 5

    def loss_fn(batch):
        loss = model(batch).pow(2).mean()
        return (loss * float("nan") if batch[0, 0].item() == poison_at else loss), {}

    def next_batch(step):
        return torch.full((2, 4), float(step))

    with pytest.raises(EffconvError, match=r"loss became nan at step 5; the last good checkpoint is kept"):
        run_stage(model, StageSpec("toy", 10, 1e-3, checkpoint_every=2), loss_fn=loss_fn, next_batch=next_batch,
                  evaluate=None, checkpoint_path=ckpt, progress=False)
    state = load_checkpoint(ckpt)
    assert state["step"] == 4 and len(state["train_losses"]) == 4
    assert all(torch.isfinite(v).all() for v in state["trainable"].values())
    assert not list(tmp_path.glob("*.tmp"))


def test_full_disk_during_export_leaves_no_output(tiny_model_dir, tmp_path, monkeypatch):
    from safetensors import torch as st_torch

    written = []

    def disk_full(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 64)  # a partial shard, as a full disk leaves it
        written.append(Path(filename))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(st_torch, "save_file", disk_full)
    import transformers.modeling_utils as mu

    if hasattr(mu, "safe_save_file"):
        monkeypatch.setattr(mu, "safe_save_file", disk_full)
    cfg = LinearizeConfig(model=str(tiny_model_dir), data=str(tiny_model_dir / "train.txt"), out=str(tmp_path / "out"),
                          window=4, seq_len=32, batch_size=4, stage1_tokens=32 * 4 * 2, stage2_tokens=0,
                          progress=False)
    with pytest.raises(EffconvError, match="could not write the model"):
        linearize(cfg)
    assert written, "the export never reached the weights"
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")], "partial export left behind"
    assert not any(p.exists() for p in written)


KILLED_WORKER = textwrap.dedent(
    """
    import os, signal, sys, torch
    from pathlib import Path
    from effconv.training.loop import StageSpec, load_checkpoint, run_stage

    ckpt, kill_at = Path(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    data = torch.randn(64, 9, generator=torch.Generator().manual_seed(1))
    calls = [0]

    def loss_fn(b):
        calls[0] += 1
        if calls[0] == kill_at + 1:  # in the middle of step `kill_at` (0-based): kill -9 ourselves
            Path(str(ckpt) + ".steps_done").write_text(str(kill_at))
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.nn.functional.mse_loss(model(b[:, :8]).squeeze(-1), b[:, 8]), {}

    resume = load_checkpoint(ckpt) if ckpt.exists() else None
    result = run_stage(model, StageSpec("toy", 20, 3e-2, checkpoint_every=CHECKPOINT_EVERY), loss_fn=loss_fn,
                       next_batch=lambda step: data[(step * 8) % 64 : (step * 8) % 64 + 8], evaluate=None,
                       checkpoint_path=ckpt, resume_state=resume, progress=False)
    torch.save({"losses": torch.tensor(result.train_losses), "weight": model[0].weight}, str(ckpt) + ".final")
    """
)


def test_sigkill_at_a_random_step_loses_at_most_one_checkpoint_interval(tmp_path):
    import random

    every = 3
    kill_at = random.Random().randint(1, 19)  # a different step on every run; reported on failure
    script = tmp_path / "worker.py"
    script.write_text(KILLED_WORKER.replace("CHECKPOINT_EVERY", str(every)))
    ckpt = tmp_path / "toy.pt"
    env = _env()
    killed = subprocess.run([sys.executable, str(script), str(ckpt), str(kill_at)], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, f"kill_at={kill_at}: {killed.stderr[-2000:]}"
    steps_done = int(Path(str(ckpt) + ".steps_done").read_text())
    saved = load_checkpoint(ckpt)["step"] if ckpt.exists() else 0
    assert steps_done - every < saved <= steps_done, (kill_at, saved)  # lost less than one checkpoint interval
    resumed = subprocess.run([sys.executable, str(script), str(ckpt), '1000000'], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    unbroken_ckpt = tmp_path / "unbroken.pt"
    unbroken = subprocess.run([sys.executable, str(script), str(unbroken_ckpt), '1000000'], env=env, capture_output=True, text=True)
    assert unbroken.returncode == 0, unbroken.stderr[-2000:]
    a = torch.load(str(unbroken_ckpt) + ".final", weights_only=True)
    b = torch.load(str(ckpt) + ".final", weights_only=True)
    torch.testing.assert_close(b["losses"], a["losses"], msg=f"kill_at={kill_at}")
    torch.testing.assert_close(b["weight"], a["weight"], msg=f"kill_at={kill_at}")
