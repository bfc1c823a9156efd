"""Truncated backpropagation through time (--tbptt-piece), stage 1 and stage 2: the pieces carry the state (and
stage 1's softmax targets attend to the earlier pieces), so the loss is the whole block's; one piece is the
whole-block gradient; more pieces cut the gradient between them only."""

from __future__ import annotations

import pytest
import torch

from effconv.conversion.student import make_student
from effconv.distill.lora import attach_lora
from effconv.distill.losses import finetune_loss, next_token_distill_loss, tbptt_finetune_loss
from effconv.distill.transfer import attention_mode, attention_transfer_loss, tbptt_transfer_loss
from effconv.errors import EffconvError
from effconv.io.sources import load_teacher
from effconv.modeling.modeling_effconv import EffconvCache
from effconv.pipelines.linearize import linearize

from test_linearize import tiny_cfg

MIXERS = {
    "hybrid": dict(window=4, gate=False, sinks=0),
    "gated hybrid with sinks": dict(window=4, gate=True, sinks=2, decay=True, decay_memory=16.0),
    "gated linear": dict(window=0, gate=True, sinks=0, decay=True, decay_memory=16.0),
    "one softmax layer kept": dict(window=4, gate=True, sinks=2, layers=[0]),
}


def _student(model_dir, tmp_path, **kw):
    cfg = tiny_cfg(model_dir, tmp_path / "unused", **kw)
    cfg.validate()
    teacher, _, _ = load_teacher(str(model_dir), dtype=torch.float32, device="cpu")
    student = make_student(teacher, cfg, torch.device("cpu"))
    torch.manual_seed(1)
    with torch.no_grad():  # trained-looking feature maps and gates: the converted layers differ from softmax
        for name, p in student.named_parameters():
            if p.requires_grad and ("feature_map" in name or "forget_gate" in name or "window_mix" in name):
                p.add_(0.2 * torch.randn_like(p))
    peft_model = attach_lora(student, [i for i, layer in enumerate(student.model.layers) if layer.self_attn.is_converted],
                             rank=4, alpha=8.0, seed=0)
    with torch.no_grad():  # LoRA B starts at zero: give the adapters a value so that they matter
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return peft_model, student


def _grads(peft_model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    peft_model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("mixer", [*MIXERS, "sliding window with sinks"])
def test_tbptt_loss_is_the_whole_blocks_and_only_the_gradient_is_cut(tiny_model_dir, tmp_path, mixer):
    settings = MIXERS.get(mixer, dict(attention="sliding", window=4, sinks=2))
    peft_model, student = _student(tiny_model_dir, tmp_path, **settings)
    batch = torch.randint(0, student.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    kl, ce = 1.0, 0.5

    whole = finetune_loss(peft_model, student, batch, kl, ce)
    whole.backward()
    whole_grads = _grads(peft_model)

    # one piece: the same loss and the same gradients
    one = tbptt_finetune_loss(peft_model, student, batch, kl, ce, piece=24)
    torch.testing.assert_close(one, whole.detach(), rtol=1e-5, atol=1e-6)
    for name, g in _grads(peft_model).items():
        torch.testing.assert_close(g, whole_grads[name], rtol=1e-4, atol=1e-6, msg=name)

    # pieces of 8 and of 10 (the last one partial): the loss is the block's, as the state is carried
    for piece in (8, 10):
        loss = tbptt_finetune_loss(peft_model, student, batch, kl, ce, piece=piece)
        torch.testing.assert_close(loss, whole.detach(), rtol=1e-5, atol=1e-6)
        peft_model.zero_grad(set_to_none=True)

    # two pieces of 12: the gradient is the first piece's loss's plus the second's from a constant state (built
    # here by a no-grad prefill), not the whole block's
    tbptt_finetune_loss(peft_model, student, batch, kl, ce, piece=12)
    cut_grads = _grads(peft_model)
    head, counts = student.lm_head.weight, (2 * 23, 2 * 24)
    with torch.no_grad(), peft_model.disable_adapter(), attention_mode(student, "teacher"):
        teacher_hidden = student.model(input_ids=batch, use_cache=False).last_hidden_state
    first = student.model(input_ids=batch[:, :12], use_cache=False).last_hidden_state
    with torch.no_grad():
        cache = EffconvCache(student.config.num_hidden_layers)
        student.model(input_ids=batch[:, :12], cache=cache, use_cache=True)
    second = student.model(input_ids=batch[:, 12:], cache=cache, use_cache=True).last_hidden_state
    expected = (next_token_distill_loss(first, head, batch[:, :13], teacher_hidden[:, :12], ce_weight=ce,
                                        kl_weight=kl, counts=counts)
                + next_token_distill_loss(second, head, batch[:, 12:], teacher_hidden[:, 12:], ce_weight=ce,
                                          kl_weight=kl, counts=counts))
    torch.testing.assert_close(expected.detach(), whole.detach(), rtol=1e-5, atol=1e-6)
    expected.backward()
    difference = 0.0
    for name, g in _grads(peft_model).items():
        torch.testing.assert_close(cut_grads[name], g, rtol=1e-4, atol=1e-7, msg=name)
        difference = max(difference, float((g - whole_grads[name]).abs().max()))
    assert difference > 1e-5  # the cut is real: some gradient crossed it in the whole block


def test_tbptt_differs_from_fresh_pieces(tiny_model_dir, tmp_path):
    """The carried state is what the later pieces see: scoring each piece from a fresh state gives another loss."""
    peft_model, student = _student(tiny_model_dir, tmp_path, **MIXERS["gated hybrid with sinks"])
    batch = torch.randint(0, student.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    carried = tbptt_finetune_loss(peft_model, student, batch, 1.0, 0.0, piece=8)
    peft_model.zero_grad(set_to_none=True)
    with torch.no_grad():
        fresh = sum(finetune_loss(peft_model, student, batch[:, i : i + 8], 1.0, 0.0) for i in range(0, 24, 8)) / 3
    assert abs(float(carried) - float(fresh)) > 1e-3


def test_linearize_with_tbptt_trains_and_exports(tiny_model_dir, tmp_path):
    result = linearize(tiny_cfg(tiny_model_dir, tmp_path / "out", tbptt_piece=16, gate=True, sinks=2,
                                kl_weight=1.0, ce_weight=0.0))
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert result.metrics["stage2"]["tokens"] == 32 * 4 * 4  # whole blocks counted once
    assert result.metrics["stage1"]["tokens"] == 32 * 4 * 12
    assert result.metrics["stage2_val_ppl"] > 0


@pytest.mark.parametrize("change,message", [
    (dict(tbptt_piece=12), "must be a divisor of --seq-len 32"),
    (dict(tbptt_piece=32), "must be a divisor of --seq-len 32 below it"),
    (dict(tbptt_piece=-8), "must be a divisor"),
    (dict(tbptt_piece=8, attention="gqa", kv_heads=1), "applies to layers with a state or a window"),
    (dict(tbptt_piece=8, attn_ce_weight=0.1), "does not take --attn-ce-weight"),
    (dict(tbptt_piece=8, layers_per_block=1), "not supported with --layers-per-block"),
])
def test_bad_tbptt_piece_is_one_clear_error(tiny_model_dir, tmp_path, change, message):
    with pytest.raises(EffconvError, match=message):
        linearize(tiny_cfg(tiny_model_dir, tmp_path / "out", **change))
    assert not (tmp_path / "out").exists()


def _transfer_grads(student) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad and p.grad is not None}
    student.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("mixer", list(MIXERS))
def test_tbptt_attention_transfer_is_the_whole_blocks_loss_with_the_gradient_cut(tiny_model_dir, tmp_path, mixer):
    """Stage 1 over pieces: each converted layer continues from its state and its softmax target attends to the
    earlier pieces, so the loss is attention transfer's over the whole block; the gradient is the first piece's
    plus the second's from a constant state."""
    cfg = tiny_cfg(tiny_model_dir, tmp_path / "unused", **MIXERS[mixer])
    cfg.validate()
    teacher, _, _ = load_teacher(str(tiny_model_dir), dtype=torch.float32, device="cpu")
    student = make_student(teacher, cfg, torch.device("cpu"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    last = max(i for i, layer in enumerate(student.model.layers) if layer.self_attn.is_converted)
    batch = torch.randint(0, student.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))

    whole = attention_transfer_loss(student, batch, last)
    whole.backward()
    whole_grads = _transfer_grads(student)
    assert whole_grads

    one = tbptt_transfer_loss(student, batch, last, piece=24)
    torch.testing.assert_close(one, whole.detach(), rtol=1e-5, atol=1e-7)
    for name, g in _transfer_grads(student).items():
        torch.testing.assert_close(g, whole_grads[name], rtol=1e-4, atol=1e-7, msg=name)

    for piece in (8, 10):
        with torch.no_grad():
            torch.testing.assert_close(tbptt_transfer_loss(student, batch, last, piece=piece, backward=False),
                                       whole.detach(), rtol=1e-5, atol=1e-7)

    tbptt_transfer_loss(student, batch, last, piece=12)
    cut_grads = _transfer_grads(student)
    first = attention_transfer_loss(student, batch[:, :12], last)
    with torch.no_grad():
        cache = EffconvCache(student.config.num_hidden_layers)
        attention_transfer_loss(student, batch[:, :12], last, cache=cache)
    second = attention_transfer_loss(student, batch[:, 12:], last, cache=cache)
    ((first + second) / 2).backward()
    difference = 0.0
    for name, g in _transfer_grads(student).items():
        torch.testing.assert_close(cut_grads[name], g, rtol=1e-4, atol=1e-7, msg=name)
        difference = max(difference, float((g - whole_grads[name]).abs().max()))
    assert difference > 1e-6  # the cut is real
