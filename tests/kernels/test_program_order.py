"""The `program_order` fixture (conftest.py) really reorders the interpreter's programs: an order-dependent kernel
(fp32 atomic adds of values of mixed magnitude into one cell) gives different bits under another order, and an
order-independent one (each program stores its own element) does not. The determinism tests rely on this."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _atomic_sum_kernel(x, out):
    tl.atomic_add(out, tl.load(x + tl.program_id(0)), sem="relaxed")


@triton.jit
def _copy_kernel(x, out):
    i = tl.program_id(0)
    tl.store(out + i, tl.load(x + i))


def test_program_order_changes_an_order_dependent_result(program_order):
    x = torch.tensor([1e8, 1.0, -1e8, 3.0, 0.5, 7.0, -2.0, 1e-3], dtype=torch.float32)
    sums, copies = {}, {}
    for kind in ("grid", "reversed", "shuffled"):
        program_order(kind)
        out = torch.zeros(1)
        _atomic_sum_kernel[(x.numel(),)](x, out)
        sums[kind] = out.item()
        copy = torch.empty_like(x)
        _copy_kernel[(x.numel(),)](x, copy)
        copies[kind] = copy
    assert sums["grid"] != sums["reversed"]  # ((1e8 + 1) - 1e8) ... against ... (1e-3 + ... - 1e8 + 1 + 1e8)
    assert all(torch.equal(c, x) for c in copies.values())
