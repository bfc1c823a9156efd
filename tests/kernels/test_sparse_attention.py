"""Sliding-window (+ sinks) and top-k block-sparse attention kernels against the fp32 O(T^2) oracles:
outputs and gradients. Runs on CUDA when present, otherwise through TRITON_INTERPRET=1 (conftest.py)."""
from __future__ import annotations

import pytest
import torch

import effconv_kernels as ek
from effconv_kernels.block_sparse.naive import block_sparse_mask, naive_block_sparse_attention, select_key_blocks
from effconv_kernels.sparse_window.naive import naive_sliding_window_attention, sliding_window_mask

TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (1.5e-2, 3e-2)}  # (output, grads)


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-6)).item()


def make_qkv(B, H, Hkv, T, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, n, T, D, generator=g) for n in (H, Hkv, Hkv)]
    return [x.to(device=device, dtype=dtype).requires_grad_() for x in xs]


def check_grads(o, o_ref, leaves, dtype, device):
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(device)
    grads = torch.autograd.grad((o.float() * do).sum(), leaves)
    grads_ref = torch.autograd.grad((o_ref.float() * do).sum(), leaves)
    for name, a, b in zip("qkv", grads, grads_ref):
        assert a.dtype == dtype, name
        assert rel_err(a, b) < TOL[dtype][1], name


WINDOW_CASES = [
    # B, H, Hkv, T, D, window, sinks, dtype, block (None = the public op's choice, 64 above T = 32)
    (1, 2, 2, 37, 16, 5, 0, torch.float32, 16),      # GQA 1, T not a multiple of the block, window < block
    (2, 3, 1, 45, 32, 20, 3, torch.float32, 16),     # GQA 3, window spans blocks, sinks
    (1, 3, 1, 40, 16, 1, 17, torch.float32, 16),     # window 1 (the token itself) + sinks over a block boundary
    (1, 3, 1, 33, 32, 64, 2, torch.bfloat16, 16),    # window larger than T: full causal attention
    (1, 2, 2, 50, 16, 9, 4, torch.bfloat16, 16),
    (1, 2, 1, 100, 16, 20, 5, torch.float32, 16),    # GQA 2; the sink block is seen by query blocks past the window
    (1, 2, 2, 70, 16, 30, 3, torch.bfloat16, None),  # the public op, block 64: 2 query blocks, last partial
]


def sliding(q, k, v, *, block, **kw):
    if block is None:
        return ek.sliding_window_attention(q, k, v, backend="triton", **kw)
    from effconv_kernels.sparse_window.triton import triton_sliding_window_attention
    return triton_sliding_window_attention(q, k, v, block=block, **kw)


@pytest.mark.parametrize("B,H,Hkv,T,D,window,sinks,dtype,block", WINDOW_CASES)
def test_sliding_window_matches_naive(B, H, Hkv, T, D, window, sinks, dtype, block, device):
    q, k, v = make_qkv(B, H, Hkv, T, D, dtype, device)
    kw = dict(window=window, sinks=sinks, scale=D ** -0.5)
    o = sliding(q, k, v, block=block, **kw)
    o_ref = naive_sliding_window_attention(q, k, v, **kw)
    assert o.dtype == dtype and o.shape == q.shape
    assert rel_err(o, o_ref) < TOL[dtype][0]
    check_grads(o, o_ref, [q, k, v], dtype, device)


def test_sliding_window_split_sink_lists(device):
    """Long dk/dv lists (sink key blocks) split over several programs, partials reduced in a fixed order."""
    from effconv_kernels.common.block_list_attn import block_list_attention, invert_block_lists, plan_split
    from effconv_kernels.sparse_window.naive import sliding_window_block_list

    B, H, Hkv, T, D, W, S, bs = 2, 4, 2, 100, 16, 20, 20, 16
    q, k, v = make_qkv(B, H, Hkv, T, D, torch.float32, device, seed=7)
    idx = sliding_window_block_list(T, bs, W, S, device)  # not compacted: block_list_attention does it
    inv = plan_split(invert_block_lists(idx, idx.shape[2], 1), min_iters=1)
    assert inv[4] >= 1 and inv[5] >= 2  # split rows, programs per split row
    kw = dict(window=W, sinks=S, scale=D ** -0.5)
    o = block_list_attention(q, k, v, idx, block=bs, inverse=inv, **kw)
    o_ref = naive_sliding_window_attention(q, k, v, **kw)
    assert rel_err(o, o_ref) < TOL[torch.float32][0]
    check_grads(o, o_ref, [q, k, v], torch.float32, device)


def test_sliding_window_large_window_is_causal_softmax():
    q, k, v = make_qkv(1, 4, 2, 21, 8, torch.float32, "cpu")
    o = naive_sliding_window_attention(q, k, v, window=100, sinks=0, scale=0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    assert rel_err(o, ref) < 1e-5
    m = sliding_window_mask(6, 2, 1)
    assert m.tolist()[5] == [True, False, False, False, True, True]


BLOCK_CASES = [
    # B, H, Hkv, T, D, block, topk, dtype
    (1, 2, 2, 61, 16, 16, 1, torch.float32),     # 4 blocks, last partial
    (2, 3, 1, 70, 32, 16, 2, torch.float32),     # GQA 3
    (1, 3, 1, 40, 16, 16, 5, torch.float32),     # topk larger than the earlier blocks: full causal
    (1, 3, 1, 75, 32, 16, 2, torch.bfloat16),
    (1, 2, 2, 50, 16, 16, 1, torch.bfloat16),
]


@pytest.mark.parametrize("B,H,Hkv,T,D,block,topk,dtype", BLOCK_CASES)
def test_block_sparse_matches_naive(B, H, Hkv, T, D, block, topk, dtype, device):
    q, k, v = make_qkv(B, H, Hkv, T, D, dtype, device, seed=2)
    kw = dict(block_size=block, topk=topk, scale=D ** -0.5)
    o = ek.block_sparse_attention(q, k, v, backend="triton", **kw)
    o_ref = naive_block_sparse_attention(q, k, v, **kw)
    assert o.dtype == dtype
    assert rel_err(o, o_ref) < TOL[dtype][0]
    check_grads(o, o_ref, [q, k, v], dtype, device)


def test_block_sparse_given_idx_with_gaps(device):
    """A caller's idx in naive layout (chosen, -1 gaps, own block last) is compacted before the kernels."""
    B, H, Hkv, T, D, bs = 1, 4, 2, 90, 16, 16
    q, k, v = make_qkv(B, H, Hkv, T, D, torch.bfloat16, device, seed=8)
    idx = select_key_blocks(q, k, block_size=bs, topk=3)
    assert (idx[..., :-1] < 0).any()  # the first query blocks have gaps
    kw = dict(block_size=bs, topk=3, scale=D ** -0.5, idx=idx)
    o = ek.block_sparse_attention(q, k, v, backend="triton", **kw)
    o_ref = naive_block_sparse_attention(q, k, v, **kw)
    assert rel_err(o, o_ref) < TOL[torch.bfloat16][0]
    check_grads(o, o_ref, [q, k, v], torch.bfloat16, device)


def test_block_selection_is_anchor_topk_and_causal():
    torch.manual_seed(0)
    B, H, Hkv, T, D, bs = 1, 4, 2, 70, 8, 8
    q, k = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D)
    idx = select_key_blocks(q, k, block_size=bs, topk=2)
    nb = 9
    assert idx.shape == (B, H, nb, 3)
    for h in range(H):
        pooled = k[0, h // 2, : (nb - 1) * bs].reshape(nb - 1, bs, D).mean(1)
        for m in range(nb):
            assert idx[0, h, m, -1] == m  # own block always
            chosen = sorted(int(x) for x in idx[0, h, m, :-1] if x >= 0)
            expect = sorted((pooled[:m] @ q[0, h, m * bs]).topk(min(2, m)).indices.tolist()) if m else []
            assert chosen == expect
    # changing tokens after position p changes no output at or before p (selection and attention are causal)
    v = torch.randn(B, Hkv, T, D)
    o = naive_block_sparse_attention(q, k, v, block_size=bs, topk=2, scale=0.3)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, :, 30:] += 5
    k2[:, :, 30:] -= 3
    v2[:, :, 30:] += 1
    o2 = naive_block_sparse_attention(q2, k2, v2, block_size=bs, topk=2, scale=0.3)
    assert torch.equal(o[:, :, :30], o2[:, :, :30])
    mask = block_sparse_mask(idx, T, bs)
    assert mask.sum(-1).max() <= 3 * bs and mask.diagonal(dim1=-2, dim2=-1).all()


def test_inverse_block_lists_match_brute_force(device):
    from effconv_kernels.common.block_list_attn import invert_block_lists

    g = torch.Generator().manual_seed(3)
    B, H, G, nq, nsel = 2, 6, 3, 9, 4
    idx = torch.randint(-1, nq, (B, H, nq, nsel), generator=g)
    m = torch.arange(nq)[None, None, :, None]
    idx = torch.where(idx <= m, idx, torch.full_like(idx, -1))  # causal lists, with gaps (-1)
    idx[..., -1] = m[..., 0]                                     # own block, like the real lists
    flat = idx.view(-1, nsel)
    for a in range(flat.shape[0]):  # no repeated block in a list (the ops never make one)
        seen = set()
        for c in range(nsel - 1, -1, -1):
            if int(flat[a, c]) in seen:
                flat[a, c] = -1
            seen.add(int(flat[a, c]))
    end, cnt, ent, order = invert_block_lists(idx.to(device=device, dtype=torch.int32), nq, G)[:4]
    end, cnt, ent, order = end.cpu(), cnt.cpu(), ent.cpu(), order.cpu()
    for b in range(B):
        for hk in range(H // G):
            for n in range(nq):
                r = (b * (H // G) + hk) * nq + n
                expect = [gg * nq + mm for gg in range(G) for mm in range(nq)
                          if (idx[b, hk * G + gg, mm] == n).any()]
                assert ent[end[r] - cnt[r]:end[r]].tolist() == expect, (b, hk, n)
    assert sorted(order.tolist()) == list(range(B * (H // G) * nq))
    assert cnt[order].tolist() == sorted(cnt.tolist(), reverse=True)


def _sparse_case(op, device):
    """(forward, q, k, v, dout): GQA 3 with sinks / popular blocks, where many query blocks feed one key block."""
    q, k, v = make_qkv(1, 3, 1, 75, 16, torch.bfloat16, device, seed=4)
    if op == "window":
        fn = lambda: sliding(q, k, v, block=16, window=20, sinks=18, scale=0.25)  # noqa: E731
    else:
        fn = lambda: ek.block_sparse_attention(q, k, v, block_size=16, topk=2, scale=0.25,  # noqa: E731
                                               backend="triton")
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(device=device, dtype=q.dtype)
    return fn, q, k, v, do


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU: programs run concurrently in a varying order only there")
@pytest.mark.parametrize("op", ["window", "topk"])
def test_sparse_backward_is_deterministic_on_gpu(op):
    """No atomics in the backward: repeated runs give bitwise-equal gradients."""
    fn, q, k, v, do = _sparse_case(op, "cuda")
    runs = [torch.autograd.grad(fn(), [q, k, v], do) for _ in range(3)]
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["window", "topk"])
def test_sparse_backward_does_not_depend_on_program_order(op, program_order):
    """No atomics in the backward: the interpreter's programs run in grid, reversed and shuffled order give
    bitwise-equal outputs and gradients, equal to the oracle's (an order-dependent kernel would not:
    test_program_order.py)."""
    fn, q, k, v, do = _sparse_case(op, "cpu")
    runs = {}
    for kind in ("grid", "reversed", "shuffled"):
        program_order(kind)
        o = fn()
        runs[kind] = (o, *torch.autograd.grad(o, [q, k, v], do))
    if op == "window":
        o_ref = naive_sliding_window_attention(q, k, v, window=20, sinks=18, scale=0.25)
    else:
        o_ref = naive_block_sparse_attention(q, k, v, block_size=16, topk=2, scale=0.25)
    assert rel_err(runs["grid"][0], o_ref) < TOL[torch.bfloat16][0]
    for got, want in zip(runs["grid"][1:], torch.autograd.grad(o_ref.float(), [q, k, v], do.float())):
        assert rel_err(got, want) < TOL[torch.bfloat16][1]
    for kind in ("reversed", "shuffled"):
        for name, a, b in zip(("o", "dq", "dk", "dv"), runs[kind], runs["grid"]):
            assert torch.equal(a, b), (kind, name)


@pytest.mark.parametrize("B,H,Hkv,T,D,block,topk", [(1, 4, 2, 70, 8, 8, 2), (2, 3, 1, 61, 16, 16, 1),
                                                    (1, 2, 2, 48, 16, 16, 5), (1, 2, 1, 40, 8, 16, 0)])
def test_triton_block_selection_matches_naive(B, H, Hkv, T, D, block, topk, device):
    from effconv_kernels.block_sparse.triton import triton_select_key_blocks

    for dtype in (torch.float32, torch.bfloat16):
        q, k, _ = make_qkv(B, H, Hkv, T, D, dtype, device, seed=6)
        a, n = triton_select_key_blocks(q, k, block_size=block, topk=topk, with_counts=True)
        a, n = a.cpu(), n.cpu()
        b = select_key_blocks(q, k, block_size=block, topk=topk).cpu()
        assert a.shape == b.shape and a.dtype == torch.int32 and n.shape == a.shape[:-1]
        assert torch.equal(n, (b >= 0).sum(-1).int())                       # valid entries per list
        pos = torch.arange(a.shape[-1])
        assert torch.equal(a >= 0, pos < n[..., None])                      # left-compacted
        assert torch.equal(a.sort(-1).values, b.sort(-1).values), dtype    # same blocks (own block included)
        assert torch.equal(a.gather(-1, (n[..., None] - 1).long())[..., 0], b[..., -1])  # own block last valid


def test_sparse_ops_reject_bad_input():
    q, k, v = make_qkv(1, 3, 2, 8, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="multiple of kv heads"):
        ek.sliding_window_attention(q, k, v, window=4, scale=1.0)
    q, k, v = make_qkv(1, 2, 1, 8, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="window"):
        ek.sliding_window_attention(q, k, v, window=0, scale=1.0)
    with pytest.raises(ValueError, match="block_size"):
        ek.block_sparse_attention(q, k, v, block_size=12, topk=2, scale=1.0, backend="triton")


def test_sparse_bench_runs_tiny_on_cpu(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "sparse.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(root / "bench" / "sparse.py"), "--tiny", "--out", str(out)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == {"sdpa", "window512", "window2048", "topk8"} and len(rows) == 4
    for r in rows:
        assert "error" not in r and "skipped" not in r, f"{r['method']}: {r.get('error') or r.get('skipped')}"
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0, r
