"""hybridize --attention sliding | block_sparse | gqa: end to end on tiny teachers, the MHA -> GQA merge, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_teacher
from test_hybridize import cfg_for, six_layer_dir  # noqa: F401 - fixture reused

from effconv.errors import EffconvError
from effconv.conversion.gqa import kv_head_groups, merge_kv_heads
from effconv.pipelines.hybridize import hybridize, state_dir_for
from effconv.pipelines.linearize import LinearizeConfig
from effconv.distill.transfer import set_attention_mode, attention_transfer_loss
from effconv.conversion.student import make_student


def decode_equals_parallel(model, ids):
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        step, pieces = None, []
        for t in range(ids.shape[1]):
            step = model(ids[:, t : t + 1], past_key_values=step.past_key_values if step else None, use_cache=True)
            pieces.append(step.logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attention,extra", [("sliding", dict(window=6, sinks=2)),
                                             ("block_sparse", dict(block_size=16, topk=1, seq_len=64)),
                                             ("gqa", dict(kv_heads=1))])
def test_hybridize_attention_variants_export_and_decode(six_layer_dir, tiny_model_dir, tmp_path, attention, extra):  # noqa: F811
    out = tmp_path / "out"
    result = hybridize(cfg_for(six_layer_dir, tiny_model_dir, out, ratio=0.34, select="interval", score="none",
                               attention=attention, **extra))
    kept = result.softmax_layers
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.attention_types == ["softmax" if i in kept else attention for i in range(6)]
    meta = json.loads((out / "effconv.json").read_text())
    if attention == "gqa":
        assert model.config.gqa_kv_heads == 1
        assert all(model.model.layers[i].self_attn.k_proj.out_features == model.config.head_dim
                   for i in result.converted_layers)
        assert "stage1" in meta["metrics"]  # the merged K/V projections were trained by attention transfer
    else:
        assert "stage1" not in meta["metrics"]  # sparse layers have nothing to transfer
    decode_equals_parallel(model, torch.randint(3, 400, (2, 40), generator=torch.Generator().manual_seed(0)))


def test_measured_scores_for_sliding_layers(six_layer_dir, tiny_model_dir, tmp_path):  # noqa: F811
    result = hybridize(cfg_for(six_layer_dir, tiny_model_dir, tmp_path / "out", ratio=0.5, attention="sliding",
                               window=4, stage2_tokens=0))
    assert result.scores.trained_tokens == 0 and all(s > 0 for s in result.scores.transfer_mse)


@pytest.mark.parametrize("method", ["mean", "similar"])
def test_gqa_merge_keeps_the_teacher_and_trains_merged_heads(method):
    teacher = tiny_teacher("qwen3")  # 6 query heads, 2 kv heads, q/k norm
    cfg = LinearizeConfig(attention="gqa", kv_heads=1, kv_merge=method, layers=[0, 2])
    student = make_student(teacher, cfg, torch.device("cpu"))
    assert [a.layer_type for a in (l.self_attn for l in student.model.layers)] == ["gqa", "softmax", "gqa"]
    ids = torch.randint(3, 400, (2, 20))
    with torch.no_grad():
        set_attention_mode(student.converted_attentions(), "teacher")
        torch.testing.assert_close(student(ids, use_cache=False).logits, teacher(ids).logits, rtol=1e-5, atol=1e-5)
        set_attention_mode(student.converted_attentions(), "student")
        assert not torch.allclose(student(ids, use_cache=False).logits, teacher(ids).logits, atol=1e-3)
    loss = attention_transfer_loss(student, ids, 2)
    loss.backward()
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all(".k_proj." in n or ".v_proj." in n for n in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters() if p.requires_grad)
    decode_equals_parallel(student, ids)


def test_kv_head_groups_similar_pairs_identical_heads():
    k = torch.randn(4, 3, 8)
    k[2] = k[0] * 2  # head 2 points the same way as head 0
    k[3] = k[1] * 0.5
    v = torch.cat([k[:, :, :4], k[:, :, :4]], -1)
    assert kv_head_groups(k.reshape(12, 8), v.reshape(12, 8), 4, 2, 3, "similar") == [[0, 2], [1, 3]]
    assert kv_head_groups(k.reshape(12, 8), v.reshape(12, 8), 4, 2, 3, "mean") == [[0, 1], [2, 3]]


def test_merge_rejects_bad_kv_heads():
    cpu = torch.device("cpu")
    plain = make_student(tiny_teacher("llama"), LinearizeConfig(attention="sliding", window=4, layers=[]), cpu)
    with pytest.raises(EffconvError, match="must divide"):
        merge_kv_heads(plain, [0], 3)  # the tiny teachers have 2 kv heads
    with pytest.raises(EffconvError, match="nothing to merge"):
        merge_kv_heads(plain, [0], 2)
    converted = make_student(tiny_teacher("llama"), LinearizeConfig(layers=[0]), cpu)
    with pytest.raises(EffconvError, match="only softmax layers"):
        merge_kv_heads(converted, [0], 1)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(attention="mamba"), "unknown --attention"),
        (dict(attention="sliding", window=28, sinks=4), "covers the whole --seq-len 32"),
        (dict(attention="sliding", window=0), "needs --window >= 1"),
        (dict(attention="sliding", sinks=-1), "--sinks must be >= 0"),
        (dict(attention="block_sparse", block_size=24), "power of two"),
        (dict(attention="block_sparse", block_size=16, topk=1), "cover the whole --seq-len"),
        (dict(attention="block_sparse", topk=0, seq_len=256), "--topk must be >= 1"),
        (dict(attention="gqa"), "needs --kv-heads"),
        (dict(attention="gqa", kv_heads=3), "must divide the model's 2 key/value heads"),
        (dict(attention="gqa", kv_heads=2), "must divide the model's 2 key/value heads"),
        (dict(attention="gqa", kv_heads=1, kv_merge="kmeans"), "unknown --kv-merge"),
        (dict(kv_heads=1), "applies to --attention gqa only"),
        (dict(ratio=None, softmax_layers=[9]), "out of range"),
        (dict(ratio=1.5), r"--ratio must be in \(0, 1\)"),
    ],
)
def test_bad_attention_settings_are_one_clear_error(six_layer_dir, tiny_model_dir, tmp_path, change, message):  # noqa: F811
    settings = dict(ratio=0.5)
    settings.update(change)
    with pytest.raises(EffconvError, match=message) as e:
        hybridize(cfg_for(six_layer_dir, tiny_model_dir, tmp_path / "out", **settings))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not state_dir_for(tmp_path / "out").exists()
