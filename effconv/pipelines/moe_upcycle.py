"""`effconv moe-upcycle`: every dense gated FFN becomes a mixture of experts (conversion/moe.py), then
distillation from the dense model (distill/moe.py), then an export in transformers' own Mixtral / Qwen2-MoE /
Qwen3-MoE format where the layout fits (io/native_moe.py), else as an effconv model.

Works on effconv exports too (a linearized / hybridized model becomes Linear-MoE).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import (
    DTYPES, DataArgs, check_data_args, check_generated_split, LoraArgs, ModelArgs, MoeArgs, MoeRecoveryArgs, RunArgs, TrainArgs, option, run_identity,
)
from ..console import console
from ..conversion.moe import collect_mlp_inputs, dense_effconv_model, moe_config, moe_layers, upcycle
from ..data import BlockLoader
from ..distill.moe import (
    distill_loss, held_out_metrics, kl_to_teacher, load_balance, mark_trainable, set_experts_compute, set_top_k,
    top_k_at, trainable_model,
)
from ..errors import EffconvError
from ..eval.params import parameter_counts
from ..eval.quality import perplexity
from ..io.export import check_output_dir, export_model
from ..io.native_moe import export_native, native_layout
from ..io.sources import load_causal_lm
from ..training import distributed, fsdp
from ..training.loop import StageSpec, load_checkpoint, run_stage
from ..training.run import (
    prepare_run_data, prepare_run_dir, resolve_device_and_dtype, run_dir_for, stage_metrics, steps_for,
)

METHODS = ("split", "copy")
SPLITS = ("random", "balanced", "coactivation")
ROUTER_INITS = ("auto", "activation", "kmeans", "uniform")
ROUTER_WEIGHTS = ("auto", "softmax", "renormalised")
LOAD_BALANCING = ("aux", "bias", "none")
TRAINABLE = ("router", "router-lora", "experts")
EXPORT_FORMATS = ("auto", "native", "effconv")


@dataclass
class MoeUpcycleConfig(RunArgs, TrainArgs, DataArgs, LoraArgs, MoeRecoveryArgs, MoeArgs, ModelArgs):
    """Settings of one upcycling run (CLI options and YAML recipe keys)."""

    model: str | None = option(None, "HF model directory (llama/mistral/qwen2/qwen3 or an effconv export), GGUF file "
                                     "or hub id (default: SmolLM2-135M-Instruct)")
    out: str = option("out/moe", "Output directory for the MoE model")
    export_format: str = option("auto", "auto (native transformers format when it fits) | native | effconv")
    eval_every: int = option(20, "Validate every N steps")
    checkpoint_every: int = option(20, "Checkpoint every N steps")

    def validate(self) -> None:
        choices = dict(method=METHODS, split=SPLITS, router_init=ROUTER_INITS, router_weights=ROUTER_WEIGHTS,
                       load_balancing=LOAD_BALANCING, experts_compute=("auto", "masked"),
                       train=TRAINABLE, export_format=EXPORT_FORMATS, dtype=DTYPES)
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
            if self.router_weights == "softmax":
                raise EffconvError("--method copy needs renormalised router weights (its step-0 output equals the "
                                   "dense FFN only then); use --router-weights auto or renormalised")
            if self.router_init == "activation":
                raise EffconvError("--router-init activation is for --method split; copy uses kmeans or uniform")
        elif self.router_init == "kmeans":
            raise EffconvError("--router-init kmeans is for --method copy; split uses activation or uniform")
        if self.top_k_start is not None and not self.top_k <= self.top_k_start <= self.experts:
            raise EffconvError(f"--top-k-start must be between --top-k ({self.top_k}) and --experts ({self.experts}), "
                               f"got {self.top_k_start}")
        if not 0 < self.anneal_fraction <= 1:
            raise EffconvError(f"--anneal-fraction must be in (0, 1], got {self.anneal_fraction}")
        for name in ("tokens", "calibration_tokens", "generate_tokens"):
            if getattr(self, name) < 0:
                raise EffconvError(f"--{name.replace('_', '-')} must be >= 0")
        if self.seq_len < 2 or self.batch_size < 1:
            raise EffconvError("--seq-len must be >= 2 and --batch-size >= 1")
        if self.lr <= 0 or self.router_init_std < 0:
            raise EffconvError("--lr must be > 0 and --router-init-std >= 0")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise EffconvError(f"--max-seconds must be > 0 (seconds), got {self.max_seconds}")
        check_data_args(self)
        check_generated_split(self)

    def annealing_start(self) -> int:
        """The top-k distillation starts from (top_k_start; default twice top_k, at most the experts)."""
        return self.top_k_start if self.top_k_start is not None else min(self.experts, 2 * self.top_k)

    def identity(self) -> dict:
        """What must match for --resume: everything except output handling and the time budget."""
        return run_identity(self, "max_seconds", "experts_compute")  # same arithmetic either way


@dataclass
class MoeUpcycleResult:
    out: Path
    export_format: str
    metrics: dict = field(default_factory=dict)
    model: object = None  # the exported network as an effconv model (in memory)


def moe_upcycle(cfg: MoeUpcycleConfig) -> MoeUpcycleResult:
    """Upcycle, measure, distill, measure, export."""
    cfg.validate()
    distributed.check_launch(cfg.batch_size)
    out = Path(cfg.out)
    check_output_dir(out, cfg.overwrite)
    device, dtype = resolve_device_and_dtype(cfg.device, cfg.dtype)
    device = distributed.local_device(device)  # one GPU per launched process
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
        prepare_run_dir(run_dir, cfg.identity(), resume=cfg.resume, overwrite=cfg.overwrite)
    distributed.wait_for_everyone()
    train_blocks, val_blocks, data_description = prepare_run_data(cfg, tokenizer, lambda: (loaded, tokenizer))
    del loaded
    val_blocks = val_blocks[: cfg.max_val_blocks]
    console.print(f"data: {data_description}; validating on {val_blocks.shape[0]} blocks")
    dense.requires_grad_(False)
    calibration = collect_mlp_inputs(dense, train_blocks, cfg.calibration_tokens, cfg.batch_size) if cfg.calibration_tokens else []
    student = upcycle(dense, calibration, cfg)
    del calibration
    steps = steps_for(cfg.tokens, cfg.batch_size, cfg.seq_len)
    if sharded:
        mark_trainable(student, cfg)  # FSDP fixes the trainable set's dtype per unit when it shards
        fsdp.shard(dense, device)
        fsdp.shard(student, device)
    bs = cfg.batch_size
    metrics: dict = {"source": source.description, "data": data_description}
    metrics.update(_routing_metrics("upcycled", student, dense, val_blocks, bs))
    metrics["parameters"] = _parameter_metrics(student, dense)
    console.print(f"teacher validation perplexity {metrics['teacher_val_ppl']:.3f}; upcycled before training "
                  f"{metrics['upcycled_val_ppl']:.3f} (KL to teacher {metrics['upcycled_kl']:.4f}"
                  + _coverage_note(metrics.get("upcycled_coverage")) + "); "
                  f"{metrics['parameters']['active_ffn_fraction_of_dense']:.1%} of the dense FFN parameters active "
                  "per token")

    model_to_export = student
    if steps > 0:
        trainee = trainable_model(student, cfg)
        spec = StageSpec("moe distillation", steps, cfg.lr, warmup_steps=min(10, steps // 10),
                         eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every,
                         max_seconds=cfg.max_seconds)
        ckpt = run_dir / "distill.pt"
        resume_state = load_checkpoint(ckpt) if cfg.resume and ckpt.is_file() else None
        layers = moe_layers(trainee)
        if resume_state is not None and "router_bias" in resume_state:
            for m, b in zip(layers, resume_state["router_bias"]):
                m.router_bias.copy_(b)
        loader = BlockLoader(train_blocks, bs, seed=cfg.seed)
        start_k = cfg.annealing_start()
        set_experts_compute(trainee, cfg.experts_compute)
        result = run_stage(
            trainee, spec, loss_fn=lambda b: distill_loss(trainee, dense, b, cfg),
            before_step=lambda step, planned: set_top_k(
                trainee, top_k_at(step, planned, start_k, cfg.top_k, cfg.anneal_fraction)),
            next_batch=lambda step: loader.batch(step).to(device),
            evaluate=lambda: kl_to_teacher(trainee, dense, val_blocks, bs), checkpoint_path=ckpt,
            resume_state=resume_state, progress=cfg.progress,
            extra_state=lambda: {"router_bias": [m.router_bias.detach().cpu().clone() for m in layers]},
        )
        set_top_k(trainee, cfg.top_k)  # the exported k, whatever the schedule reached
        set_experts_compute(trainee, "auto")  # measurement and the returned model use the inference path
        metrics["distillation"] = {
            "train": cfg.train, "top_k_start": start_k, "top_k_end": cfg.top_k, **stage_metrics(result),
            "first_train_loss": result.train_losses[0] if result.train_losses else None,
            "final_train_loss": result.train_losses[-1] if result.train_losses else None,
            "val_kl": result.val_losses,
        }
        # sharded: measured on the trained model itself (LoRA unmerged); the main process merges its gathered copy
        measured = trainee if sharded else (trainee.merge_and_unload() if cfg.train == "router-lora" else trainee)
        metrics.update({k: v for k, v in _routing_metrics("distilled", measured, dense, val_blocks, bs).items()
                        if not k.startswith("teacher_")})
        console.print(f"after distillation: validation perplexity {metrics['distilled_val_ppl']:.3f} "
                      f"(KL to teacher {metrics['distilled_kl']:.4f}"
                      + _coverage_note(metrics.get("distilled_coverage")) + ")")
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


def _routing_metrics(prefix: str, model, dense, val_blocks, batch_size: int) -> dict:
    """Held-out loss, perplexity and KL to the dense model; the busiest expert's share of routed tokens per layer
    and the balance figure (distill/moe.load_balance); the routed experts' coverage of the dense activation mass.
    One pass of both models over the validation blocks (distill/moe.held_out_metrics)."""
    m = held_out_metrics(model, dense, val_blocks, batch_size)
    shares = m["max_expert_share"]
    out = {"teacher_val_loss": m["teacher_loss"], "teacher_val_ppl": perplexity(m["teacher_loss"]),
           f"{prefix}_val_loss": m["loss"], f"{prefix}_val_ppl": perplexity(m["loss"]), f"{prefix}_kl": m["kl"],
           f"{prefix}_max_expert_share": shares, f"{prefix}_load_balance": load_balance(shares, model.config.num_experts)}
    if m["coverage"] is not None:
        out[f"{prefix}_coverage"] = m["coverage"]
    return out


def _coverage_note(coverage: dict | None) -> str:
    if coverage is None:
        return ""
    return (f"; the chosen experts cover {coverage['coverage']:.1%} of the dense FFN's activation mass, an oracle "
            f"router {coverage['oracle_coverage']:.1%}")


def _parameter_metrics(student, dense) -> dict:
    """Parameters per token of the MoE model (eval/params.py) beside the dense model's FFN."""
    counts = parameter_counts(student)
    dense_ffn = parameter_counts(dense)["ffn_parameters"]
    return {**counts, "dense_parameters": sum(p.numel() for p in dense.parameters()), "dense_ffn_parameters": dense_ffn,
            "active_ffn_fraction_of_dense": counts["active_ffn_parameters"] / dense_ffn}
