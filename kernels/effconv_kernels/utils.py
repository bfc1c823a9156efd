"""Small helpers shared by the ops (no Triton import here: this module must load on any machine)."""
from __future__ import annotations

import functools
import os
import warnings

import torch

_BACKENDS = ("auto", "triton", "reference", "naive")


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    """Why `import triton` fails on this machine ("ExceptionType: message"), or None when it imports."""
    try:
        import triton  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any failure (missing package, broken install): reported as is
        return f"{type(error).__name__}: {error}"
    return None


def triton_available() -> bool:
    return triton_import_error() is None


_FELL_BACK = False  # "auto" has said once in this process that CUDA tensors take the PyTorch path


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """'auto' -> 'triton' for CUDA tensors (when triton imports; else 'reference', with one warning per process
    saying why), 'reference' otherwise. An explicit 'triton' without triton raises RuntimeError."""
    global _FELL_BACK
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"backend='triton' needs the triton package, which did not import "
                               f"({triton_import_error() or 'not available'}); install triton or pass "
                               "backend='reference'")
        return backend
    if backend != "auto":
        return backend
    if not all(t.is_cuda for t in tensors if t is not None):
        return "reference"
    if triton_available():
        return "triton"
    if not _FELL_BACK:
        _FELL_BACK = True
        warnings.warn(f"effconv_kernels: running the PyTorch reference on CUDA tensors (slow): triton did not import "
                      f"({triton_import_error() or 'not available'}); this is said once per process",
                      RuntimeWarning, stacklevel=3)
    return "reference"


def resolve_attention_backend(backend: str, op: str, *tensors: torch.Tensor) -> str:
    """Backend of the parallel linear / hybrid attention: 'triton' or 'naive' (the O(T^2) oracle).

    'auto' -> 'triton' for CUDA tensors (when triton imports), 'naive' otherwise. 'reference' is refused: the
    chunked PyTorch formulation lives only in effconv/modeling/attention_ops.py.
    """
    if backend == "reference":
        raise ValueError(
            f"effconv_kernels.{op}: backend='reference' no longer exists here. The chunked PyTorch path (O(T*C) "
            f"memory, autograd backward) is effconv.modeling.attention_ops.{op}, the one the model runs off the "
            "kernel path; backend='naive' is the O(T^2) oracle, 'triton' the kernels.")
    be = resolve_backend(backend, *tensors)
    return "naive" if be == "reference" else be


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def check_gqa(h: int, hkv: int) -> int:
    if hkv <= 0 or h % hkv != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({hkv})")
    return h // hkv


def float_dtype_ok(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t is not None and t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"expected fp32/fp16/bf16 tensors, got {t.dtype}")
