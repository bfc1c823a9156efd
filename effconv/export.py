"""Writing converted models: safetensors weights, config, tokenizer and the modeling code, all or nothing.

Everything is written into a temporary sibling directory and renamed onto --out at the end, so a crash,
a full disk or a kill never leaves a directory at --out that looks complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .errors import EffconvError
from .modeling import MODELING_FILES

MODELING_DIR = Path(__file__).parent / "modeling"
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
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as e:
            raise EffconvError(f"cannot create {parent}: {e.strerror}") from e


def export_model(
    model,
    tokenizer,
    out: Path,
    *,
    overwrite: bool = False,
    max_shard_size: str | int = "2GB",
    metadata: dict | None = None,
) -> Path:
    """Save an EffconvForCausalLM (LoRA already merged) so plain transformers can load it.

    `metadata` is written as effconv.json (how the model was made, with measured losses)."""
    out = Path(out)
    check_output_dir(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))
    try:
        model.config.auto_map = dict(AUTO_MAP)
        model.config.architectures = ["EffconvForCausalLM"]
        model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        for name in MODELING_FILES:
            shutil.copyfile(MODELING_DIR / name, tmp / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if metadata is not None:
            (tmp / "effconv.json").write_text(json.dumps(metadata, indent=2, default=str) + "\n")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.resolve().parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EffconvError(f"could not write the model to {out}: {e.strerror or e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
