#!/usr/bin/env bash
# One call on a lent GPU machine: install this checkout, run the `cuda` tests, run the
# benchmarks, and leave the results under $OUT (log.txt and results.tar.gz of JSON/markdown).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh [bench names...]     (from the repo root)
#
# The whole script keeps within BUDGET_S seconds (default 540, under the device tool's
# 10-minute command limit): each step gets what is left, and a step with too little time
# left is skipped and says so. Benchmarks run with --quick unless FULL=1.
# The machine already has torch, triton, transformers, scikit-learn and pytest.
set -uo pipefail
OUT=${OUT:-/tmp/igpt-gpu}
BUDGET_S=${BUDGET_S:-540}
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1
t0=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - t0))); }

echo "== $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
pip install -q --no-build-isolation --no-deps -e . || { echo "install failed"; exit 1; }
echo "installed after $(( $(date +%s) - t0 )) s"

echo "== cuda tests"
# Default kernel configs only: autotuning every config would spend the budget compiling.
IGPT_ATTENTION_AUTOTUNE=0 IGPT_LN_MLP_AUTOTUNE=0 timeout $(( $(left) < 240 ? $(left) : 240 )) \
  python -m pytest -q -m cuda tests --junitxml="$OUT/results/cuda-tests.xml"
echo "cuda tests rc=$?"

echo "== benchmarks"
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(attention ln_mlp palette train probe sample)
quick=(--quick); [ "${FULL:-0}" = 1 ] && quick=()
for name in "${names[@]}"; do
  [ -f "benchmarks/bench_$name.py" ] || { echo "no benchmark $name"; continue; }
  t=$(( $(left) - 20 ))
  if [ "$t" -lt 30 ]; then echo "-- $name skipped: budget spent"; continue; fi
  echo "-- $name (up to $t s)"
  timeout "$t" igpt bench "$name" --out "$OUT/results" "${quick[@]}"
  echo "$name rc=$?"
done
tar -czf "$OUT/results.tar.gz" -C "$OUT" results && rm -rf "$OUT/results"
echo "== done $(date -u +%FT%TZ) after $(( $(date +%s) - t0 )) s"
