"""Backend choice of the kernels package: "auto" says once why CUDA tensors take the PyTorch reference, an explicit
"triton" without triton is one clear error (triton_available monkeypatched: no GPU or uninstall needed)."""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

import effconv_kernels as ek
from effconv_kernels import utils

CUDA_LIKE = SimpleNamespace(is_cuda=True)  # resolve_backend only asks the tensors whether they are on CUDA


@pytest.fixture
def no_triton(monkeypatch):
    monkeypatch.setattr(utils, "triton_available", lambda: False)
    monkeypatch.setattr(utils, "triton_import_error", lambda: "ModuleNotFoundError: No module named 'triton'")
    monkeypatch.setattr(utils, "_FELL_BACK", False)


def test_auto_falls_back_on_cuda_with_one_warning(no_triton):
    with pytest.warns(RuntimeWarning, match=r"PyTorch reference on CUDA.*No module named 'triton'"):
        assert utils.resolve_backend("auto", CUDA_LIKE, None) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second fallback in the process is silent
        assert utils.resolve_backend("auto", CUDA_LIKE) == "reference"


def test_auto_on_cpu_tensors_is_the_reference_without_a_warning(no_triton):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert utils.resolve_backend("auto", torch.zeros(1)) == "reference"
        assert utils.resolve_backend("auto", CUDA_LIKE, torch.zeros(1)) == "reference"  # mixed devices
    assert utils._FELL_BACK is False


def test_explicit_triton_without_triton_is_one_clear_error(no_triton):
    with pytest.raises(RuntimeError, match=r"backend='triton' needs the triton package.*No module named 'triton'"):
        utils.resolve_backend("triton", torch.zeros(1))
    fq = torch.rand(1, 2, 8, 4)
    with pytest.raises(RuntimeError, match="backend='triton' needs the triton package"):  # through a public op
        ek.linear_attention(fq, fq, torch.randn(1, 2, 8, 4), backend="triton")
    assert utils.resolve_backend("reference", CUDA_LIKE) == "reference"  # explicit choices need no triton
    assert utils.resolve_backend("naive", CUDA_LIKE) == "naive"


def test_with_triton_the_choice_is_unchanged(monkeypatch):
    monkeypatch.setattr(utils, "triton_available", lambda: True)
    assert utils.resolve_backend("auto", CUDA_LIKE) == "triton"
    assert utils.resolve_backend("auto", torch.zeros(1)) == "reference"
    assert utils.resolve_backend("triton", torch.zeros(1)) == "triton"
    with pytest.raises(ValueError, match="backend must be one of"):
        utils.resolve_backend("cuda", torch.zeros(1))
