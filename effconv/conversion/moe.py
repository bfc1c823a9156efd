"""Dense gated FFNs -> mixtures of experts: neuron splits (random, balanced k-means of weight rows, co-activation
k-means) or copy-upcycling, and routers initialised from the layers' input hidden states.

Methods
- split: the FFN's I intermediate neurons are partitioned into E experts of I/E neurons (random, balanced k-means of
  the neurons' gate/up weight rows, or balanced k-means of their activation patterns on data = co-activation).
  Parameters are unchanged; top-k of E experts run per token. Expert down projections are scaled by top_k, so that
  with renormalised top-k weights the selected experts add up as in the dense FFN (top-k = E reproduces it exactly
  when the router is uniform). With shared S, the S*I/(E+S) neurons of largest activation mass form an always-on
  shared expert.
- copy (sparse upcycling with granularity G): expert e is slice e % G (I/G neurons) of the FFN; the E/G copies of a
  slice share router rows, so softmax-then-top-k (top_k a multiple of G, renormalised) always picks whole copies
  and every slice gets total weight 1/G; down projections scaled by G make the step-0 output equal to the dense one.

The router is initialised from the layer's input hidden states on calibration text: split fits each expert's log
output norm ("activation mass") by ridge regression; copy uses k-means centroids (one per copy). Initial logits are
scaled to a small spread so the weights start near uniform over the chosen experts.

`cfg` below is any settings object with the MoeArgs fields (effconv.config).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..config import MoeArgs
from ..errors import EffconvError
from ..io.sources import SUPPORTED_MODEL_TYPES
from ..modeling import EffconvConfig, EffconvForCausalLM
from ..modeling.moe import MoeMLP
from .student import build_student, effconv_config_from_teacher


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
        members = F.one_hot(labels.to(feats.device), k).to(feats.dtype)  # (n, k): one matmul sums each cluster
        centroids = F.normalize(members.T @ feats, dim=-1)
    return labels


def _balanced_assign(sim: torch.Tensor, size: int) -> torch.Tensor:
    """Capacity-constrained assignment, strongest pairs first, in rounds: every unassigned row proposes the cluster
    it is most similar to among those with room left; each cluster keeps its `size` - taken strongest proposers.
    A few rounds of (n, k) tensor work (a greedy loop over all n k pairs took tens of seconds per layer at SmolLM2's
    1,536 neurons and 48 clusters)."""
    n, k = sim.shape
    if n != size * k:
        raise ValueError(f"{n} rows do not fill {k} clusters of {size}")
    sim = sim.float()
    labels = torch.full((n,), -1, dtype=torch.long, device=sim.device)
    room = torch.full((k,), size, dtype=torch.long, device=sim.device)
    while bool((labels < 0).any()):
        free = (labels < 0).nonzero().squeeze(1)
        scores = sim[free].masked_fill(room[None] == 0, float("-inf"))
        value, best = scores.max(1)
        by_value = torch.argsort(value, descending=True)
        free, best = free[by_value], best[by_value]
        by_cluster = torch.sort(best, stable=True).indices  # within a cluster: strongest first
        free, best = free[by_cluster], best[by_cluster]
        counts = torch.bincount(best, minlength=k)
        rank = torch.arange(len(best), device=sim.device) - (torch.cumsum(counts, 0) - counts)[best]
        accept = rank < room[best]
        labels[free[accept]] = best[accept]
        room -= torch.bincount(best[accept], minlength=k)
    return labels.cpu()


def neuron_mass(mlp, x: torch.Tensor) -> torch.Tensor:
    """(tokens, I) activation mass of each neuron of a dense gated MLP: |act(gate x) * up x| times the norm of the
    neuron's down-projection column (what the neuron adds to the output, at most), fp32."""
    return _neuron_activations(mlp, x).abs() * mlp.down_proj.weight.float().to(x.device).norm(dim=0)


def split_neurons(mlp, x: torch.Tensor, cfg: MoeArgs, generator: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(shared neuron indices, one index tensor per routed expert) for --method split."""
    inter = mlp.gate_proj.weight.shape[0]
    slices = cfg.experts + cfg.shared
    if inter % slices:
        raise EffconvError(f"--method split needs the intermediate size ({inter}) to be divisible by --experts + "
                           f"--shared ({slices})")
    expert_size = inter // slices
    mass = neuron_mass(mlp, x) if x.numel() else None
    neurons = torch.arange(inter)
    shared = neurons[:0]
    if cfg.shared:
        if mass is None:
            raise EffconvError("--shared with --method split needs calibration text (--calibration-tokens > 0)")
        shared = torch.sort(torch.topk(mass.mean(0), cfg.shared * expert_size).indices).values.cpu()
        neurons = neurons[~torch.isin(neurons, shared)]
    if cfg.split == "random" or cfg.experts == 1:
        labels = torch.arange(len(neurons))[torch.randperm(len(neurons), generator=generator)] % cfg.experts
    elif cfg.split == "balanced":
        rows = torch.cat([F.normalize(mlp.gate_proj.weight.float(), dim=-1), F.normalize(mlp.up_proj.weight.float(), dim=-1)], -1)
        labels = balanced_kmeans(rows[neurons], cfg.experts, generator=generator)
    else:
        if mass is None:
            raise EffconvError("--split coactivation needs calibration text (--calibration-tokens > 0)")
        labels = balanced_kmeans(mass[:, neurons.to(mass.device)].T, cfg.experts, generator=generator)
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


def renormalised_weights(cfg: MoeArgs) -> bool:
    """Whether the top-k weights are renormalised to sum to 1 (--router-weights; auto: softmax for split, where it
    keeps each chosen expert at its dense weight for any k, renormalised for copy, whose step-0 equality needs it)."""
    if cfg.router_weights == "auto":
        return cfg.method == "copy"
    return cfg.router_weights == "renormalised"


def moe_config(dense_config: EffconvConfig, cfg: MoeArgs) -> EffconvConfig:
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
                  shared_expert_intermediate_size=shared_size, norm_topk_prob=renormalised_weights(cfg))
    return EffconvConfig(**values)


@torch.no_grad()
def upcycle_mlp(mlp, x: torch.Tensor, moe: MoeMLP, cfg: MoeArgs, generator: torch.Generator) -> None:
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
        # a chosen expert's weight is ~1/k (renormalised) or ~1/E (softmax over all E) while the logits are close:
        # scaled by k or E, it adds its neurons' dense output
        scale = cfg.top_k if renormalised_weights(cfg) else cfg.experts
        for e, idx in enumerate(groups):
            moe.experts.gate_up_proj[e] = torch.cat([gate_w[idx], up_w[idx]]).to(dtype)
            moe.experts.down_proj[e] = (down_w[:, idx] * scale).to(dtype)
        moe.dense_neurons = (shared, torch.stack(groups))  # for routing_coverage (distill/moe.py); not saved
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


def upcycle(dense: EffconvForCausalLM, calibration: list[torch.Tensor], cfg: MoeArgs) -> EffconvForCausalLM:
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
