"""One linearize recipe (attention transfer + a short LoRA stage) through effconv's accelerate path, for scaling.

Run under `accelerate launch --num_processes N` (once with N = 1, once with N > 1; docs/scale.md) with a DDP config
(recipes/accelerate/ddp.yaml) or an FSDP one (fsdp.yaml: the model is built in CPU memory and sharded over the
processes by effconv/training/fsdp.py, as `effconv linearize` does; 1 process is never sharded). The teacher is a
SmolLM2-135M-shaped Llama with *random* weights (no network or model files needed), and the
training data is *random token ids* from a seeded generator: the numbers measure throughput, memory and that
N processes follow 1 process, not conversion quality. Every batch is a pure function of the step, so all
configurations see the same global batches; run_stage (effconv/training/loop.py) slices each global batch over
the processes and averages the gradients, exactly as `effconv linearize` does under `accelerate launch`.

Writes JSON (main process): tokens/s per stage, peak memory per process, per-step losses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from effconv.conversion.student import make_student  # noqa: E402
from effconv.distill.lora import attach_lora  # noqa: E402
from effconv.distill.losses import finetune_loss  # noqa: E402
from effconv.distill.transfer import transfer_loss_fn  # noqa: E402
from effconv.pipelines.linearize import LinearizeConfig  # noqa: E402
from effconv.training import distributed, fsdp  # noqa: E402
from effconv.training.loop import StageSpec, run_stage  # noqa: E402


def teacher_config(size: str) -> tf.LlamaConfig:
    if size == "smollm2":  # SmolLM2-135M's shape (as bench/stage1_throughput.py)
        return tf.LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True,
        )
    return tf.LlamaConfig(  # "tiny": CPU smoke test of the script itself
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True,
    )


def resident_mib() -> float:
    """VmRSS after glibc's malloc_trim (freed heap memory handed back), so that it shows what is held."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["smollm2", "tiny"], default="smollm2")
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences), sliced over the processes")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--stage1-steps", type=int, default=40)
    p.add_argument("--stage2-steps", type=int, default=10)
    p.add_argument("--warmup-steps", type=int, default=3, help="first steps left out of tokens/s (compilation)")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    acc = distributed.get_accelerator()
    world = acc.num_processes if acc else 1
    cuda = torch.cuda.is_available()
    device = distributed.local_device(torch.device("cuda" if cuda else "cpu"))
    dtype = torch.bfloat16 if cuda else torch.float32
    sharded = distributed.fsdp_requested()
    build_device = torch.device("cpu") if sharded else device  # FSDP: each process moves only its shards
    torch.manual_seed(0)  # the same random teacher in every process
    config = teacher_config(args.size)
    with torch.device(build_device):
        teacher = tf.LlamaForCausalLM(config).to(dtype)
    cfg = LinearizeConfig(window=args.window, seq_len=args.seq_len, batch_size=args.batch, seed=0)
    student = make_student(teacher, cfg, build_device)
    del teacher
    if sharded:
        fsdp.shard(student, device)
    parameter_bytes = fsdp.local_parameter_bytes(student)
    resident_after_build = resident_mib()
    last = max(i for i, layer in enumerate(student.model.layers) if layer.self_attn.is_converted)

    def next_batch(step: int) -> torch.Tensor:  # random token ids, a pure function of the step
        g = torch.Generator().manual_seed(1000 + step)
        return torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=g).to(device)

    step_times: dict[str, list[float]] = {}

    def synchronized_now() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def timed_batches(name):
        times = step_times.setdefault(name, [])

        def fn(step):
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter())
            return next_batch(step)
        return fn

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    report: dict = {"world_size": world, "mode": "fsdp" if sharded else "ddp" if world > 1 else "single",
                    "size": args.size, "global_batch": args.batch, "seq_len": args.seq_len,
                    "dtype": str(dtype), "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                    "data": "random token ids (random-weight teacher): throughput/agreement only, not quality",
                    "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                           "NVSHMEM_DISABLE_NVLS")}}
    stages = [("stage1", StageSpec("attention transfer", args.stage1_steps, 1e-2, warmup_steps=2,
                                   eval_every=10**9, checkpoint_every=10**9))]
    results = {}
    loss_fn, backward = transfer_loss_fn(student, last)  # FSDP: layer by layer (training/fsdp.py transfer_backward)
    r1 = run_stage(student, stages[0][1], loss_fn=loss_fn, next_batch=timed_batches("stage1"), evaluate=None,
                   checkpoint_path=None, progress=False, backward=backward)
    results["stage1"] = r1
    stage_end = {"stage1": synchronized_now()}
    if args.stage2_steps > 0:
        student.requires_grad_(False)
        converted = [i for i, layer in enumerate(student.model.layers) if layer.self_attn.is_converted]
        peft_model = attach_lora(student, converted, rank=cfg.lora_rank, alpha=cfg.lora_alpha, seed=cfg.seed)
        spec2 = StageSpec("lora finetune", args.stage2_steps, 2e-4, warmup_steps=2, eval_every=10**9,
                          checkpoint_every=10**9)
        results["stage2"] = run_stage(peft_model, spec2, loss_fn=lambda b: (finetune_loss(peft_model, student, b, 0.0), {}),
                                      next_batch=timed_batches("stage2"), evaluate=None, checkpoint_path=None,
                                      progress=False)
        stage_end["stage2"] = synchronized_now()
    for name, r in results.items():
        # wall time between the batch fetches of step `warmup` and the end of the stage
        times = step_times[name] + [stage_end[name]]
        w = min(args.warmup_steps, r.steps - 1)
        seconds = times[-1] - times[w]
        tokens = (r.steps - w) * args.batch * args.seq_len
        report[name] = {"steps": r.steps, "timed_steps": r.steps - w, "seconds": round(seconds, 3),
                        "tokens_per_second": round(tokens / seconds, 1), "losses": r.train_losses}
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0,
                         parameter_bytes / 2**20, resident_after_build, resident_mib()], device=device)
    if acc is not None:
        peak = acc.gather(peak[None])
    peak = peak.reshape(-1, 4)
    report["peak_memory_gib_per_process"] = [round(float(x), 3) for x in peak[:, 0].tolist()]
    # the model's parameters each process holds (FSDP: its shards; before the LoRA stage adds its adapters)
    report["parameter_mib_per_process"] = [round(float(x), 3) for x in peak[:, 1].tolist()]
    # host memory resident (VmRSS after malloc_trim) once the model is built (and sharded) and at the end; on the
    # CPU it holds the model (every process builds the whole model in CPU memory before sharding it)
    report["resident_mib_after_build_per_process"] = [round(float(x), 1) for x in peak[:, 2].tolist()]
    report["resident_mib_per_process"] = [round(float(x), 1) for x in peak[:, 3].tolist()]
    if distributed.is_main_process():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps({k: v for k, v in report.items() if k not in ("stage1", "stage2")}))
        for name in results:
            print(name, {k: v for k, v in report[name].items() if k != "losses"})
    distributed.shutdown()


if __name__ == "__main__":
    main()
