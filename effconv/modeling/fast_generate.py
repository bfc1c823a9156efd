"""The fast path of `model.generate` for effconv models: a static decode cache and a CUDA graph of the one-token step.

Shipped inside every export (imports only torch, transformers and its siblings). It plugs into transformers' own
generation loop, so logits processors, stopping criteria, sampling and streamers behave as for any model
(`EFFCONV_GENERATE_LOOP` below says which loop runs):

* `_prepare_cache_for_generation` gives greedy and sampling runs an `EffconvCache(static=True)`;
* at the first one-token step the prompt's cache is moved into fixed buffers (`freeze`): the fp32 linear state,
  the hybrid layers' window ring buffers (token t in slot t % W, left padding masked per row), and a preallocated
  KV cache of `max_cache_len` slots for kept softmax layers; from then on a step writes in place, reads its slot
  from a device counter and never syncs with the host;
* `_valid_auto_compile_criteria` / `get_compiled_call` (transformers' switch to a compiled forward for static
  caches) hand the loop a `DecodeGraphs` runner on CUDA: the first step runs eagerly (kernels compile), the second
  captures the step in a CUDA graph, later steps replay it. Cache and graph are kept for the next call of the
  same batch size;
* `generate` itself runs the calls it can serve exactly in effconv's own loop (`fast_loop`: greedy or sampling with
  transformers' warpers, EOS, lengths, streamer, left padding), which reads the stop decision one step late
  instead of syncing with the device after every step; everything else goes to transformers' loop above.

`EFFCONV_FAST_GENERATE` (docs/environment.md): `auto` (default) static cache + CUDA graph on CUDA, transformers'
usual loop elsewhere; `on` the static cache on every device (the CUDA graph on CUDA only); `off` never.
`model.generate(..., disable_compile=True)` keeps the static cache but runs the steps eagerly.
`EFFCONV_GENERATE_LOOP`: `effconv` (default) as above, `transformers` always transformers' loop.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

MODES = ("auto", "on", "off")
STATIC_LAYER_TYPES = ("softmax", "gqa", "linear")  # sliding and block_sparse layers keep the eager cache
CACHE_ROUNDING = 256  # softmax KV buffers grow in these steps, so that calls of similar lengths share one buffer


def fast_generate_mode() -> str:
    value = os.environ.get("EFFCONV_FAST_GENERATE", "").strip().lower() or "auto"
    aliases = {"1": "on", "true": "on", "0": "off", "false": "off"}
    value = aliases.get(value, value)
    if value not in MODES:
        raise ValueError(f"EFFCONV_FAST_GENERATE must be one of auto, on, off (or 1, 0), got {value!r}")
    return value


def static_cache_wanted(model) -> bool:
    """Whether EFFCONV_FAST_GENERATE asks for the static cache for this model: `on`, or `auto` on CUDA."""
    mode = fast_generate_mode()
    return mode == "on" or (mode == "auto" and model.device.type == "cuda")


def generate_cache_name() -> str:
    """The keyword under which this transformers' `generate` passes the cache (`cache` from 5.2x on)."""
    try:
        from transformers.generation.utils import ALL_CACHE_NAMES

        return ALL_CACHE_NAMES[0]
    except (ImportError, IndexError):
        return "past_key_values"


def static_unsupported(model, kernels) -> str | None:
    """Why this model cannot decode from a static cache, or None."""
    types = sorted(set(model.config.attention_types) - set(STATIC_LAYER_TYPES))
    if types:
        return f"its {', '.join(types)} layers have no static decode cache"
    if kernels is None:
        from .backend import KERNELS_MISSING

        return f"the decode-step kernels did not import ({KERNELS_MISSING})"
    return None


@dataclass
class StaticContext:
    """What every layer's static step shares: the device counter of tokens seen (= the slot the next token goes
    to), each row's left padding and the slot numbers of the softmax KV buffers."""

    position: torch.Tensor  # (1,) int64
    first_token: torch.Tensor  # (B,) int64
    slots: torch.Tensor  # (max_cache_len,) int64


def _leading_padding(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor | None:
    """(B,) count of left-padding tokens, or None when the mask is not left padding (zeros after a one)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return torch.zeros(batch, dtype=torch.long, device=device)
    mask = attention_mask[:, :length].bool()
    first = (mask.long().cumsum(-1) == 0).sum(-1)
    if not bool((mask == (torch.arange(length, device=mask.device)[None, :] >= first[:, None])).all()):
        return None
    return first.to(device)


def _reuse(buffer: torch.Tensor | None, like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """`buffer` when it has the wanted shape, dtype and device (so a captured graph stays valid), else a new one."""
    shape = tuple(like.shape) if shape is None else tuple(shape)
    dtype = like.dtype if dtype is None else dtype
    if buffer is not None and tuple(buffer.shape) == shape and buffer.dtype == dtype and buffer.device == like.device:
        return buffer
    return torch.zeros(shape, dtype=dtype, device=like.device)


@torch.no_grad()
def freeze(model, cache, attention_mask, kernels) -> bool:
    """Move the prompt's cache into the fixed buffers of static decoding; False (and the cache stays dynamic) when
    this model or batch cannot decode statically (said once)."""
    reason = static_unsupported(model, kernels)
    seen = cache.seen_tokens
    layers = [layer.self_attn for layer in model.layers]  # model: the EffconvModel
    some = next(c for c in cache.layer_caches if c.keys is not None or c.state is not None or c.ring is not None)
    ref = some.keys if some.keys is not None else (some.ring.k if some.ring is not None else some.state[0])
    batch, device = ref.shape[0], ref.device
    first = None
    if reason is None:
        first = _leading_padding(attention_mask, batch, seen, device)
        if first is None:
            reason = "the attention mask is not left padding"
    needs_kv = any(a.layer_type in ("softmax", "gqa") for a in layers)
    if reason is None and needs_kv and seen + 1 > cache.max_cache_len:
        reason = f"the prompt ({seen} tokens) fills the static KV cache ({cache.max_cache_len} slots)"
    if reason is not None:
        logger.warning_once(f"effconv: generation decodes without the static cache (slower): {reason}")
        cache.static = False
        return False
    length = max(cache.max_cache_len, 1) if needs_kv else 1
    ctx = cache.static_context
    if ctx is None or ctx.first_token.shape[0] != batch or ctx.slots.numel() != length or ctx.slots.device != device:
        ctx = StaticContext(position=torch.zeros(1, dtype=torch.long, device=device),
                            first_token=torch.zeros(batch, dtype=torch.long, device=device),
                            slots=torch.arange(length, device=device))
        cache.static_context = ctx
        cache.graph = None
    ctx.position.fill_(seen)
    ctx.first_token.copy_(first)
    padded = bool(first.any())
    for attn, c in zip(layers, cache.layer_caches):
        if attn.layer_type in ("softmax", "gqa"):
            shape = (*c.keys.shape[:2], length, c.keys.shape[3])
            c.static_keys = _reuse(c.static_keys, c.keys, shape)
            c.static_values = _reuse(c.static_values, c.values, (*shape[:3], c.values.shape[3]))
            c.static_keys[:, :, :seen].copy_(c.keys)
            c.static_values[:, :, :seen].copy_(c.values)
            c.keys = c.values = None
        elif attn.window == 0:
            state = [_reuse(old, new, dtype=torch.float32) for old, new in zip(c.static_state or (None, None), c.state)]
            for buffer, new in zip(state, c.state):
                if buffer is not new:
                    buffer.copy_(new)
            c.static_state = c.state = tuple(state)
        else:
            if c.ring is not None:  # decoded one-token steps before, eagerly: back to (state, window keys)
                attn._unroll_ring(c)
            ring = kernels.HybridDecodeCache.from_prefill(c.keys, c.values, c.key_features.to(c.keys.dtype),
                                                          window=attn.window, final_state=c.state,
                                                          log_decay=attn.log_decay(), key_gates=c.key_gates,
                                                          **attn._ring_sinks(c))
            w, held = ring.k.shape[2], c.keys.shape[2]
            # from_prefill numbers the held tokens from 0; the device counter is absolute: token t in slot t % W
            shift = (seen - held) % w
            old = c.static_ring
            for name in ("S", "z", "k", "v", "fk") + (("lg",) if ring.lg is not None else ()) + (
                    ("sk", "sv") if ring.sk is not None else ()):
                new = getattr(ring, name)
                if name in ("k", "v", "fk", "lg") and shift:
                    new = torch.roll(new, shift, dims=2)
                buffer = _reuse(getattr(old, name) if old is not None else None, new)
                buffer.copy_(new)
                setattr(ring, name, buffer)
            if padded:  # padded tokens still in the window: nothing to add to the state when they leave it
                slot = torch.arange(w, device=device)
                token = (seen - 1) - ((seen - 1 - slot) % w)
                pad = (token[None, :] < first[:, None])[:, None, :, None]
                ring.v.masked_fill_(pad, 0)
                ring.fk.masked_fill_(pad, 0)
            ring.seen = seen
            c.static_ring = c.ring = ring
            c.ring_position = ctx.position
            c.keys = c.values = c.key_features = c.state = c.key_gates = None
            c.sinks = c.key_sinks = None
        c.key_mask = None
        c.static = ctx
    cache.frozen = True
    return True


def thaw(model, cache) -> None:
    """Back from the static buffers to the growing cache (a multi-token continuation of a static cache)."""
    seen = cache.seen_tokens
    for attn, c in zip((layer.self_attn for layer in model.layers), cache.layer_caches):
        if c.static is None:
            continue
        if c.static_keys is not None:
            c.keys = c.static_keys[:, :, :seen].clone()
            c.values = c.static_values[:, :, :seen].clone()
        elif c.ring is not None:
            attn._unroll_ring(c)
        c.static = None
    cache.frozen = False
    cache.static = False  # the buffers' graph does not know the new tokens' positions
    cache.graph = None


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    output: object


class DecodeGraphs:
    """The model's forward, where one-token steps through a frozen static cache replay a CUDA graph (captured per
    cache, i.e. per batch size; see the module docstring). Anything else runs the forward as is."""

    def __init__(self, model):
        self._model = weakref.ref(model)
        self.failed: str | None = None

    def __call__(self, *args, **kwargs):
        model = self._model()
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        input_ids = kwargs.get("input_ids")
        if (args or input_ids is None or input_ids.shape[1] != 1 or not input_ids.is_cuda or cache is None
                or not getattr(cache, "frozen", False) or kwargs.get("inputs_embeds") is not None
                or kwargs.get("output_attentions") or kwargs.get("output_hidden_states") or self.failed
                or not cache.has_room(1)):
            return model(*args, **kwargs)
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = cache.static_context.position.view(1, 1).expand(input_ids.shape[0], 1)
        step = cache.graph
        if step is None:
            if not cache.graph_warm:  # first step eagerly: Triton kernels compile, cuBLAS sets up
                cache.graph_warm = True
                return model(*args, **kwargs)
            step = self._capture(model, cache, input_ids, positions, kwargs)
            if step is None:
                return model(*args, **kwargs)
        step.input_ids.copy_(input_ids)
        step.position_ids.copy_(positions)
        step.graph.replay()
        cache.seen_tokens += 1
        return step.output

    def _capture(self, model, cache, input_ids, positions, kwargs) -> _Graph | None:
        name = "cache" if "cache" in kwargs else "past_key_values"
        ids, pos = input_ids.clone(), positions.clone()
        call = {name: cache, "input_ids": ids, "position_ids": pos, "use_cache": True, "return_dict": True,
                "logits_to_keep": kwargs.get("logits_to_keep", 1)}
        seen = cache.seen_tokens
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            # capture records the step without running it: only Python-side counters move, and are put back
            with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                output = model(**call)
        except RuntimeError as error:
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            self.failed = str(error).splitlines()[0] if str(error) else type(error).__name__
            logger.warning_once(f"effconv: generation decodes without a CUDA graph (slower): {self.failed}")
            return None
        finally:
            cache.seen_tokens = seen
        torch.cuda.current_stream().wait_stream(stream)
        cache.graph = _Graph(graph, ids, pos, output)
        return cache.graph


# GenerationConfig fields the effconv loop honours (beside the metadata that does not change decoding); a call
# that sets any other field away from its default runs transformers' own loop
LOOP_FIELDS = {"max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k",
               "top_p", "eos_token_id", "pad_token_id", "bos_token_id", "use_cache", "disable_compile",
               "transformers_version", "_from_model_config"}
LOOPS = ("effconv", "transformers")


def generate_loop() -> str:
    """EFFCONV_GENERATE_LOOP: `effconv` (default) runs the calls it can serve in effconv's loop, `transformers`
    always runs transformers' own loop (the static cache and CUDA graph still serve it)."""
    value = os.environ.get("EFFCONV_GENERATE_LOOP", "").strip().lower() or "effconv"
    if value not in LOOPS:
        raise ValueError(f"EFFCONV_GENERATE_LOOP must be one of {', '.join(LOOPS)}, got {value!r}")
    return value


@dataclass
class _LoopPlan:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    new_tokens: int
    config: object  # the effective GenerationConfig
    eos: torch.Tensor | None  # (n,) eos ids on the device
    pad: int | None
    eos_banned: int  # the first steps at which EOS may not be chosen (min_new_tokens / min_length)
    warpers: object  # LogitsProcessorList of the sampling warpers (empty for greedy)


def _loop_plan(model, args: tuple, kwargs: dict) -> _LoopPlan | None:
    """The effconv loop's settings for a `generate` call, or None when transformers' loop must run it: anything
    beyond greedy / sampling with temperature, top-k and top-p, EOS and a length, a streamer and an attention mask
    (beams, other processors or stopping criteria, scores or dict outputs, prefill chunking, ...)."""
    import copy

    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    if generate_loop() == "transformers" or len(args) > 1:
        return None
    if not static_cache_wanted(model) or static_unsupported(model, _kernels()) is not None:
        return None
    kwargs = dict(kwargs)
    input_ids = args[0] if args else kwargs.pop("inputs", None)
    input_ids = kwargs.pop("input_ids", input_ids)
    attention_mask = kwargs.pop("attention_mask", None)
    kwargs.pop("streamer", None)
    given = kwargs.pop("generation_config", None)
    base = given if given is not None else model.generation_config
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        return None
    asked = copy.deepcopy(base)
    if asked.update(**kwargs):  # keys that are not generation settings (model inputs): transformers' loop
        return None
    default = type(asked)()
    for key, value in asked.to_dict().items():  # what the model's and the call's settings ask for
        unset = getattr(default, key, value)
        if key not in LOOP_FIELDS and value != unset and (value or unset):  # None, False and 0 all mean "off"
            return None
    try:  # the values transformers would decode with (its defaults filled in: e.g. top-k 50 when sampling)
        config, extra = model._prepare_generation_config(given, **kwargs)
    except (AttributeError, TypeError, ValueError):
        return None
    if any(extra.values()) or config.use_cache is False or config.cache_implementation is not None:
        return None
    prompt = input_ids.shape[1]
    new_tokens = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - prompt
    if new_tokens is None or new_tokens < 1:
        return None
    eos = config.eos_token_id
    eos = [eos] if isinstance(eos, int) else (list(eos) if eos is not None else [])
    pad = config.pad_token_id
    if isinstance(pad, (list, tuple)):
        return None
    if pad is None and eos:
        pad = eos[0]  # as transformers does (it also says so)
    if attention_mask is None:
        if pad is not None and bool((input_ids == pad).any()):
            return None  # transformers would infer a mask from the padding: let it
        attention_mask = torch.ones_like(input_ids)
    warpers = LogitsProcessorList()
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            warpers.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
        if config.top_p is not None and config.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    # transformers' MinLength / MinNewTokens processors: EOS scores -inf until the lengths are reached
    banned = max(config.min_new_tokens or 0, (config.min_length or 0) - prompt) if eos else 0
    device = input_ids.device
    return _LoopPlan(input_ids=input_ids, attention_mask=attention_mask.to(device), new_tokens=int(new_tokens),
                     config=config, eos=torch.tensor(eos, device=device) if eos else None, pad=pad,
                     eos_banned=max(banned, 0), warpers=warpers)


def _kernels():
    from .backend import kernels

    return kernels


class _StopFlag:
    """Whether every row has finished, read one step late: the flag is copied to pinned host memory without
    blocking, so the host queues the next step while the device still runs this one."""

    def __init__(self, device):
        pinned = device.type == "cuda"
        self.flags = [torch.zeros((), dtype=torch.bool, pin_memory=pinned) for _ in range(2)]
        self.events = [torch.cuda.Event() if pinned else None for _ in range(2)]
        self.turn = 0

    def push(self, unfinished: torch.Tensor) -> None:
        self.flags[self.turn].copy_(unfinished.max() == 0, non_blocking=True)
        if self.events[self.turn] is not None:
            self.events[self.turn].record()
        self.turn ^= 1

    def previous(self) -> bool:
        """The flag pushed before the last one (False before there is one)."""
        i = self.turn  # two pushes ago wrote here; the last push wrote the other slot
        if self.events[i] is not None:
            self.events[i].synchronize()
        return bool(self.flags[i])


@torch.no_grad()
def fast_loop(model, plan: _LoopPlan, streamer=None) -> torch.Tensor:
    """Greedy search or sampling with transformers' semantics (the same tokens as its loop for greedy, and for
    sampling from the same random state: the same warpers and one multinomial draw per step), through the static
    cache and the CUDA-graph step, without a host sync per step: the stop decision is read one step late (at most
    one extra step is computed and dropped), the tokens stay on the device until the end (a streamer gets each
    token as it comes, which needs that sync)."""
    ids, mask, n = plan.input_ids, plan.attention_mask, plan.new_tokens
    batch, prompt = ids.shape
    device = ids.device
    cache = model._generation_cache(prompt + n)
    name = generate_cache_name()
    graph_ok = device.type == "cuda" and not plan.config.disable_compile
    forward = model.get_compiled_call() if graph_ok else model.__call__
    if streamer is not None:
        streamer.put(ids.cpu())
    # positions as transformers numbers them: real tokens from 0, left padding skipped
    positions = mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(mask == 0, 1)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, return_dict=True,
                logits_to_keep=1, **{name: cache})
    position = positions[:, -1:]
    tokens = torch.empty(batch, n, dtype=ids.dtype, device=device)
    unfinished = torch.ones(batch, dtype=torch.long, device=device)
    stop = _StopFlag(device)
    done = n
    for step in range(n):
        scores = out.logits[:, -1].to(dtype=torch.float32, copy=True)
        if step < plan.eos_banned:
            scores[:, plan.eos] = float("-inf")
        if plan.config.do_sample:
            scores = plan.warpers(ids, scores)  # temperature, top-k and top-p do not read the ids
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            token = torch.argmax(scores, dim=-1)
        if plan.eos is not None:
            token = token * unfinished + plan.pad * (1 - unfinished)
            unfinished = unfinished & ~torch.isin(token, plan.eos)
        tokens[:, step] = token
        if streamer is not None:  # the host has the token now anyway: decide at once
            streamer.put(token.cpu())
            if plan.eos is not None and not bool(unfinished.any()):
                done = step + 1
                break
        if step == n - 1:
            break
        if plan.eos is not None and streamer is None:
            stop.push(unfinished)
            if step >= 1 and stop.previous():  # every row had finished one step ago
                done = step  # tokens[:, :step] are the answer; this step's token is dropped
                break
        mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
        position = position + 1
        out = forward(input_ids=token[:, None], attention_mask=mask, position_ids=position, use_cache=True,
                      return_dict=True, logits_to_keep=1, **{name: cache})
    if plan.eos is not None:  # transformers stops at the step where the last row finished
        done = _all_finished_at(tokens[:, :done], plan.eos)
    if streamer is not None:
        streamer.end()
    return torch.cat([ids, tokens[:, :done]], 1)


def _all_finished_at(tokens: torch.Tensor, eos: torch.Tensor) -> int:
    """The number of steps after which every row had produced an EOS (all of them when some row never did)."""
    hit = torch.isin(tokens, eos)
    if not bool(hit.any(1).all()):
        return tokens.shape[1]
    return int(hit.int().argmax(1).max()) + 1


class FastGenerationMixin:
    """GenerationMixin overrides of EffconvForCausalLM (module docstring)."""

    def generate(self, *args, **kwargs):
        plan = _loop_plan(self, args, kwargs)
        self._effconv_generate_loop = "transformers" if plan is None else "effconv"  # what the last call ran
        if plan is None:
            return super().generate(*args, **kwargs)
        return fast_loop(self, plan, kwargs.get("streamer"))

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length, *args, **kwargs):
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size,
                                                       max_cache_length, *args, **kwargs)
        name = generate_cache_name()
        if model_kwargs.get(name) is not None or generation_config.use_cache is False:
            return result
        from transformers.generation.configuration_utils import GenerationMode

        from .modeling_effconv import EffconvCache

        # a growing cache unless the static one can serve (given here, not made by the forward, so that
        # transformers' prefill chunking finds a cache)
        model_kwargs[name] = EffconvCache(self.config.num_hidden_layers)
        if not static_cache_wanted(self):
            return result
        if generation_mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
            logger.warning_once(f"effconv: {generation_mode} decodes without the static cache (slower); greedy "
                                "search and sampling use it")
            return result
        reason = static_unsupported(self, _kernels())
        if reason is not None:
            logger.warning_once(f"effconv: generation decodes without the static cache (slower): {reason}")
            return result
        model_kwargs[name] = self._generation_cache(max_cache_length)
        return result

    def _generation_cache(self, max_cache_length: int):
        """The static cache of the last call (its buffers and graph stay valid for the same batch size), reset."""
        from .modeling_effconv import EffconvCache

        length = -(-int(max_cache_length) // CACHE_ROUNDING) * CACHE_ROUNDING
        cache = getattr(self, "_effconv_generation_cache", None)
        if cache is None or cache.max_cache_len < length:
            cache = EffconvCache(self.config.num_hidden_layers, static=True, max_cache_len=length)
            self._effconv_generation_cache = cache
        cache.reset_for_generation()
        return cache

    def _valid_auto_compile_criteria(self, model_kwargs, generation_config) -> bool:
        cache = model_kwargs.get(generate_cache_name())
        if getattr(cache, "static", False):
            return self.device.type == "cuda" and not generation_config.disable_compile
        return super()._valid_auto_compile_criteria(model_kwargs, generation_config)

    def get_compiled_call(self, compile_config=None):
        runner = getattr(self, "_effconv_decode_graphs", None)
        if runner is None:
            runner = self._effconv_decode_graphs = DecodeGraphs(self)
        return runner
