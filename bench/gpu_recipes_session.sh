#!/usr/bin/env bash
# One GPU call that runs the SmolLM2 recipes (issue 9) side by side on one GPU, sharing one teacher-generated text,
# and measures each with bench/recipes.py (held-out teacher text and held-out prose). Results under $OUT:
# <run>.jsonl, <run>.log, gen.log, report.md. Run from the repo root with the GGUF at $MODEL.
#   MODEL=/root/m.gguf bash bench/gpu_recipes_session.sh
# Knobs (env): GEN_TOKENS, GEN_BATCH (teacher text, shared by every run through effconv's data cache),
# RUNS (space-separated names from the case below), RUN_TIMEOUT (seconds per run), EFFCONV_GENERATION_CACHE,
# SESSION_SECONDS (the *-long runs: wall-clock budgets that end every run by then; see left_s below).
# r25-long2 runs the r25 recipe as it is (window 128 since 2026-12-02; r25w64-long2 is the window-64 variant).
set -u
OUT=${OUT:-/tmp/effconv-recipes}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}
MODEL=${MODEL:?set MODEL to the teacher (GGUF file or HF directory)}
GEN_TOKENS=${GEN_TOKENS:-1000000}
GEN_BATCH=${GEN_BATCH:-2048}
GEN_MODE=${GEN_MODE:-graph}  # teacher-text generation mode (graph: effconv.graph_sampling, the fast one on a GPU)
RUN_TIMEOUT=${RUN_TIMEOUT:-420}
RUNS=${RUNS:-"moe w64+linear-moe r25 w0 moe-copy"}
EXTRA=${EXTRA:-}  # more --set overrides for every run (CPU smoke test: tiny budgets)
T0=$(date +%s)
GEN="--set model=$MODEL --set generate_tokens=$GEN_TOKENS --set generation_batch_size=$GEN_BATCH"
GEN="$GEN --set generation_mode=$GEN_MODE"  # every run reads the text step 1 wrote (the mode is in its cache key)
# SESSION_SECONDS: every *-long run ends by T0 + SESSION_SECONDS (its stages get wall-clock budgets, max_seconds,
# from what is left when it starts; RESERVE seconds are kept for setup, evaluation and export)
SESSION_SECONDS=${SESSION_SECONDS:-}
left_s() {  # seconds left before the deadline minus $1, at least 30
  local rem=$(( T0 + ${SESSION_SECONDS:-100000} - $(date +%s) - $1 ))
  echo $(( rem > 30 ? rem : 30 ))
}
stage_budgets() {  # linearize / hybridize: stage 1 gets 55 %, stage 2 45 % of what is left minus $1
  local t; t=$(left_s "$1")
  echo "--set stage1_max_seconds=$(( t * 55 / 100 )) --set stage2_max_seconds=$(( t * 45 / 100 ))"
}

# 1. the teacher writes the shared training text once (effconv caches it; every run below reads the cache)
timeout ${GEN_TIMEOUT:-300} python3 - "$MODEL" "$GEN_TOKENS" "$GEN_BATCH" "$GEN_MODE" > "$OUT/gen.log" 2>&1 <<'EOF'
import sys, time, torch
from effconv.data import generate_teacher_samples
from effconv.loading import cache_root, load_teacher
cuda = torch.cuda.is_available()
model, tok, _ = load_teacher(sys.argv[1], dtype=torch.bfloat16 if cuda else torch.float32, device="cuda" if cuda else "cpu")
t0 = time.time()
samples = generate_teacher_samples(model, tok, num_tokens=int(sys.argv[2]), batch_size=int(sys.argv[3]),
                                   cache_dir=cache_root() / "data", progress=False, generation_mode=sys.argv[4])
dt = time.time() - t0
n = sum(s.generated_tokens for s in samples)
print(f"teacher text: {len(samples)} samples, {n} generated tokens in {dt:.1f}s = {n / dt:.0f} tokens/s")
EOF
echo "== gen exit=$? after $(( $(date +%s) - T0 ))s: $(tail -1 "$OUT/gen.log")"
TEXT=$(ls -t "${EFFCONV_CACHE:-$HOME/.cache/effconv}"/data/teacher_text-*.jsonl 2>/dev/null | head -1)

run() {  # name recipe [--set ...]
  local name=$1 recipe=$2; shift 2
  local cap=$RUN_TIMEOUT
  [ -n "$SESSION_SECONDS" ] && cap=$(left_s -60)  # a hard stop one minute after the deadline
  timeout "$cap" python3 bench/recipes.py run "$recipe" --name "$name" --log "$OUT/$name.jsonl" "$@" $EXTRA \
    > "$OUT/$name.log" 2>&1
  echo "== $name exit=$? after $(( $(date +%s) - T0 ))s: $(grep '^\[recipes\]' "$OUT/$name.log" | tail -1)"
}

long_run() {  # name recipe reserve [--set ...]: LONG_S1 + LONG_S2 tokens (S2=... for one run), stage budgets
  local name=$1 recipe=$2 reserve=$3; shift 3  # ending by the deadline
  run "$name" "$recipe" $GEN "$@" --set stage1_tokens=${LONG_S1:-20000000} \
    --set stage2_tokens=${S2:-${LONG_S2:-10000000}} $(stage_budgets "$reserve") --set out=/root/runs/$name
}

for r in $RUNS; do
  case $r in
    moe) run moe-8x2 recipes/smollm2-135m-moe-8x2.yaml $GEN --set tokens=${MOE_TOKENS:-6000000} \
           --set out=/root/runs/moe-8x2 & ;;
    moe-copy) run moe-copy recipes/smollm2-135m-moe-8x2.yaml $GEN --set method=copy --set granularity=2 \
           --set tokens=0 --set out=/root/runs/moe-copy & ;;
    w64+linear-moe) ( run w64 recipes/smollm2-135m-linearize-w64.yaml $GEN --set out=/root/runs/w64 \
           && run linear-moe recipes/smollm2-135m-linear-moe.yaml --set model=/root/runs/w64 --set data="$TEXT" \
                --set tokens=${LMOE_TOKENS:-2000000} --set out=/root/runs/linear-moe ) & ;;
    r25) run r25 recipes/smollm2-135m-hybridize-r25.yaml $GEN --set stage1_tokens=${R25_S1:-3000000} \
           --set stage2_tokens=${R25_S2:-3000000} --set out=/root/runs/r25 & ;;
    mqa) run mqa recipes/smollm2-135m-hybridize-r25.yaml $GEN --set attention=gqa --set kv_heads=1 --set ratio=0.1 \
           --set select=interval --set score=none --set stage1_tokens=${MQA_S1:-2000000} \
           --set stage2_tokens=${MQA_S2:-1000000} --set out=/root/runs/mqa & ;;
    w64-long) run w64-long recipes/smollm2-135m-linearize-w64.yaml $GEN --set stage1_tokens=${LONG_S1:-5000000} \
           --set stage2_tokens=${LONG_S2:-3000000} --set out=/root/runs/w64-long & ;;
    r25-long) run r25-long recipes/smollm2-135m-hybridize-r25.yaml $GEN --set stage1_tokens=${LONG_S1:-5000000} \
           --set stage2_tokens=${LONG_S2:-3000000} --set out=/root/runs/r25-long & ;;
    moe-long) run moe-long recipes/smollm2-135m-moe-8x2.yaml $GEN --set tokens=${MOE_TOKENS:-20000000} \
           --set max_seconds=$(left_s "${MOE_RESERVE:-300}") --set out=/root/runs/moe-long & ;;
    w64-long2) long_run w64-long recipes/smollm2-135m-linearize-w64.yaml "${RESERVE:-150}" & ;;
    r25-long2) long_run r25-long recipes/smollm2-135m-hybridize-r25.yaml "${RESERVE:-180}" & ;;
    r25w64-long2) long_run r25w64-long recipes/smollm2-135m-hybridize-r25.yaml "${RESERVE:-180}" --set window=64 & ;;
    r25w128-long2) long_run r25w128-long recipes/smollm2-135m-hybridize-r25.yaml "${RESERVE:-180}" --set window=128 & ;;
    w64-long2+linear-moe) ( long_run w64-long recipes/smollm2-135m-linearize-w64.yaml "${W64_RESERVE:-500}" \
           && run linear-moe-long recipes/smollm2-135m-linear-moe.yaml --set model=/root/runs/w64-long --set data="$TEXT" \
                --set tokens=${LMOE_TOKENS:-20000000} \
                --set max_seconds=$(left_s "${MOE_RESERVE:-300}") --set out=/root/runs/linear-moe-long ) & ;;
    w64-kl-long2) long_run w64-kl-long recipes/smollm2-135m-linearize-w64.yaml "${RESERVE:-150}" \
           --set ce_weight=0 --set kl_weight=1 & ;;
    r25w128-kl-long2) long_run r25w128-kl-long recipes/smollm2-135m-hybridize-r25.yaml "${RESERVE:-180}" \
           --set ce_weight=0 --set kl_weight=1 & ;;
    w64-kl4-long2) S2=4000000 long_run w64-kl4-long recipes/smollm2-135m-linearize-w64.yaml "${RESERVE:-150}" \
           --set ce_weight=0 --set kl_weight=1 & ;;
    w64-kl-r32-long2) long_run w64-kl-r32-long recipes/smollm2-135m-linearize-w64.yaml "${RESERVE:-150}" \
           --set ce_weight=0 --set kl_weight=1 --set lora_rank=32 & ;;
    w0-kl-long2) long_run w0-kl-long recipes/smollm2-135m-linearize-w0.yaml "${RESERVE:-150}" --set kernel=auto \
           --set ce_weight=0 --set kl_weight=1 & ;;
    r25w256-long2) long_run r25w256-long recipes/smollm2-135m-hybridize-r25.yaml "${RESERVE:-180}" --set window=256 & ;;
    w0-long) long_run w0-long recipes/smollm2-135m-linearize-w0.yaml "${RESERVE:-150}" --set kernel=auto & ;;
    w64+linear-moe-long) ( run w64 recipes/smollm2-135m-linearize-w64.yaml $GEN --set out=/root/runs/w64 \
           && run linear-moe-long recipes/smollm2-135m-linear-moe.yaml --set model=/root/runs/w64 --set data="$TEXT" \
                --set tokens=${LMOE_TOKENS:-20000000} --set max_seconds=$(left_s "${MOE_RESERVE:-300}") \
                --set out=/root/runs/linear-moe-long ) & ;;
    w0) run w0 recipes/smollm2-135m-linearize-w0.yaml $GEN --set kernel=auto --set stage1_tokens=${W0_S1:-6000000} \
           --set stage2_tokens=${W0_S2:-3000000} --set out=/root/runs/w0 & ;;
    *) echo "unknown run $r" ;;
  esac
done
if [ -n "${WITH_MOE_SPLITS:-}" ]; then  # bench/gpu_ablations_session.sh's moe part on the same text, side by side
  ( OUT="$OUT" WORK=/root/abl MODEL="$MODEL" TEXT="$TEXT" SKIP=linearize RUN_TIMEOUT="$RUN_TIMEOUT" \
      MOE_TOKENS=${SPLIT_TOKENS:-1000000} bash bench/gpu_ablations_session.sh > "$OUT/moe-splits-session.log" 2>&1
    echo "== moe split ablation done after $(( $(date +%s) - T0 ))s"; tail -8 "$OUT/moe-splits-session.log" ) &
fi
wait
ls "$OUT"/*.jsonl > /dev/null 2>&1 && python3 bench/recipes.py report "$OUT"/*.jsonl | tee "$OUT/report.md"
for f in "$OUT"/*.log; do echo "--- $f"; grep -E "Error|error:|Traceback" "$f" | head -3; done
echo "== done after $(( $(date +%s) - T0 ))s"
