"""`effconv moe-upcycle`: every dense gated FFN becomes a mixture of experts, then distillation from the dense model.

Methods
- split: the FFN's I intermediate neurons are partitioned into E experts of I/E neurons (random, balanced k-means of
  the neurons' gate/up weight rows, or balanced k-means of their activation patterns on data = co-activation).
  Parameters are unchanged; top-k of E experts run per token. Expert down projections are scaled by top_k, so that
  with renormalised top-k weights the selected experts add up as in the dense FFN (top-k = E reproduces it exactly
  when the router is uniform). With --shared S, the S*I/(E+S) neurons of largest activation mass form an always-on
  shared expert.
- copy (sparse upcycling with granularity G): expert e is slice e % G (I/G neurons) of the FFN; the E/G copies of a
  slice share router rows, so softmax-then-top-k (top_k a multiple of G, renormalised) always picks whole copies
  and every slice gets total weight 1/G; down projections scaled by G make the step-0 output equal to the dense one.

The router is initialised from the layer's input hidden states on calibration text: split fits each expert's log
output norm ("activation mass") by ridge regression; copy uses k-means centroids (one per copy). Initial logits are
scaled to a small spread so the weights start near uniform over the chosen experts.

Works on effconv exports too (a linearized / hybridized model becomes Linear-MoE); the result is exported as a
native Mixtral / Qwen2-MoE / Qwen3-MoE model where transformers has that layout, else as an effconv model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data as data_lib
from . import distributed, fsdp
from .errors import EffconvError
from .export import check_output_dir, export_model
from .linearize import _device_and_dtype, _prepare_run_dir, prepare_run_data, run_dir_for, stage_budget_metrics
from .loading import SUPPORTED_MODEL_TYPES, build_student, effconv_config_from_teacher, load_causal_lm
from .metrics import next_token_loss, perplexity
from .modeling import EffconvConfig, EffconvForCausalLM
from .modeling.moe import MoeMLP
from .train import StageSpec, console, load_checkpoint, run_stage

METHODS = ("split", "copy")
SPLITS = ("random", "balanced", "coactivation")
ROUTER_INITS = ("auto", "activation", "kmeans", "uniform")
LOAD_BALANCING = ("aux", "bias", "none")
TRAINABLE = ("router", "router-lora", "experts")
EXPORT_FORMATS = ("auto", "native", "effconv")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class MoeUpcycleConfig:
    """Settings of one upcycling run (CLI options and YAML recipe keys)."""

    model: str | None = None  # HF directory (llama/mistral/qwen2/qwen3 or an effconv export), GGUF, hub id
    out: str = "out/moe"
    method: str = "split"  # split | copy
    split: str = "balanced"  # split only: random | balanced | coactivation
    experts: int = 8  # routed experts per layer
    top_k: int = 2
    granularity: int = 1  # copy only: each expert is a 1/G slice of the FFN
    shared: int = 0  # always-on shared experts (split: of expert size; copy: one dense copy, outputs halved)
    router_init: str = "auto"  # auto (split: activation, copy: kmeans) | activation | kmeans | uniform
    router_init_std: float = 1.0  # spread of the initial router logits (measured: 1.0 beats 0.1 on SmolLM2)
    load_balancing: str = "aux"  # aux (Switch loss) | bias (selection bias, no gradient) | none
    aux_weight: float = 0.01
    bias_rate: float = 0.001
    calibration_tokens: int = 8192  # tokens of layer inputs for clustering and router init
    train: str = "router"  # router | router-lora | experts
    tokens: int = 0  # distillation budget (0: export the step-0 model)
    max_seconds: float | None = None  # wall-clock cap of distillation: fewer steps, LR decayed at the new end
    lr: float = 1e-3
    lora_rank: int = 8
    lora_alpha: float = 16.0
    hidden_mse_weight: float = 0.0  # per-layer hidden-state MSE beside KL on the logits
    export_format: str = "auto"  # auto (native when the layout fits) | native | effconv
    data: str | None = None
    text_field: str = "text"
    generate_tokens: int = 10_000
    generation_batch_size: int = 48
    generation_mode: str = "auto"  # teacher text: auto (graph on CUDA) | static | continuous | graph
    seq_len: int = 256
    batch_size: int = 8
    val_fraction: float = 0.1
    max_val_blocks: int = 16
    eval_every: int = 20
    checkpoint_every: int = 20
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    keep_run: bool = False
    progress: bool = True

    def validate(self) -> None:
        choices = dict(method=METHODS, split=SPLITS, router_init=ROUTER_INITS, load_balancing=LOAD_BALANCING,
                       train=TRAINABLE, export_format=EXPORT_FORMATS, dtype=("auto", "float32", "bfloat16", "float16"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise EffconvError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.experts < 1:
            raise EffconvError(f"--experts must be >= 1, got {self.experts}")
        if not 1 <= self.top_k <= self.experts:
            raise EffconvError(f"--top-k must be between 1 and --experts ({self.experts}), got {self.top_k}")
        if self.shared < 0 or self.granularity < 1:
            raise EffconvError("--shared must be >= 0 and --granularity >= 1")
        if self.method == "copy":
            g = self.granularity
            if self.experts % g or self.top_k % g:
                raise EffconvError(f"--method copy needs --experts ({self.experts}) and --top-k ({self.top_k}) to be "
                                   f"multiples of --granularity ({g})")
            if self.shared > 1:
                raise EffconvError("--method copy supports --shared 0 or 1")
            if self.router_init == "activation":
                raise EffconvError("--router-init activation is for --method split; copy uses kmeans or uniform")
        elif self.router_init == "kmeans":
            raise EffconvError("--router-init kmeans is for --method copy; split uses activation or uniform")
        for name in ("tokens", "calibration_tokens", "generate_tokens"):
            if getattr(self, name) < 0:
                raise EffconvError(f"--{name.replace('_', '-')} must be >= 0")
        if self.seq_len < 2 or self.batch_size < 1:
            raise EffconvError("--seq-len must be >= 2 and --batch-size >= 1")
        if self.lr <= 0 or self.router_init_std < 0:
            raise EffconvError("--lr must be > 0 and --router-init-std >= 0")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise EffconvError(f"--max-seconds must be > 0 (seconds), got {self.max_seconds}")
        data_lib.check_generation_mode(self.generation_mode)

    def identity(self) -> dict:
        """What must match for --resume: everything except output handling and the time budget (a checkpoint
        keeps its planned steps)."""
        skip = {"resume", "overwrite", "keep_run", "progress", "max_seconds"}
        if self.generation_mode == "static":  # runs from before the setting existed: absent, so they still resume
            skip.add("generation_mode")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


@dataclass
class MoeUpcycleResult:
    out: Path
    export_format: str
    metrics: dict = field(default_factory=dict)
    model: object = None  # the exported network as an effconv model (in memory)


# --------------------------------------------------------------------------------------------------------------
# Dense model in effconv form, calibration statistics
# --------------------------------------------------------------------------------------------------------------


def dense_effconv_model(model) -> EffconvForCausalLM:
    """The model as an EffconvForCausalLM with dense gated MLPs (a plain HF teacher gets softmax attention in
    every layer; an effconv export keeps its linear / hybrid layers)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type == "effconv":
        if getattr(model.config, "num_experts", 0):
            raise EffconvError("the model is already a mixture of experts")
        return model
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise EffconvError(
            f"no recognised gated FFN (gate_proj/up_proj/down_proj) in a {model_type!r} model; moe-upcycle converts "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} models and effconv exports"
        )
    n = model.config.num_hidden_layers
    config = effconv_config_from_teacher(model.config, attention_types=["softmax"] * n)
    if config.mlp_bias:
        raise EffconvError("FFNs with biases (mlp_bias) are not supported by moe-upcycle")
    return build_student(model, config)


@torch.no_grad()
def collect_mlp_inputs(model: EffconvForCausalLM, blocks: torch.Tensor, max_tokens: int, batch_size: int) -> list[torch.Tensor]:
    """Each layer's FFN input (after the post-attention norm), up to max_tokens rows per layer, fp32 on CPU."""
    layers = model.model.layers
    captured: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.mlp.register_forward_hook(lambda m, args, out, i=i: captured[i].append(args[0].flatten(0, 1).float().cpu()))
             for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        seen = 0
        for start in range(0, blocks.shape[0], batch_size):
            if seen >= max_tokens:
                break
            batch = blocks[start : start + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
            seen += batch.numel()
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(c)[:max_tokens] for c in captured]


def _neuron_activations(mlp, x: torch.Tensor) -> torch.Tensor:
    """(tokens, I) intermediate activations act(gate x) * up x of a dense gated MLP, fp32."""
    gate = F.linear(x, mlp.gate_proj.weight.float().to(x.device))
    up = F.linear(x, mlp.up_proj.weight.float().to(x.device))
    return mlp.act_fn(gate) * up


def balanced_kmeans(features: torch.Tensor, k: int, *, iters: int = 15, generator: torch.Generator) -> torch.Tensor:
    """Cluster labels of the rows of `features` (cosine similarity) into k clusters of exactly n/k rows each."""
    n = features.shape[0]
    size = n // k
    feats = F.normalize(features.float(), dim=-1)
    centroids = feats[torch.randperm(n, generator=generator)[:k]].clone()
    labels = torch.empty(n, dtype=torch.long)
    for _ in range(iters):
        sim = feats @ centroids.T
        labels = _balanced_assign(sim, size)
        on_device = labels.to(feats.device)
        for c in range(k):
            centroids[c] = F.normalize(feats[on_device == c].mean(0), dim=-1)
    return labels


def _balanced_assign(sim: torch.Tensor, size: int) -> torch.Tensor:
    """Greedy capacity-constrained assignment: strongest (row, cluster) pairs first, each cluster takes `size` rows."""
    n, k = sim.shape
    order = torch.argsort(sim.flatten(), descending=True)
    rows, cols = (order // k).tolist(), (order % k).tolist()
    labels = [-1] * n
    room = [size] * k
    left = n
    for r, c in zip(rows, cols):
        if labels[r] < 0 and room[c] > 0:
            labels[r] = c
            room[c] -= 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(labels)


def split_neurons(mlp, x: torch.Tensor, cfg: MoeUpcycleConfig, generator: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(shared neuron indices, one index tensor per routed expert) for --method split."""
    inter = mlp.gate_proj.weight.shape[0]
    slices = cfg.experts + cfg.shared
    if inter % slices:
        raise EffconvError(f"--method split needs the intermediate size ({inter}) to be divisible by --experts + "
                           f"--shared ({slices})")
    expert_size = inter // slices
    acts = _neuron_activations(mlp, x) if x.numel() else None
    neurons = torch.arange(inter)
    shared = neurons[:0]
    if cfg.shared:
        if acts is None:
            raise EffconvError("--shared with --method split needs calibration text (--calibration-tokens > 0)")
        mass = acts.abs().mean(0)
        shared = torch.sort(torch.topk(mass, cfg.shared * expert_size).indices).values.cpu()
        neurons = neurons[~torch.isin(neurons, shared)]
    if cfg.split == "random" or cfg.experts == 1:
        labels = torch.arange(len(neurons))[torch.randperm(len(neurons), generator=generator)] % cfg.experts
    elif cfg.split == "balanced":
        rows = torch.cat([F.normalize(mlp.gate_proj.weight.float(), dim=-1), F.normalize(mlp.up_proj.weight.float(), dim=-1)], -1)
        labels = balanced_kmeans(rows[neurons], cfg.experts, generator=generator)
    else:
        if acts is None:
            raise EffconvError("--split coactivation needs calibration text (--calibration-tokens > 0)")
        labels = balanced_kmeans(acts[:, neurons].abs().T, cfg.experts, generator=generator)
    return shared, [neurons[labels == e] for e in range(cfg.experts)]


def _scaled_rows(rows: torch.Tensor, x: torch.Tensor, std: float) -> torch.Tensor:
    """Router rows rescaled so the logits on the calibration inputs have standard deviation `std` across experts."""
    if x.numel() == 0 or std == 0:
        return torch.zeros_like(rows)
    logits = x @ rows.T
    spread = (logits - logits.mean(-1, keepdim=True)).std().clamp_min(1e-8)
    return rows * (std / spread)


def activation_router(x: torch.Tensor, expert_outputs_norm: torch.Tensor, std: float) -> torch.Tensor:
    """Router rows W (E, D) whose logits x @ W.T fit each expert's centred log output norm (ridge regression)."""
    target = torch.log(expert_outputs_norm + 1e-6)
    target = target - target.mean(-1, keepdim=True)
    d = x.shape[1]
    gram = x.T @ x + 1e-2 * x.pow(2).mean() * x.shape[0] * torch.eye(d, device=x.device)
    w = torch.linalg.solve(gram, x.T @ target).T
    return _scaled_rows(w, x, std)


def kmeans_router(x: torch.Tensor, groups: int, std: float, generator: torch.Generator, iters: int = 15) -> torch.Tensor:
    """One router row per group: k-means (cosine) centroids of the layer inputs."""
    feats = F.normalize(x, dim=-1)
    centroids = feats[torch.randperm(x.shape[0], generator=generator)[:groups]].clone()
    for _ in range(iters):
        labels = (feats @ centroids.T).argmax(-1)
        for c in range(groups):
            if bool((labels == c).any()):
                centroids[c] = F.normalize(feats[labels == c].mean(0), dim=-1)
    return _scaled_rows(centroids, x, std)


# --------------------------------------------------------------------------------------------------------------
# Upcycling
# --------------------------------------------------------------------------------------------------------------


def moe_config(dense_config: EffconvConfig, cfg: MoeUpcycleConfig) -> EffconvConfig:
    inter = dense_config.intermediate_size
    if cfg.method == "split":
        slices = cfg.experts + cfg.shared
        if inter % slices:
            raise EffconvError(f"--method split needs the intermediate size ({inter}) to be divisible by --experts + "
                               f"--shared ({slices})")
        expert_size, shared_size = inter // slices, cfg.shared * (inter // slices)
    else:
        if inter % cfg.granularity:
            raise EffconvError(f"--granularity {cfg.granularity} does not divide the intermediate size ({inter})")
        expert_size, shared_size = inter // cfg.granularity, inter if cfg.shared else 0
    values = dense_config.to_dict()
    for key in ("auto_map", "architectures", "transformers_version", "model_type", "_name_or_path"):
        values.pop(key, None)
    values.update(num_experts=cfg.experts, num_experts_per_tok=cfg.top_k, moe_intermediate_size=expert_size,
                  shared_expert_intermediate_size=shared_size, norm_topk_prob=True)
    return EffconvConfig(**values)


@torch.no_grad()
def upcycle_mlp(mlp, x: torch.Tensor, moe: MoeMLP, cfg: MoeUpcycleConfig, generator: torch.Generator) -> None:
    """Fill `moe` (a fresh MoeMLP) from the dense gated `mlp`; x: the layer's calibration inputs (tokens, D).

    The statistics (splits, router fits) are computed in fp32 on the dense weights' device (the GPU when the model
    is there: ~30x faster than the CPU at SmolLM2's 32K calibration tokens); the calibration inputs are moved there
    one layer at a time. Index tensors (the neuron groups) stay on the CPU."""
    stats_device = os.environ.get("EFFCONV_MOE_STATS_DEVICE") or mlp.gate_proj.weight.device  # e.g. "cpu"
    gate_w, up_w, down_w = (p.weight.float().to(stats_device) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    x = x.to(stats_device)
    dtype = moe.gate.weight.dtype
    router_init = cfg.router_init if cfg.router_init != "auto" else ("activation" if cfg.method == "split" else "kmeans")
    if router_init != "uniform" and x.numel() == 0:
        raise EffconvError(f"--router-init {router_init} needs calibration text (--calibration-tokens > 0)")
    if cfg.method == "split":
        shared, groups = split_neurons(mlp, x, cfg, generator)
        for e, idx in enumerate(groups):
            moe.experts.gate_up_proj[e] = torch.cat([gate_w[idx], up_w[idx]]).to(dtype)
            moe.experts.down_proj[e] = (down_w[:, idx] * cfg.top_k).to(dtype)
        if cfg.shared:
            moe.shared_expert.gate_proj.weight.copy_(gate_w[shared])
            moe.shared_expert.up_proj.weight.copy_(up_w[shared])
            moe.shared_expert.down_proj.weight.copy_(down_w[:, shared])
        if router_init == "activation":
            acts = _neuron_activations(mlp, x)
            norms = torch.stack([F.linear(acts[:, idx], down_w[:, idx]).norm(dim=-1) for idx in groups], -1)
            moe.gate.weight.copy_(activation_router(x, norms, cfg.router_init_std))
        else:
            moe.gate.weight.zero_()
    else:
        g, inter = cfg.granularity, gate_w.shape[0]
        size = inter // g
        halve = 0.5 if cfg.shared else 1.0  # with a shared dense copy, shared and routed halves add up to the FFN
        for e in range(cfg.experts):
            s = slice((e % g) * size, (e % g + 1) * size)
            moe.experts.gate_up_proj[e] = torch.cat([gate_w[s], up_w[s]]).to(dtype)
            moe.experts.down_proj[e] = (down_w[:, s] * g * halve).to(dtype)
        if cfg.shared:
            moe.shared_expert.gate_proj.weight.copy_(gate_w)
            moe.shared_expert.up_proj.weight.copy_(up_w)
            moe.shared_expert.down_proj.weight.copy_(down_w * halve)
        rows = (kmeans_router(x, cfg.experts // g, cfg.router_init_std, generator) if router_init == "kmeans"
                else torch.zeros(cfg.experts // g, gate_w.shape[1]))
        # all slices of one copy share a row: their logits tie exactly, so top-k takes whole copies
        moe.gate.weight.copy_(rows.repeat_interleave(g, dim=0).to(dtype))
    moe.router_bias.zero_()


def upcycle(dense: EffconvForCausalLM, calibration: list[torch.Tensor], cfg: MoeUpcycleConfig) -> EffconvForCausalLM:
    """A new EffconvForCausalLM with MoE FFNs built from `dense` (which is left unchanged)."""
    config = moe_config(dense.config, cfg)
    device, dtype = next(dense.parameters()).device, next(dense.parameters()).dtype
    with torch.device("meta"):
        moe_model = EffconvForCausalLM(config)
    moe_model.to_empty(device=device)
    moe_model.to(dtype)
    state = {k: v.clone() for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing, unexpected = moe_model.load_state_dict(state, strict=False)
    if unexpected:
        raise EffconvError(f"weights that do not fit the MoE model: {unexpected[:3]}")
    generator = torch.Generator().manual_seed(cfg.seed)
    for i, (dense_layer, moe_layer) in enumerate(zip(dense.model.layers, moe_model.model.layers)):
        x = calibration[i] if calibration else torch.empty(0, config.hidden_size)
        upcycle_mlp(dense_layer.mlp, x, moe_layer.mlp, cfg, generator)
    if config.tie_word_embeddings:
        moe_model.tie_weights()
    moe_model.model.rotary_emb = type(dense.model.rotary_emb)(config=config).to(device)
    return moe_model.eval()


def moe_layers(model) -> list[MoeMLP]:
    return [m for m in model.modules() if isinstance(m, MoeMLP)]


# --------------------------------------------------------------------------------------------------------------
# Distillation
# --------------------------------------------------------------------------------------------------------------


def _layer_outputs(model, store: list[torch.Tensor]):
    layers = model.model.layers if hasattr(model, "model") and hasattr(model.model, "layers") else model.base_model.model.model.layers
    return [layer.register_forward_hook(lambda m, a, out: store.append(out)) for layer in layers]


def distill_loss(student, teacher, batch: torch.Tensor, cfg: MoeUpcycleConfig) -> tuple[torch.Tensor, dict]:
    """KL(teacher || student) on next-token distributions + optional hidden MSE + load balancing."""
    want_hidden = cfg.hidden_mse_weight > 0
    t_hidden: list[torch.Tensor] = []
    s_hidden: list[torch.Tensor] = []
    hooks = _layer_outputs(teacher, t_hidden) if want_hidden else []
    try:
        with torch.no_grad():
            t_logits = fsdp.call(teacher, lambda: teacher(input_ids=batch, use_cache=False).logits.float())
    finally:
        for h in hooks:
            h.remove()
    layers = moe_layers(student)
    for m in layers:
        m.keep_router_logits = cfg.load_balancing == "aux"
    hooks = _layer_outputs(student, s_hidden) if want_hidden else []
    try:
        s_logits = student(input_ids=batch, use_cache=False).logits.float()
    finally:
        for h in hooks:
            h.remove()
    kl = F.kl_div(F.log_softmax(s_logits, -1).flatten(0, 1), F.log_softmax(t_logits, -1).flatten(0, 1),
                  log_target=True, reduction="batchmean")
    loss = kl
    logs = {"kl": kl.detach()}  # no float(): a host sync every step (the training loop drops logs anyway)
    if want_hidden:
        mse = torch.stack([F.mse_loss(s.float(), t.float()) for s, t in zip(s_hidden, t_hidden)]).mean()
        loss = loss + cfg.hidden_mse_weight * mse
    if cfg.load_balancing == "aux":
        aux = torch.stack([global_balancing_loss(m.router_logits, m.top_k) for m in layers]).mean()
        loss = loss + cfg.aux_weight * aux
        for m in layers:
            m.keep_router_logits, m.router_logits = False, None
    elif cfg.load_balancing == "bias":
        with torch.no_grad():  # auxiliary-loss-free balancing: raise the bias of under-used experts
            for m in layers:
                load = distributed.sum_over_processes(m.last_load).float()  # the global batch's load
                m.router_bias += cfg.bias_rate * torch.sign(load.mean() - load)
    return loss, logs


def global_balancing_loss(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """modeling.moe.load_balancing_loss with the routed fractions f_e of the global batch: under accelerate launch
    each process holds 1/N of the tokens, and the mean over processes of E * sum_e f_e(global) * P_e(local) is the
    loss of the global batch (f_e carries no gradient), so N processes follow the 1-process run. One process: the
    same as load_balancing_loss."""
    num_experts = router_logits.shape[-1]
    probs = torch.softmax(router_logits.float(), dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices
    fraction = F.one_hot(chosen, num_experts).float().sum(1).mean(0) / top_k
    fraction = distributed.mean_over_processes(fraction, distributed.get_accelerator())  # equal tokens per process
    return num_experts * (fraction * probs.mean(0)).sum()


def kl_to_teacher(student, teacher, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean KL(teacher || student) per token over `blocks` (sharded models run through their FSDP roots)."""
    return fsdp.call_all([student, teacher], lambda: _kl_to_teacher(student, teacher, blocks, batch_size))


@torch.no_grad()
def _kl_to_teacher(student, teacher, blocks: torch.Tensor, batch_size: int) -> float:
    device = next(student.parameters()).device
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start : start + batch_size].to(device)
        s = F.log_softmax(student(input_ids=batch, use_cache=False).logits.float(), -1)
        t = F.log_softmax(teacher(input_ids=batch, use_cache=False).logits.float(), -1)
        total += float((t.exp() * (t - s)).sum())
        count += batch.numel()
    return total / max(count, 1)


def expert_load(model, blocks: torch.Tensor, batch_size: int) -> list[float]:
    """Mean over layers of the largest expert's share of routed tokens (1/E is perfectly balanced)."""
    return fsdp.call(model, lambda: _expert_load(model, blocks, batch_size))


@torch.no_grad()
def _expert_load(model, blocks: torch.Tensor, batch_size: int) -> list[float]:
    device = next(model.parameters()).device
    layers = moe_layers(model)
    loads = [torch.zeros(m.num_experts) for m in layers]
    for start in range(0, blocks.shape[0], batch_size):
        model(input_ids=blocks[start : start + batch_size].to(device), use_cache=False)
        for acc, m in zip(loads, layers):
            acc += m.last_load.float().cpu()
    return [float(x.max() / x.sum()) for x in loads]


def _mark_trainable(model, cfg: MoeUpcycleConfig) -> None:
    """Routers (and with --train experts the experts) trainable, everything else frozen."""
    model.requires_grad_(False)
    for m in moe_layers(model):
        m.gate.weight.requires_grad_(True)
        if cfg.train == "experts":
            m.experts.requires_grad_(True)
            if m.shared_expert is not None:
                m.shared_expert.requires_grad_(True)


def _set_trainable(model, cfg: MoeUpcycleConfig):
    _mark_trainable(model, cfg)
    if cfg.train != "router-lora":
        return model
    from peft import LoraConfig, get_peft_model

    targets = [f"model.layers.{i}.self_attn.{p}" for i in range(len(model.model.layers)) for p in LORA_TARGETS]
    torch.manual_seed(cfg.seed + 1)  # seeded LoRA init: a resumed run builds the same adapters
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets)
    peft_model = get_peft_model(model, lora)
    for m in moe_layers(peft_model):
        m.gate.weight.requires_grad_(True)  # peft freezes everything that is not an adapter
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    return peft_model


# --------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------


def native_layout(model: EffconvForCausalLM) -> tuple[str | None, str]:
    """(native model_type or None, why not) for an upcycled effconv model."""
    c = model.config
    if any(t != "softmax" for t in c.attention_types):
        return None, "linear / hybrid attention layers need effconv's modeling code"
    if c.mlp_bias or c.o_proj_bias and c.base_model_type != "qwen3":
        return None, "biases the MoE formats do not have"
    if any(bool(m.router_bias.any()) for m in moe_layers(model)):
        return None, "a load-balancing router bias (no native field for it)"
    if c.teacher_sliding_layers and any(c.teacher_sliding_layers) and not all(c.teacher_sliding_layers):
        return None, "sliding-window attention in some layers only"
    if c.base_model_type == "qwen3" or c.qk_norm:
        if c.shared_expert_intermediate_size:
            return None, "Qwen3-MoE has no shared expert"
        if any(c.teacher_sliding_layers):
            return None, "sliding-window attention"
        return "qwen3_moe", ""
    if c.shared_expert_intermediate_size or c.attention_bias:
        if any(c.teacher_sliding_layers):
            return None, "sliding-window attention"
        if c.o_proj_bias:
            return None, "an output-projection bias"
        return "qwen2_moe", ""
    return "mixtral", ""


def native_model(model: EffconvForCausalLM, model_type: str):
    """The same network as a transformers Mixtral / Qwen2-MoE / Qwen3-MoE model (weights copied)."""
    import transformers as tf

    c = model.config
    common = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
        num_experts_per_tok=c.num_experts_per_tok, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(".router_bias")}
    if c.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    if model_type == "mixtral":
        config = tf.MixtralConfig(**common, intermediate_size=c.moe_intermediate_size, num_local_experts=c.num_experts,
                                  sliding_window=c.sliding_window if any(c.teacher_sliding_layers) else None)
        cls = tf.MixtralForCausalLM
    elif model_type == "qwen3_moe":
        config = tf.Qwen3MoeConfig(**common, intermediate_size=c.intermediate_size, moe_intermediate_size=c.moe_intermediate_size,
                                   num_experts=c.num_experts, norm_topk_prob=c.norm_topk_prob, decoder_sparse_step=1,
                                   mlp_only_layers=[], attention_bias=c.attention_bias)
        cls = tf.Qwen3MoeForCausalLM
    else:
        config = tf.Qwen2MoeConfig(**common, intermediate_size=c.intermediate_size, moe_intermediate_size=c.moe_intermediate_size,
                                   shared_expert_intermediate_size=c.shared_expert_intermediate_size or 1,
                                   num_experts=c.num_experts, norm_topk_prob=c.norm_topk_prob, decoder_sparse_step=1,
                                   mlp_only_layers=[])
        cls = tf.Qwen2MoeForCausalLM
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            for proj, width in (("q_proj", c.num_attention_heads), ("k_proj", c.num_key_value_heads), ("v_proj", c.num_key_value_heads)):
                state.setdefault(f"{p}self_attn.{proj}.bias", torch.zeros(width * c.head_dim))
            # the shared expert's sigmoid gate starts at sigmoid(0) = 1/2: its down projection is doubled to match
            state[f"{p}mlp.shared_expert_gate.weight"] = torch.zeros(1, c.hidden_size)
            if c.shared_expert_intermediate_size:
                state[f"{p}mlp.shared_expert.down_proj.weight"] = state[f"{p}mlp.shared_expert.down_proj.weight"] * 2
            else:  # a one-neuron shared expert with zero weights contributes nothing
                for name, shape in (("gate_proj", (1, c.hidden_size)), ("up_proj", (1, c.hidden_size)), ("down_proj", (c.hidden_size, 1))):
                    state[f"{p}mlp.shared_expert.{name}.weight"] = torch.zeros(shape)
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        native = cls(config)
    native.load_state_dict({k: v.detach().to("cpu", dtype).clone() for k, v in state.items()}, strict=True, assign=True)
    if c.tie_word_embeddings:
        native.tie_weights()
    native.model.rotary_emb = type(native.model.rotary_emb)(config=config)
    return native.eval()


def export_native(model: EffconvForCausalLM, model_type: str, tokenizer, out: Path, *, overwrite: bool, metadata: dict) -> Path:
    native = native_model(model, model_type)
    check_output_dir(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))
    try:
        native.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "effconv.json").write_text(json.dumps(metadata, indent=2, default=str) + "\n")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.resolve().parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EffconvError(f"could not write the model to {out}: {e.strerror or e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------------------------


def _steps(cfg: MoeUpcycleConfig) -> int:
    return math.ceil(cfg.tokens / (cfg.batch_size * cfg.seq_len)) if cfg.tokens > 0 else 0


def moe_upcycle(cfg: MoeUpcycleConfig) -> MoeUpcycleResult:
    """Upcycle, measure, distill, measure, export."""
    cfg.validate()
    distributed.check_launch(cfg.batch_size)
    out = Path(cfg.out)
    check_output_dir(out, cfg.overwrite)
    device, dtype = _device_and_dtype(cfg)  # type: ignore[arg-type] - same fields as LinearizeConfig
    torch.manual_seed(cfg.seed)
    main = distributed.is_main_process()  # under accelerate launch only the main process writes (and logs)
    console.print(f"[bold]effconv moe-upcycle[/bold]: loading {cfg.model or 'the default model'}")
    # FSDP: the model is upcycled in CPU memory, then each process moves only its shards to the device
    sharded = distributed.fsdp_requested()
    with distributed.main_process_first():  # a GGUF model is converted (and cached) once
        loaded, tokenizer, source = load_causal_lm(cfg.model, dtype=dtype,
                                                   device=torch.device("cpu") if sharded else device)
    dense = dense_effconv_model(loaded)
    if cfg.export_format == "native" and any(t != "softmax" for t in dense.config.attention_types):
        raise EffconvError("--export-format native: this model has linear attention layers; use auto or effconv")
    moe_config(dense.config, cfg)  # shape errors before any data work
    run_dir = run_dir_for(out)
    if main:
        _prepare_run_dir(cfg, run_dir)  # type: ignore[arg-type]
    distributed.wait_for_everyone()
    train_blocks, val_blocks, data_description = prepare_run_data(cfg, tokenizer, lambda: (loaded, tokenizer))
    del loaded
    val_blocks = val_blocks[: cfg.max_val_blocks]
    console.print(f"data: {data_description}; validating on {val_blocks.shape[0]} blocks")
    dense.requires_grad_(False)
    calibration = collect_mlp_inputs(dense, train_blocks, cfg.calibration_tokens, cfg.batch_size) if cfg.calibration_tokens else []
    student = upcycle(dense, calibration, cfg)
    del calibration
    steps = _steps(cfg)
    if sharded:
        _mark_trainable(student, cfg)  # FSDP fixes the trainable set's dtype per unit when it shards
        fsdp.shard(dense, device)
        fsdp.shard(student, device)
    bs = cfg.batch_size
    metrics: dict = {"source": source.description, "data": data_description}
    metrics["teacher_val_loss"] = next_token_loss(dense, val_blocks, batch_size=bs)
    metrics["teacher_val_ppl"] = perplexity(metrics["teacher_val_loss"])
    metrics["upcycled_val_loss"] = next_token_loss(student, val_blocks, batch_size=bs)
    metrics["upcycled_val_ppl"] = perplexity(metrics["upcycled_val_loss"])
    metrics["upcycled_kl"] = kl_to_teacher(student, dense, val_blocks, bs)
    metrics["upcycled_max_expert_share"] = expert_load(student, val_blocks, bs)
    console.print(f"teacher validation perplexity {metrics['teacher_val_ppl']:.3f}; upcycled before training "
                  f"{metrics['upcycled_val_ppl']:.3f} (KL to teacher {metrics['upcycled_kl']:.4f})")

    model_to_export = student
    if steps > 0:
        trainee = _set_trainable(student, cfg)
        spec = StageSpec("moe distillation", steps, cfg.lr, warmup_steps=min(10, steps // 10),
                         eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every,
                         max_seconds=cfg.max_seconds)
        ckpt = run_dir / "distill.pt"
        resume_state = load_checkpoint(ckpt) if cfg.resume and ckpt.is_file() else None
        layers = moe_layers(trainee)
        if resume_state is not None and "router_bias" in resume_state:
            for m, b in zip(layers, resume_state["router_bias"]):
                m.router_bias.copy_(b)
        loader = data_lib.BlockLoader(train_blocks, bs, seed=cfg.seed)
        result = run_stage(
            trainee, spec, loss_fn=lambda b: distill_loss(trainee, dense, b, cfg),
            next_batch=lambda step: loader.batch(step).to(device),
            evaluate=lambda: kl_to_teacher(trainee, dense, val_blocks, bs), checkpoint_path=ckpt,
            resume_state=resume_state, progress=cfg.progress,
            extra_state=lambda: {"router_bias": [m.router_bias.detach().cpu().clone() for m in layers]},
        )
        metrics["distillation"] = {
            "train": cfg.train, **stage_budget_metrics(result), "tokens": result.tokens,
            "seconds": round(result.seconds, 2), "tokens_per_second": round(result.tokens_per_second, 1),
            "first_train_loss": result.train_losses[0] if result.train_losses else None,
            "final_train_loss": result.train_losses[-1] if result.train_losses else None,
            "val_kl": result.val_losses,
        }
        # sharded: measured on the trained model itself (LoRA unmerged); the main process merges its gathered copy
        measured = trainee if sharded else (trainee.merge_and_unload() if cfg.train == "router-lora" else trainee)
        metrics["distilled_val_loss"] = next_token_loss(measured, val_blocks, batch_size=bs)
        metrics["distilled_val_ppl"] = perplexity(metrics["distilled_val_loss"])
        metrics["distilled_kl"] = kl_to_teacher(measured, dense, val_blocks, bs)
        metrics["distilled_max_expert_share"] = expert_load(measured, val_blocks, bs)
        console.print(f"after distillation: validation perplexity {metrics['distilled_val_ppl']:.3f} "
                      f"(KL to teacher {metrics['distilled_kl']:.4f})")
        model_to_export = measured
    if sharded:
        model_to_export = fsdp.plain_copy(model_to_export)  # on the main process; None on the others
        if model_to_export is not None and cfg.train == "router-lora" and steps > 0:
            model_to_export = model_to_export.merge_and_unload()

    fmt = cfg.export_format
    metadata: dict = {}
    if main:
        model_to_export.requires_grad_(False)
        native_type, why = native_layout(model_to_export)
        if fmt == "native" and native_type is None:
            raise EffconvError(f"--export-format native is not possible: {why}")
        use_native = native_type is not None and fmt != "effconv"
        metadata = {"command": "moe-upcycle", "config": dataclasses.asdict(cfg), "metrics": metrics,
                    "export_format": native_type if use_native else "effconv",
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if use_native:
            export_native(model_to_export, native_type, tokenizer, out, overwrite=cfg.overwrite, metadata=metadata)
        else:
            export_model(model_to_export, tokenizer, out, overwrite=cfg.overwrite, metadata=metadata)
        if not cfg.keep_run:
            shutil.rmtree(run_dir, ignore_errors=True)
        console.print(f"[green]wrote {out}[/green] ({metadata['export_format']} format)")
    distributed.wait_for_everyone()
    return MoeUpcycleResult(out=out, export_format=metadata.get("export_format", ""), metrics=metrics,
                            model=model_to_export)
