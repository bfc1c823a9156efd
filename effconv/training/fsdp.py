"""FSDP: the model's weights sharded over the processes of `accelerate launch` (an FSDP config, `fsdp_version: 2`).

effconv shards the model itself with torch's FSDP2 (`torch.distributed.fsdp.fully_shard`) once it is built:
every decoder layer is one FSDP unit, and a root unit (`ShardedRoot`) holds the rest (token embeddings, final
norm, head; a tied head stays with its embedding). Each process keeps 1/N of every parameter that exists at that
point, frozen or trainable (feature maps, window mixes, merged K/V, MoE routers and experts); a unit's full weights
are gathered only while it runs. Parameters added afterwards (the LoRA adapters of linearize stage 2 and of
moe-upcycle `--train router-lora`) are not sharded: they are small, every process holds them, and
`distributed.average_gradients` averages their gradients as in data-parallel runs. The gradients of sharded
parameters are averaged by FSDP itself (reduce-scatter), never a second time by effconv.

Calling a sharded model. FSDP gathers the root unit when its module's forward runs, but effconv also calls models
in other ways (the inner `student.model` for attention transfer, peft wrappers that call `forward` directly, the
teacher inside a student's loss). So the root is a wrapper whose forward runs a function: `call(model, fn)` runs
`fn()` inside it, with the root unit gathered and FSDP's backward hooks on what `fn` returns; the decoder layers
gather themselves through their own hooks. `training.loop.run_stage` and `eval.quality.next_token_loss` go through `call`.

Attention transfer (linearize stage 1, hybridize scoring) is different: in transfer mode a layer's loss is a side
output and its hidden-state output carries no gradient, so FSDP's per-layer backward hooks would never run.
`distill.transfer.transfer_backward` therefore streams the layers by hand: gather one layer, run it in
transfer mode, backpropagate its loss (scaled as in `distill.transfer.attention_transfer_loss`), average the gradients
of its trainable parameters over the processes, keep this process's shard of them, free the gathered layer.
Every parameter gets exactly the gradient of the 1-process step with the same global batch.

Checkpoints and exports hold full tensors in the format of a 1-process run: the shards are gathered
(`full_tensor`, on every process) and only the main process writes; on resume each process keeps its shard of
the full tensors it reads. `plain_copy` gathers the whole model into an ordinary CPU model on the main process
for the export.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..console import console
from ..errors import EffconvError
from . import distributed
from .distributed import is_dtensor

_mesh = None


class ShardedRoot(nn.Module):
    """The FSDP root over a model: `forward(fn)` runs `fn()` with the root unit's weights gathered."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.module = model
        self.active = False

    def forward(self, fn: Callable[[], Any]) -> Any:
        return fn()


def _root(model) -> ShardedRoot | None:
    # set with object.__setattr__ (not a submodule); peft wrappers forward unknown attributes to the base model
    return getattr(model, "_effconv_fsdp_root", None)


def is_sharded(model) -> bool:
    return _root(model) is not None


def device_mesh(device: torch.device):
    global _mesh
    if _mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        _mesh = init_device_mesh(device.type, (distributed.launched_world_size(),))
    return _mesh


def shard(model: nn.Module, device: torch.device) -> nn.Module:
    """fully_shard each decoder layer of an EffconvForCausalLM, then a ShardedRoot over it (in place).

    The model may be in CPU memory: FSDP moves each unit's shard to `device` as it shards it, so a process never
    holds the full model on the device."""
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        return model
    full = local_parameter_bytes(model)
    mesh = device_mesh(device)
    reshard = distributed.fsdp_reshard_after_forward()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    root = ShardedRoot(model)
    fully_shard(root, mesh=mesh, reshard_after_forward=True)
    object.__setattr__(model, "_effconv_fsdp_root", root)
    root(lambda: None)  # FSDP initialises from the first forward, which must be the root's
    console.print(f"FSDP: {len(model.model.layers)} decoder layers + root sharded over {mesh.size()} processes; "
                  f"parameters per process {local_parameter_bytes(model) / 2**20:.2f} MiB of {full / 2**20:.2f} MiB",
                  soft_wrap=True)
    return model


def call(model, fn: Callable[[], Any]) -> Any:
    """`fn()`, run inside the FSDP root of `model` when it is sharded (else simply `fn()`). Nested calls on the
    same root run `fn` directly."""
    root = _root(model)
    if root is None or root.active:
        return fn()
    root.active = True
    try:
        return root(fn)
    finally:
        root.active = False


def call_all(models, fn: Callable[[], Any]) -> Any:
    """`fn()` inside the roots of several models (e.g. a student and its teacher)."""
    if not models:
        return fn()
    first, rest = models[0], list(models[1:])
    return call(first, lambda: call_all(rest, fn))


def _fsdp_modules(model) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    root = _root(model)
    return [] if root is None else [m for m in root.modules() if isinstance(m, FSDPModule)]


def reshard_all(model) -> None:
    """Make every unit sharded (its parameters the DTensor shards) before reading or writing parameters."""
    for m in _fsdp_modules(model):
        m.reshard()


# ------------------------------------------------------------------------------------------------------------
# Full tensors <-> shards (checkpoints, exports)
# ------------------------------------------------------------------------------------------------------------


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A full CPU copy of a sharded tensor (collective: every process must call it) or a copy of a plain one."""
    if is_dtensor(t):
        return t.full_tensor().detach().cpu()
    return t.detach().clone()


def local_shard(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's part of `full` in the layout of the DTensor `like` (FSDP2: torch.chunk along dim 0)."""
    placements = tuple(like.placements)
    if len(placements) != 1 or not placements[0].is_shard() or placements[0].dim != 0:
        raise EffconvError(f"unexpected FSDP placement {placements}; effconv expects Shard(0)")
    mesh = like.device_mesh
    rank, n = mesh.get_local_rank(), mesh.size()
    if tuple(full.shape) != tuple(like.shape):
        raise EffconvError(f"checkpoint tensor of shape {tuple(full.shape)} does not fit a parameter of shape "
                           f"{tuple(like.shape)}")
    chunks = torch.chunk(full, n, dim=0)
    part = chunks[rank] if rank < len(chunks) else full.new_empty((0, *full.shape[1:]))
    local = like.to_local()
    if part.shape != local.shape:
        raise EffconvError(f"shard of shape {tuple(part.shape)} does not match FSDP's {tuple(local.shape)}")
    return part


def shard_like(like: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """A DTensor laid out as `like` holding this process's part of the full tensor `full`."""
    out = torch.zeros_like(like)
    with torch.no_grad():
        out.to_local().copy_(local_shard(full, like))
    return out


@torch.no_grad()
def load_full_(param: torch.Tensor, value: torch.Tensor) -> None:
    """param <- value for a full tensor value (a sharded param keeps its part)."""
    if is_dtensor(param):
        param.to_local().copy_(local_shard(value, param))
    else:
        param.copy_(value)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with every sharded state tensor gathered (collective), the 1-process format."""
    sd = optimizer.state_dict()
    state = {}
    for idx in sorted(sd["state"]):  # the same order on every process: the gathers must pair up
        entry = sd["state"][idx]
        state[idx] = {k: (full_tensor(entry[k]) if is_dtensor(entry[k]) else entry[k]) for k in sorted(entry)}
    return {"state": state, "param_groups": sd["param_groups"]}


def shard_optimizer_state_(optimizer: torch.optim.Optimizer) -> None:
    """After optimizer.load_state_dict of a full state: keep this process's shard of each sharded param's state."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not is_dtensor(p) or p not in optimizer.state:
                continue
            st = optimizer.state[p]
            for k, v in list(st.items()):
                if torch.is_tensor(v) and not is_dtensor(v) and tuple(v.shape) == tuple(p.shape):
                    st[k] = shard_like(p, v.to(p.device))


# ------------------------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------------------------


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over sharded and plain gradients: the norm of the whole (global) gradient.

    Sharded gradients contribute the sum of squares of their local parts, summed over the processes; plain ones
    (replicated, already averaged) count once."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if is_dtensor(g)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    import torch.distributed as dist

    plain = [g for g in grads if not is_dtensor(g)]
    device = sharded[0].to_local().device
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for g in sharded:
        sq += g.to_local().float().pow(2).sum()
    dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=sharded[0].device_mesh.get_group())
    for g in plain:
        sq += g.float().pow(2).sum().to(device)
    total = sq.sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch's: grads are scaled by min(1, max/norm)
    with torch.no_grad():
        for g in sharded:
            g.to_local().mul_(coef.to(g.device))
        for g in plain:
            g.mul_(coef.to(g.device))
    return total


def average_full_(grads: list[torch.Tensor]) -> None:
    """All-reduce (mean) full gradients, one flat buffer per dtype."""
    import torch.distributed as dist

    n = distributed.launched_world_size()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= n
        offset = 0
        for g in group:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


# ------------------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------------------


def local_parameter_bytes(model) -> int:
    """Bytes of parameters this process holds (sharded: its shards)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if is_dtensor(p) else p
        total += local.numel() * local.element_size()
    return total


def plain_copy(model):
    """An ordinary (unsharded) copy of a sharded EffconvForCausalLM, or of a peft model over one, in CPU memory on
    the main process; None on the others. Collective: every process must call it."""
    reshard_all(model)
    gathered: dict[int, torch.Tensor] = {}
    state = {}
    for name, t in model.state_dict(keep_vars=True).items():  # the same order on every process
        if id(t) not in gathered:  # tied weights: gathered once
            gathered[id(t)] = full_tensor(t).cpu()
        state[name] = gathered[id(t)]
    if not distributed.is_main_process():
        return None
    peft_config = getattr(model, "peft_config", None)
    base = model.get_base_model() if peft_config else model
    with torch.device("meta"):
        twin = type(base)(base.config)
    if peft_config:
        from peft import get_peft_model

        twin = get_peft_model(twin, peft_config[model.active_adapter])
    twin.load_state_dict(state, strict=True, assign=True)
    twin_base = twin.get_base_model() if peft_config else twin
    if getattr(base.config, "tie_word_embeddings", False):
        twin_base.tie_weights()
    twin_base.model.rotary_emb = type(base.model.rotary_emb)(config=base.config)  # not in the state dict
    left = [n for n, t in [*twin.named_parameters(), *twin.named_buffers()] if t.is_meta]
    if left:
        raise EffconvError(f"internal: {left[:3]} were not gathered from the sharded model")
    return twin.eval()
