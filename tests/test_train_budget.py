"""Wall-clock budgets of training stages (StageSpec.max_seconds): the step count is re-projected from the
measured time per step, the LR schedule ends at the new total, resume keeps the planned total, and the budget
fields of linearize / hybridize / moe-upcycle are validated and reach the stages."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from effconv.training import loop as train
from effconv.errors import EffconvError
from effconv.training.loop import StageSpec, load_checkpoint, run_stage

LR = 1e-2


class FakeClock:
    """train._now for a test: time moves only when a step (next_batch) says so."""

    def __init__(self, step_seconds):
        self.t = 0.0
        self.step_seconds = step_seconds  # step index -> seconds that step "takes"

    def __call__(self) -> float:
        return self.t


def _toy(clock: FakeClock):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    data = torch.randn(64, 9, generator=torch.Generator().manual_seed(1))

    def next_batch(step: int) -> torch.Tensor:
        clock.t += clock.step_seconds(step)
        return data[(step * 8) % 64 : (step * 8) % 64 + 8]

    def loss_fn(b):
        return torch.nn.functional.mse_loss(model(b[:, :8]).squeeze(-1), b[:, 8]), {}

    return model, next_batch, loss_fn


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that records the learning rate of every step (run_stage builds its optimizer itself)."""

    lrs: list[float] = []

    def step(self, closure=None):
        RecordingAdamW.lrs.append(self.param_groups[0]["lr"])
        return super().step(closure)


def _run(monkeypatch, tmp_path, spec, step_seconds=lambda step: 1.0, clock=None, **kw):
    clock = clock or FakeClock(step_seconds)
    monkeypatch.setattr(train, "_now", clock)
    RecordingAdamW.lrs = []
    monkeypatch.setattr(train.torch.optim, "AdamW", RecordingAdamW)
    model, next_batch, loss_fn = _toy(clock)
    kw.setdefault("checkpoint_path", tmp_path / "stage.pt")
    result = run_stage(model, spec, loss_fn=loss_fn, next_batch=next_batch, evaluate=lambda: 0.5, progress=False,
                       **kw)
    return result, list(RecordingAdamW.lrs), clock


def test_project_steps_rule():
    # done + floor(remaining / step time), at least one more step, never more than requested
    assert train.project_steps(100, 5, 10.0, 5.0, 1.0) == 10
    assert train.project_steps(100, 5, 10.0, 5.0, 0.4) == 17  # 5 + floor(12.5)
    assert train.project_steps(100, 5, 1e6, 5.0, 1.0) == 100
    assert train.project_steps(100, 30, 10.0, 50.0, 1.0) == 31  # over budget already: one more step


def test_budget_cuts_the_stage_and_the_lr_decays_at_the_new_end(monkeypatch, tmp_path):
    spec = StageSpec("toy", 100, LR, max_seconds=10, eval_every=1000, checkpoint_every=1000)
    result, lrs, clock = _run(monkeypatch, tmp_path, spec)
    # after 5 steps (5 s, 1 s each): 5 + floor((10 - 5) / 1) = 10 steps in all
    assert result.steps == len(result.train_losses) == 10 == len(lrs)
    assert result.planned_steps == 100 and result.cut_by_time
    assert result.wall_seconds == pytest.approx(10.0) and clock.t == pytest.approx(10.0)
    assert result.val_losses == [(10, 0.5)]  # the final eval happens at the new end
    state = load_checkpoint(tmp_path / "stage.pt")  # ... and so does the final checkpoint
    assert state["step"] == 10 and state["planned_steps"] == 10
    # the schedule reached its floor (0.1 x lr) at step 10, the new end; the last step ran on the cosine's tail
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.1 * LR, rel=1e-9)
    assert lrs[-1] == pytest.approx(LR * train._lr_lambda(StageSpec("ref", 10, LR))(9), rel=1e-9)
    assert lrs[-1] < 0.13 * LR  # with the schedule of 100 steps it would still be ~0.98 x lr
    assert lrs[:5] == pytest.approx([LR * train._lr_lambda(spec)(s) for s in range(5)])  # planned over 100 before


def test_budget_is_re_projected_every_25_steps(monkeypatch, tmp_path):
    # a slow first step (warm-up, compilation) makes the first projection pessimistic; the next one, 25 steps
    # later, sees the real pace and plans more steps again (never more than requested)
    spec = StageSpec("toy", 100, LR, max_seconds=60, eval_every=1000, checkpoint_every=1000)
    result, lrs, clock = _run(monkeypatch, tmp_path, spec, step_seconds=lambda step: 4.0 if step == 0 else 1.0)
    # at 5 steps: 8 s, 1.6 s/step -> 5 + floor(52 / 1.6) = 37; at 30 steps: 33 s, 1 s/step -> 30 + 27 = 57
    assert result.steps == 57 and result.cut_by_time and clock.t == pytest.approx(60.0)
    assert load_checkpoint(tmp_path / "stage.pt")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.1 * LR)


def _reference_losses(steps: int) -> list[float]:
    """The loop run_stage ran before time budgets existed (AdamW, warm-up + cosine over `steps`, clipping)."""
    clock = FakeClock(lambda step: 1.0)
    model, next_batch, loss_fn = _toy(clock)
    spec = StageSpec("ref", steps, LR)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, train._lr_lambda(spec))
    losses = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss, _ = loss_fn(next_batch(step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def test_no_budget_and_an_ample_budget_change_nothing(monkeypatch, tmp_path):
    reference = _reference_losses(40)
    plain, _, _ = _run(monkeypatch, tmp_path, StageSpec("toy", 40, LR), checkpoint_path=None)
    ample, lrs, clock = _run(monkeypatch, tmp_path, StageSpec("toy", 40, LR, max_seconds=1000), checkpoint_path=None)
    torch.testing.assert_close(torch.tensor(plain.train_losses), torch.tensor(reference), rtol=1e-6, atol=1e-7)
    assert ample.train_losses == plain.train_losses  # projections (at 5 and 30 steps) kept all 40 steps
    assert plain.steps == ample.steps == plain.planned_steps == ample.planned_steps == 40
    assert not plain.cut_by_time and not ample.cut_by_time
    # a budget met exactly does not cut either: 40 steps of 1 s in 40 s
    exact, _, _ = _run(monkeypatch, tmp_path, StageSpec("toy", 40, LR, max_seconds=40), checkpoint_path=None)
    assert exact.steps == 40 and not exact.cut_by_time


def test_resume_of_a_cut_stage_continues_to_the_same_planned_total(monkeypatch, tmp_path):
    spec = StageSpec("toy", 100, LR, max_seconds=10, eval_every=4, checkpoint_every=2)
    full, full_lrs, _ = _run(monkeypatch, tmp_path / "full", spec, checkpoint_path=tmp_path / "full.pt")
    assert full.steps == 10
    ckpt = tmp_path / "part.pt"
    _, _, clock = _run(monkeypatch, tmp_path, spec, checkpoint_path=ckpt, stop_after_steps=7)  # "dies" after 7
    state = load_checkpoint(ckpt)
    assert state["step"] == 6 and state["planned_steps"] == 10 and state["wall_seconds"] == pytest.approx(6.0)
    for resume_spec in (spec, StageSpec("toy", 100, LR, eval_every=4, checkpoint_every=2)):  # budget or none
        resumed, lrs, _ = _run(monkeypatch, tmp_path, resume_spec, checkpoint_path=ckpt, clock=clock,
                               resume_state=load_checkpoint(ckpt))
        assert resumed.steps == 10 and resumed.planned_steps == 100 and resumed.cut_by_time
        assert resumed.train_losses == full.train_losses and resumed.val_losses == full.val_losses
        assert lrs == full_lrs[6:]
        assert load_checkpoint(ckpt)["step"] == 10
        torch.save(state, ckpt)  # back to the step-6 checkpoint for the next resume


def test_a_resumed_stage_counts_the_time_of_its_checkpoint(monkeypatch, tmp_path):
    # a checkpoint made before the cut (planned 100, 4 s used): the resumed run re-projects with those 4 s counted
    spec = StageSpec("toy", 100, LR, eval_every=1000, checkpoint_every=2)
    ckpt = tmp_path / "stage.pt"
    _, _, clock = _run(monkeypatch, tmp_path, spec, checkpoint_path=ckpt, stop_after_steps=4)
    assert load_checkpoint(ckpt)["planned_steps"] == 100
    budget = StageSpec("toy", 100, LR, max_seconds=20, eval_every=1000, checkpoint_every=2)
    resumed, _, _ = _run(monkeypatch, tmp_path, budget, checkpoint_path=ckpt, clock=FakeClock(lambda step: 1.0),
                         resume_state=load_checkpoint(ckpt))
    # 5 steps after resume: done 9, elapsed 4 + 5 = 9 s -> 9 + floor(11 / 1) = 20
    assert resumed.steps == 20 and resumed.cut_by_time


def test_a_resumed_stage_is_re_planned_before_its_first_new_step(monkeypatch, tmp_path):
    # 6 steps (6 s) without a cap, then --resume with a 10 s cap: 4 more steps, not the 5 before the first projection
    spec = StageSpec("toy", 100, LR, eval_every=1000, checkpoint_every=2)
    ckpt = tmp_path / "stage.pt"
    _run(monkeypatch, tmp_path, spec, checkpoint_path=ckpt, stop_after_steps=6)
    capped = StageSpec("toy", 100, LR, max_seconds=10, eval_every=1000, checkpoint_every=2)
    resumed, lrs, clock = _run(monkeypatch, tmp_path, capped, checkpoint_path=ckpt, resume_state=load_checkpoint(ckpt))
    assert resumed.steps == 10 and len(lrs) == 4 and resumed.cut_by_time
    assert resumed.wall_seconds == pytest.approx(10.0)


def test_a_cap_spent_by_earlier_attempts_ends_the_resumed_stage_at_once(monkeypatch, tmp_path, capsys):
    spec = StageSpec("toy", 100, LR, eval_every=1000, checkpoint_every=2)
    ckpt = tmp_path / "stage.pt"
    _run(monkeypatch, tmp_path, spec, checkpoint_path=ckpt, stop_after_steps=12)  # 12 s, checkpoint at step 12
    capped = StageSpec("toy", 100, LR, max_seconds=10, eval_every=1000, checkpoint_every=2)
    resumed, lrs, _ = _run(monkeypatch, tmp_path, capped, checkpoint_path=ckpt, resume_state=load_checkpoint(ckpt))
    assert resumed.steps == 12 and lrs == [] and resumed.cut_by_time
    assert load_checkpoint(ckpt)["step"] == 12
    assert "toy: its time cap of 10 s was spent by earlier attempts (12 s); it ends at step 12" in " ".join(
        capsys.readouterr().err.split())


def test_help_says_how_caps_count_across_resumes():
    from effconv.pipelines.linearize import LinearizeConfig
    from effconv.pipelines.moe_upcycle import MoeUpcycleConfig

    fields = {f.name: f.metadata["help"] for c in (LinearizeConfig, MoeUpcycleConfig) for f in dataclasses.fields(c)}
    for name in ("stage1_max_seconds", "max_seconds"):
        assert "with --resume the cap counts" in fields[name] and "earlier attempts" in fields[name]


LAUNCHED_WORKER = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    from effconv.training import distributed
    from effconv.training import loop as train
    from effconv.training.loop import StageSpec, run_stage

    out = Path(sys.argv[1])
    acc = distributed.get_accelerator()
    rank = acc.process_index if acc else 0
    clock = [0.0]
    train._now = lambda: clock[0]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    data = torch.randn(64, 9, generator=torch.Generator().manual_seed(1))

    def next_batch(step):
        clock[0] += 1.0 if rank == 0 else 2.0  # process 1 is twice as slow
        return data[(step * 8) % 64 : (step * 8) % 64 + 8]

    loss_fn = lambda b: (torch.nn.functional.mse_loss(model(b[:, :8]).squeeze(-1), b[:, 8]), {})
    r = run_stage(model, StageSpec("toy", 100, 1e-2, max_seconds=20, checkpoint_every=1000), loss_fn=loss_fn,
                  next_batch=next_batch, evaluate=lambda: 0.0, checkpoint_path=out / "toy.pt", progress=False)
    (out / f"rank{rank}.json").write_text(json.dumps({"world": acc.num_processes if acc else 1, "steps": r.steps,
                                                      "cut": r.cut_by_time, "losses": r.train_losses}))
    """
)


def test_launched_processes_agree_on_the_cut(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "worker.py"
    script.write_text(LAUNCHED_WORKER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "kernels"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(repo / "recipes" / "accelerate" / "ddp-cpu.yaml"), "--num_processes", "2", str(script),
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # both plan from the slower process (5 steps in 10 s): 5 + floor((20 - 10) / 2) = 10 steps; the faster one
    # alone would have planned 5 + 15 = 20
    assert ranks[0] == ranks[1] and ranks[0]["world"] == 2
    assert ranks[0]["steps"] == 10 and ranks[0]["cut"]


def test_bad_budgets_are_errors(tmp_path):
    from effconv.pipelines.hybridize import HybridizeConfig
    from effconv.pipelines.linearize import LinearizeConfig
    from effconv.pipelines.moe_upcycle import MoeUpcycleConfig

    model = torch.nn.Linear(2, 1)
    with pytest.raises(EffconvError, match="max_seconds must be > 0"):
        run_stage(model, StageSpec("toy", 3, LR, max_seconds=0), loss_fn=lambda b: (model(b).sum(), {}),
                  next_batch=lambda s: torch.ones(1, 2), evaluate=None, checkpoint_path=None, progress=False)
    for field, flag in (("stage1_max_seconds", "--stage1-max-seconds"), ("stage2_max_seconds", "--stage2-max-seconds")):
        for bad in (0, -5.0):
            with pytest.raises(EffconvError, match=f"{flag} must be > 0 \\(seconds\\), got {bad}"):
                LinearizeConfig(**{field: bad}).validate()
            with pytest.raises(EffconvError, match=f"{flag} must be > 0"):
                HybridizeConfig(ratio=0.5, **{field: bad}).validate()
    with pytest.raises(EffconvError, match="--max-seconds must be > 0 \\(seconds\\), got 0"):
        MoeUpcycleConfig(max_seconds=0).validate()
    with pytest.raises(EffconvError, match="--stage1-max-seconds is not supported with --layers-per-block"):
        LinearizeConfig(stage1_max_seconds=60, layers_per_block=1).validate()
    LinearizeConfig(stage2_max_seconds=60, layers_per_block=1).validate()  # stage 2 is one ordinary stage
    LinearizeConfig(stage1_max_seconds=0.5, stage2_max_seconds=600).validate()
    MoeUpcycleConfig(max_seconds=1).validate()


def test_budgets_reach_the_configs_from_recipes_and_hybridize_stages(tmp_path):
    from effconv.pipelines.hybridize import HybridizeConfig
    from effconv.pipelines.linearize import LinearizeConfig
    from effconv.pipelines.moe_upcycle import MoeUpcycleConfig
    from effconv.config import build_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage1_max_seconds: 600\nstage2_max_seconds: 120.5\n")
    cfg = build_config(LinearizeConfig, recipe, {"stage2_max_seconds": 90.0})
    assert (cfg.stage1_max_seconds, cfg.stage2_max_seconds) == (600, 90.0)
    hcfg = build_config(HybridizeConfig, recipe, {"ratio": 0.5})
    lin = hcfg.linearize_config([0, 2])  # hybridize's two final stages are linearize's, with its budgets
    assert (lin.stage1_max_seconds, lin.stage2_max_seconds, lin.layers) == (600, 120.5, [0, 2])
    assert "stage1_max_seconds" not in cfg.identity()  # a budget may change on --resume
    recipe.write_text("max_seconds: 300\n")
    mcfg = build_config(MoeUpcycleConfig, recipe, {})
    assert mcfg.max_seconds == 300 and "max_seconds" not in mcfg.identity()
    recipe.write_text("max_seconds: soon\n")
    with pytest.raises(EffconvError, match="must be"):
        build_config(MoeUpcycleConfig, recipe, {})


def test_cli_bad_budget_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "effconv.cli", "linearize", "--out", str(tmp_path / "o"),
                           "--stage1-max-seconds", "0", "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["effconv: error: --stage1-max-seconds must be > 0 (seconds), got 0.0"]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,message", [
    (["linearize", "--stage2-max-seconds", "-1"], "--stage2-max-seconds must be > 0 (seconds), got -1.0"),
    (["hybridize", "--ratio", "0.5", "--stage1-max-seconds", "0"], "--stage1-max-seconds must be > 0 (seconds), got 0.0"),
    (["hybridize", "--ratio", "0.5", "--stage2-max-seconds", "0"], "--stage2-max-seconds must be > 0 (seconds), got 0.0"),
    (["moe-upcycle", "--max-seconds", "0"], "--max-seconds must be > 0 (seconds), got 0.0"),
])
def test_cli_budget_flags_reach_the_configs(tmp_path, args, message):
    from typer.testing import CliRunner

    from effconv.cli import app

    r = CliRunner().invoke(app, [args[0], "--out", str(tmp_path / "o"), "--no-progress", *args[1:]])
    assert isinstance(r.exception, EffconvError) and str(r.exception) == message, (r.output, r.exception)
    assert not (tmp_path / "o").exists()


def test_linearize_reports_a_cut_stage_and_still_exports(tiny_model_dir, tmp_path):
    from effconv.pipelines.linearize import LinearizeConfig, linearize

    # a budget far below one step: each stage is cut to the minimum, 5 measured steps + 1
    cfg = LinearizeConfig(model=str(tiny_model_dir), data=str(tiny_model_dir / "train.txt"), out=str(tmp_path / "out"),
                          window=4, seq_len=32, batch_size=4, eval_every=4, checkpoint_every=2, progress=False,
                          stage1_tokens=32 * 4 * 12, stage2_tokens=32 * 4 * 8, stage1_max_seconds=1e-6,
                          stage2_max_seconds=1e-6)
    m = linearize(cfg).metrics
    for stage in ("stage1", "stage2"):
        assert (m[stage]["steps"], m[stage]["cut_by_time"]) == (6, True), m[stage]
        assert m[stage]["wall_seconds"] > 0
    assert m["stage1"]["planned_steps"] == 12 and m["stage2"]["planned_steps"] == 8
    assert m["stage1"]["val_mse"][-1][0] == 6 and m["stage2"]["val_loss"][-1][0] == 6  # final evals at the cut
    assert (Path(cfg.out) / "model.safetensors").is_file()


def test_moe_upcycle_reports_its_budget(tiny_model_dir, tmp_path):
    from effconv.pipelines.moe_upcycle import MoeUpcycleConfig, moe_upcycle

    cfg = MoeUpcycleConfig(model=str(tiny_model_dir), data=str(tiny_model_dir / "train.txt"), out=str(tmp_path / "o"),
                           experts=4, top_k=2, shared=0, seq_len=32, batch_size=4, tokens=32 * 4 * 8, eval_every=4,
                           checkpoint_every=4, calibration_tokens=256, progress=False, max_seconds=1e-6)
    d = moe_upcycle(cfg).metrics["distillation"]
    assert (d["steps"], d["planned_steps"], d["cut_by_time"]) == (6, 8, True)
