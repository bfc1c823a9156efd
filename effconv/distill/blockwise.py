"""Block-wise attention transfer: stage 1 of linearize, K decoder layers at a time (`--layers-per-block K`).

Transfer mode passes each converted layer's softmax output on, so a layer's transfer loss depends only on its own
new parameters and on the teacher hidden state entering it. Stage 1 therefore splits into independent blocks of K
consecutive layers. The teacher hidden states entering block j ("boundary j") are computed once, for every training
step's batch and for the validation blocks, written under the run directory (safetensors, written to a temporary
name and renamed) and streamed to the device while block j trains; then block j runs in teacher mode over them and
writes boundary j+1, and boundary j is deleted. The model itself stays in CPU memory: only the block being trained
(its weights, its optimizer state, one batch and its activations) is on the accelerator.

Equivalence with full-model stage 1. A block's loss is the sum of its layers' transfer losses divided by the number
of converted layers of the whole model, so each trainable parameter gets exactly the gradient it gets in full-model
mode; the batches are the same per step (data.BlockLoader) and AdamW and the learning-rate schedule act per
parameter, so the trained weights are the same. The one difference is gradient clipping: it uses the norm of the
block's gradients instead of the norm over all layers. Both are a no-op while the full-model norm stays below the
threshold; on steps where it exceeds it, full-model mode scales every layer by one factor and block-wise mode only
the blocks whose own norm exceeds it. The per-step losses summed over blocks are the full-model loss curve.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..console import console
from ..errors import EffconvError
from ..training import distributed
from ..training.loop import StageResult, StageSpec, load_checkpoint, run_stage
from .transfer import set_attention_mode


def check_layers_per_block(layers_per_block: int, num_layers: int) -> None:
    if layers_per_block < 1:
        raise EffconvError(f"--layers-per-block must be >= 1, got {layers_per_block}")
    if layers_per_block > num_layers:
        raise EffconvError(f"--layers-per-block {layers_per_block} is more than the model's {num_layers} layers")
    if distributed.launched_world_size() > 1:
        raise EffconvError("--layers-per-block runs in one process; it is not supported under accelerate launch")


def plan_blocks(last_layer: int, layers_per_block: int) -> list[list[int]]:
    """Consecutive decoder layers 0..last_layer in groups of K (the last group may be shorter)."""
    return [list(range(s, min(s + layers_per_block, last_layer + 1))) for s in range(0, last_layer + 1, layers_per_block)]


class LayerBlock(nn.Module):
    """K decoder layers of a model (shared, not copied) run on hidden states: the unit that is trained and moved."""

    def __init__(self, student, indices: list[int]):
        super().__init__()
        self.indices = indices
        self.layers = nn.ModuleList(student.model.layers[i] for i in indices)
        self._rotary = [student.model.rotary_emb]  # a list: not a submodule, so not moved with the block

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # the same position embeddings and layer calls as EffconvModel.forward without cache or padding mask
        b, t, _ = hidden.shape
        position_ids = torch.arange(t, device=hidden.device)[None].expand(b, -1)
        position_embeddings = self._rotary[0](hidden, position_ids)
        for layer in self.layers:
            hidden = layer(hidden, position_embeddings, None, None)
        return hidden

    def converted(self):
        return [layer.self_attn for layer in self.layers if layer.self_attn.is_converted]

    def has_trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())


def block_transfer_loss(block: LayerBlock, hidden: torch.Tensor, num_converted: int,
                        attn_ce_weight: float = 0.0) -> torch.Tensor:
    """Sum of the block's per-layer transfer losses / converted layers of the whole model (full-model scaling)."""
    losses: dict = {}
    set_attention_mode(block.converted(), "transfer", losses=losses, attn_ce_weight=attn_ce_weight)
    try:
        block(hidden)
        return torch.stack([losses[a] for a in block.converted()]).sum() / num_converted
    finally:
        set_attention_mode(block.converted(), "student")


class BoundaryStore:
    """Teacher hidden states entering each block, one safetensors file per training step plus one for validation."""

    def __init__(self, root: Path):
        self.root = root

    def dir(self, j: int) -> Path:
        return self.root / f"boundary-{j:03d}"

    def complete(self, j: int) -> bool:
        return (self.dir(j) / "complete").is_file()

    def _write(self, path: Path, hidden: torch.Tensor) -> None:
        tmp = path.with_name(path.name + ".tmp")
        save_file({"hidden": hidden.contiguous()}, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # a file under its final name is always whole

    def write_step(self, j: int, step: int, hidden: torch.Tensor) -> None:
        self._write(self.dir(j) / f"step-{step:06d}.safetensors", hidden)

    def write_val(self, j: int, hidden: torch.Tensor) -> None:
        self._write(self.dir(j) / "val.safetensors", hidden)

    def mark_complete(self, j: int) -> None:
        (self.dir(j) / "complete").write_text(json.dumps({"written": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")

    def read_step(self, j: int, step: int) -> torch.Tensor:
        return load_file(str(self.dir(j) / f"step-{step:06d}.safetensors"))["hidden"]

    def read_val(self, j: int) -> torch.Tensor:
        return load_file(str(self.dir(j) / "val.safetensors"))["hidden"]

    def start(self, j: int) -> None:
        shutil.rmtree(self.dir(j), ignore_errors=True)  # a half-written boundary is rebuilt from scratch
        self.dir(j).mkdir(parents=True)

    def delete(self, j: int) -> None:
        shutil.rmtree(self.dir(j), ignore_errors=True)


def _to(module: nn.Module, device: torch.device) -> None:
    if next(module.parameters()).device != device:
        module.to(device)


@torch.no_grad()
def _teacher_forward(block: LayerBlock, hidden: torch.Tensor, device: torch.device, batch_size: int) -> torch.Tensor:
    set_attention_mode(block.converted(), "teacher")  # converted layers compute their exact softmax output
    try:
        outs = [block(hidden[i : i + batch_size].to(device)).cpu() for i in range(0, hidden.shape[0], batch_size)]
    finally:
        set_attention_mode(block.converted(), "student")
    return torch.cat(outs)


@torch.no_grad()
def _embed(student, ids: torch.Tensor) -> torch.Tensor:
    return student.model.embed_tokens(ids.to(student.model.embed_tokens.weight.device)).cpu()


def streamed_next_token_loss(student, val_blocks: torch.Tensor, *, layers_per_block: int, device: torch.device,
                             batch_size: int, mode: str) -> float:
    """eval.quality.next_token_loss of the whole model in attention `mode`, K layers on the device at a time; the
    validation hidden states wait in CPU memory between blocks."""
    hidden = _embed(student, val_blocks)
    set_attention_mode(student.converted_attentions(), mode)
    try:
        for indices in plan_blocks(len(student.model.layers) - 1, layers_per_block):
            block = LayerBlock(student, indices)
            _to(block, device)
            with torch.no_grad():
                hidden = torch.cat([block(hidden[i : i + batch_size].to(device)).cpu()
                                    for i in range(0, hidden.shape[0], batch_size)])
            _to(block, torch.device("cpu"))
    finally:
        set_attention_mode(student.converted_attentions(), "student")
    head = nn.ModuleList([student.model.norm, student.lm_head])
    _to(head, device)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(hidden.shape[0]):  # one sequence at a time: the [T, vocab] logits are the big tensor here
            ids = val_blocks[i : i + 1].to(device)
            logits = student.lm_head(student.model.norm(hidden[i : i + 1].to(device)))
            total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"))
            count += ids[:, 1:].numel()
    _to(head, torch.device("cpu"))
    return total / max(count, 1)


def blockwise_attention_transfer(
    student,
    spec: StageSpec,
    *,
    layers_per_block: int,
    train_batch,  # step -> token ids [B, T] (CPU), the same batches as full-model mode
    val_blocks: torch.Tensor,
    batch_size: int,
    device: torch.device,
    run_dir: Path,
    resume: bool,
    progress: bool = True,
    attn_ce_weight: float = 0.0,
) -> tuple[StageResult, dict]:
    """Stage 1 block by block (see the module docstring). `student` sits in CPU memory; each block is moved to
    `device` while it trains and back afterwards. Returns the combined StageResult (losses summed over blocks:
    the full-model curves) and per-block details. Resumes at the first block whose checkpoint is not final.
    Every block trains `spec.steps` steps: a time budget (spec.max_seconds) is not supported here."""
    if spec.max_seconds is not None:
        raise EffconvError("a time budget (--stage1-max-seconds) is not supported with --layers-per-block")
    converted = [i for i, layer in enumerate(student.model.layers) if layer.self_attn.is_converted]
    blocks = plan_blocks(converted[-1], layers_per_block)
    store = BoundaryStore(run_dir / "blockwise")
    num_converted = len(converted)
    cpu = torch.device("cpu")
    rotary = student.model.rotary_emb
    rotary.to(device)
    boundary_seconds = 0.0

    def checkpoint_path(j: int) -> Path:
        return run_dir / f"stage1-block{j:03d}.pt"

    def ensure_boundary(j: int) -> None:
        nonlocal boundary_seconds
        if store.complete(j):
            return
        if j > 0:
            ensure_boundary(j - 1)
        t0 = time.perf_counter()
        store.start(j)
        if j == 0:
            for step in range(spec.steps):
                store.write_step(0, step, _embed(student, train_batch(step)))
            store.write_val(0, _embed(student, val_blocks))
        else:
            block = LayerBlock(student, blocks[j - 1])
            _to(block, device)
            for step in range(spec.steps):
                store.write_step(j, step, _teacher_forward(block, store.read_step(j - 1, step), device, batch_size))
            store.write_val(j, _teacher_forward(block, store.read_val(j - 1), device, batch_size))
            _to(block, cpu)
        store.mark_complete(j)
        if j > 0:
            store.delete(j - 1)  # only after boundary j is whole: a kill before this point rebuilds j from j-1
        boundary_seconds += time.perf_counter() - t0

    results: list[StageResult | None] = []
    per_block: list[dict] = []
    for j, indices in enumerate(blocks):
        block = LayerBlock(student, indices)
        info = {"layers": indices, "trained": block.has_trainable() and bool(block.converted())}
        per_block.append(info)
        if not info["trained"]:
            results.append(None)  # nothing to learn here; its layers only carry the teacher states onwards
            continue
        ckpt = checkpoint_path(j)
        state = load_checkpoint(ckpt) if resume and ckpt.is_file() else None
        finished = state is not None and state["step"] >= spec.steps
        if not finished:
            ensure_boundary(j)
        console.print(f"block {j + 1}/{len(blocks)}: layers {indices[0]}-{indices[-1]}"
                      + (" (done, from its checkpoint)" if finished else ""))
        _to(block, device)
        val_hidden = None if finished else store.read_val(j)

        @torch.no_grad()
        def evaluate(block=block, val_hidden=val_hidden) -> float:
            losses = [block_transfer_loss(block, val_hidden[i : i + batch_size].to(device), num_converted,
                                          attn_ce_weight).item()
                      for i in range(0, val_hidden.shape[0], batch_size)]
            return sum(losses) / len(losses)

        result = run_stage(
            block, dataclasses.replace(spec, name=f"{spec.name} [block {j + 1}/{len(blocks)}]"),
            loss_fn=lambda h, block=block: (block_transfer_loss(block, h, num_converted, attn_ce_weight), {}),
            next_batch=lambda step, j=j: store.read_step(j, step).to(device),
            evaluate=evaluate, checkpoint_path=ckpt, resume_state=state, progress=progress,
        )
        _to(block, cpu)
        results.append(result)
        info.update(final_train_mse=result.train_losses[-1] if result.train_losses else None,
                    seconds=round(result.seconds, 2))
    rotary.to(cpu)
    for j in range(len(blocks) + 1):
        store.delete(j)
    return _combine(spec, [r for r in results if r is not None]), {
        "layers_per_block": layers_per_block, "blocks": per_block, "boundary_seconds": round(boundary_seconds, 2)}


def _combine(spec: StageSpec, results: list[StageResult]) -> StageResult:
    """Per-step sums over blocks: each block's loss is its share of the full-model loss."""
    combined = StageResult(spec.name, 0, 0, 0.0, planned_steps=spec.steps)
    if not results:
        return combined
    combined.train_losses = [sum(vals) for vals in zip(*(r.train_losses for r in results), strict=True)]
    val_steps = [s for s, _ in results[0].val_losses]
    combined.val_losses = [(s, sum(r.val_losses[k][1] for r in results)) for k, s in enumerate(val_steps)]
    combined.steps = len(combined.train_losses)
    combined.tokens = results[0].tokens  # every block sees the same tokens
    combined.seconds = sum(r.seconds for r in results)
    combined.wall_seconds = sum(r.wall_seconds for r in results)
    return combined
