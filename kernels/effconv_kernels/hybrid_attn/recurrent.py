"""Hybrid-attention decode step in Triton: evict, append and attend in one launch.

One program per (batch, kv head): it folds the evicted token (t - W) into (S, z), writes the new token
into ring slot t % W, then serves the G query heads of its group (window softmax over the ring buffer
with an online max, plus fq (S, z) for the linear part) under the shared normaliser.
With a decay (HAS_DECAY, log_decay (Hkv,), g = exp(log_decay[kv head])) an eviction is S = g S + fk v^T (z alike)
and the query reads the state, which sits at token max(t - W, -1), with g^min(W, t + 1) = g^n_valid.
With per-token gates (HAS_GATE: the new token's log gate (B, Hkv) and the ring of the held tokens' log gates) an
eviction decays the state by the evicted token's own gate, and the query reads it through the gates of every token
still held. With NS attention sinks (the cache's sk / sv) token first + s becomes sink s (stored there, left out of
the window, its fk written as 0), and the sinks are scored with the sink queries in the same online softmax as the
window, so they share its row max and the normaliser. Semantics: hybrid_decode_step_ref (naive.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import check_gqa, next_pow2
from .cache import HybridDecodeCache


@triton.jit
def hybrid_decode_kernel(
    q, k, v, fq, fk, mix, S, z, kb, vb, fkb, o, ld, first, lgt, lgb, qs, skb, svb,
    G, H, W, t, slot, n_valid, evict, scale, eps, pos,
    D: tl.constexpr, F: tl.constexpr, DV: tl.constexpr,
    BD: tl.constexpr, BF: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr, BW: tl.constexpr,
    POS_ON_DEVICE: tl.constexpr, HAS_DECAY: tl.constexpr = False, HAS_FIRST: tl.constexpr = False,
    HAS_GATE: tl.constexpr = False, NS: tl.constexpr = 0, BS: tl.constexpr = 2,
):
    if POS_ON_DEVICE:  # token index read from device memory (CUDA-graph replay: no host value changes)
        t = tl.load(pos).to(tl.int32)
        slot = t % W
        n_valid = tl.minimum(t + 1, W)
        evict = t >= W
    i_bk = tl.program_id(0)
    Hkv = H // G
    i_b, i_hk = i_bk // Hkv, i_bk % Hkv
    i_bk64 = i_bk.to(tl.int64)
    b_first = 0
    if HAS_FIRST:  # left padding: tokens before first[b] are not in row b's window
        b_first = tl.load(first + i_b).to(tl.int32)
    o_d, o_f, o_v = tl.arange(0, BD), tl.arange(0, BF), tl.arange(0, BV)
    m_d, m_f, m_v = o_d < D, o_f < F, o_v < DV
    p_S = S + i_bk64 * F * DV
    b_z = tl.load(z + i_bk64 * F + o_f, mask=m_f, other=0.0)
    if HAS_DECAY:
        lam = tl.load(ld + i_hk)
    if HAS_GATE:  # the evicted token's own gate moves the state to it
        lam = tl.load(lgb + i_bk64 * W + slot)
    if evict:  # token t - W leaves the window: add it to the linear state before its slot is reused
        b_fko = tl.load(fkb + (i_bk64 * W + slot) * F + o_f, mask=m_f, other=0.0).to(tl.float32)
        b_vo = tl.load(vb + (i_bk64 * W + slot) * DV + o_v, mask=m_v, other=0.0).to(tl.float32)
        if HAS_DECAY or HAS_GATE:
            b_z = b_z * tl.exp(lam)
        b_z += b_fko
        tl.store(z + i_bk64 * F + o_f, b_z, mask=m_f)
        for f0 in range(0, F, BKF):
            o_k = f0 + tl.arange(0, BKF)
            m_kv = (o_k < F)[:, None] & m_v[None, :]
            b_k = tl.load(fkb + (i_bk64 * W + slot) * F + o_k, mask=o_k < F, other=0.0).to(tl.float32)
            b_S = tl.load(p_S + o_k[:, None] * DV + o_v[None, :], mask=m_kv, other=0.0)
            if HAS_DECAY or HAS_GATE:
                b_S = b_S * tl.exp(lam)
            tl.store(p_S + o_k[:, None] * DV + o_v[None, :], b_S + b_k[:, None] * b_vo[None, :], mask=m_kv)
    tl.debug_barrier()  # old slot contents are read above before being overwritten below
    b_kt = tl.load(k + i_bk64 * D + o_d, mask=m_d)
    b_vt = tl.load(v + i_bk64 * DV + o_v, mask=m_v)
    b_fkt = tl.load(fk + i_bk64 * F + o_f, mask=m_f)
    lowest = b_first  # the oldest token the window may hold
    if NS > 0:  # token first + s is sink s: stored apart, out of the window and (fk = 0) out of the state
        rank = t - b_first
        # the masks as vectors: a scalar condition broadcast into a mask is refused by the interpreter
        r_d = tl.zeros([BD], dtype=tl.int32) + rank
        r_v = tl.zeros([BV], dtype=tl.int32) + rank
        r_f = tl.zeros([BF], dtype=tl.int32) + rank
        tl.store(skb + (i_bk64 * NS + r_d) * D + o_d, b_kt, mask=m_d & (r_d >= 0) & (r_d < NS))
        tl.store(svb + (i_bk64 * NS + r_v) * DV + o_v, b_vt, mask=m_v & (r_v >= 0) & (r_v < NS))
        b_fkt = tl.where((r_f >= 0) & (r_f < NS), 0.0, b_fkt.to(tl.float32)).to(b_fkt.dtype)
        lowest = b_first + NS
    tl.store(kb + (i_bk64 * W + slot) * D + o_d, b_kt, mask=m_d)
    tl.store(vb + (i_bk64 * W + slot) * DV + o_v, b_vt, mask=m_v)
    tl.store(fkb + (i_bk64 * W + slot) * F + o_f, b_fkt, mask=m_f)
    if HAS_GATE:
        tl.store(lgb + i_bk64 * W + slot, tl.load(lgt + i_bk64))
    tl.debug_barrier()  # the new slot and the updated state are re-read by other threads below
    if HAS_GATE:  # the state sits before every held token: it reaches the query through all their gates
        b_lsum = tl.zeros([BW], dtype=tl.float32)
        for w0 in range(0, W, BW):
            o_w = w0 + tl.arange(0, BW)
            b_lsum += tl.load(lgb + i_bk64 * W + o_w, mask=o_w < n_valid, other=0.0)
        b_gq = tl.exp(tl.sum(b_lsum, 0))

    for g in range(G):
        i_h = i_hk * G + g
        i_bh64 = (i_b * H + i_h).to(tl.int64)
        b_mix = tl.load(mix + i_h).to(tl.float32)
        alpha = 1.0 / (1.0 + tl.exp(-b_mix))
        beta = 1.0 - alpha
        b_q = tl.load(q + i_bh64 * D + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_m = tl.full([1], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([1], dtype=tl.float32)
        b_acc = tl.zeros([BV], dtype=tl.float32)
        if NS > 0:  # the sinks that exist by now, scored with the sink query, open the online softmax
            o_s = tl.arange(0, BS)
            m_s = (o_s < NS) & (b_first + o_s <= t)
            b_qs = tl.load(qs + i_bh64 * D + o_d, mask=m_d, other=0.0).to(tl.float32)
            b_sk = tl.load(skb + (i_bk64 * NS + o_s[:, None]) * D + o_d[None, :], mask=m_s[:, None] & m_d[None, :],
                           other=0.0)
            s_sink = tl.sum(b_sk.to(tl.float32) * b_qs[None, :], 1) * scale
            s_sink = tl.where(m_s, s_sink, float("-inf"))
            b_m = tl.maximum(b_m, tl.max(s_sink, 0))
            m_sink = tl.where(b_m == float("-inf"), 0.0, b_m)
            p_sink = tl.exp(s_sink - m_sink)
            b_sv = tl.load(svb + (i_bk64 * NS + o_s[:, None]) * DV + o_v[None, :], mask=m_s[:, None] & m_v[None, :],
                           other=0.0)
            b_l = tl.sum(p_sink, 0) + b_l
            b_acc = tl.sum(p_sink[:, None] * b_sv.to(tl.float32), 0)
        for w0 in range(0, W, BW):  # slots >= n_valid are masked (a fixed trip count also serves POS_ON_DEVICE)
            o_w = w0 + tl.arange(0, BW)
            m_w = o_w < n_valid
            if HAS_FIRST or NS > 0:  # slot j holds token t - ((t - j) mod W)
                m_w = m_w & (t - (t - o_w + W) % W >= lowest)
            b_kb = tl.load(kb + (i_bk64 * W + o_w[:, None]) * D + o_d[None, :], mask=m_w[:, None] & m_d[None, :], other=0.0)
            s = tl.sum(b_kb.to(tl.float32) * b_q[None, :], 1) * scale
            s = tl.where(m_w, s, float("-inf"))
            m_new = tl.maximum(b_m, tl.max(s, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully padded block so far: no NaN
            corr = tl.exp(b_m - m_safe)
            p = tl.exp(s - m_safe)
            b_vb = tl.load(vb + (i_bk64 * W + o_w[:, None]) * DV + o_v[None, :], mask=m_w[:, None] & m_v[None, :], other=0.0)
            b_l = b_l * corr + tl.sum(p, 0)
            b_acc = b_acc * corr + tl.sum(p[:, None] * b_vb.to(tl.float32), 0)
            b_m = m_new
        b_num = tl.zeros([BV], dtype=tl.float32)
        for f0 in range(0, F, BKF):
            o_k = f0 + tl.arange(0, BKF)
            m_kv = (o_k < F)[:, None] & m_v[None, :]
            b_fq = tl.load(fq + i_bh64 * F + o_k, mask=o_k < F, other=0.0).to(tl.float32)
            b_S = tl.load(p_S + o_k[:, None] * DV + o_v[None, :], mask=m_kv, other=0.0)
            b_num += tl.sum(b_fq[:, None] * b_S, 0)
        b_fqf = tl.load(fq + i_bh64 * F + o_f, mask=m_f, other=0.0).to(tl.float32)
        if HAS_DECAY or HAS_GATE:  # the state sits n_valid = min(W, t + 1) tokens before the query
            if HAS_GATE:
                b_qf = b_gq
            else:
                b_qf = tl.exp(lam * n_valid)
            b_num = b_num * b_qf
            b_den = alpha * b_l + beta * tl.sum(b_fqf * b_z, 0) * b_qf + eps
        else:
            b_den = alpha * b_l + beta * tl.sum(b_fqf * b_z, 0) + eps
        b_o = (alpha * b_acc + beta * b_num) / b_den
        tl.store(o + i_bh64 * DV + o_v, b_o.to(o.dtype.element_ty), mask=m_v)


def triton_hybrid_decode_step(q_t, k_t, v_t, fq_t, fk_t, mix, cache: HybridDecodeCache, *, window: int,
                              scale: float, eps=1e-6, position: torch.Tensor | None = None, log_decay=None,
                              first: torch.Tensor | None = None, log_gate=None, sink_queries=None):
    W = cache.window
    if int(window) != W:
        raise ValueError(f"window={window} but the cache holds {W} slots")
    B, H, D = q_t.shape
    Hkv, DV, F = k_t.shape[1], v_t.shape[-1], fq_t.shape[-1]
    G = check_gqa(H, Hkv)
    for name, x in (("S", cache.S), ("z", cache.z)):
        if x.dtype != torch.float32 or not x.is_contiguous():
            raise ValueError(f"cache.{name} must be contiguous fp32")
    for name, x in (("k", cache.k), ("v", cache.v), ("fk", cache.fk), ("lg", cache.lg), ("sk", cache.sk),
                    ("sv", cache.sv)):
        if x is not None and not x.is_contiguous():
            raise ValueError(f"cache.{name} must be contiguous")
    gated = log_gate is not None
    if gated and (cache.lg is None or cache.lg.dtype != torch.float32):
        raise ValueError("a gated decode step needs a cache that keeps fp32 gates (cache.lg)")
    sinks = 0 if cache.sk is None else cache.sk.shape[2]
    t = cache.seen
    q_t, k_t, v_t, fq_t, fk_t = (x.contiguous() for x in (q_t, k_t, v_t, fq_t, fk_t))
    mix_f = mix.float().contiguous()
    o = torch.empty(B, H, DV, dtype=q_t.dtype, device=q_t.device)
    BD, BF, BV = max(16, next_pow2(D)), max(16, next_pow2(F)), max(16, next_pow2(DV))
    BKF = max(16, min(BF, 4096 // BV))
    BW = max(16, min(64, next_pow2(W)))
    hybrid_decode_kernel[(B * Hkv,)](
        q_t, k_t.to(cache.k.dtype), v_t.to(cache.v.dtype), fq_t, fk_t.to(cache.fk.dtype), mix_f,
        cache.S, cache.z, cache.k, cache.v, cache.fk, o,
        log_decay.float().contiguous() if log_decay is not None else mix_f,
        first if first is not None else mix_f,
        log_gate.float().contiguous() if gated else mix_f, cache.lg if gated else mix_f,
        (q_t if sink_queries is None else sink_queries.contiguous()) if sinks else mix_f,
        cache.sk if sinks else mix_f, cache.sv if sinks else mix_f,
        G, H, W, t, t % W, min(t + 1, W), int(t >= W), float(scale), float(eps),
        position if position is not None else mix_f,
        D=D, F=F, DV=DV, BD=BD, BF=BF, BKF=BKF, BV=BV, BW=BW, POS_ON_DEVICE=position is not None,
        HAS_DECAY=log_decay is not None, HAS_FIRST=first is not None, HAS_GATE=gated, NS=sinks,
        BS=max(2, next_pow2(sinks)), num_warps=4,
    )
    if position is None:  # with a device position the caller advances it (once per model step)
        cache.seen = t + 1
    return o
