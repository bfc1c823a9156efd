"""Attention transfer, the one protocol: every converted attention layer learns to reproduce its teacher's
softmax output on the same inputs (MSE after o_proj, optionally plus the attention-map cross-entropy of Hedgehog).

In transfer mode a converted layer computes both outputs from the same q, k, v, records the loss and passes the
*softmax* output on, so every layer trains on the teacher's own hidden states and no gradient crosses layers
(which is what lets block-wise and FSDP runs stream one layer at a time). In teacher mode a converted layer
runs the exact softmax attention it replaced (a "gqa" layer: with the teacher's own key/value projections), so a
student doubles as its teacher without a second copy of the weights.

The modes patch the layers' forward for the time they are set; the model code itself (effconv/modeling, shipped in
every export) knows nothing of training.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..modeling.attention_ops import hybrid_attention_weights
from ..modeling.modeling_effconv import LayerCache
from .pieces import over_pieces

ATTENTION_MODES = ("student", "teacher", "transfer")


class _TransferMSE(torch.autograd.Function):
    """F.mse_loss(y_pred.float(), y_true.float()) in fewer passes over the (B, T, hidden) activations (they are
    ~5% of a stage-1 step on the H100 otherwise): the fp32 difference is formed once and saved, the sum of
    squares is one dot, and the gradient is written straight in y_pred's dtype. Same fp32 math; only the
    loss's summation order differs."""

    @staticmethod
    def forward(ctx, y_pred, y_true):
        diff = y_pred.to(torch.float32, copy=True).sub_(y_true).flatten()  # copy: never modify y_pred in place
        ctx.save_for_backward(diff)
        ctx.pred_shape, ctx.pred_dtype = y_pred.shape, y_pred.dtype
        return torch.dot(diff, diff) / max(diff.numel(), 1)

    @staticmethod
    def backward(ctx, grad):
        (diff,) = ctx.saved_tensors
        scale = grad * (2.0 / max(diff.numel(), 1))
        grad_pred = torch.mul(diff, scale, out=torch.empty(diff.shape, dtype=ctx.pred_dtype, device=diff.device))
        grad_pred = grad_pred.view(ctx.pred_shape)
        return grad_pred, (-grad_pred if ctx.needs_input_grad[1] else None)


def transfer_mse(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
    """Attention-transfer loss of one layer: mean squared error in fp32."""
    return _TransferMSE.apply(y_pred, y_true)


def attention_map_ce(attn, q: torch.Tensor, k: torch.Tensor, features=None, log_gate=None) -> torch.Tensor:
    """Cross-entropy between the softmax and the converted attention maps (Hedgehog's loss); O(T^2). `features`:
    the (q, k) the feature maps read, when not q and k themselves; `log_gate`: a gated layer's gates."""
    feature_q, feature_k = features if features is not None else (q, k)
    t = q.shape[2]
    k_rep = k.float().repeat_interleave(attn.num_heads // attn.num_kv_heads, 1)
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    teacher = torch.softmax((q.float() @ k_rep.transpose(-1, -2) * attn.scale).masked_fill(~causal, float("-inf")), -1)
    mix = getattr(attn, "window_mix", torch.zeros(attn.num_heads, device=q.device))
    student = hybrid_attention_weights(
        q, k, attn.feature_map_q(feature_q), attn.feature_map_k(feature_k), mix, window=attn.window, scale=attn.scale,
        log_decay=attn.log_decay(), log_gate=log_gate, sinks=attn.sinks, separate=attn.separate,
    )
    return -(teacher * torch.log(student.clamp_min(1e-12))).sum(-1).mean()


def _holds_teacher_kv(attn) -> bool:
    """A "gqa" layer during conversion keeps the teacher's key/value projections (conversion/gqa.py)."""
    return attn.layer_type == "gqa" and getattr(attn, "teacher_k_proj_weight", None) is not None


def _teacher_kv(attn, hidden_states, position_embeddings):
    b, t, _ = hidden_states.shape
    n = attn.teacher_num_kv_heads
    k = F.linear(hidden_states, attn.teacher_k_proj_weight, attn.teacher_k_proj_bias).view(b, t, n, -1)
    v = F.linear(hidden_states, attn.teacher_v_proj_weight, attn.teacher_v_proj_bias).view(b, t, n, -1)
    if attn.config.qk_norm:
        k = attn.k_norm(k)
    cos, sin = position_embeddings
    k = apply_rotary_pos_emb(k.transpose(1, 2), k.transpose(1, 2), cos, sin)[0]
    return k, v.transpose(1, 2)


def teacher_forward(attn, hidden_states, position_embeddings, cache=None, key_mask=None):
    """The layer as the teacher had it: exact softmax attention (with the teacher's K/V heads for gqa layers)."""
    q, k, v = attn.project(hidden_states, position_embeddings)
    if _holds_teacher_kv(attn):
        with torch.no_grad():
            k, v = _teacher_kv(attn, hidden_states, position_embeddings)
    return attn.merge_heads(attn.softmax(q, k, v, cache, key_mask))


def _softmax_cache(cache):
    """Transfer over consecutive pieces of a block (tbptt_transfer_loss): the layer's cache holds the converted
    attention's state, and beside it (an attribute set here, unknown to the model code) the softmax keys and
    values of the pieces so far, which the softmax target of a later piece attends to."""
    if cache is None:
        return None
    if getattr(cache, "transfer_softmax", None) is None:
        cache.transfer_softmax = LayerCache()
    return cache.transfer_softmax


def transfer_forward(attn, losses: dict, attn_ce_weight: float, hidden_states, position_embeddings, cache=None,
                     key_mask=None):
    """Record MSE(converted output, softmax output) in `losses[attn]`; return the softmax output. With a cache
    (a later piece of a block), the converted attention continues from its state and the softmax one attends to
    the earlier pieces' keys."""
    if cache is not None and (attn.layer_type == "gqa" or attn_ce_weight > 0):
        raise ValueError("attention transfer over pieces is for recurrent layers without the attention-map loss")
    if attn.layer_type == "gqa":  # the merged K/V projections learn to match the teacher's
        q, k, v = attn.project(hidden_states, position_embeddings)
        with torch.no_grad():
            k_t, v_t = _teacher_kv(attn, hidden_states, position_embeddings) if _holds_teacher_kv(attn) else (k, v)
            y_true = attn.merge_heads(attn.softmax(q, k_t, v_t, None, key_mask))
        losses[attn] = transfer_mse(attn.merge_heads(attn.softmax(q, k, v, None, key_mask)), y_true)
        return y_true
    with torch.no_grad():
        q, k, v, *unrotated = attn.project(hidden_states, position_embeddings, unrotated=attn.features_unrotated)
        y_true = attn.merge_heads(attn.softmax(q, k, v, _softmax_cache(cache), key_mask))
    features = tuple(unrotated) or None
    log_gate = attn.log_gate(hidden_states)  # trained: outside no_grad
    loss = transfer_mse(attn.merge_heads(attn.converted(q, k, v, cache, key_mask, features, log_gate)), y_true)
    if attn_ce_weight > 0 and not attn.is_sparse:  # sparse layers have no attention-map parameters
        loss = loss + attn_ce_weight * attention_map_ce(attn, q, k, features, log_gate)
    losses[attn] = loss
    return y_true


def set_attention_mode(attentions: Iterable, mode: str, *, losses: dict | None = None,
                       attn_ce_weight: float = 0.0) -> None:
    """student: the converted attention (the layers' own forward); teacher: exact softmax; transfer: both, each
    layer's loss recorded in `losses` (keyed by the attention module)."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"unknown attention mode {mode!r}; choose one of {ATTENTION_MODES}")
    if mode == "transfer" and losses is None:
        raise ValueError("transfer mode needs a dict to record the losses in")
    for attn in attentions:
        attn.__dict__.pop("forward", None)  # back to the class's forward (student)
        if mode == "teacher":
            attn.forward = partial(teacher_forward, attn)
        elif mode == "transfer":
            attn.forward = partial(transfer_forward, attn, losses, attn_ce_weight)


@contextmanager
def attention_mode(model, mode: str, **kwargs) -> Iterator[dict]:
    """Every converted layer of `model` (an effconv model or a peft wrapper of one) in `mode` for the block;
    yields the dict transfer mode records its losses in. Back to student mode afterwards, also on errors."""
    losses: dict = {}
    attentions = model.converted_attentions()
    set_attention_mode(attentions, mode, losses=losses, **kwargs)
    try:
        yield losses
    finally:
        set_attention_mode(attentions, "student")
        losses.clear()


def attention_transfer_loss(student, batch: torch.Tensor, last_layer: int, attn_ce_weight: float = 0.0,
                            cache=None) -> torch.Tensor:
    """Mean transfer loss of the converted layers on a batch of token ids (layers past `last_layer` are not run);
    `cache` (an EffconvCache): the batch continues the tokens that cache has seen."""
    with attention_mode(student, "transfer", attn_ce_weight=attn_ce_weight) as losses:
        student.model(input_ids=batch, cache=cache, use_cache=cache is not None, num_layers=last_layer + 1)
        return torch.stack([losses[a] for a in student.converted_attentions()]).mean()


def tbptt_transfer_loss(student, batch: torch.Tensor, last_layer: int, piece: int, *,
                        backward: bool = True) -> torch.Tensor:
    """Attention transfer by truncated backpropagation through time: the (B, T) block in pieces of `piece`
    tokens, each converted layer continuing from the state the previous piece left (gradient cut between pieces)
    and its softmax target attending to the whole block so far. The loss is attention_transfer_loss's over the
    whole block; with `backward` each piece's share is backpropagated at once (activation memory: one piece's).
    Returns the loss without a graph."""
    t = batch.shape[1]

    def piece_loss(start: int, stop: int, cache) -> torch.Tensor:
        return attention_transfer_loss(student, batch[:, start:stop], last_layer, cache=cache) * ((stop - start) / t)

    return over_pieces(student.config.num_hidden_layers, t, piece, piece_loss, device=batch.device,
                       backward=backward)


def transfer_loss_fn(student, last_layer: int, attn_ce_weight: float = 0.0, tbptt_piece: int = 0):
    """run_stage's loss function for attention transfer and its `backward` flag: a sharded (FSDP) student
    streams its layers and leaves the gradients itself (transfer_backward), as does transfer over pieces."""
    from ..training import fsdp

    if fsdp.is_sharded(student):
        return (lambda b: (transfer_backward(student, b, last_layer, attn_ce_weight), {})), False
    if tbptt_piece:
        return (lambda b: (tbptt_transfer_loss(student, b, last_layer, tbptt_piece), {})), False
    return (lambda b: (attention_transfer_loss(student, b, last_layer, attn_ce_weight), {})), True


def transfer_backward(student, batch: torch.Tensor, last_layer: int, attn_ce_weight: float = 0.0) -> torch.Tensor:
    """One attention-transfer step on a sharded student (inside `fsdp.call(student, ...)`): the loss of
    `attention_transfer_loss`, its gradients left on the sharded parameters (averaged over processes), one
    layer gathered at a time. Returns the loss without a graph."""
    from ..training.distributed import is_dtensor
    from ..training.fsdp import average_full_, shard_like

    inner = student.model
    n = len(student.converted_attentions())
    with torch.no_grad():  # as EffconvModel.forward: embeddings (root unit, gathered by `call`) and rotary tables
        hidden = inner.embed_tokens(batch)
        b, t = batch.shape
        position_ids = torch.arange(t, device=hidden.device)[None].expand(b, -1)
        position_embeddings = inner.rotary_emb(hidden, position_ids)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    with attention_mode(student, "transfer", attn_ce_weight=attn_ce_weight) as losses:
        for layer in list(inner.layers)[: last_layer + 1]:
            layer.unshard()  # gathered by hand: the layer's FSDP hooks are bypassed (layer.forward)
            try:
                hidden = layer.forward(hidden, position_embeddings, None, None).detach()
                attn = layer.self_attn
                if attn.is_converted:
                    loss = losses.pop(attn)
                    if loss.requires_grad:
                        (loss / n).backward()  # = d mean(losses) / d this layer's parameters
                    total += loss.detach().float()
                named = [(name, p) for name, p in layer.named_parameters() if p.requires_grad and p.grad is not None]
                grads = [p.grad for _, p in named]
                for _, p in named:
                    p.grad = None
                if grads:
                    average_full_(grads)
            finally:
                layer.reshard()
            sharded = dict(layer.named_parameters())
            for (name, _), g in zip(named, grads):
                p = sharded[name]
                g = shard_like(p, g) if is_dtensor(p) else g
                p.grad = g if p.grad is None else p.grad + g
    return total / n
