"""Mixture-of-experts FFN for effconv models (shipped inside every export, so only torch and transformers here).

Weights use transformers' Mixtral / Qwen-MoE layout so the native exports are a renaming:
router `gate.weight` (E, D); experts `experts.gate_up_proj` (E, 2I, D) with gate rows first, then up rows,
and `experts.down_proj` (E, D, I); optional always-on `shared_expert` (a gated MLP).
Routing is softmax over all experts, then top-k (optionally renormalised). `router_bias` is added to the
probabilities for the top-k choice only (bias-based load balancing); it never changes the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .backend import kernels as _kernels
from .backend import use_kernels


class SharedExpert(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def experts_loop(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, act_fn) -> torch.Tensor:
    """sum_k w_k * down_e(act(gate_e x) * up_e x), one expert at a time over the tokens routed to it."""
    out = torch.zeros_like(hidden)
    num_experts = gate_up_proj.shape[0]
    for e in torch.unique(top_k_index).tolist():
        if not 0 <= e < num_experts:
            continue
        token_idx, slot = torch.where(top_k_index == e)
        gate, up = F.linear(hidden[token_idx], gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(act_fn(gate) * up, down_proj[e]) * top_k_weights[token_idx, slot, None].to(hidden.dtype)
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def experts_masked(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, act_fn) -> torch.Tensor:
    """The same sum computed with every expert for every token, the unchosen ones weighted 0: two large matrix
    products (the dense FFN's arithmetic) instead of a gather per expert. On a CPU with many experts chosen per
    token (top-15 of 48) it is faster, and for training it keeps (tokens, E * I) activations where the loop keeps
    a copy of the input per chosen expert (k times the layer input: 16 GB for SmolLM2 at 2,048 tokens, top-30)."""
    num_experts, two_i, d = gate_up_proj.shape
    weights = torch.zeros(hidden.shape[0], num_experts, dtype=hidden.dtype, device=hidden.device)
    weights = weights.scatter(1, top_k_index, top_k_weights.to(hidden.dtype))
    gate, up = F.linear(hidden, gate_up_proj.reshape(num_experts * two_i, d)).view(-1, num_experts, two_i).chunk(2, -1)
    inner = act_fn(gate) * up * weights[..., None]  # (N, E, I)
    return inner.flatten(1) @ down_proj.transpose(1, 2).reshape(num_experts * (two_i // 2), d)


class MoeExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str, backend: str = "auto"):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.hidden_act = hidden_act
        self.act_fn = ACT2FN[hidden_act]
        self.backend = backend  # the config's attention_backend: auto | triton | reference (backend.py)
        # "masked" forces experts_masked (moe-upcycle --experts-compute sets it for distillation only)
        self.compute = "auto"
        if backend == "triton" and hidden_act != "silu":
            raise ValueError(f"the Triton expert kernel computes SwiGLU experts; this model's activation is {hidden_act}")

    def forward(self, hidden, top_k_index, top_k_weights) -> torch.Tensor:
        if self.compute == "masked":
            return experts_masked(hidden, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, self.act_fn)
        if self.hidden_act == "silu" and use_kernels(self.backend, hidden):
            return _kernels.moe_experts(hidden, top_k_index, top_k_weights.to(hidden.dtype), self.gate_up_proj,
                                        self.down_proj, backend="triton")
        if not hidden.is_cuda and 4 * top_k_index.shape[1] >= self.num_experts:
            return experts_masked(hidden, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, self.act_fn)
        return experts_loop(hidden, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, self.act_fn)


class MoeMLP(nn.Module):
    """Sparse FFN: router -> top-k experts (+ shared expert). After a forward, `router_logits` (tokens, E) is
    kept when `keep_router_logits` is set (load-balancing loss) and `last_load` holds the tokens per expert."""

    def __init__(self, config):
        super().__init__()
        d, e = config.hidden_size, config.num_experts
        self.num_experts, self.top_k = e, config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(d, e, bias=False)
        self.register_buffer("router_bias", torch.zeros(e), persistent=True)
        backend = getattr(config, "attention_backend", "auto")
        self.experts = MoeExperts(e, d, config.moe_intermediate_size, config.hidden_act, backend=backend)
        self.shared_expert = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = SharedExpert(d, config.shared_expert_intermediate_size, config.hidden_act)
        self.keep_router_logits = False
        self.router_logits: torch.Tensor | None = None
        self.last_load: torch.Tensor | None = None

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.gate(flat)
        probs = torch.softmax(logits.float(), dim=-1)
        choice = probs + self.router_bias.float()  # a zero bias changes nothing; testing for one would sync
        top_index = torch.topk(choice, self.top_k, dim=-1).indices
        top_weights = probs.gather(-1, top_index)
        if self.norm_topk_prob:
            top_weights = top_weights / top_weights.sum(-1, keepdim=True)
        return logits, top_weights, top_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, top_weights, top_index = self.route(flat)
        if self.keep_router_logits:
            self.router_logits = logits
        with torch.no_grad():
            # index_add, not bincount: bincount on CUDA reads the max back to the host (no CUDA graph then)
            flat_index = top_index.flatten()
            self.last_load = torch.zeros(self.num_experts, dtype=torch.long, device=flat_index.device).index_add_(
                0, flat_index, torch.ones_like(flat_index))
        out = self.experts(flat, top_index, top_weights.to(x.dtype))
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        return out.view(shape)


def load_balancing_loss(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss E * sum_e f_e * P_e (1.0 when perfectly balanced)."""
    num_experts = router_logits.shape[-1]
    probs = torch.softmax(router_logits.float(), dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices
    fraction = F.one_hot(chosen, num_experts).float().sum(1).mean(0) / top_k
    return num_experts * (fraction * probs.mean(0)).sum()
