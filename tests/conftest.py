"""Shared fixtures: tiny random teachers of every supported architecture, saved as HF directories."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).parent))
from helpers_tokenizer import make_tiny_tokenizer  # noqa: E402

os.environ.setdefault("EFFCONV_CACHE", str(Path(__file__).parent.parent / ".pytest_cache" / "effconv"))

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def load_bench_script(name: str):
    """bench/<name>.py as a module (bench/ is scripts, not a package; some import their neighbours)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
VOCAB = 400


def tiny_teacher_config(arch: str, **overrides):
    common = dict(
        vocab_size=VOCAB, hidden_size=96, intermediate_size=128, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    common.update(overrides)
    if arch == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=16)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=32, attention_bias=True)
    raise ValueError(arch)


def random_effconv_model(seed: int = 0, *, norms: bool = False, **config):
    """An effconv model (EffconvConfig(**config)) with random weights large enough that attention shapes the
    logits; decay logits keep their initialisation; `norms`: the norm weights are drawn near 1 too."""
    from effconv.modeling import EffconvConfig, EffconvForCausalLM

    model_config = EffconvConfig(**config)
    torch.manual_seed(seed)
    model = EffconvForCausalLM(model_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                if norms:
                    p.normal_(1.0, 0.1)
            elif "decay_logit" not in name:
                p.normal_(0.0, 0.08 if p.dim() > 1 else 0.3)
    return model


def tiny_teacher(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_teacher_config(arch, **overrides)
    config._attn_implementation = "sdpa"
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random weights with norms near 1 so that attention actually shapes the logits
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.1) if p.shape[0] in (96, 32, 16) else p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.08)
    return model


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama teacher with tokenizer and a small training text."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_teacher("llama").save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "Linear attention replaces softmax with a kernel feature map.",
        "Write a short story about a robot who learns to paint.",
        "A train travels 60 miles per hour for 2.5 hours.",
    ]
    (path / "train.txt").write_text("\n\n".join(" ".join(sentences[i % 4] for i in range(j, j + 30)) for j in range(40)))
    return path
