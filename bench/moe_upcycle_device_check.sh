#!/usr/bin/env bash
# moe-upcycle end to end on a tiny random Llama on whatever device "auto" picks (the GPU there): every split
# method, a shared expert, copy + k-means router, a few distillation steps, export and reload. The CPU tests pin
# device="cpu"; this is the check that the statistics also run where the weights are on the GPU.
#   bash bench/moe_upcycle_device_check.sh [WORKDIR]
set -eu
W=${1:-/tmp/moe-device-check}
rm -rf "$W" && mkdir -p "$W"
export PYTHONPATH=$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}
python3 bench/make_tiny_model.py "$W/teacher" > /dev/null
common="--model $W/teacher --data $W/teacher/train.txt --experts 4 --top-k 2 --calibration-tokens 512 --tokens 2048
  --seq-len 32 --batch-size 8 --eval-every 4 --checkpoint-every 4 --no-progress --overwrite"
for v in "split random" "split balanced" "split coactivation --shared 1 --experts 3" "copy kmeans --granularity 2"; do
  set -- $v  # later --experts overrides the common one
  method=$1 how=$2; shift 2
  if [ "$method" = split ]; then extra="--method split --split $how"; else extra="--method copy --router-init $how"; fi
  python3 -m effconv.cli moe-upcycle $common $extra "$@" --out "$W/out-$method-$how" > "$W/log-$method-$how" 2>&1 \
    || { echo "FAILED: $v"; tail -5 "$W/log-$method-$how"; exit 1; }
  python3 - "$W/out-$method-$how" <<'PY'
import sys, torch, transformers
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(sys.argv[1].rsplit("/", 1)[-1], type(m).__name__, "reloaded; logits finite:",
      bool(torch.isfinite(m(torch.tensor([[1, 2, 3, 4]])).logits).all()))
PY
done
echo "moe-upcycle device check: all passed on $(python3 -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")')"
