#!/usr/bin/env bash
# One call on a lent GPU machine: install this checkout, run the `cuda` tests, run every
# benchmark, and leave the results under $OUT (a log and one tarball of JSON files).
#   usage (from the repo root):  OUT=/some/dir bash benchmarks/gpu_check.sh [bench names...]
# The machine already has torch, triton, transformers, scikit-learn and pytest.
set -uo pipefail
OUT=${OUT:-/tmp/igpt-gpu}
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1
log="$OUT/log.txt"
exec > >(tee -a "$log") 2>&1

echo "== $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null) on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
time pip install -q --no-build-isolation --no-deps -e . || { echo "install failed"; exit 1; }

echo "== cuda tests"
timeout 240 python -m pytest -q -m cuda -x tests --junitxml="$OUT/results/cuda-tests.xml"
echo "cuda tests rc=$?"

echo "== benchmarks"
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  names=(attention ln_mlp palette train probe sample)
fi
for name in "${names[@]}"; do
  [ -f "benchmarks/bench_$name.py" ] || { echo "no benchmark $name"; continue; }
  echo "-- $name"
  timeout 150 igpt bench "$name" --out "$OUT/results"
  echo "$name rc=$?"
done
tar -czf "$OUT/results.tar.gz" -C "$OUT" results && rm -rf "$OUT/results"
echo "== done $(date -u +%FT%TZ)"
