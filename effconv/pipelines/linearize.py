"""`effconv linearize`: softmax attention -> learned-feature-map linear attention (optionally the sliding-window
hybrid), attention transfer (stage 1), LoRA fine-tune (stage 2), safetensors export.

The pipeline is a typed function over `LinearizeConfig`; the CLI and the YAML recipes only fill that config.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import (
    DTYPES, AttentionArgs, DataArgs, FinetuneArgs, LoraArgs, ModelArgs, RunArgs, TrainArgs, TransferArgs,
    check_choice, check_data_args, check_generated_split, check_non_negative, check_positive, option, run_identity,
)
from ..console import console
from ..conversion.student import make_student
from ..data import BlockLoader
from ..distill import blockwise as blockwise_lib
from ..distill.lora import attach_lora
from ..distill.losses import finetune_loss, tbptt_finetune_loss
from ..distill.transfer import attention_mode, attention_transfer_loss, tbptt_transfer_loss, transfer_loss_fn
from ..errors import EffconvError
from ..eval.quality import next_token_loss, perplexity
from ..io.export import check_output_dir, export_model
from ..io.sources import load_teacher
from ..modeling.attention_ops import FEATURE_MAPS
from ..training import distributed, fsdp
from ..training.loop import StageSpec, load_checkpoint, run_stage
from ..training.run import (
    prepare_run_data, prepare_run_dir, resolve_device_and_dtype, run_dir_for, stage_metrics, steps_for,
)

KERNEL_CHOICES = ("auto", "triton", "reference")
ATTENTION_CHOICES = ("linear", "sliding", "block_sparse", "gqa")
KV_MERGE_CHOICES = ("mean", "similar")


@dataclass
class LinearizeConfig(RunArgs, LoraArgs, FinetuneArgs, TransferArgs, TrainArgs, AttentionArgs, DataArgs, ModelArgs):
    """Every setting of a linearize run; YAML recipes hold these keys."""

    layers: list[int] | None = option(None, "Comma-separated layers to convert (default: all)")

    def validate(self) -> None:
        if self.feature_map not in FEATURE_MAPS:
            raise EffconvError(f"unknown feature map {self.feature_map!r}; choose one of {', '.join(FEATURE_MAPS)}")
        if self.decay and not self.decay_memory >= 2:
            raise EffconvError(f"--decay-memory must be at least 2 tokens, got {self.decay_memory}")
        if self.decay and self.attention != "linear":
            raise EffconvError(f"--decay applies to --attention linear layers, not {self.attention}")
        if self.gate and self.attention != "linear":  # asked for explicitly (None: the default)
            raise EffconvError(f"--gate applies to --attention linear layers, not {self.attention}")
        if self.effective_gate() and not self.decay_memory >= 2:
            raise EffconvError(f"--decay-memory must be at least 2 tokens, got {self.decay_memory}")
        if self.window < 0:
            raise EffconvError(f"--window must be >= 0 (0 = pure linear attention), got {self.window}")
        self._validate_attention()
        check_data_args(self)
        check_choice("kernel", self.kernel, KERNEL_CHOICES)
        check_positive(self, "seq_len", "batch_size", "lora_rank", "eval_every", "checkpoint_every", "generation_batch_size")
        check_non_negative(self, "stage1_tokens", "stage2_tokens", "generate_tokens", "attn_ce_weight", "kl_weight",
                           "ce_weight")
        self._validate_tbptt()
        if self.stage2_tokens > 0 and self.ce_weight == 0 and self.kl_weight == 0:
            raise EffconvError("--ce-weight 0 and --kl-weight 0 leave stage 2 without a loss; set one of them")
        if not 0 < self.val_fraction < 1:
            raise EffconvError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        check_generated_split(self)
        check_choice("dtype", self.dtype, DTYPES)
        if self.layers_per_block is not None and self.layers_per_block < 1:
            raise EffconvError(f"--layers-per-block must be >= 1, got {self.layers_per_block}")
        for name in ("stage1_max_seconds", "stage2_max_seconds"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise EffconvError(f"--{name.replace('_', '-')} must be > 0 (seconds), got {getattr(self, name)}")
        if self.stage1_max_seconds is not None and self.layers_per_block is not None:
            raise EffconvError("--stage1-max-seconds is not supported with --layers-per-block (block-wise stage 1 "
                               "trains every block for the same steps); size stage 1 by --stage1-tokens")

    def _validate_tbptt(self) -> None:
        piece = self.tbptt_piece
        if piece == 0:
            return
        if piece < 0 or piece >= self.seq_len or self.seq_len % piece:
            raise EffconvError(f"--tbptt-piece {piece} must be a divisor of --seq-len {self.seq_len} below it (0: off)")
        if self.attention not in ("linear", "sliding", "block_sparse"):
            raise EffconvError(f"--tbptt-piece applies to layers with a state or a window, not --attention "
                               f"{self.attention}")
        if self.attn_ce_weight > 0:
            raise EffconvError("--tbptt-piece does not take --attn-ce-weight (the attention maps of a piece do not "
                               "see the pieces before it)")
        if self.layers_per_block is not None:
            raise EffconvError("--tbptt-piece is not supported with --layers-per-block (block-wise stage 1 streams "
                               "whole blocks of teacher states)")

    def _validate_attention(self) -> None:
        if self.attention not in ATTENTION_CHOICES:
            raise EffconvError(f"unknown --attention {self.attention!r}; choose one of {', '.join(ATTENTION_CHOICES)}")
        if self.attention == "linear" and self.window >= self.seq_len:
            # a query's window holds itself and the window-1 tokens before it: the linear part starts window back
            raise EffconvError(
                f"--window {self.window} is not smaller than --seq-len {self.seq_len}: every token would be inside "
                "the softmax window, so the linear part would never be trained or measured; use a smaller --window "
                "or a longer --seq-len")
        if self.normalizer not in ("shared", "separate"):
            raise EffconvError(f"--normalizer must be shared or separate, got {self.normalizer!r}")
        if self.normalizer == "separate" and not (self.attention == "linear" and self.window > 0):
            raise EffconvError("--normalizer separate needs --attention linear with --window > 0 (a softmax and a "
                               "linear branch to normalise apart)")
        if self.sinks is not None and self.sinks < 0:
            raise EffconvError(f"--sinks must be >= 0, got {self.sinks}")
        self.sinks, self.gate = self.effective_sinks(), self.effective_gate()
        if self.sinks and self.attention not in ("linear", "sliding"):
            raise EffconvError(f"--sinks applies to --attention linear (with --window) and sliding, not {self.attention}")
        if self.sinks and self.attention == "linear" and self.window < 1:
            raise EffconvError("--sinks needs --window >= 1: sinks are softmax terms beside the window, and --window 0 "
                               "has no softmax part")
        if self.attention == "linear" and self.sinks and self.window + self.sinks >= self.seq_len:
            raise EffconvError(f"--window {self.window} + --sinks {self.sinks} covers the whole --seq-len "
                               f"{self.seq_len}: the linear part would never be trained; lower --window or --sinks "
                               "or raise --seq-len")
        if self.attention == "sliding":
            if self.window < 1:
                raise EffconvError(f"--attention sliding needs --window >= 1, got {self.window}")
            if self.window + self.sinks >= self.seq_len:
                raise EffconvError(
                    f"--window {self.window} + --sinks {self.sinks} covers the whole --seq-len {self.seq_len}: the "
                    "sliding layers would be exact softmax attention; use a smaller window or longer sequences")
        if self.attention == "block_sparse":
            if self.block_size < 16 or self.block_size & (self.block_size - 1):
                raise EffconvError(f"--block-size must be a power of two >= 16, got {self.block_size}")
            if self.topk < 1:
                raise EffconvError(f"--topk must be >= 1, got {self.topk}")
            if (self.topk + 1) * self.block_size >= self.seq_len:
                raise EffconvError(
                    f"--topk {self.topk} blocks of {self.block_size} (+ the own block) cover the whole --seq-len "
                    f"{self.seq_len}: nothing would be sparse; lower --topk or --block-size or raise --seq-len")
        if self.attention == "gqa":
            if self.kv_heads is None or self.kv_heads < 1:
                raise EffconvError("--attention gqa needs --kv-heads N >= 1 (1 = multi-query attention)")
            if self.kv_merge not in KV_MERGE_CHOICES:
                raise EffconvError(f"unknown --kv-merge {self.kv_merge!r}; choose one of {', '.join(KV_MERGE_CHOICES)}")
        elif self.kv_heads is not None:
            raise EffconvError(f"--kv-heads applies to --attention gqa only (got --attention {self.attention})")

    def identity(self) -> dict:
        """The settings that must match for --resume to continue a run."""
        return run_identity(self, "eval_every", "checkpoint_every", "stage1_max_seconds", "stage2_max_seconds")


@dataclass
class LinearizeResult:
    out: Path
    metrics: dict = field(default_factory=dict)


def linearize(cfg: LinearizeConfig, *, metadata: dict | None = None,
              extra_files: dict[str, bytes] | None = None) -> LinearizeResult:
    """Run the pipeline; `metadata` (optional) is merged into the export's effconv.json and `extra_files` (name ->
    bytes) are written beside it, in the export's one atomic write (e.g. hybridize's per-layer scores)."""
    cfg.validate()
    distributed.check_launch(cfg.batch_size, blockwise=cfg.layers_per_block is not None)
    if cfg.tbptt_piece and distributed.fsdp_requested():
        raise EffconvError("--tbptt-piece is not supported under FSDP yet; run it on one GPU or with data parallelism")
    out = Path(cfg.out)
    check_output_dir(out, cfg.overwrite)
    run_dir = run_dir_for(out)
    if distributed.is_main_process():  # under accelerate launch only the main process writes
        prepare_run_dir(run_dir, cfg.identity(), resume=cfg.resume, overwrite=cfg.overwrite)
    distributed.wait_for_everyone()
    device, dtype = resolve_device_and_dtype(cfg.device, cfg.dtype)
    device = distributed.local_device(device)  # one GPU per launched process
    torch.manual_seed(cfg.seed)

    console.print(f"[bold]effconv linearize[/bold]: loading {cfg.model or 'the default model'}")
    blockwise = cfg.layers_per_block is not None
    sharded = distributed.fsdp_requested()
    # block-wise: the model waits in CPU memory and only the block being trained goes to the device;
    # FSDP: the model is built in CPU memory and each process moves only its shards to the device
    teacher, tokenizer, source = load_teacher(cfg.model, dtype=dtype,
                                              device=torch.device("cpu") if blockwise or sharded else device)
    if blockwise:
        blockwise_lib.check_layers_per_block(cfg.layers_per_block, teacher.config.num_hidden_layers)
    train_blocks, val_blocks, data_description = prepare_run_data(cfg, tokenizer, lambda: (teacher, tokenizer))
    val_blocks = val_blocks[: cfg.max_val_blocks]
    console.print(f"data: {data_description}; validating on {val_blocks.shape[0]} blocks")
    student = make_student(teacher, cfg, next(teacher.parameters()).device)
    del teacher
    if sharded:
        fsdp.shard(student, device)
    converted = [i for i, layer in enumerate(student.model.layers) if layer.self_attn.is_converted]
    loader = BlockLoader(train_blocks, cfg.batch_size, seed=cfg.seed)
    metrics: dict = {"source": source.description, "data": data_description, "converted_layers": converted}

    def val_loss(mode: str) -> float:
        if blockwise:
            return blockwise_lib.streamed_next_token_loss(student, val_blocks, layers_per_block=cfg.layers_per_block,
                                                          device=device, batch_size=cfg.batch_size, mode=mode)
        with attention_mode(student, mode):
            return next_token_loss(student, val_blocks, batch_size=cfg.batch_size)

    metrics["teacher_val_loss"] = val_loss("teacher")
    metrics["teacher_val_ppl"] = perplexity(metrics["teacher_val_loss"])
    console.print(f"teacher validation perplexity {metrics['teacher_val_ppl']:.3f}")

    def next_batch(step: int) -> torch.Tensor:
        return loader.batch(step).to(device)

    # Stage 1: attention transfer.
    stage1_steps = steps_for(cfg.stage1_tokens, cfg.batch_size, cfg.seq_len)
    stage1 = StageSpec(
        "attention transfer", stage1_steps, cfg.stage1_lr, warmup_steps=min(10, stage1_steps // 10),
        eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every, max_seconds=cfg.stage1_max_seconds,
    )
    stage1_ckpt = run_dir / "stage1.pt"
    # sliding / block_sparse layers have no new parameters: attention transfer has nothing to train there
    train_stage1 = stage1.steps > 0 and any(p.requires_grad for p in student.parameters())
    if train_stage1 and blockwise:
        r1, metrics["stage1_blockwise"] = blockwise_lib.blockwise_attention_transfer(
            student, stage1, layers_per_block=cfg.layers_per_block, train_batch=loader.batch, val_blocks=val_blocks,
            batch_size=cfg.batch_size, device=device, run_dir=run_dir, resume=cfg.resume, progress=cfg.progress,
            attn_ce_weight=cfg.attn_ce_weight,
        )
    elif train_stage1:
        resume_state = load_checkpoint(stage1_ckpt) if cfg.resume and stage1_ckpt.is_file() else None
        last = converted[-1]

        @torch.no_grad()
        def val_transfer() -> float:
            def loss(blocks):
                if cfg.tbptt_piece:
                    return tbptt_transfer_loss(student, blocks, last, cfg.tbptt_piece, backward=False)
                return attention_transfer_loss(student, blocks, last, cfg.attn_ce_weight)

            losses = [loss(val_blocks[i : i + cfg.batch_size].to(device)).item()
                      for i in range(0, val_blocks.shape[0], cfg.batch_size)]
            return sum(losses) / len(losses)

        loss_fn, backward = transfer_loss_fn(student, last, cfg.attn_ce_weight, cfg.tbptt_piece)
        r1 = run_stage(
            student, stage1, loss_fn=loss_fn, next_batch=next_batch, evaluate=val_transfer,
            checkpoint_path=stage1_ckpt, resume_state=resume_state, progress=cfg.progress, backward=backward,
        )
    if train_stage1:
        metrics["stage1"] = {**stage_metrics(r1), "final_train_mse": r1.train_losses[-1] if r1.train_losses else None,
                             "val_mse": r1.val_losses}
    metrics["stage1_val_loss"] = val_loss("student")
    metrics["stage1_val_ppl"] = perplexity(metrics["stage1_val_loss"])
    console.print(f"after attention transfer: validation perplexity {metrics['stage1_val_ppl']:.3f}")

    # Stage 2: LoRA fine-tune of the attention projections of converted layers.
    stage2_steps = steps_for(cfg.stage2_tokens, cfg.batch_size, cfg.seq_len)
    stage2 = StageSpec(
        "lora finetune", stage2_steps, cfg.stage2_lr, warmup_steps=min(10, stage2_steps // 10),
        eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every, max_seconds=cfg.stage2_max_seconds,
    )
    model_to_export = student
    if stage2.steps > 0:
        if blockwise:
            student.to(device)  # stage 2 (LoRA through the whole model) needs the whole model on the device
        student.requires_grad_(False)
        peft_model = attach_lora(student, converted, rank=cfg.lora_rank, alpha=cfg.lora_alpha, seed=cfg.seed)
        stage2_ckpt = run_dir / "stage2.pt"
        resume_state = load_checkpoint(stage2_ckpt) if cfg.resume and stage2_ckpt.is_file() else None
        if cfg.tbptt_piece:  # each piece's loss is backpropagated inside the loss function
            def stage2_loss(b):
                return tbptt_finetune_loss(peft_model, student, b, cfg.kl_weight, cfg.ce_weight, cfg.tbptt_piece), {}
        else:
            def stage2_loss(b):
                return finetune_loss(peft_model, student, b, cfg.kl_weight, cfg.ce_weight), {}
        r2 = run_stage(
            peft_model, stage2, loss_fn=stage2_loss, backward=not cfg.tbptt_piece, next_batch=next_batch,
            evaluate=lambda: next_token_loss(peft_model, val_blocks, batch_size=cfg.batch_size),
            checkpoint_path=stage2_ckpt, resume_state=resume_state, progress=cfg.progress,
        )
        metrics["stage2"] = {**stage_metrics(r2), "val_loss": r2.val_losses}
        if sharded:  # measured with the adapters unmerged; the main process merges its gathered copy
            metrics["stage2_val_loss"] = next_token_loss(peft_model, val_blocks, batch_size=cfg.batch_size)
            model_to_export = fsdp.plain_copy(peft_model)
            model_to_export = model_to_export.merge_and_unload() if model_to_export is not None else None
        else:
            model_to_export = peft_model.merge_and_unload()
            metrics["stage2_val_loss"] = next_token_loss(model_to_export, val_blocks, batch_size=cfg.batch_size)
        metrics["stage2_val_ppl"] = perplexity(metrics["stage2_val_loss"])
        console.print(f"after LoRA fine-tune: validation perplexity {metrics['stage2_val_ppl']:.3f}")
    elif sharded:
        model_to_export = fsdp.plain_copy(student)  # the main process exports an ordinary, gathered copy

    export_metadata = {"command": "linearize", "config": dataclasses.asdict(cfg), "metrics": metrics,
                       "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **(metadata or {})}
    if distributed.is_main_process():
        model_to_export.requires_grad_(False)
        export_model(model_to_export, tokenizer, out, overwrite=cfg.overwrite, metadata=export_metadata,
                     extra_files=extra_files)
        if not cfg.keep_run:
            shutil.rmtree(run_dir, ignore_errors=True)
    distributed.wait_for_everyone()
    console.print(f"[green]wrote {out}[/green]")
    return LinearizeResult(out=out, metrics=metrics)
