#!/usr/bin/env bash
# One GPU call for the kernels of issues 5 and 6 and the teacher-generation speed: the sparse-attention and MoE
# kernel tests on CUDA, bench/sparse.py, bench/moe_gpu_session.sh, bench/teacher_generation.py. Everything lands in
# $OUT/kernels.tgz (logs + JSON) and $OUT/summary.txt (also printed). Run from the repo root:
#   bash bench/gpu_kernels_session.sh          knobs: SKIP="sparse moe gen", SPARSE_TIMEOUT, MOE_TIMEOUT, GEN_TIMEOUT
set -u
OUT=${OUT:-/tmp/effconv-kernels}
W=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}
SKIP=${SKIP:-}
T0=$(date +%s)
stamp() { echo "== $1 after $(( $(date +%s) - T0 ))s" | tee -a "$W/summary.txt"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv > "$W/env.txt" 2>&1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name())" >> "$W/env.txt" 2>&1
cat "$W/env.txt" >> "$W/summary.txt"

# the sparse tests compile on the CPU while the MoE session's tests do the same (16 cores); timings come after
if [[ " $SKIP " != *" sparse "* ]]; then
  ( timeout "${SPARSE_TIMEOUT:-120}" python3 -m pytest -q -p no:cacheprovider -n "${SPARSE_SHARDS:-4}" --confcutdir tests/kernels \
      tests/kernels/test_sparse_attention.py > "$W/sparse-tests.log" 2>&1; echo "exit=$?" >> "$W/sparse-tests.log" ) &
fi
if [[ " $SKIP " != *" moe "* ]]; then
  OUT="$W/moe" timeout "${MOE_TIMEOUT:-250}" bash bench/moe_gpu_session.sh > "$W/moe-session.log" 2>&1
  stamp "moe session exit=$?"
  tail -45 "$W/moe-session.log" >> "$W/summary.txt"
fi
wait
if [[ " $SKIP " != *" sparse "* ]]; then
  stamp "sparse tests ($(tail -2 "$W/sparse-tests.log" | tr '\n' ' '))"
  timeout "${SPARSE_BENCH_TIMEOUT:-100}" python3 bench/sparse.py --budget-s 60 --out "$W/sparse.json" > "$W/sparse.log" 2>&1
  stamp "sparse bench exit=$?"
  tail -25 "$W/sparse.log" >> "$W/summary.txt"
fi
if [[ " $SKIP " != *" gen "* ]]; then
  timeout "${GEN_TIMEOUT:-110}" python3 bench/teacher_generation.py --out "$W/gen.json" --budget-s 70 \
    --configs 512:dynamic 2048:dynamic 2048:static 2048:static-compile > "$W/gen.log" 2>&1
  stamp "generation bench exit=$?"
  cat "$W/gen.log" | grep -v Warning >> "$W/summary.txt"
fi
tar czf "$OUT/kernels.tgz" -C "$W" .
cp "$W/summary.txt" "$OUT/summary.txt"
cat "$W/summary.txt"
