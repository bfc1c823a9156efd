#!/usr/bin/env bash
# One GPU call for the ablations of issue 9 that had not run: window 256, stage 2 off, LoRA rank 4 / 32, a KL
# stage-2 loss (with a same-data w64 baseline), and the moe-upcycle split method after distillation; all on one
# teacher text ($TEXT, e.g. the one bench/gpu_recipes_session.sh generated), several processes side by side.
#   MODEL=/root/m.gguf TEXT=~/.cache/effconv/data/teacher_text-....jsonl bash bench/gpu_ablations_session.sh
# Results: $OUT/ablations.tgz (run dirs' runs.jsonl, logs) and the report printed last.
set -u
OUT=${OUT:-/tmp/effconv-ablations}
W=${WORK:-/root/abl}
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}
MODEL=${MODEL:?set MODEL}
TEXT=${TEXT:?set TEXT to the training text (jsonl with a text field)}
RUN_TIMEOUT=${RUN_TIMEOUT:-400}
MOE_TOKENS=${MOE_TOKENS:-1500000}
SKIP=${SKIP:-}
T0=$(date +%s)
stamp() { echo "== $1 after $(( $(date +%s) - T0 ))s"; }

if [[ " $SKIP " != *" linearize "* ]]; then
  for part in "w64-hedgehog,w256-hedgehog" "w64-no-stage2,w64-lora4" "w64-lora32,w64-kl1"; do
    d=$W/linearize-${part%%,*}
    ( timeout "$RUN_TIMEOUT" python3 bench/ablations.py run --plan linearize --only "$part" --out "$d" \
        --model "$MODEL" --data "$TEXT" > "$d.log" 2>&1; stamp "linearize $part exit=$?" ) &
  done
fi
if [[ " $SKIP " != *" moe "* ]]; then
  for split in random balanced coactivation; do
    ( timeout "$RUN_TIMEOUT" python3 bench/recipes.py run recipes/smollm2-135m-moe-8x2.yaml --name "moe-$split" \
        --log "$W/moe-splits.jsonl" --set model="$MODEL" --set data="$TEXT" --set split=$split \
        --set tokens="$MOE_TOKENS" --set out="$W/models/moe-$split" > "$W/moe-$split.log" 2>&1
      stamp "moe $split exit=$?" ) &
  done
fi
wait
for d in "$W"/linearize-*/; do [ -f "$d/runs.jsonl" ] && python3 bench/ablations.py report "$d"; done
[ -f "$W/moe-splits.jsonl" ] && python3 bench/recipes.py report "$W/moe-splits.jsonl"
tar czf "$OUT/ablations.tgz" -C "$W" --exclude=models --exclude='*.safetensors' --exclude='*.pt' .
stamp done
