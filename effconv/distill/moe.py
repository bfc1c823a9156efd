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
from .losses import next_token_distill_loss


def _layer_outputs(model, store: list[torch.Tensor]):
    layers = model.model.layers if hasattr(model, "model") and hasattr(model.model, "layers") else model.base_model.model.model.layers
    return [layer.register_forward_hook(lambda m, a, out: store.append(out)) for layer in layers]


def _causal_lm(model):
    """The EffconvForCausalLM inside a peft wrapper (LoRA layers are injected in place, so it runs them)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def distill_loss(student, teacher, batch: torch.Tensor, cfg: MoeRecoveryArgs) -> tuple[torch.Tensor, dict]:
    """KL(teacher || student) on next-token distributions + optional hidden MSE + load balancing.

    The KL is formed from the final hidden states a chunk of positions at a time (losses.next_token_distill_loss):
    the output head is the dense model's, untouched by upcycling, so both sides share it."""
    want_hidden = cfg.hidden_mse_weight > 0
    t_hidden: list[torch.Tensor] = []
    s_hidden: list[torch.Tensor] = []
    hooks = _layer_outputs(teacher, t_hidden) if want_hidden else []
    try:
        with torch.no_grad():
            t_last = fsdp.call(teacher, lambda: teacher.model(input_ids=batch, use_cache=False).last_hidden_state)
    finally:
        for h in hooks:
            h.remove()
    layers = moe_layers(student)
    for m in layers:
        m.keep_router_logits = cfg.load_balancing == "aux"
    hooks = _layer_outputs(student, s_hidden) if want_hidden else []
    lm = _causal_lm(student)
    try:
        s_last = lm.model(input_ids=batch, use_cache=False).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    kl = next_token_distill_loss(s_last, lm.lm_head.weight, batch, t_last, ce_weight=0.0, kl_weight=1.0)
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


def set_experts_compute(model, compute: str) -> None:
    """auto | masked for every MoE layer's routed experts (MoeExperts.compute)."""
    for m in moe_layers(model):
        m.experts.compute = compute


def top_k_at(step: int, planned_steps: int, start_k: int, end_k: int, anneal_fraction: float) -> int:
    """Top-k annealing: k falls linearly from start_k to end_k over the first anneal_fraction of the planned steps,
    then stays at end_k (the exported model's k), so the last steps always train the exported routing."""
    anneal_steps = anneal_fraction * planned_steps
    if start_k <= end_k or step >= anneal_steps:
        return end_k
    return round(start_k + (end_k - start_k) * step / anneal_steps)


def set_top_k(model, k: int) -> None:
    for m in moe_layers(model):
        m.top_k = k


def routing_coverage(student, dense, blocks: torch.Tensor, batch_size: int) -> dict | None:
    """How much of what the dense FFN computed for a token its MoE layer still runs: per token, the share of the
    dense FFN's activation mass (|act(gate x) * up x| of each neuron times the norm of its down-projection
    column) that lies in the shared expert's and the chosen experts' neurons, for the token's input x to the MoE
    layer; mean over tokens and layers. `oracle_coverage` is the same for the top-k experts by that mass (the best
    any router can do with these experts). None unless every MoE layer was split from `dense`'s FFN neurons, and
    for a sharded dense model (its FFN weights are gathered only inside its own forward)."""
    return held_out_metrics(student, dense, blocks, batch_size)["coverage"]


def held_out_metrics(student, teacher, blocks: torch.Tensor, batch_size: int) -> dict:
    """One pass of both models over held-out blocks: next-token loss of each, mean KL(teacher || student) per token,
    each MoE layer's busiest expert's share of the routed tokens (1/E: perfectly balanced) and the routing
    coverage (routing_coverage; None where it does not apply)."""
    return fsdp.call_all([student, teacher], lambda: _held_out_metrics(student, teacher, blocks, batch_size))


@torch.no_grad()
def _held_out_metrics(student, teacher, blocks, batch_size) -> dict:
    layers = moe_layers(student)
    with_coverage = bool(layers) and not fsdp.is_sharded(teacher) and all(
        getattr(m, "dense_neurons", None) is not None for m in layers)
    dense_mlps = [layer.mlp for layer in teacher.model.layers]
    coverage_sums = torch.zeros(len(layers), 2, dtype=torch.float64)
    loads = [torch.zeros(m.num_experts) for m in layers]
    totals = dict(student=0.0, teacher=0.0, kl=0.0)
    tokens = predictions = 0

    def measure(i: int, x: torch.Tensor) -> None:
        moe, mlp = layers[i], dense_mlps[i]
        shared, routed = moe.dense_neurons  # index tensors: (S,) and (E, m)
        flat = x.reshape(-1, x.shape[-1])
        gate, up = F.linear(flat, mlp.gate_proj.weight), F.linear(flat, mlp.up_proj.weight)
        mass = (mlp.act_fn(gate) * up).float().abs() * mlp.down_proj.weight.float().norm(dim=0)
        total = mass.sum(-1).clamp_min(1e-12)
        per_expert = mass[:, routed.to(mass.device)].sum(-1)  # (N, E)
        base = mass[:, shared.to(mass.device)].sum(-1)
        best = per_expert.topk(moe.top_k, dim=-1).indices
        for j, idx in enumerate((moe.route(flat)[2], best)):
            coverage_sums[i, j] += float(((base + per_expert.gather(1, idx).sum(-1)) / total).sum())

    hooks = [m.register_forward_hook(lambda mod, args, out, i=i: measure(i, args[0])) for i, m in enumerate(layers)] \
        if with_coverage else []
    device = next(student.parameters()).device
    try:
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start : start + batch_size].to(device)
            s = F.log_softmax(student(input_ids=batch, use_cache=False).logits.float(), -1)
            for acc, m in zip(loads, layers):
                acc += m.last_load.float().cpu()
            t = F.log_softmax(teacher(input_ids=batch, use_cache=False).logits.float(), -1)
            totals["kl"] += float((t.exp() * (t - s)).sum())
            targets = batch[:, 1:, None]
            totals["student"] -= float(s[:, :-1].gather(-1, targets).sum())
            totals["teacher"] -= float(t[:, :-1].gather(-1, targets).sum())
            tokens += batch.numel()
            predictions += targets.numel()
    finally:
        for h in hooks:
            h.remove()
    coverage = None
    if with_coverage:
        per_layer = (coverage_sums / max(tokens, 1)).tolist()
        coverage = {"coverage": sum(c for c, _ in per_layer) / len(per_layer),
                    "oracle_coverage": sum(o for _, o in per_layer) / len(per_layer),
                    "per_layer": [round(c, 4) for c, _ in per_layer]}
    return {"loss": totals["student"] / max(predictions, 1), "teacher_loss": totals["teacher"] / max(predictions, 1),
            "kl": totals["kl"] / max(tokens, 1), "max_expert_share": [float(x.max() / x.sum()) for x in loads],
            "coverage": coverage}


def load_balance(loads: list[float], num_experts: int) -> float:
    """The balance figure: mean over layers of the busiest expert's share of routed tokens times the number of
    experts (1.0: perfectly balanced; E: every token to one expert)."""
    return sum(loads) / len(loads) * num_experts if loads else float("nan")
