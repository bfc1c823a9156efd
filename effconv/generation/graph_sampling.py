"""Teacher sampling with the decode step in a CUDA graph: the fast way to write training text.

`model.generate` at batch 2048 spends most of a ~54 ms decode step in Python and kernel launches (the step's
arithmetic for a 135M model is about a millisecond), so the teacher wrote only 11-15K tokens/s on an H200.
`GraphSampler` keeps one preallocated transformers StaticCache for a fixed batch, runs the prompt (left-padded)
eagerly, and replays one captured step per new token: the attention mask and positions come from device counters,
sampling (temperature, top-k, top-p) happens on the GPU with the exponential-race trick (argmax of p / Exp(1) is
a draw from p, with no host sync), and a device flag per row notes its first stop token. The host looks at the
flags every `check_every` steps and stops once every row has ended.

    sampler = GraphSampler(model, batch_size=2048, max_prompt_len=120, max_new_tokens=256, stop_ids=[2], pad_id=2)
    responses = sampler.generate(list_of_prompt_ids)   # each row's new tokens up to and including its stop token

Attention of the one-token step goes through `decode_attention` (registered with transformers' AttentionInterface
for the duration of a batch): the query heads of one key/value head are packed as rows of a single query, so the
masked SDPA reads each cached key once instead of once per query head after `repeat_kv` (transformers 5.17 repeats
the cache for every step of a masked GQA decode; at batch 2048 that made the step 83 ms on an H200).

The same step runs eagerly on the CPU (and wherever a graph cannot be captured), so tests check it against
`model.generate` there: greedy decoding gives the same tokens. Sampled tokens are not the ones `generate` draws
(another random stream), only from the same distribution.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .decoding import accepts_argument, capture_step

DECODE_ATTENTION = "effconv_decode"


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs):
    """transformers attention function: packed-GQA SDPA for one query token, transformers' SDPA otherwise.

    query (B, H, L, d), key/value (B, KV, T, d), attention_mask bool (B, 1, L, T); returns ((B, L, H, d), None).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if length != 1 or heads % kv_heads or attention_mask is None or attention_mask.shape[1] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # query head h belongs to key/value head h // (H / KV), as repeat_kv orders them
    packed = query.reshape(b, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, 1, heads, dim), None


def _register_decode_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(DECODE_ATTENTION, decode_attention)


def full_attention_config(config, length: int):
    """The config the cache is built from: sliding-window layers (Mistral, Qwen2) get a full static layer, which
    is exact while every sequence fits the window (no key is ever further back than `length` tokens); a longer one
    is refused rather than attended wrongly (the one mask of the step is not a per-layer window)."""
    import copy

    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    sliding = window is not None and (layer_types is None or "sliding_attention" in layer_types)
    if not sliding:
        return config
    if length > window:
        raise ValueError(f"graph sampling covers sliding-window models only while prompt + new tokens ({length}) "
                         f"fit the window ({window})")
    full = copy.deepcopy(config)
    full.sliding_window = None
    full.layer_types = ["full_attention"] * (len(layer_types) if layer_types else config.num_hidden_layers)
    return full


class GraphSampler:
    """Sampled (or greedy) continuations for batches of at most `batch_size` prompts (see module docstring)."""

    def __init__(
        self,
        model,
        *,
        batch_size: int,
        max_prompt_len: int,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        pad_id: int,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        use_cuda_graph: bool | None = None,
        check_every: int = 16,
    ) -> None:
        from transformers import StaticCache

        self.model = model
        self.cache_name = "cache" if accepts_argument(model, "cache") else "past_key_values"  # the forward's name
        self.device = next(model.parameters()).device
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        # slots for the longest prompt plus every new token; a multiple of 16 keeps SDPA's masked kernels aligned
        self.cache_len = -(-(max_prompt_len + max_new_tokens + 1) // 16) * 16
        self.pad_id = pad_id
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.check_every = max(1, check_every)
        self.use_cuda_graph = (self.device.type == "cuda") if use_cuda_graph is None else use_cuda_graph
        self.use_cuda_graph = bool(self.use_cuda_graph) and self.device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_error: str | None = None
        _register_decode_attention()

        device, b = self.device, batch_size
        self.cache = StaticCache(config=full_attention_config(model.config, max_prompt_len + max_new_tokens),
                                 max_cache_len=self.cache_len)
        # static buffers the captured step reads and advances
        self.slots = torch.arange(self.cache_len, device=device)
        self.stop_ids = torch.tensor(list(stop_ids) or [-1], dtype=torch.long, device=device)
        self.token = torch.zeros((b, 1), dtype=torch.long, device=device)
        self.cache_position = torch.zeros((1,), dtype=torch.long, device=device)
        self.position_ids = torch.zeros((b, 1), dtype=torch.long, device=device)
        self.first_slot = torch.zeros((b, 1), dtype=torch.long, device=device)  # left padding per row
        self.finished = torch.zeros((b,), dtype=torch.bool, device=device)
        self.step_mask = torch.zeros((b, 1, 1, self.cache_len), dtype=torch.bool, device=device)

    # ---- the pieces of a step -------------------------------------------------------------------------------

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token per row from last-position logits (B, V): greedy, or temperature -> top-k -> top-p sampling."""
        logits = logits.float()
        if not self.do_sample:
            return logits.argmax(-1, keepdim=True)
        logits = logits / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            values, indices = logits.topk(self.top_k, dim=-1)  # sorted, largest first
        else:
            values, indices = logits.sort(dim=-1, descending=True)
        probs = values.softmax(-1)
        if self.top_p < 1.0:
            # keep the smallest prefix whose mass reaches top_p (at least the first token), as transformers' TopP
            mass_before = probs.cumsum(-1) - probs
            probs = probs.masked_fill(mass_before >= self.top_p, 0.0)
        # exponential race: argmax(p_i / E_i), E_i ~ Exp(1), is a draw from p (renormalising is not needed)
        race = probs / torch.empty_like(probs).exponential_()
        return indices.gather(-1, race.argmax(-1, keepdim=True))

    def _accept(self, token: torch.Tensor) -> None:
        """Record the chosen tokens: ended rows keep emitting pad; the stop flags update."""
        token = torch.where(self.finished[:, None], torch.full_like(token, self.pad_id), token)
        self.token.copy_(token)
        self.finished |= (token == self.stop_ids[None, :]).any(-1)

    def _step(self) -> None:
        # the key slots a row may see: from its first real token up to the slot being written now
        valid = (self.slots[None, :] >= self.first_slot) & (self.slots[None, :] <= self.cache_position)
        self.step_mask.copy_(valid[:, None, None, :])
        out = self.model(self.token, attention_mask=self.step_mask, position_ids=self.position_ids,
                         cache_position=self.cache_position, **{self.cache_name: self.cache}, use_cache=True)
        self._accept(self._choose(out.logits[:, -1]))
        self.cache_position.add_(1)
        self.position_ids.add_(1)

    def _capture(self) -> None:
        self.graph = capture_step(self._step, (self.token, self.cache_position, self.position_ids, self.finished))

    def _run_step(self, eager: bool) -> None:
        if not eager and self.use_cuda_graph and self.graph_error is None:
            if self.graph is None:
                try:
                    self._capture()
                except RuntimeError as error:  # e.g. a host sync inside some model's forward: stay eager
                    self.graph_error = str(error).splitlines()[0]
                    torch.cuda.synchronize()
                    warnings.warn(f"teacher sampling runs without a CUDA graph (slower): {self.graph_error}",
                                  stacklevel=2)
            if self.graph is not None:
                self.graph.replay()
                return
        self._step()

    # ---- one batch ----------------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[list[int]]) -> list[list[int]]:
        """New tokens for each prompt (at most max_new_tokens), cut after its first stop token."""
        config = self.model.config
        previous = config._attn_implementation
        with torch.no_grad():
            try:
                config._attn_implementation = DECODE_ATTENTION  # read at call time: captured steps keep theirs
                return self._generate(prompts)
            finally:
                config._attn_implementation = previous

    def _generate(self, prompts: Sequence[list[int]]) -> list[list[int]]:
        count = len(prompts)
        if not 1 <= count <= self.batch_size:
            raise ValueError(f"GraphSampler takes 1..{self.batch_size} prompts, got {count}")
        rows = list(prompts) + [prompts[0]] * (self.batch_size - count)  # a fixed batch: one graph for every call
        width = max(len(ids) for ids in rows)
        if width + self.max_new_tokens >= self.cache_len:
            raise ValueError(f"a prompt of {width} tokens does not fit the sampler's {self.cache_len}-slot cache")
        b, device = self.batch_size, self.device
        input_ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        first = torch.empty((b, 1), dtype=torch.long)
        for row, ids in enumerate(rows):
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            first[row, 0] = width - len(ids)
        input_ids, first = input_ids.to(device), first.to(device)

        # prefill, eagerly: every prompt token sees the real tokens before it; a pad query sees itself only, so
        # no softmax row is empty (an empty one is NaN, and NaN in a padded slot's values poisons later layers)
        # a fresh cache, at the same addresses (newer transformers count the filled slots on the device)
        self.cache.reset()
        self.first_slot.copy_(first)
        query = torch.arange(width, device=device)
        causal = (self.slots[None, :] <= query[:, None])[None] & (self.slots[None, None, :] >= first[:, :, None])
        prefill_mask = (causal | (self.slots[None, :] == query[:, None])[None])[:, None]
        out = self.model(input_ids, attention_mask=prefill_mask, position_ids=(query[None] - first).clamp(min=0),
                         cache_position=query, **{self.cache_name: self.cache}, use_cache=True, logits_to_keep=1)
        self.finished.zero_()
        self._accept(self._choose(out.logits[:, -1]))
        self.cache_position.fill_(width)
        self.position_ids.copy_(width - first)

        tokens = [self.token.clone()]
        while len(tokens) < self.max_new_tokens:
            if len(tokens) % self.check_every == 0 and bool(self.finished[:count].all()):
                break
            self._run_step(eager=self.graph is None and not tokens[1:])  # the first step eager: warms up kernels
            tokens.append(self.token.clone())
        responses = []
        stop_set = set(self.stop_ids.tolist())
        for row in torch.cat(tokens, 1)[:count].tolist():
            end = next((i + 1 for i, token in enumerate(row) if token in stop_set), len(row))
            responses.append(row[:end])
        return responses
