"""The one kernel choice of effconv models: Triton kernels from `effconv_kernels`, or the PyTorch path.

The kernels come from the files an export ships beside this one (effconv/io/kernel_bundle.py), else from the
installed `effconv_kernels` package. `attention_backend` in the model config: "triton" runs the kernels or fails with one clear error when they cannot
load; "reference" always runs the plain-PyTorch ops of attention_ops.py; "auto" runs the kernels on CUDA tensors
and PyTorch elsewhere, and says once why when it falls back on CUDA. Shipped inside every export.
"""

from __future__ import annotations

import torch
from transformers.utils import logging

BACKENDS = ("auto", "triton", "reference")

KERNELS_MISSING: str | None = None
try:  # an export ships the kernels as sibling files (effconv/io/kernel_bundle.py): the version it was made with
    from .effconv_kernels_bundle import KERNELS as kernels

    KERNELS_SOURCE: str | None = "bundled with the model"
except ImportError as bundle_error:
    if bundle_error.name is None or not bundle_error.name.endswith("effconv_kernels_bundle"):
        raise  # the bundle is there but broken: say so, do not hide it behind the slow path
    try:  # effconv's own source tree (and exports from before the bundle): the effconv_kernels package
        import effconv_kernels as kernels

        KERNELS_SOURCE = "effconv_kernels package"
    except Exception as error:  # noqa: BLE001 - any import failure: the reason is reported when it matters
        kernels = None
        KERNELS_SOURCE = None
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
