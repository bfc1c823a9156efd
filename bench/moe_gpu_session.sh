#!/usr/bin/env bash
# One GPU call for the MoE expert kernel (docs/kernels.md, "MoE experts"): (a) tests/kernels/test_moe.py on
# CUDA, (b1) bench/moe.py --quick eager (+ ceilings, launch counts, autotuned configs), (b2) --quick --graph
# (CUDA-graph replay = GPU time), (c) bench/moe.py --profile --profile-only at large and smol_split N 16384
# (torch.profiler: GPU ms per kernel of triton and dense fwd+bwd, with per-kernel floors), printed last. Every
# step runs under `timeout`, capped by what is left of BUDGET (235 s; the bench steps leave PROFILE_TIMEOUT
# for the profile), so the script ends in ~240 s whatever compiles. Run from the repo root:
#   bash bench/moe_gpu_session.sh
# Output under $OUT (default ./moe-out): env.txt, tests.log, moe_eager.{json,log}, moe_graph.{json,log},
# moe_profile.{json,log}.
# Compiles: the tests' test_every_tile_config_matches_loop[0..4] compile every config of every kernel with the
# benchmark's specialization (bf16, BM 128, D/I multiples of 16, E 8, k 2) in parallel pytest shards, so the
# benchmark's autotuner finds them in Triton's cache and only times them (~35 ms per config and key).
# Knobs: BUDGET (235), SHARDS (8), TEST_TIMEOUT (90), EAGER_TIMEOUT (75), GRAPH_TIMEOUT (55),
# PROFILE_TIMEOUT (35), SKIP_TESTS=1.
set -u
OUT=${OUT:-./moe-out}
GRAPH_EXTRA=${GRAPH_EXTRA:-}  # e.g. "--ceilings --configs --count-launches" when SKIP_EAGER=1
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}
T0=$(date +%s)
BUDGET=${BUDGET:-235}
PT=${PROFILE_TIMEOUT:-35}
left() {  # min(wanted, what is left of the budget minus a reserve $2), at least 5 s
  local rem=$(( BUDGET - ${2:-0} - ($(date +%s) - T0) ))
  local t=$(( $1 < rem ? $1 : rem ))
  echo $(( t > 5 ? t : 5 ))
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv > "$OUT/env.txt" 2>&1
timeout 20 python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  >> "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # --confcutdir: only tests/kernels/conftest.py (CUDA when present; EFFCONV_POISON NaN-fills torch.empty)
  timeout 25 python3 -m pytest tests/kernels/test_moe.py --confcutdir tests/kernels --collect-only -q \
    -p no:cacheprovider 2>/dev/null | grep '::' > /tmp/moe_test_ids
  rm -f /tmp/moeshard_*
  split -n r/"${SHARDS:-8}" /tmp/moe_test_ids /tmp/moeshard_
  TT=$(left "${TEST_TIMEOUT:-90}" "$PT")
  for f in /tmp/moeshard_*; do
    [ -s "$f" ] || continue  # an empty shard would make pytest collect the whole repository
    ( EFFCONV_POISON=1 timeout "$TT" python3 -m pytest -q -p no:cacheprovider --confcutdir tests/kernels \
        $(cat "$f") > "$f.log" 2>&1; echo "exit=$?" >> "$f.log" ) &
  done
  wait
  cat /tmp/moeshard_*.log > "$OUT/tests.log" 2>/dev/null || echo "no test logs (collection failed?)"
  echo "== tests: $(wc -l < /tmp/moe_test_ids) collected, done after $(( $(date +%s) - T0 ))s (exit 124 = timeout)"
fi

# BEFORE_BENCH: a command run after the tests, before any timing (e.g. wait for a side job to end)
[ -n "${BEFORE_BENCH:-}" ] && { eval "$BEFORE_BENCH"; echo "== before-bench done after $(( $(date +%s) - T0 ))s"; }
# PLANS: backward plans WGRAD:DGRAD timed beside the default (auto) one (docs/kernels.md, "backward plans")
PLANS=${PLANS:-"triton:fused grouped_mm:fused triton:grouped_mm"}
if [ "${SKIP_EAGER:-0}" != 1 ]; then
  timeout "$(left "${EAGER_TIMEOUT:-75}" "$PT")" python3 bench/moe.py --quick --ceilings --configs --count-launches \
    --out "$OUT/moe_eager.json" > "$OUT/moe_eager.log" 2>&1
  echo "== bench eager exit=$? after $(( $(date +%s) - T0 ))s"
fi
timeout "$(left "${GRAPH_TIMEOUT:-55}" "$PT")" python3 bench/moe.py --quick --graph --skip-correctness --plans $PLANS \
  $GRAPH_EXTRA --out "$OUT/moe_graph.json" > "$OUT/moe_graph.log" 2>&1
echo "== bench graph exit=$? after $(( $(date +%s) - T0 ))s"
timeout "$(left "$PT")" python3 bench/moe.py --profile --profile-only --skip-correctness --shapes large smol_split \
  --tokens 16384 --plans $PLANS --out "$OUT/moe_profile.json" > "$OUT/moe_profile.log" 2>&1
echo "== bench profile exit=$? after $(( $(date +%s) - T0 ))s"

echo "== autotuned configs (eager run; kernel, key values -> config)"
sed -n '/^autotuned configs/,/^fwd \/ fwd+bwd ms/p' "$OUT/moe_eager.log" | sed '1d;$d'
echo "== tests (all shards)"
if [ -f "$OUT/tests.log" ]; then
  grep -hE "^(FAILED|ERROR)" "$OUT/tests.log" | cut -c1-200 | head -6
  grep -oE "[0-9]+ (passed|failed|skipped|errors?)" "$OUT/tests.log" \
    | awk '{n[$2]+=$1} END {for (k in n) printf "%s %d  ", k, n[k]; print ""}'
  echo "shard exits: $(grep -hoE "exit=[0-9]+" "$OUT/tests.log" | tr '\n' ' ')"
fi
echo "== ceilings, launches, correctness (eager run)"
grep -E '^\{"ceilings"|^\{"launches"|^\{"correctness' "$OUT/moe_eager.log" | cut -c1-700
grep -hE "Traceback|[A-Za-z]Error|graph_error" "$OUT/moe_eager.log" "$OUT/moe_graph.log" "$OUT/moe_profile.log" | grep -v '^{"launches"' \
  | cut -c1-300 | head -8
echo "== eager summary"
sed -n '/^fwd \/ fwd+bwd ms/,$p' "$OUT/moe_eager.log"
echo "== graph summary (eager + CUDA-graph replay), then the backward plans"
sed -n '/^fwd \/ fwd+bwd ms/,$p' "$OUT/moe_graph.log"
echo "== per-kernel profile (GPU ms per fwd+bwd; x floor = ms / max(FLOP floor, byte floor))"
grep -vE '^\{|USDT|Warning|warn' "$OUT/moe_profile.log" | grep -E '^(profile|  )' | cut -c1-150
