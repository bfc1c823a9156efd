"""Writing outputs all or nothing: a directory is built under a temporary sibling name and renamed onto its target
at the end, so a crash, a full disk or a kill never leaves a directory at --out that looks complete.

`export_model` writes an effconv model (safetensors weights, config, tokenizer, the modeling code and the kernels
flattened beside it, so plain transformers loads it with trust_remote_code and runs the kernels); io/native_moe.py
writes MoE models in transformers' own formats.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import EffconvError, disk_write_reason
from ..modeling import MODELING_FILES
from .kernel_bundle import write_kernel_bundle

MODELING_DIR = Path(__file__).resolve().parent.parent / "modeling"
AUTO_MAP = {
    "AutoConfig": "configuration_effconv.EffconvConfig",
    "AutoModelForCausalLM": "modeling_effconv.EffconvForCausalLM",
}


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Fail before any work when --out exists and may not be replaced."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise EffconvError(f"output directory {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise EffconvError(f"output path {out} exists and is not a directory")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        # a directory made and removed again: a read-only disk or a directory without write permission fails
        # here, before any work, not at the first checkpoint
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
    except OSError as e:
        raise EffconvError(f"cannot write to {parent} ({e.strerror}); choose an --out on a writable disk") from e


@contextmanager
def atomic_directory(out: Path, *, overwrite: bool = False, what: str = "the model") -> Iterator[Path]:
    """Yield an empty temporary directory beside `out`; when the block succeeds it becomes `out` (replacing an old
    one if `overwrite`), when it fails it is removed. File-system errors become one EffconvError line naming `what`."""
    out = Path(out)
    check_output_dir(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))
    try:
        yield tmp
        share_like_new_files(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.resolve().parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = disk_write_reason(e)
        if reason is None:
            raise
        raise EffconvError(f"could not write {what} to {out}: {reason}") from e


def share_like_new_files(directory: Path) -> None:
    """Give a finished output the permissions of files the user creates (0666 / 0777 less the umask): mkdtemp
    makes its directory 0700 and some writers (transformers' weights) leave 0600 files."""
    mask = os.umask(0)
    os.umask(mask)  # reading the umask means setting it; it is put back at once
    for root, _, files in os.walk(directory):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def write_file_atomic(path: Path, content: bytes) -> None:
    """Write a file under a temporary name and rename it: a file under its final name is always whole, and a
    failed write leaves no temporary file."""
    replace_atomically(path, lambda tmp: tmp.write_bytes(content))


def replace_atomically(path: Path, write: Callable[[Path], object], *, tmp: Path | None = None, what: str = "",
                       advice: Callable[[], str] = lambda: "") -> None:
    """`write(tmp)`, then rename `tmp` over `path`. Any failure (a full disk, Ctrl-C) removes `tmp` and leaves
    `path` as it was; a file-system failure becomes one EffconvError line ("could not write {what}{path}: ...",
    then `advice()`, which is asked after the cleanup)."""
    tmp = tmp or path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        reason = disk_write_reason(e)
        if reason is None:
            raise
        raise EffconvError(f"could not write {what}{path}: {reason}{advice()}") from e


def write_metadata(directory: Path, metadata: dict | None, extra_files: dict[str, bytes] | None = None) -> None:
    """effconv.json (how the model was made, with measured losses) and any extra report files."""
    if metadata is not None:
        (directory / "effconv.json").write_text(json.dumps(metadata, indent=2, default=str) + "\n")
    for name, content in (extra_files or {}).items():
        (directory / name).write_bytes(content)


def export_model(
    model,
    tokenizer,
    out: Path,
    *,
    overwrite: bool = False,
    max_shard_size: str | int = "2GB",
    metadata: dict | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Save an EffconvForCausalLM (LoRA already merged) so plain transformers can load it.

    `metadata` is written as effconv.json; `extra_files` (name -> bytes) beside it, in the same atomic write."""
    with atomic_directory(out, overwrite=overwrite) as tmp:
        model.config.auto_map = dict(AUTO_MAP)
        model.config.architectures = ["EffconvForCausalLM"]
        model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        for name in MODELING_FILES:
            shutil.copyfile(MODELING_DIR / name, tmp / name)
        write_kernel_bundle(tmp)  # the model's Triton kernels, so that it runs them without effconv installed
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_metadata(tmp, metadata, extra_files)
    return Path(out)
