"""The chunked stage-2 loss equals the unchunked one, value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from effconv.distill.losses import kl_to_teacher_logits, next_token_distill_loss


@pytest.mark.parametrize("chunk_size", [5, 16, 1000])
def test_chunked_distill_loss_matches_full_logits(chunk_size):
    torch.manual_seed(0)
    b, t, d, v = 2, 11, 8, 37
    hidden = torch.randn(b, t, d, requires_grad=True)
    teacher_hidden = torch.randn(b, t, d)
    weight = torch.randn(v, d, requires_grad=True)
    ids = torch.randint(0, v, (b, t))
    loss = next_token_distill_loss(hidden, weight, ids, teacher_hidden, ce_weight=0.7, kl_weight=1.3,
                                   chunk_size=chunk_size)
    logits = hidden @ weight.T
    expected = 0.7 * F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()) + 1.3 * kl_to_teacher_logits(
        logits, (teacher_hidden @ weight.T).detach())  # the teacher is a fixed target
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(loss, (hidden, weight))
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    only_ce = next_token_distill_loss(hidden, weight, ids, None, ce_weight=1.0, kl_weight=0.0, chunk_size=chunk_size)
    torch.testing.assert_close(only_ce, F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))
