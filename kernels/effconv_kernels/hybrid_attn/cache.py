"""Decode-time cache for the sliding-window + linear hybrid attention."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linear_attn.naive import linear_state


@dataclass
class HybridDecodeCache:
    """Everything one hybrid-attention layer needs to decode one token at a time.

    S  (B, Hkv, F, Dv) fp32  linear state  sum_j fk_j v_j^T over tokens that have left the window
    z  (B, Hkv, F)     fp32  linear normaliser state  sum_j fk_j
    k  (B, Hkv, W, D)        ring buffer of the last W raw keys (after RoPE); token t sits in slot t % W
    v  (B, Hkv, W, Dv)       ring buffer of the last W values
    fk (B, Hkv, W, F)        ring buffer of the last W feature-mapped keys (moved into S, z on eviction)
    seen: number of tokens appended so far (the same for every sequence of the batch: no ragged batches)

    A decode step appends token t = seen: if t >= W it first adds slot t % W (token t - W) into (S, z),
    then overwrites that slot. All tensors are updated IN PLACE (the object is reused across steps).

    With a decay g (`log_decay` of the decode step) S and z hold sum_j g^(p-j) fk_j v_j^T (and g^(p+1) S0),
    p = seen - 1 - W the last token that left the window (p = -1 while none has), i.e. exactly the state
    `hybrid_attention(..., output_final_state=True, log_decay=...)` returns for the tokens seen so far; the
    cache itself does not store the decay (pass the same log_decay to every step).

    With per-token gates (`log_gate` of the decode step, GLA style) the cache also keeps each held token's log gate
    in `lg` (B, Hkv, W) fp32: an eviction moves the state to the evicted token with that token's own gate, and the
    query reads the state with the gates of the tokens still in the window.

    With attention sinks (`sk`, `sv` (B, Hkv, S, D / Dv)) token first + s (first = the row's left padding, 0 by
    default) is sink s: it is kept there for ever and read by softmax beside the window, it is left out of the ring's
    window (and its fk is stored as zero, so its eviction adds nothing to the state).
    """

    S: torch.Tensor
    z: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    fk: torch.Tensor
    seen: int = 0
    lg: torch.Tensor | None = None
    sk: torch.Tensor | None = None
    sv: torch.Tensor | None = None

    @property
    def window(self) -> int:
        return self.k.shape[2]

    @classmethod
    def empty(cls, batch: int, num_kv_heads: int, window: int, head_dim: int, feature_dim: int,
              value_dim: int | None = None, *, dtype=torch.bfloat16, device=None,
              initial_state=None, gated: bool = False, sinks: int = 0) -> "HybridDecodeCache":
        Dv = head_dim if value_dim is None else value_dim
        if initial_state is not None:
            S, z = (x.float().clone() for x in initial_state)
        else:
            S = torch.zeros(batch, num_kv_heads, feature_dim, Dv, dtype=torch.float32, device=device)
            z = torch.zeros(batch, num_kv_heads, feature_dim, dtype=torch.float32, device=device)
        kw = dict(dtype=dtype, device=device)
        return cls(S=S, z=z,
                   k=torch.zeros(batch, num_kv_heads, window, head_dim, **kw),
                   v=torch.zeros(batch, num_kv_heads, window, Dv, **kw),
                   fk=torch.zeros(batch, num_kv_heads, window, feature_dim, **kw),
                   seen=0,
                   lg=torch.zeros(batch, num_kv_heads, window, dtype=torch.float32, device=device) if gated else None,
                   sk=torch.zeros(batch, num_kv_heads, sinks, head_dim, **kw) if sinks else None,
                   sv=torch.zeros(batch, num_kv_heads, sinks, Dv, **kw) if sinks else None)

    @classmethod
    def from_prefill(cls, k: torch.Tensor, v: torch.Tensor, fk: torch.Tensor, *, window: int,
                     initial_state=None, final_state=None, log_decay=None, key_gates=None,
                     sink_keys=None, sink_values=None, seen: int | None = None) -> "HybridDecodeCache":
        """Cache after a parallel prefill of k (B, Hkv, T, D), v, fk.

        `final_state` is the (S, z) returned by `hybrid_attention(..., output_final_state=True)` on
        the same prefill (it already includes `initial_state`); if not given it is recomputed here (with the
        decay `log_decay` (Hkv,) when given, which must then be the one the decode steps use). `key_gates`
        (B, Hkv, T): the log gates of a gated layer's tokens (then `final_state` is required). `sink_keys`,
        `sink_values` (B, Hkv, S, D / Dv): the sinks the prefill took (its first S tokens; fk must be zero there,
        and then `final_state` is required). `seen`: the sequence's token count when k holds only its last T tokens
        (default T): token numbers are absolute, which sinks need.
        """
        B, Hkv, T, D = k.shape
        W = int(window)
        if W < 1:
            raise ValueError("window must be >= 1")
        L = max(0, T - W)  # tokens 0..L-1 have left the window
        if final_state is not None:
            S, z = (x.float().clone() for x in final_state)
        elif key_gates is not None or sink_keys is not None:
            raise ValueError("from_prefill with key_gates or sinks needs the prefill's final_state")
        else:
            S, z = linear_state(fk, v, L, initial_state, log_decay)
        cache = cls.empty(B, Hkv, W, D, fk.shape[-1], v.shape[-1], dtype=k.dtype, device=k.device,
                          gated=key_gates is not None, sinks=0 if sink_keys is None else sink_keys.shape[2])
        if sink_keys is not None:
            cache.sk.copy_(sink_keys)
            cache.sv.copy_(sink_values)
        cache.S, cache.z = S.contiguous(), z.contiguous()
        if T > 0:
            tok = torch.arange(L, T, device=k.device)
            slots = (tok + (0 if seen is None else seen - T)) % W
            cache.k[:, :, slots] = k[:, :, L:]
            cache.v[:, :, slots] = v[:, :, L:]
            cache.fk[:, :, slots] = fk[:, :, L:]
            if key_gates is not None:
                cache.lg[:, :, slots] = key_gates[:, :, L:].float()
        cache.seen = T if seen is None else int(seen)
        return cache
