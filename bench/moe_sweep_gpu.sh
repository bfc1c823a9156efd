#!/usr/bin/env bash
# One GPU call: the MoE expert kernel at one shape under several tuning variants (docs/kernels.md, "MoE
# experts", fourth iteration), each in its own process (its own autotuner), timed by CUDA-graph replay and
# profiled per kernel. Variants are env settings of effconv_kernels.moe.triton:
#   EFFCONV_MOE_WIDE_TUNING=1   the autotuner also tries WIDE_CONFIGS (smaller tiles, more warps per tile)
#   EFFCONV_MOE_BM=64           rows per block of the sorted order (default 128 at these sizes)
#   EFFCONV_MOE_WGRAD_SPLITS=2  row splits of the weight-grad GEMMs (fp32 partials + a sum)
#   EFFCONV_MOE_WGRAD=grouped_mm  torch._grouped_mm for the weight grads
#   EFFCONV_MOE_SLOT=sum        k = 2: write (token, slot) rows and sum them (default: atomic adds into the output)
#   EFFCONV_MOE_ROUTE_SUB=1024  ids per sub-tile of the routing kernels (default min(256, 8192 / next_pow2(E)))
#   EFFCONV_MOE_TUNE_REPEATS=3  the autotuner times each config as the min over 3 shorter do_bench runs
#   EFFCONV_MOE_PREFETCH=0      down_bwd loads its epilogue's g / u after the k loop (default: before it)
#   EFFCONV_MOE_ZERO=inline     zero the slot adds' outputs on the current stream (default: a side stream)
#   EFFCONV_MOE_WGRAD_STREAM=0|1  weight grads serial (0), only dW_d on a side stream (1); default 2, both
#   EFFCONV_MOE_PINNED=0        autotune the keys PINNED holds for this GPU too (default: their pinned configs)
#   EFFCONV_MOE_WGRAD_MIN_ROWS=1024 / EFFCONV_MOE_WGRAD_WAVES=8  the split rule's rows per split / waves
# Run from the repo root:  SHAPE=smol_split bash bench/moe_sweep_gpu.sh
# Output under $OUT (default ./moe-sweep): <variant>.json / .log, summary.txt (printed at the end).
# Knobs: SHAPE (smol_split), TOKENS ("4096 16384"), VARIANTS (names below), BUDGET (seconds, 480), PER_RUN (150).
set -u
OUT=${OUT:-./moe-sweep}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}
SHAPE=${SHAPE:-smol_split}
TOKENS=${TOKENS:-"4096 16384"}
VARIANTS=${VARIANTS:-"base wide wide-bm64 wide-s2 wide-bm64-s2 wide-grouped"}
BUDGET=${BUDGET:-480}
T0=$(date +%s)
variant_env() {
  case $1 in
    base) echo "" ;;
    wide) echo "EFFCONV_MOE_WIDE_TUNING=1" ;;
    wide-bm64) echo "EFFCONV_MOE_WIDE_TUNING=1 EFFCONV_MOE_BM=64" ;;
    wide-s2) echo "EFFCONV_MOE_WIDE_TUNING=1 EFFCONV_MOE_WGRAD_SPLITS=2" ;;
    wide-s4) echo "EFFCONV_MOE_WIDE_TUNING=1 EFFCONV_MOE_WGRAD_SPLITS=4" ;;
    wide-bm64-s2) echo "EFFCONV_MOE_WIDE_TUNING=1 EFFCONV_MOE_BM=64 EFFCONV_MOE_WGRAD_SPLITS=2" ;;
    wide-grouped) echo "EFFCONV_MOE_WIDE_TUNING=1 EFFCONV_MOE_WGRAD=grouped_mm" ;;
    bm64) echo "EFFCONV_MOE_BM=64" ;;
    sum) echo "EFFCONV_MOE_SLOT=sum" ;;
    s1) echo "EFFCONV_MOE_WGRAD_SPLITS=1" ;;
    sub1024) echo "EFFCONV_MOE_ROUTE_SUB=1024" ;;
    sub128) echo "EFFCONV_MOE_ROUTE_SUB=128" ;;
    robust) echo "EFFCONV_MOE_TUNE_REPEATS=3" ;;
    noprefetch) echo "EFFCONV_MOE_PREFETCH=0" ;;
    inline) echo "EFFCONV_MOE_ZERO=inline" ;;
    wide-sum) echo "EFFCONV_MOE_WIDE_TUNING=1 EFFCONV_MOE_SLOT=sum" ;;
    wide-sub256) echo "EFFCONV_MOE_WIDE_TUNING=1 EFFCONV_MOE_ROUTE_SUB=256" ;;
    wide-sub128) echo "EFFCONV_MOE_WIDE_TUNING=1 EFFCONV_MOE_ROUTE_SUB=128" ;;
    wide-s3) echo "EFFCONV_MOE_WIDE_TUNING=1 EFFCONV_MOE_WGRAD_SPLITS=3" ;;
    autotune) echo "EFFCONV_MOE_PINNED=0" ;;
    ws0) echo "EFFCONV_MOE_WGRAD_STREAM=0" ;;
    ws1) echo "EFFCONV_MOE_WGRAD_STREAM=1" ;;
    r1024) echo "EFFCONV_MOE_WGRAD_MIN_ROWS=1024" ;;
    r512) echo "EFFCONV_MOE_WGRAD_MIN_ROWS=512" ;;
    r1024w8) echo "EFFCONV_MOE_WGRAD_MIN_ROWS=1024 EFFCONV_MOE_WGRAD_WAVES=8" ;;
    r512w8) echo "EFFCONV_MOE_WGRAD_MIN_ROWS=512 EFFCONV_MOE_WGRAD_WAVES=8" ;;
    *) echo "unknown" ;;
  esac
}
for v in $VARIANTS; do  # NAME@2 repeats variant NAME in a fresh process (its own autotuning), saved as NAME@2
  e=$(variant_env "${v%@*}")
  [ "$e" = unknown ] && { echo "unknown variant $v"; continue; }
  rem=$(( BUDGET - ($(date +%s) - T0) ))
  [ "$rem" -lt 20 ] && { echo "== $v skipped: budget spent"; continue; }
  t=$(( ${PER_RUN:-150} < rem ? ${PER_RUN:-150} : rem ))
  # shellcheck disable=SC2086
  env $e timeout "$t" python3 bench/moe.py --quick --graph --profile --configs --methods triton dense \
    --shapes "$SHAPE" --tokens $TOKENS --out "$OUT/$v.json" > "$OUT/$v.log" 2>&1
  echo "== $v ($e) exit=$? after $(( $(date +%s) - T0 ))s"
done
python3 - "$OUT" $VARIANTS > "$OUT/summary.txt" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("variant | N | tri graph fwd | tri graph fb | dense graph fwd | dense graph fb | fwd ratio | fb ratio | kernels (ms, fwd+bwd)")
for v in sys.argv[2:]:
    f = out / f"{v}.json"
    if not f.exists():
        print(f"{v} | missing"); continue
    rec = json.loads(f.read_text())
    for r in rec["results"]:
        t, d = r.get("triton", {}), r.get("dense", {})
        prof = next((p for p in r.get("profile", []) if isinstance(p, dict) and p.get("method") == "triton"), None)
        ks = " ".join(f"{k['kernel'][:22]}={k['ms']:.4f}" for k in (prof or {}).get("kernels", [])[:9])
        g = lambda m, k: m.get(k, float("nan"))
        print(f"{v} | {r['N']} | {g(t,'graph_fwd_ms'):.4f} | {g(t,'graph_fwdbwd_ms'):.4f} | {g(d,'graph_fwd_ms'):.4f} | "
              f"{g(d,'graph_fwdbwd_ms'):.4f} | {r.get('triton_over_dense_graph_fwd', float('nan')):.3f} | "
              f"{r.get('triton_over_dense_graph_fwdbwd', float('nan')):.3f} | {ks}")
    for c in rec.get("autotune", []):
        print(f"   {v} tuned {c['kernel']} {','.join(c['key'][:len(c['key_names'])])} -> {c['config']} "
              f"w{c['num_warps']} s{c['num_stages']} {c.get('source', '')}")
EOF
cat "$OUT/summary.txt"
grep -hE "Traceback|Error" "$OUT"/*.log | cut -c1-250 | head -8
echo "== sweep done after $(( $(date +%s) - T0 ))s"
