"""effconv models with sparse softmax layers ("sliding" with sinks, "block_sparse" top-k): token-by-token and
chunked decoding equal the parallel forward; the sliding cache stays bounded; teacher mode is unchanged."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_teacher
from effconv.conversion.student import build_student, effconv_config_from_teacher
from effconv.modeling.attention_ops import block_sparse_attention, select_key_blocks, sliding_window_attention
from effconv.distill.transfer import attention_mode, set_attention_mode


def sparse_student(arch, types, *, window=5, sinks=2, block=4, topk=2):
    teacher = tiny_teacher(arch)
    config = effconv_config_from_teacher(teacher.config, window_size=window, attention_types=types)
    config.sink_tokens, config.sparse_block_size, config.sparse_topk = sinks, block, topk
    return teacher, build_student(teacher, config).eval()


def decode_pieces(student, x, steps):
    with torch.no_grad():
        out = student(x[:, : steps[0]], use_cache=True)
        cache, pieces, i = out.past_key_values, [out.logits], steps[0]
        for n in steps[1:]:
            pieces.append(student(x[:, i : i + n], past_key_values=cache, use_cache=True).logits)
            i += n
    return torch.cat(pieces, 1), cache


@pytest.mark.parametrize("types", [["sliding", "softmax", "sliding"], ["block_sparse", "linear", "block_sparse"],
                                   ["sliding", "block_sparse", "softmax"]])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_sparse_decode_equals_parallel_forward(arch, types):
    _, student = sparse_student(arch, types)
    x = torch.randint(3, 400, (2, 27))
    with torch.no_grad():
        full = student(x, use_cache=False).logits
    one_by_one, _ = decode_pieces(student, x, [1] * 27)
    torch.testing.assert_close(one_by_one, full, rtol=1e-4, atol=1e-5)
    chunked, _ = decode_pieces(student, x, [6, 3, 1, 5, 12])
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-5)


def test_sparse_layers_differ_from_softmax_and_match_full_attention_in_the_limit():
    teacher, student = sparse_student("llama", ["sliding", "block_sparse", "sliding"], window=4, sinks=1, block=4, topk=1)
    x = torch.randint(3, 400, (1, 30))
    with torch.no_grad():
        sparse = student(x, use_cache=False).logits
        set_attention_mode(student.converted_attentions(), "teacher")
        dense = student(x, use_cache=False).logits
        assert not torch.allclose(sparse, dense, atol=1e-3)  # the layers really are sparse
        torch.testing.assert_close(dense, teacher(x).logits, rtol=1e-5, atol=1e-5)
    # a window / topk covering the whole context is exact softmax attention
    _, wide = sparse_student("llama", ["sliding", "block_sparse", "sliding"], window=64, sinks=0, block=4, topk=16)
    with torch.no_grad():
        torch.testing.assert_close(wide(x, use_cache=False).logits, teacher(x).logits, rtol=1e-4, atol=1e-5)


def test_sliding_cache_holds_only_sinks_and_window():
    _, student = sparse_student("mistral", ["sliding"] * 3, window=6, sinks=3)
    with torch.no_grad():
        _, cache = decode_pieces(student, torch.randint(3, 400, (1, 40)), [10] + [1] * 30)
    for layer in cache.layer_caches:
        assert layer.keys.shape[2] == 3 + 6
        assert layer.key_positions.tolist() == [0, 1, 2, 34, 35, 36, 37, 38, 39]


def test_transfer_mode_scores_sparse_layers():
    _, student = sparse_student("llama", ["sliding", "softmax", "block_sparse"], window=3, sinks=0, block=4, topk=1)
    with torch.no_grad(), attention_mode(student, "transfer") as recorded:
        student.model(input_ids=torch.randint(3, 400, (2, 20)), use_cache=False)
        losses = [recorded[a] for a in student.converted_attentions()]
    assert len(losses) == 2 and all(float(l) > 0 for l in losses)


def test_torch_sparse_ops_match_the_kernel_package_oracles():
    from effconv_kernels.block_sparse.naive import naive_block_sparse_attention
    from effconv_kernels.sparse_window.naive import naive_sliding_window_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 37, 8), torch.randn(2, 2, 37, 8), torch.randn(2, 2, 37, 8)
    pos = torch.arange(37)
    o = sliding_window_attention(q, k, v, scale=0.3, window=5, sinks=2, q_positions=pos, k_positions=pos)
    torch.testing.assert_close(o, naive_sliding_window_attention(q, k, v, window=5, sinks=2, scale=0.3))
    sel = select_key_blocks(q, k, block_size=8, topk=2, q_start=0)
    o = block_sparse_attention(q, k, v, sel, scale=0.3, block_size=8)
    torch.testing.assert_close(o, naive_block_sparse_attention(q, k, v, block_size=8, topk=2, scale=0.3))
