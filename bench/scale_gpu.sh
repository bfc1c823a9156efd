#!/usr/bin/env bash
# Issue 8: one linearize recipe (SmolLM2-135M-shaped, random weights, random token data) through accelerate on
# 1 GPU and N GPUs (NGPU, default 2), tokens/s, scaling efficiency, peak memory and parameter memory per GPU,
# loss curves. MODE=ddp (default: data parallel, recipes/accelerate/ddp.yaml) or MODE=fsdp (weights sharded,
# recipes/accelerate/fsdp.yaml); CONFIG=path overrides the accelerate config.
# Writes $OUT/scale_gpu/{n1,nN,summary}.json (MODE=ddp) or $OUT/scale_gpu_fsdp/... (MODE=fsdp).
#   GPU (2x H200):  bash bench/scale_gpu.sh ; MODE=fsdp bash bench/scale_gpu.sh
#   CPU smoke test: SIZE=tiny BATCH=4 SEQ=32 S1=6 S2=3 PYTHON=python bash bench/scale_gpu.sh
#                   MODE=fsdp CONFIG=recipes/accelerate/fsdp-cpu.yaml SIZE=tiny BATCH=4 SEQ=32 S1=6 S2=3 PYTHON=python bash bench/scale_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# NVLink multicast stays off (it can take the shared host's GPUs out of service): see the device notes
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
MODE="${MODE:-ddp}" NGPU="${NGPU:-2}"
case "$MODE" in ddp|fsdp) ;; *) echo "MODE must be ddp or fsdp, got $MODE" >&2; exit 2;; esac
CONFIG="${CONFIG:-recipes/accelerate/$MODE.yaml}"
OUT_DIR="${OUT:-/tmp}/scale_gpu$([ "$MODE" = ddp ] || echo "_$MODE")"; mkdir -p "$OUT_DIR"
SIZE="${SIZE:-smollm2}" BATCH="${BATCH:-16}" SEQ="${SEQ:-1024}" S1="${S1:-40}" S2="${S2:-10}"
PY="${PYTHON:-python3}"
for n in 1 "$NGPU"; do
  echo "== $n process(es), $CONFIG" >&2
  "$PY" -m accelerate.commands.launch --config_file "$CONFIG" --num_processes "$n" \
    bench/scale_gpu.py --size "$SIZE" --batch "$BATCH" --seq-len "$SEQ" --stage1-steps "$S1" --stage2-steps "$S2" \
    --out "$OUT_DIR/n$n.json"
done
"$PY" - "$OUT_DIR" "$NGPU" "$MODE" "$CONFIG" <<'PYEOF'
import json, sys
from pathlib import Path
d, ngpu, mode, config = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
one, two = (json.loads((d / f"n{n}.json").read_text()) for n in (1, ngpu))
summary = {"device": one["device"], "data": one["data"], "global_batch": one["global_batch"],
           "seq_len": one["seq_len"], "mode": mode, "config": config, "gpus": ngpu, "env": two["env"],
           "stages": {}}
for stage in ("stage1", "stage2"):
    if stage not in one:
        continue
    a, b = one[stage], two[stage]
    diff = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a["losses"], b["losses"]))
    summary["stages"][stage] = {
        "tokens_per_second_1gpu": a["tokens_per_second"], f"tokens_per_second_{ngpu}gpu": b["tokens_per_second"],
        "scaling_efficiency": round(b["tokens_per_second"] / (ngpu * a["tokens_per_second"]), 3),
        "max_relative_loss_difference": diff, "losses_1gpu": a["losses"], f"losses_{ngpu}gpu": b["losses"]}
summary["peak_memory_gib_per_gpu"] = {"1gpu": one["peak_memory_gib_per_process"],
                                      f"{ngpu}gpu": two["peak_memory_gib_per_process"]}
summary["parameter_mib_per_gpu"] = {"1gpu": one["parameter_mib_per_process"],
                                    f"{ngpu}gpu": two["parameter_mib_per_process"]}
summary["host_resident_mib_per_process"] = {
    "after_build_1gpu": one["resident_mib_after_build_per_process"],
    f"after_build_{ngpu}gpu": two["resident_mib_after_build_per_process"],
    "end_1gpu": one["resident_mib_per_process"], f"end_{ngpu}gpu": two["resident_mib_per_process"]}
# two points of peak memory vs tokens per GPU (1 GPU: the whole batch, N GPUs: 1/N) -> fixed + per-token cost;
# only meaningful for DDP, where the fixed part (the model) is the same on 1 and N GPUs
tokens_1, tokens_2 = one["global_batch"] * one["seq_len"], two["global_batch"] * two["seq_len"] / ngpu
peak_1, peak_2 = one["peak_memory_gib_per_process"][0], max(two["peak_memory_gib_per_process"])
if mode == "ddp" and peak_1 > 0 and tokens_1 != tokens_2:
    per_token = (peak_1 - peak_2) / (tokens_1 - tokens_2)
    summary["memory_fit"] = {"fixed_gib": round(peak_1 - per_token * tokens_1, 3),
                             "gib_per_1k_tokens_per_gpu": round(per_token * 1024, 4),
                             "note": "peak = fixed + per_token * tokens per GPU, from these two runs (docs/scale.md)"}
(d / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({k: ({s: {kk: vv for kk, vv in v.items() if not kk.startswith("losses")} for s, v in summary["stages"].items()}
                      if k == "stages" else v) for k, v in summary.items()}, indent=1))
PYEOF
