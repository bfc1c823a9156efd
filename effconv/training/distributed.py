"""Multi-process runs through `accelerate launch`: one Accelerator per process, created only when launched with
more than one process, so single-process runs are unchanged.

Data parallelism is explicit and small on purpose: every process builds the same global batch (batches are a
pure function of the step), trains on its contiguous 1/N slice, and the gradients of the trainable parameters
are averaged before the optimizer step. With equal slices the averaged gradient equals the one of the
global batch, so an N-process run follows the 1-process run with the same global batch. Only the main process
writes checkpoints, exports and logs.

With an FSDP config (`distributed_type: FSDP`, `fsdp_version: 2`; recipes/accelerate/fsdp*.yaml) the same runs
also shard the model's weights over the processes (effconv/fsdp.py); the data parallelism is unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..console import console
from ..errors import EffconvError

_accelerator = None


def launched_world_size() -> int:
    """Processes started by accelerate launch / torchrun (they set WORLD_SIZE); 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def fsdp_requested() -> bool:
    """Launched with an FSDP accelerate config. The launcher exports ACCELERATE_USE_FSDP=true from
    `distributed_type: FSDP` (accelerate's own state only reports FSDP on GPUs; on CPU it says MULTI_CPU)."""
    return launched_world_size() > 1 and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_reshard_after_forward() -> bool:
    return os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "0", "no_reshard")


def check_launch(batch_size: int, *, blockwise: bool = False) -> None:
    """Settings that cannot work with the launched processes: one clear error before any work."""
    n = launched_world_size()
    if n <= 1:
        return
    mode = "FSDP" if fsdp_requested() else "data parallel"
    if blockwise:
        raise EffconvError(f"--layers-per-block runs in one process; it is not supported under accelerate launch "
                           f"({n} processes, {mode}): run block-wise conversion without accelerate launch")
    if batch_size % n:
        raise EffconvError(f"--batch-size {batch_size} (the global batch) must be divisible by the {n} processes; "
                           f"set it to a multiple of {n}")
    if fsdp_requested():
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise EffconvError(f"the accelerate config asks for FSDP version {version}; effconv shards with FSDP2 "
                               "(torch fully_shard): set fsdp_version: 2 (recipes/accelerate/fsdp.yaml)")
        if os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
            raise EffconvError("fsdp_offload_params is not supported by effconv; set it to false")


def report_error(message: str) -> None:
    """Print `effconv: error: ...` once. Before the processes have started working together every process fails
    the same way and only the main one reports; later a failure may be one process's own, so each reports
    (tagged with its index unless it is the main process)."""
    import sys

    rank = launched_rank()
    if launched_world_size() > 1 and rank != 0:
        if _accelerator is None:
            return
        message = f"(process {rank}) {message}"
    print(f"effconv: error: {message}", file=sys.stderr)


def get_accelerator():
    """The process-wide Accelerator when launched with N > 1 processes, else None."""
    global _accelerator
    if launched_world_size() <= 1:
        return None
    if _accelerator is None:
        from accelerate import Accelerator

        # no CUDA (CI): CPU processes over gloo; accelerate only picks that when asked for the CPU
        _accelerator = Accelerator(cpu=not torch.cuda.is_available())
        console.quiet = not _accelerator.is_main_process  # one log, from the main process
    return _accelerator


def shutdown() -> None:
    """The normal end of a multi-process run: every process waits for the others, then tears the process group
    down while the interpreter is fully alive (left to interpreter exit, gloo's worker threads can abort the
    process: "terminate called without an active exception"). Only on success: after an error the other
    processes may never arrive."""
    global _accelerator
    if _accelerator is None:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        _accelerator.wait_for_everyone()
        dist.destroy_process_group()
    _accelerator = None


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
    """All-reduce (mean) the gradients of the trainable parameters, one flat buffer per dtype. Parameters sharded
    by FSDP are skipped: FSDP has averaged their gradients already."""
    if accelerator is None or accelerator.num_processes == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if is_dtensor(p):
            continue
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


def max_over_processes(value: torch.Tensor, accelerator) -> torch.Tensor:
    """Elementwise maximum of a (no-grad) tensor over the launched processes, on every process; the tensor itself
    in one process. (The collective runs on the accelerator's device: NCCL takes GPU tensors only.)"""
    if accelerator is None or accelerator.num_processes == 1:
        return value
    import torch.distributed as dist

    out = value.detach().clone().to(accelerator.device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.to(value.device)


def sum_over_processes(value: torch.Tensor) -> torch.Tensor:
    """Sum of a (no-grad) tensor over the launched processes; the tensor itself in one process."""
    acc = get_accelerator()
    if acc is None or acc.num_processes == 1:
        return value
    return acc.reduce(value.detach().clone(), reduction="sum")


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        return None
    return DTensor


def is_dtensor(t) -> bool:
    """A parameter or gradient sharded by FSDP2."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)
