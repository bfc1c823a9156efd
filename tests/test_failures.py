"""Failures a user meets (docs/failures.md): each one ends with one clear line and a non-zero exit code, without a
traceback unless --debug / EFFCONV_DEBUG=1 asks for one, and leaves nothing behind that blocks the next run."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from effconv import cli
from effconv.errors import EffconvError, failure_line
from effconv.io.export import atomic_directory
from effconv.pipelines.linearize import LinearizeConfig, linearize
from effconv.training.loop import load_checkpoint
from effconv.training.run import interrupted_message, prepare_run_dir, run_dir_for

TINY_ARGS = ["--window", "4", "--seq-len", "32", "--batch-size", "4", "--checkpoint-every", "2", "--no-progress"]


def tiny_args(model_dir: Path, out: Path, stage1_steps: int, stage2_steps: int) -> list[str]:
    return ["linearize", "--model", model_dir, "--data", model_dir / "train.txt", *TINY_ARGS, "--out", out,
            "--stage1-tokens", 32 * 4 * stage1_steps, "--stage2-tokens", 32 * 4 * stage2_steps]


def run_main(monkeypatch, capsys, *args) -> tuple[int, str]:
    """`effconv ARGS` in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["effconv", *map(str, args)])
    monkeypatch.setattr(cli, "_debug_option", False)
    monkeypatch.delenv("EFFCONV_DEBUG", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capsys.readouterr().err


def squeezed(text: str) -> str:
    """Text without whitespace: rich folds long log lines (and paths) at 80 columns when stderr is not a terminal."""
    return "".join(text.split())


def effconv_lines(stderr: str) -> list[str]:
    """The lines effconv's failure handling printed (progress and log lines are others)."""
    return [line for line in stderr.splitlines() if line.startswith(("effconv: ", "Traceback"))]


def read_only_below(monkeypatch, directory: Path) -> None:
    """Make every directory creation under `directory` fail as on a read-only mount (root ignores chmod)."""
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).resolve().is_relative_to(directory.resolve()):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)


# ---- 1. read-only --out, full disk ---------------------------------------------------------------------------------


def test_read_only_out_is_one_line_before_any_work(tiny_model_dir, tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only_below(monkeypatch, ro)
    code, err = run_main(monkeypatch, capsys, *tiny_args(tiny_model_dir, ro / "out", 2, 0))
    assert code == 1
    assert err.strip().splitlines() == [
        f"effconv: error: cannot write to {ro} (Read-only file system); choose an --out on a writable disk"]
    assert list(ro.iterdir()) == []


def test_a_run_dir_that_cannot_be_made_is_one_error(tmp_path, monkeypatch):
    read_only_below(monkeypatch, tmp_path)
    with pytest.raises(EffconvError, match=r"cannot write the run directory .* \(Read-only file system\)"):
        prepare_run_dir(tmp_path / ".out.effconv-run", {"seed": 0}, resume=False, overwrite=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a write-protected directory anyway")
def test_write_protected_out_directory(tiny_model_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(EffconvError, match=r"cannot write to .*locked \(Permission denied\)"):
            linearize(LinearizeConfig(model=str(tiny_model_dir), out=str(locked / "out")))
    finally:
        locked.chmod(0o755)


def test_full_disk_while_checkpointing(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The third stage-1 checkpoint write fails half-way with ENOSPC: one line, exit 1, the partial file removed,
    the step-4 checkpoint whole; after freeing space --resume continues from it and says so."""
    real_save = torch.save
    writes = []

    def disk_fills_up(obj, f, *args, **kwargs):
        if str(getattr(f, "name", f)).endswith("stage1.pt.tmp"):
            writes.append(obj["step"])
            if len(writes) == 3:
                f.write(b"\0" * 100)  # what a full disk leaves: a partial file
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_up)
    args = tiny_args(tiny_model_dir, tmp_path / "out", 10, 2)
    code, err = run_main(monkeypatch, capsys, *args)
    run_dir = run_dir_for(tmp_path / "out")
    ckpt = run_dir / "stage1.pt"
    assert code == 1 and writes == [2, 4, 6]
    assert effconv_lines(err) == [
        f"effconv: error: could not write checkpoint {ckpt}: No space left on device; the previous checkpoint is "
        f"kept at {ckpt}; free space, then rerun the same command with --resume"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "stage1.pt"]  # no stage1.pt.tmp
    assert load_checkpoint(ckpt)["step"] == 4
    assert not (tmp_path / "out").exists()

    monkeypatch.setattr(torch, "save", real_save)  # space freed
    code, err = run_main(monkeypatch, capsys, *args, "--resume")
    assert code == 0, err
    assert squeezed(f"attention transfer: resuming at step 4 of 10 from {ckpt}") in squeezed(err)
    assert (tmp_path / "out" / "model.safetensors").is_file() and not run_dir.exists()


def test_full_disk_in_a_writer_that_does_not_raise_oserror(tmp_path):
    """safetensors reports a full disk as its own error type naming os error 28: still one line, nothing left."""
    with pytest.raises(EffconvError, match=r"could not write the model to .*out: No space left on device$"):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "model.safetensors").write_bytes(b"\0" * 10)
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                               "\"No space left on device\" })")
    assert list(tmp_path.iterdir()) == []


# ---- 2. Ctrl-C and --resume; 7. permissions; 9. warnings (one interrupted and resumed run) -------------------------


@pytest.fixture(scope="module")
def interrupted_run(tiny_model_dir, tmp_path_factory):
    """A real SIGINT to `effconv linearize` in a child process once stage 1 has a checkpoint at step >= 4, then
    the same command with --resume (and a stage-1 cap 3 s past the time already spent, so it ends soon)."""
    tmp = tmp_path_factory.mktemp("interrupt")
    out = tmp / "out"
    args = [sys.executable, "-m", "effconv.cli", *map(str, tiny_args(tiny_model_dir, out, 5000, 2))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("EFFCONV_DEBUG", None)

    def child_setup():
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a shell may start test runs with SIGINT ignored
        os.umask(0o022)

    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=child_setup)
    ckpt = run_dir_for(out) / "stage1.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and load_checkpoint(ckpt)["step"] >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, interrupted_err = proc.communicate(timeout=120)
    cap = load_checkpoint(ckpt)["wall_seconds"] + 3  # the cap counts the interrupted attempt's time: 3 s more
    resumed = subprocess.run([*args, "--resume", "--stage1-max-seconds", f"{cap:.1f}"], capture_output=True,
                             text=True, env=env, preexec_fn=child_setup, timeout=300)
    return dict(code=proc.returncode, err=interrupted_err, ckpt=ckpt, out=out, resumed=resumed)


def test_ctrl_c_says_where_to_resume_and_resume_says_the_step(interrupted_run):
    r = interrupted_run
    assert r["code"] == 130 and "Traceback" not in r["err"]
    last = r["err"].strip().splitlines()[-1]
    match = re.fullmatch(rf"effconv: interrupted; attention transfer at step (\d+) of 5000 is saved in "
                         rf"{re.escape(str(r['ckpt']))}; rerun the same command with --resume to continue from there",
                         last)
    assert match, last
    step = int(match.group(1))
    assert step >= 4
    resumed = r["resumed"]
    assert resumed.returncode == 0, resumed.stderr
    assert squeezed(f"attention transfer: resuming at step {step} of ") in squeezed(resumed.stderr)
    assert (r["out"] / "model.safetensors").is_file()


def test_exports_get_the_umask_permissions(interrupted_run):
    out = interrupted_run["out"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    files = list(out.iterdir())
    assert files and {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o644 for p in files}


DEPRECATION = re.compile(r"past_key_values|cache_params|is_gradient_checkpointing|FutureWarning|deprecated")


def test_linearize_and_generate_of_the_export_warn_nothing(interrupted_run, tmp_path):
    # the resumed run trains stage 1, attaches LoRA and trains stage 2, evaluates and exports
    for err in (interrupted_run["err"], interrupted_run["resumed"].stderr):
        assert not DEPRECATION.search(err), err
    script = ("import torch, sys\nfrom transformers import AutoModelForCausalLM\n"
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
              "out = m.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=6, min_new_tokens=6, do_sample=False)\n"
              "assert out.shape == (1, 10)\n")
    generated = subprocess.run([sys.executable, "-W", "default", "-c", script, str(interrupted_run["out"])],
                               capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                               cwd=tmp_path, timeout=300)  # as the README loads it: the export's own model code
    assert generated.returncode == 0, generated.stderr
    assert not DEPRECATION.search(generated.stderr), generated.stderr


def test_interrupted_message_names_the_newest_checkpoint_or_none(tmp_path):
    run_dir = tmp_path / ".out.effconv-run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    assert interrupted_message([run_dir]) == ("interrupted before the first checkpoint; rerun the same command to "
                                              "start again")
    torch.save({"stage": "attention transfer", "step": 12, "planned_steps": 12}, run_dir / "stage1.pt")
    time.sleep(0.01)
    torch.save({"stage": "lora finetune", "step": 4, "planned_steps": 8}, run_dir / "stage2.pt")
    os.utime(run_dir / "stage1.pt", (1, 1))
    assert interrupted_message([run_dir]) == (
        f"interrupted; lora finetune at step 4 of 8 is saved in {run_dir / 'stage2.pt'}; rerun the same command with "
        "--resume to continue from there")


# ---- 3. a failed start leaves nothing that blocks the corrected command --------------------------------------------


def test_mistyped_model_path_then_the_corrected_command_just_runs(tiny_model_dir, tmp_path):
    settings = dict(data=str(tiny_model_dir / "train.txt"), out=str(tmp_path / "out"), window=4, seq_len=32,
                    batch_size=4, stage1_tokens=32 * 4 * 2, stage2_tokens=0, progress=False)
    with pytest.raises(EffconvError, match="not found"):
        linearize(LinearizeConfig(model=str(tmp_path / "typo"), **settings))
    assert [p.name for p in run_dir_for(tmp_path / "out").iterdir()] == ["config.json"]  # the failed start's
    linearize(LinearizeConfig(model=str(tiny_model_dir), **settings))  # no --resume, no --overwrite
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_run_dir_with_a_checkpoint_is_still_an_interrupted_run(tmp_path):
    run_dir = tmp_path / ".out.effconv-run"
    prepare_run_dir(run_dir, {"seed": 0}, resume=False, overwrite=False)
    prepare_run_dir(run_dir, {"seed": 1}, resume=False, overwrite=False)  # settings only: started again
    prepare_run_dir(run_dir, {"seed": 2}, resume=True, overwrite=False)  # nothing to resume: started again
    assert json.loads((run_dir / "config.json").read_text()) == {"seed": 2}
    (run_dir / "stage1.pt").write_bytes(b"checkpoint")
    with pytest.raises(EffconvError, match="an interrupted run exists"):
        prepare_run_dir(run_dir, {"seed": 2}, resume=False, overwrite=False)
    with pytest.raises(EffconvError, match="--resume with different settings than the interrupted run: seed"):
        prepare_run_dir(run_dir, {"seed": 3}, resume=True, overwrite=False)
    with pytest.raises(EffconvError, match="nothing to resume"):
        prepare_run_dir(tmp_path / ".other.effconv-run", {"seed": 0}, resume=True, overwrite=False)


def test_hybridize_state_without_scores_does_not_block(tmp_path):
    from effconv.pipelines.hybridize import HybridizeConfig, _prepare_state, state_dir_for

    cfg = HybridizeConfig(ratio=0.5, out=str(tmp_path / "out"))
    state_dir, run_dir = state_dir_for(tmp_path / "out"), run_dir_for(tmp_path / "out")
    assert _prepare_state(cfg, state_dir, run_dir) is None
    assert _prepare_state(cfg, state_dir, run_dir) is None  # only its settings file: not an interrupted run
    (state_dir / "scores.json").write_text("{}")
    with pytest.raises(EffconvError, match="an interrupted run exists"):
        _prepare_state(cfg, state_dir, run_dir)


# ---- 4. --generate-tokens checked before generating; 5. --seq-len <= --window ---------------------------------------


def test_too_few_generate_tokens_fail_before_the_teacher_is_loaded(tmp_path):
    from effconv.pipelines.moe_upcycle import MoeUpcycleConfig, moe_upcycle

    message = (r"--generate-tokens 300 makes 1 block of --seq-len 256, fewer than the 2 needed for training and "
               r"validation; use --generate-tokens 512 or more, or a shorter --seq-len")
    # the model does not exist: an error about it would mean the check came too late
    with pytest.raises(EffconvError, match=message):
        linearize(LinearizeConfig(model=str(tmp_path / "missing"), generate_tokens=300, out=str(tmp_path / "a")))
    with pytest.raises(EffconvError, match=message):
        moe_upcycle(MoeUpcycleConfig(model=str(tmp_path / "missing"), generate_tokens=300, out=str(tmp_path / "b")))
    LinearizeConfig(generate_tokens=512).validate()
    LinearizeConfig(generate_tokens=300, data="some.txt").validate()  # given text is measured when read


@pytest.mark.parametrize("val_fraction", [0.05, 0.3, 0.5, 0.8, 0.9])
def test_generate_tokens_check_agrees_with_the_split(val_fraction):
    from effconv.data.packing import split_train_val

    def allowed(blocks: int) -> bool:
        try:
            LinearizeConfig(generate_tokens=blocks * 32, seq_len=32, window=4, val_fraction=val_fraction).validate()
            return True
        except EffconvError:
            return False

    def splits(blocks: int) -> bool:
        try:
            split_train_val(torch.zeros(blocks, 32), val_fraction)
            return True
        except EffconvError:
            return False

    for blocks in range(1, 30):
        assert allowed(blocks) == splits(blocks), blocks


def test_window_not_smaller_than_seq_len_is_refused():
    for seq_len in (32, 64):
        with pytest.raises(EffconvError, match=f"--window 64 is not smaller than --seq-len {seq_len}: every token"):
            LinearizeConfig(window=64, seq_len=seq_len).validate()
    LinearizeConfig(window=64, seq_len=65, sinks=0).validate()
    LinearizeConfig(window=0, seq_len=16).validate()  # no window: no sinks by default either
    with pytest.raises(EffconvError, match="--window 64 \\+ --sinks 4 covers the whole --seq-len 68"):
        LinearizeConfig(window=64, seq_len=68).validate()  # the default 4 sinks leave no linear part
    LinearizeConfig(window=64, seq_len=69).validate()


# ---- 7. permissions; 8. tables on a pipe ---------------------------------------------------------------------------


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    previous = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            os.close(os.open(tmp / "weights.bin", os.O_CREAT | os.O_WRONLY, 0o600))  # as transformers writes them
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "notes.txt").write_text("x")
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode and stat.S_IMODE((out / "sub").stat().st_mode) == dir_mode
    assert stat.S_IMODE((out / "weights.bin").stat().st_mode) == file_mode
    assert stat.S_IMODE((out / "sub" / "notes.txt").stat().st_mode) == file_mode


def test_report_on_a_pipe_is_whole(capsys):
    from effconv.eval.report import SPEED_HEADER, print_report

    answer = "a long greedy answer " * 30
    speed = {"status": "ok", "prefill_ms": 1.0, "decode_tokens_per_s": 10.0, "peak_memory_bytes": 2**20,
             "cache_bytes": 2**20, "cache_bytes_per_token": 64.0}
    report = {
        "models": {r: {"source": f"{r}-model", "class": "X", "parameters": 1000, "attention": "softmax"}
                   for r in ("teacher", "student")},
        "environment": {"device": "cpu", "dtype": "float32", "torch": "2", "threads": 2, "cpu_count": 2},
        "speed": {"rows": [{"model": r, "batch_size": 1, "context": c, **speed}
                           for r in ("teacher", "student") for c in (128, 256)],
                  "decode_tokens": 8, "repeats": 1, "warmup": 0, "memory_method": "RSS"},
        "generations": [{"prompt": "Tell me a story about the sea.", "teacher": answer, "student": answer[::-1]}],
    }
    print_report(report)  # capsys: stdout is not a terminal
    printed = capsys.readouterr().out
    assert "| " + " | ".join(SPEED_HEADER) + " |" in printed  # every column header whole
    assert answer in printed and answer[::-1] in printed  # generations neither cut nor wrapped


# ---- no traceback unless asked; --debug before or after the command name ------------------------------------------


def test_debug_before_or_after_the_command_and_the_environment_variable(tiny_model_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "exists").mkdir()
    args = ["linearize", "--model", tiny_model_dir, "--out", tmp_path / "exists"]
    code, err = run_main(monkeypatch, capsys, *args)
    assert code == 1 and err.strip().splitlines() == [
        f"effconv: error: output directory {tmp_path / 'exists'} already exists; pass --overwrite to replace it"]
    for argv in (["--debug", *args], [*args, "--debug"]):
        monkeypatch.setattr(sys, "argv", ["effconv", *map(str, argv)])
        monkeypatch.setattr(cli, "_debug_option", False)
        with pytest.raises(EffconvError, match="already exists"):  # raised through: Python prints the traceback
            cli.main()
    monkeypatch.setattr(sys, "argv", ["effconv", *map(str, args)])
    monkeypatch.setattr(cli, "_debug_option", False)
    monkeypatch.setenv("EFFCONV_DEBUG", "1")
    with pytest.raises(EffconvError, match="already exists"):
        cli.main()
    monkeypatch.setenv("EFFCONV_DEBUG", "yes")
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == "effconv: error: EFFCONV_DEBUG='yes': use 1 (show tracebacks) or 0"


def test_unexpected_errors_and_interrupts_outside_a_run_are_one_line(tmp_path, monkeypatch, capsys):
    import effconv.pipelines.linearize as pipeline

    def fails(cfg):
        raise ValueError("boom\nsecond line")

    monkeypatch.setattr(pipeline, "linearize", fails)
    code, err = run_main(monkeypatch, capsys, "linearize", "--out", tmp_path / "out")
    assert code == 1 and err.strip().splitlines() == [
        "effconv: error: unexpected ValueError: boom second line (rerun with --debug for the traceback)"]

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "linearize", interrupted)
    code, err = run_main(monkeypatch, capsys, "linearize", "--out", tmp_path / "out")
    assert code == 130 and err.strip().splitlines() == [
        "effconv: interrupted before the first checkpoint; rerun the same command to start again"]


def test_failure_line_of_file_system_and_memory_errors():
    assert failure_line(FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/x/y")) == (
        "No such file or directory: /x/y (rerun with --debug for the traceback)")
    assert failure_line(MemoryError()) == "out of memory; lower --batch-size or --seq-len"
    assert failure_line(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")) == (
        "out of memory; lower --batch-size or --seq-len")
