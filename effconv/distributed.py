"""Multi-process runs through `accelerate launch`: one Accelerator per process, created only when launched with
more than one process, so single-process runs are unchanged.

Data parallelism is explicit and small on purpose: every process builds the same global batch (batches are a
pure function of the step), trains on its contiguous 1/N slice, and the gradients of the trainable parameters
are averaged before the optimizer step. With equal slices the averaged gradient equals the one of the
global batch, so an N-process run follows the 1-process run with the same global batch. Only the main process
writes checkpoints, exports and logs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import EffconvError

_accelerator = None


def launched_world_size() -> int:
    """Processes started by accelerate launch / torchrun (they set WORLD_SIZE); 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def get_accelerator():
    """The process-wide Accelerator when launched with N > 1 processes, else None."""
    global _accelerator
    if launched_world_size() <= 1:
        return None
    if _accelerator is None:
        from accelerate import Accelerator

        # no CUDA (CI): CPU processes over gloo; accelerate only picks that when asked for the CPU
        _accelerator = Accelerator(cpu=not torch.cuda.is_available())
        from .train import console

        console.quiet = not _accelerator.is_main_process  # one log, from the main process
    return _accelerator


def is_main_process() -> bool:
    acc = get_accelerator()
    return acc is None or acc.is_main_process


def wait_for_everyone() -> None:
    acc = get_accelerator()
    if acc is not None:
        acc.wait_for_everyone()


@contextmanager
def main_process_first() -> Iterator[None]:
    """The main process runs the body first (e.g. writes a data cache), then the others (which read it)."""
    acc = get_accelerator()
    if acc is None:
        yield
        return
    with acc.main_process_first():
        yield


def local_device(device: torch.device) -> torch.device:
    """Each launched process gets its own GPU (LOCAL_RANK); CPU stays CPU."""
    if device.type == "cuda" and launched_world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shard_batch(batch: torch.Tensor, accelerator) -> torch.Tensor:
    """This process's contiguous 1/N of the global batch (rows)."""
    if accelerator is None or accelerator.num_processes == 1:
        return batch
    n = accelerator.num_processes
    if batch.shape[0] % n:
        raise EffconvError(f"the global batch ({batch.shape[0]} sequences) must be divisible by the {n} processes;"
                           f" set --batch-size to a multiple of {n}")
    per = batch.shape[0] // n
    return batch[accelerator.process_index * per : (accelerator.process_index + 1) * per]


def average_gradients(params: list[torch.Tensor], accelerator) -> None:
    """All-reduce (mean) the gradients of the trainable parameters, one flat buffer per dtype."""
    if accelerator is None or accelerator.num_processes == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:  # every process must contribute the same buffers
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        flat = accelerator.reduce(flat, reduction="mean")
        offset = 0
        for p in group:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()


def mean_over_processes(value: torch.Tensor, accelerator) -> torch.Tensor:
    if accelerator is None or accelerator.num_processes == 1:
        return value
    return accelerator.reduce(value.detach().clone(), reduction="mean")
