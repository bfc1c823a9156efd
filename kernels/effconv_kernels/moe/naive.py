"""Plain-PyTorch MoE experts in transformers' MixtralExperts layout.

gate_up_proj (E, 2I, D): rows [0, I) are the gate projection, rows [I, 2I) the up projection;
down_proj (E, D, I). out[t] = sum_j w[t, j] * down_e(silu(gate_e x_t) * up_e x_t), e = top_k_index[t, j].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _expert_ffn(x, gate_up, down):
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def naive_moe_experts(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj):
    """transformers' style: one Python iteration per expert, tokens gathered with torch.where (the oracle)."""
    out = torch.zeros_like(hidden)
    for e in range(gate_up_proj.shape[0]):
        token_idx, slot = torch.where(top_k_index == e)
        if token_idx.numel() == 0:
            continue
        y = _expert_ffn(hidden[token_idx], gate_up_proj[e], down_proj[e])
        y = y * top_k_weights[token_idx, slot, None].to(y.dtype)
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def sorted_moe_experts(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj):
    """Reference: one stable sort of the (token, slot) assignments by expert, then one matmul pair per
    contiguous expert segment (one host sync for the segment lengths)."""
    n, k = top_k_index.shape
    num_experts = gate_up_proj.shape[0]
    flat_expert = top_k_index.reshape(-1)
    order = torch.argsort(flat_expert, stable=True)
    counts = torch.bincount(flat_expert, minlength=num_experts).tolist()
    x_sorted = hidden[order // k]
    pieces = []
    for e, rows in enumerate(torch.split(x_sorted, counts)):
        if rows.shape[0]:
            pieces.append(_expert_ffn(rows, gate_up_proj[e], down_proj[e]))
    y_sorted = torch.cat(pieces) if pieces else hidden.new_zeros(0, hidden.shape[1])
    y_sorted = y_sorted * top_k_weights.reshape(-1)[order, None].to(y_sorted.dtype)
    y = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)  # back to (token, slot) order
    return y.view(n, k, -1).sum(1).to(hidden.dtype)
