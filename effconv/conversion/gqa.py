"""MHA -> GQA / MQA: merge the key/value heads of chosen layers of an effconv student.

Each group of r = Hkv / N original kv heads becomes one kv head whose K and V projections are the mean of the
group's (the GQA paper's mean-pooling conversion). `method="similar"` first regroups the kv heads so that heads
with similar K/V weights (cosine similarity of their concatenated projection rows) share a group; the query
heads travel with their kv head (q_proj rows and o_proj columns are permuted alike), which leaves the teacher
function unchanged. The original projections stay on the layer as non-persistent buffers (never exported) so
that teacher and transfer modes can still compute the exact softmax output; attention transfer then trains
the merged K/V projections to match it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import EffconvError


def kv_head_groups(k_weight: torch.Tensor, v_weight: torch.Tensor, num_kv: int, new_kv: int, head_dim: int,
                   method: str) -> list[list[int]]:
    """new_kv groups of r = num_kv / new_kv original kv heads. mean: consecutive heads; similar: greedy, each
    group seeded by the first unassigned head and filled with its most similar unassigned heads."""
    r = num_kv // new_kv
    if method == "mean":
        return [list(range(g * r, (g + 1) * r)) for g in range(new_kv)]
    rows = torch.cat([k_weight.float().reshape(num_kv, -1), v_weight.float().reshape(num_kv, -1)], dim=1)
    rows = nn.functional.normalize(rows, dim=1)
    sim = rows @ rows.T
    free, groups = list(range(num_kv)), []
    while free:
        seed = free[0]
        mates = sorted(free[1:], key=lambda j: -float(sim[seed, j]))[: r - 1]
        group = [seed] + sorted(mates)
        groups.append(group)
        free = [j for j in free if j not in group]
    return groups


def _heads(w: torch.Tensor, n: int) -> torch.Tensor:
    return w.reshape(n, -1, *w.shape[1:])


@torch.no_grad()
def merge_kv_heads(student, layers: list[int], new_kv: int, *, method: str = "mean") -> None:
    """Turn `layers` of `student` into "gqa" layers with `new_kv` key/value heads (in place)."""
    config = student.config
    num_heads, num_kv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    if new_kv < 1 or num_kv % new_kv:
        raise EffconvError(f"--kv-heads {new_kv} must divide the model's {num_kv} key/value heads "
                           f"({num_heads} query heads); choose one of {[d for d in range(1, num_kv + 1) if num_kv % d == 0]}")
    if new_kv == num_kv:
        raise EffconvError(f"--kv-heads {new_kv} is the model's own number of key/value heads: nothing to merge")
    q_per_kv = num_heads // num_kv
    for i in layers:
        attn = student.model.layers[i].self_attn
        if attn.layer_type != "softmax":
            raise EffconvError(f"layer {i} is {attn.layer_type}; only softmax layers can be merged to GQA")
        groups = kv_head_groups(attn.k_proj.weight, attn.v_proj.weight, num_kv, new_kv, hd, method)
        order = [h for g in groups for h in g]  # original kv heads in their new (grouped) order
        if order != list(range(num_kv)):  # permute query heads with their kv head: same function
            q_order = torch.tensor([kv * q_per_kv + j for kv in order for j in range(q_per_kv)])
            attn.q_proj.weight.copy_(_heads(attn.q_proj.weight, num_heads)[q_order].reshape_as(attn.q_proj.weight))
            if attn.q_proj.bias is not None:
                attn.q_proj.bias.copy_(_heads(attn.q_proj.bias, num_heads)[q_order].reshape(-1))
            w_o = attn.o_proj.weight.reshape(attn.o_proj.weight.shape[0], num_heads, hd)
            attn.o_proj.weight.copy_(w_o[:, q_order].reshape_as(attn.o_proj.weight))
        kv_order = torch.tensor(order)
        for name in ("k_proj", "v_proj"):
            old = getattr(attn, name)
            w = _heads(old.weight, num_kv)[kv_order]
            b = None if old.bias is None else _heads(old.bias, num_kv)[kv_order]
            # the teacher's projections (regrouped), for teacher / transfer mode only
            attn.register_buffer(f"teacher_{name}_weight", w.reshape_as(old.weight).clone(), persistent=False)
            attn.register_buffer(f"teacher_{name}_bias", None if b is None else b.reshape(-1).clone(), persistent=False)
            new = nn.Linear(old.in_features, new_kv * hd, bias=old.bias is not None, device=old.weight.device,
                            dtype=old.weight.dtype)
            new.weight.copy_(w.reshape(new_kv, -1, hd, old.in_features).mean(1).reshape(new_kv * hd, -1))
            if b is not None:
                new.bias.copy_(b.reshape(new_kv, -1, hd).mean(1).reshape(-1))
            setattr(attn, name, new)
        attn.layer_type = "gqa"
        attn.num_kv_heads = new_kv
        attn.teacher_num_kv_heads = num_kv
        config.attention_types[i] = "gqa"
    config.gqa_kv_heads = new_kv
