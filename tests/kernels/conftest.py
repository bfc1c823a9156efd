"""Kernel tests run the Triton kernels on CUDA when there is a GPU, else through the CPU interpreter.

TRITON_INTERPRET must be set before any @triton.jit kernel is *defined* (Triton picks the interpreter
at decoration time), so it is set here, before the test modules import effconv_kernels' Triton parts.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"


def _patch_interpreter_bf16() -> None:
    """Two bf16 bugs of Triton's interpreter (3.x, seen on 3.9), patched for the CPU tests only.

    1. tl.dot multiplies the raw uint16 bits of bf16 operands: upcast them to fp32 (exact) first.
    2. fp32 -> bf16 casts truncate, where the GPU rounds to nearest even: that doubles and biases the
       rounding error, so do the cast through torch (RTNE) like the hardware.
    The GPU run exercises the real bf16 tensor-core path.
    """
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except Exception:  # pragma: no cover
        return
    builder = interp.InterpreterBuilder
    if getattr(builder, "_effconv_bf16_patch", False):
        return
    orig = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            def up(x):
                if x.dtype.scalar != tl.bfloat16:
                    return x
                data = interp._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
                return interp.TensorHandle(data, tl.float32)
            a, b = up(a), up(b)
        return orig(self, a, b, d, input_precision, max_num_imprecise_acc)

    orig_cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            t = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interp.TensorHandle(t.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return orig_cast(self, src, dst_type)

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    builder.create_fp_trunc = lambda self, src, dst_type: self.cast_impl(src, dst_type)
    builder._effconv_bf16_patch = True


if not ON_GPU:
    _patch_interpreter_bf16()


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if ON_GPU else "cpu"


def poison_empty(monkeypatch) -> None:
    """Make every torch.empty* buffer start as NaN (ints: -2**30), so a kernel that reads an element nobody
    wrote, or leaves an output element unwritten, fails the comparison instead of passing on zero-filled fresh
    memory (CPU allocations often come back zeroed)."""
    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(-(2 ** 30))
        return t

    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: poison(new_empty(self, *a, **k)))


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    """With EFFCONV_POISON=1, every test runs with poison_empty."""
    if os.environ.get("EFFCONV_POISON", "0") == "1":
        poison_empty(monkeypatch)
    yield


@pytest.fixture
def poisoned(monkeypatch):
    """Call it to poison fresh buffers from that point of a test on, whatever EFFCONV_POISON says."""
    return lambda: poison_empty(monkeypatch)


def load_attention_ops():
    """effconv/modeling/attention_ops.py, the chunked PyTorch attention (the model's CPU path, shipped in every export),
    loaded from its file: it imports only torch, so the kernel tests need neither transformers nor effconv installed."""
    mod = globals().get("_ATTENTION_OPS")
    if mod is None:
        path = Path(__file__).resolve().parents[2] / "effconv" / "modeling" / "attention_ops.py"
        spec = importlib.util.spec_from_file_location("effconv_attention_ops", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        globals()["_ATTENTION_OPS"] = mod
    return mod


@pytest.fixture(scope="session")
def attention_ops():
    return load_attention_ops()


@pytest.fixture
def program_order(monkeypatch):
    """Call it with "grid", "reversed" or "shuffled" to make the CPU interpreter run every later launch's programs
    in that order (it runs them one by one in grid order otherwise): a kernel whose result depends on the order in
    which its programs run (atomics that do not commute, one program reading what another wrote) gives different
    bits under another order, as it may from run to run on a GPU. Interpreter only."""
    if ON_GPU:
        pytest.skip("the program order is permuted in the CPU interpreter only")
    from triton.runtime import interpreter as interp

    original = interp.InterpreterBuilder.set_grid_idx
    perms: dict = {}

    def set_order(kind: str) -> None:
        if kind not in ("grid", "reversed", "shuffled"):
            raise ValueError(kind)

        def set_grid_idx(self, x, y, z):
            nx, ny, nz = self.grid_dim
            n = nx * ny * nz
            if (kind, n) not in perms:
                if kind == "grid":
                    perms[kind, n] = list(range(n))
                elif kind == "reversed":
                    perms[kind, n] = list(range(n - 1, -1, -1))
                else:
                    perms[kind, n] = torch.randperm(n, generator=torch.Generator().manual_seed(n)).tolist()
            j = perms[kind, n][(x * ny + y) * nz + z]  # a bijection: every program still runs exactly once
            return original(self, j // (ny * nz), (j // nz) % ny, j % nz)

        monkeypatch.setattr(interp.InterpreterBuilder, "set_grid_idx", set_grid_idx)

    return set_order
