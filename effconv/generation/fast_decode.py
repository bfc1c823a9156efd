"""Low-overhead greedy decoding: a static-shape decoder step (one token for each of B sequences) replayed from a
CUDA graph, for converted effconv models and for HF teachers alike (the teacher through transformers'
StaticCache), so that decode speed compares the models and not Python overhead.

    decoder = StaticDecoder(model, use_cuda_graph=None)   # None: a graph on CUDA, eager elsewhere
    first = decoder.prefill(input_ids)                    # (B, 1) greedy token after the prompt
    token = decoder.step()                                # one more greedy token per call (B, 1)
    greedy_generate(model, input_ids, max_new_tokens)     # decoding.decode over decoder.step, returns all tokens

One replay = forward of the last token + argmax + position advance, all on the GPU. A graph needs every
tensor the step touches at a fixed address: converted linear/hybrid layers keep a fixed-size state and
window ring buffer (the ring's slot comes from a device counter); the teacher's StaticCache is preallocated.
Effconv models with softmax layers (their KV cache grows by concatenation) and CPU runs use the same step eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decoding import accepts_argument, capture_step, decode


@dataclass
class GreedyResult:
    tokens: torch.Tensor  # (B, prompt + new tokens)
    cuda_graph: bool  # whether the decode steps ran as CUDA-graph replays


def _is_effconv(model) -> bool:
    return hasattr(model, "converted_attentions") and hasattr(model.model, "layers")


class StaticDecoder:
    """Prefill once, then one greedy token per `step()` for a fixed batch (see module docstring)."""

    def __init__(self, model, *, use_cuda_graph: bool | None = None, max_new_tokens: int = 256,
                 prefill_chunk: int | None = None):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.effconv = _is_effconv(model)
        self.cache_name = "cache" if accepts_argument(model, "cache") else "past_key_values"  # the forward's name
        if use_cuda_graph is None:
            use_cuda_graph = self.device.type == "cuda"
        if self.effconv and not all(layer.self_attn.layer_type == "linear" for layer in model.model.layers):
            # softmax, gqa and sparse layers grow their KV cache by concatenation: not static
            use_cuda_graph = False
        self.use_cuda_graph = bool(use_cuda_graph) and self.device.type == "cuda"
        self.max_new_tokens = max_new_tokens
        self.prefill_chunk = prefill_chunk  # prompt fed in pieces: bounds the prefill's activation memory
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_failed: str | None = None

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        b, t = input_ids.shape
        if self.effconv:
            from ..modeling.modeling_effconv import EffconvCache

            self.cache = EffconvCache(self.model.config.num_hidden_layers)
        else:
            from transformers import StaticCache

            self.cache = StaticCache(config=self.model.config, max_cache_len=t + self.max_new_tokens + 1)
        chunk = self.prefill_chunk or t
        for start in range(0, t, chunk):
            piece = input_ids[:, start : start + chunk]
            kw = {} if self.effconv else {"cache_position": torch.arange(start, start + piece.shape[1], device=self.device)}
            out = self.model(piece, **{self.cache_name: self.cache}, use_cache=True, logits_to_keep=1, **kw)
        self.prompt_len = t
        # static buffers: the step reads the token and position here and writes the next ones back
        self.token = out.logits[:, -1:].argmax(-1)
        self.position = torch.full((1,), t, dtype=torch.long, device=self.device)
        self.position_ids = torch.full((b, 1), t, dtype=torch.long, device=self.device)
        self.generated = 0
        self.graph = None
        return self.token.clone()

    def _forward_step(self) -> None:
        kw = {"position_ids": self.position_ids, self.cache_name: self.cache, "use_cache": True}
        if not self.effconv:
            kw["cache_position"] = self.position
        logits = self.model(self.token, **kw).logits
        self.token.copy_(logits[:, -1:].argmax(-1))
        self.position.add_(1)
        self.position_ids.add_(1)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Append one greedy token per sequence; returns the static token buffer (clone it to keep it)."""
        if self.generated + 1 > self.max_new_tokens:
            raise ValueError(f"StaticDecoder was sized for {self.max_new_tokens} new tokens")
        if self.graph is not None:
            self.graph.replay()
        elif self.use_cuda_graph and self.generated >= 1:
            self._capture()
            self.graph.replay()
        else:
            self._forward_step()  # first step eager: compiles kernels, builds the ring buffers
            if self.use_cuda_graph and self.effconv:
                self._attach_device_position()
        self.generated += 1
        if self.effconv:
            self.cache.seen_tokens = self.prompt_len + self.generated
        return self.token

    def _attach_device_position(self) -> None:
        """Hybrid layers read their ring slot from the shared device counter from now on."""
        seen = int(self.position)  # tokens in the cache (one host sync, once)
        for c in self.cache.layer_caches:
            if c.ring is not None:
                # the ring built from the prefill numbers tokens from the start of its window; the device counter
                # is absolute, so rotate the slots until token t sits in slot t % W
                w = c.ring.k.shape[2]
                shift = (seen - c.ring.seen) % w
                if shift:
                    for name in ("k", "v", "fk"):
                        setattr(c.ring, name, torch.roll(getattr(c.ring, name), shift, dims=2).contiguous())
                c.ring.seen = seen
                c.ring_position = self.position

    def _capture(self) -> None:
        # the capture records the step without running it; state is advanced only by replays
        self.graph = capture_step(self._forward_step, (self.token, self.position, self.position_ids))

    def finish(self) -> None:
        """Bring the caches' Python counters in line with the device counter (after graph replays)."""
        if self.effconv:
            seen = self.prompt_len + self.generated
            self.cache.seen_tokens = seen
            for c in self.cache.layer_caches:
                if c.ring is not None:
                    c.ring.seen = seen


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, use_cuda_graph: bool | None = None
                    ) -> GreedyResult:
    """Greedy tokens through StaticDecoder (prompt + max_new_tokens). No stopping at EOS: fixed-length output."""
    decoder = StaticDecoder(model, use_cuda_graph=use_cuda_graph, max_new_tokens=max_new_tokens)
    first = decoder.prefill(input_ids)
    rest = decode(lambda _: decoder.step().clone(), first, max_new_tokens - 1)  # the step keeps its own token
    decoder.finish()
    return GreedyResult(tokens=torch.cat([input_ids, first, *rest], 1), cuda_graph=decoder.graph is not None)
