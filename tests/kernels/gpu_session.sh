#!/usr/bin/env bash
# One call on the lent GPU (see docs/kernels.md): the kernel tests on CUDA, then bench/attention.py.
# Everything lands under $OUT (env.txt, tests.log, bench.log, bench.json). Run from the repo root, e.g.
#   bash tests/kernels/gpu_session.sh            (carry .whl holding fla_core and einops wheels for fla)
# Knobs: SHARDS (parallel pytest processes; the tests are compile-bound), TEST_TIMEOUT, BENCH_TIMEOUT,
# BENCH_ARGS, SKIP_TESTS=1.
set -u
OUT=${OUT:-/tmp/effconv-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > "$OUT/env.txt" 2>&1
if ls .whl/fla_core-*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/fla_core-*.whl .whl/einops-*.whl >> "$OUT/env.txt" 2>&1 && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}
python3 -c "
import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())
try:
    import fla; print('fla', fla.__version__)
except Exception as e: print('fla import failed:', e)
" >> "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # --confcutdir: only tests/kernels/conftest.py (the project's root conftest builds HF models)
  python3 -m pytest tests/kernels --confcutdir tests/kernels --collect-only -q -p no:cacheprovider 2>/dev/null \
    | grep '::' > /tmp/kernel_test_ids
  rm -f /tmp/kshard_*
  export EFFCONV_POISON=${EFFCONV_POISON:-1}  # NaN-filled torch.empty buffers (tests/kernels/conftest.py)
  split -n r/"${SHARDS:-8}" /tmp/kernel_test_ids /tmp/kshard_
  for f in /tmp/kshard_*; do
    ( timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider --confcutdir tests/kernels \
        $(cat "$f") > "$f.log" 2>&1; echo "exit=$?" >> "$f.log" ) &
  done
  wait
  cat /tmp/kshard_*.log > "$OUT/tests.log"
  echo "== tests: $(wc -l < /tmp/kernel_test_ids) collected, done after $(( $(date +%s) - T0 ))s"
  grep -hE "^(FAILED|ERROR)|passed|failed|exit=" /tmp/kshard_*.log
fi

timeout "${BENCH_TIMEOUT:-330}" python3 bench/attention.py \
  ${BENCH_ARGS:---checks --profile --sweep --fla-head-dims 64 --budget-s 150 --fla-budget-s 240} --out "$OUT/bench.json" \
  > "$OUT/bench.log" 2>&1
echo "== bench exit=$? after $(( $(date +%s) - T0 ))s"
grep -E "^checks|Error|error" "$OUT/bench.log" | head -20
grep -E "^(linear|hybrid)_T" "$OUT/bench.log"
sed -n '/^fwd+bwd ms/,$p' "$OUT/bench.log"
