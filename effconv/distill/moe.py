"""Recovering an upcycled MoE model by distillation from its dense teacher: KL on next-token distributions,
optional hidden-state MSE, and load balancing (an auxiliary loss over the global batch, or a selection bias).

`cfg` below is any settings object with the MoE recovery fields of MoeUpcycleConfig.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import MoeRecoveryArgs
from ..conversion.moe import moe_layers
from ..training import distributed, fsdp
from .lora import attach_lora
from .losses import kl_to_teacher_logits


def _layer_outputs(model, store: list[torch.Tensor]):
    layers = model.model.layers if hasattr(model, "model") and hasattr(model.model, "layers") else model.base_model.model.model.layers
    return [layer.register_forward_hook(lambda m, a, out: store.append(out)) for layer in layers]


def distill_loss(student, teacher, batch: torch.Tensor, cfg: MoeRecoveryArgs) -> tuple[torch.Tensor, dict]:
    """KL(teacher || student) on next-token distributions + optional hidden MSE + load balancing."""
    want_hidden = cfg.hidden_mse_weight > 0
    t_hidden: list[torch.Tensor] = []
    s_hidden: list[torch.Tensor] = []
    hooks = _layer_outputs(teacher, t_hidden) if want_hidden else []
    try:
        with torch.no_grad():
            t_logits = fsdp.call(teacher, lambda: teacher(input_ids=batch, use_cache=False).logits.float())
    finally:
        for h in hooks:
            h.remove()
    layers = moe_layers(student)
    for m in layers:
        m.keep_router_logits = cfg.load_balancing == "aux"
    hooks = _layer_outputs(student, s_hidden) if want_hidden else []
    try:
        s_logits = student(input_ids=batch, use_cache=False).logits.float()
    finally:
        for h in hooks:
            h.remove()
    kl = kl_to_teacher_logits(s_logits, t_logits)
    loss = kl
    logs = {"kl": kl.detach()}  # no float(): a host sync every step (the training loop drops logs anyway)
    if want_hidden:
        mse = torch.stack([F.mse_loss(s.float(), t.float()) for s, t in zip(s_hidden, t_hidden)]).mean()
        loss = loss + cfg.hidden_mse_weight * mse
    if cfg.load_balancing == "aux":
        aux = torch.stack([global_balancing_loss(m.router_logits, m.top_k) for m in layers]).mean()
        loss = loss + cfg.aux_weight * aux
        for m in layers:
            m.keep_router_logits, m.router_logits = False, None
    elif cfg.load_balancing == "bias":
        with torch.no_grad():  # auxiliary-loss-free balancing: raise the bias of under-used experts
            for m in layers:
                load = distributed.sum_over_processes(m.last_load).float()  # the global batch's load
                m.router_bias += cfg.bias_rate * torch.sign(load.mean() - load)
    return loss, logs


def global_balancing_loss(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """modeling.moe.load_balancing_loss with the routed fractions f_e of the global batch: under accelerate launch
    each process holds 1/N of the tokens, and the mean over processes of E * sum_e f_e(global) * P_e(local) is the
    loss of the global batch (f_e carries no gradient), so N processes follow the 1-process run. One process: the
    same as load_balancing_loss."""
    num_experts = router_logits.shape[-1]
    probs = torch.softmax(router_logits.float(), dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices
    fraction = F.one_hot(chosen, num_experts).float().sum(1).mean(0) / top_k
    fraction = distributed.mean_over_processes(fraction, distributed.get_accelerator())  # equal tokens per process
    return num_experts * (fraction * probs.mean(0)).sum()


def kl_to_teacher(student, teacher, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean KL(teacher || student) per token over `blocks` (sharded models run through their FSDP roots)."""
    return fsdp.call_all([student, teacher], lambda: _kl_to_teacher(student, teacher, blocks, batch_size))


@torch.no_grad()
def _kl_to_teacher(student, teacher, blocks: torch.Tensor, batch_size: int) -> float:
    device = next(student.parameters()).device
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start : start + batch_size].to(device)
        s = F.log_softmax(student(input_ids=batch, use_cache=False).logits.float(), -1)
        t = F.log_softmax(teacher(input_ids=batch, use_cache=False).logits.float(), -1)
        total += float((t.exp() * (t - s)).sum())
        count += batch.numel()
    return total / max(count, 1)


def expert_load(model, blocks: torch.Tensor, batch_size: int) -> list[float]:
    """Mean over layers of the largest expert's share of routed tokens (1/E is perfectly balanced)."""
    return fsdp.call(model, lambda: _expert_load(model, blocks, batch_size))


@torch.no_grad()
def _expert_load(model, blocks: torch.Tensor, batch_size: int) -> list[float]:
    device = next(model.parameters()).device
    layers = moe_layers(model)
    loads = [torch.zeros(m.num_experts) for m in layers]
    for start in range(0, blocks.shape[0], batch_size):
        model(input_ids=blocks[start : start + batch_size].to(device), use_cache=False)
        for acc, m in zip(loads, layers):
            acc += m.last_load.float().cpu()
    return [float(x.max() / x.sum()) for x in loads]


def mark_trainable(model, cfg: MoeRecoveryArgs) -> None:
    """Routers (and with --train experts the experts) trainable, everything else frozen."""
    model.requires_grad_(False)
    for m in moe_layers(model):
        m.gate.weight.requires_grad_(True)
        if cfg.train == "experts":
            m.experts.requires_grad_(True)
            if m.shared_expert is not None:
                m.shared_expert.requires_grad_(True)


def trainable_model(model, cfg):
    """The model distillation trains: routers (and experts) trainable in place, or a peft wrapper with LoRA on every
    attention projection beside the routers (--train router-lora)."""
    mark_trainable(model, cfg)
    if cfg.train != "router-lora":
        return model
    peft_model = attach_lora(model, range(len(model.model.layers)), rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                             seed=cfg.seed)
    for m in moe_layers(peft_model):
        m.gate.weight.requires_grad_(True)  # peft freezes everything that is not an adapter
    return peft_model
