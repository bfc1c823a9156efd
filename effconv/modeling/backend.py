"""The one kernel choice of effconv models: Triton kernels from `effconv_kernels`, or the PyTorch path.

`attention_backend` in the model config: "triton" runs the kernels or fails with one clear error when they cannot
load; "reference" always runs the plain-PyTorch ops of attention_ops.py; "auto" runs the kernels on CUDA tensors
and PyTorch elsewhere, and says once why when it falls back on CUDA. Shipped inside every export.
"""

from __future__ import annotations

import torch
from transformers.utils import logging

BACKENDS = ("auto", "triton", "reference")

try:  # optional: an export on a machine without the kernels package runs the PyTorch path
    import effconv_kernels as kernels

    KERNELS_MISSING: str | None = None
except Exception as error:  # noqa: BLE001 - any import failure: the reason is reported when it matters
    kernels = None
    KERNELS_MISSING = f"{type(error).__name__}: {error}"

logger = logging.get_logger(__name__)


def use_kernels(backend: str, x: torch.Tensor) -> bool:
    """Whether an op on `x` runs the Triton kernels under `backend`."""
    if backend == "reference":
        return False
    if backend == "triton":
        if kernels is None:
            raise RuntimeError(f"attention_backend 'triton' needs the effconv_kernels package, which did not import "
                               f"({KERNELS_MISSING}); install effconv or use attention_backend 'reference'")
        return True
    if backend != "auto":
        raise ValueError(f"unknown attention_backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not x.is_cuda:
        return False
    if kernels is None:
        logger.warning_once(f"effconv: running the PyTorch attention path on CUDA (slow): the effconv_kernels "
                            f"package did not import ({KERNELS_MISSING})")
        return False
    return True
