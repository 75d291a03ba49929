#!/usr/bin/env bash
# One call on a lent GPU machine: install this checkout, run `igpt selftest` (every kernel
# against PyTorch), run the `cuda` tests, run every benchmark, and bring back at most 8 files
# under $OUT:
#
#   log.txt          everything printed, in order
#   selftest.json    `igpt selftest --json`: each kernel's errors against PyTorch's, verdicts
#   info.txt         nvidia-smi, versions, `igpt info` (backends, quantizer module)
#   cuda-tests.xml   JUnit XML of the `cuda` tests (failures carry their tracebacks)
#   cuda-failures.txt  the failing tests' tracebacks, long form (empty when all pass)
#   autotune.jsonl   every config the Triton autotuner timed (ms), and the one it kept
#   dispatch.json    what backend="auto" measured and chose, per shape key
#   results.tar.gz   each benchmark's JSON and Markdown rows
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh [bench names...]     (from the repo root)
#   DRY_RUN=1 OUT=/tmp/x bash benchmarks/gpu_check.sh               (rehearsal on a CPU)
#
# The whole script keeps within BUDGET_S seconds (default 540, under the device tool's
# 10-minute command limit): each step gets what is left, and a step with too little time
# left is skipped and says so. Benchmarks run with --quick unless FULL=1. DRY_RUN=1 skips
# the install and nvidia-smi, collects the cuda tests without running them and runs the
# benchmarks' CPU plumbing (--dry-run where a script has it, --help elsewhere), so a typo
# here shows on a CPU machine instead of costing GPU time.
# The GPU machine already has torch, triton, transformers, scikit-learn and pytest.
set -uo pipefail
OUT=${OUT:-/tmp/igpt-gpu}
BUDGET_S=${BUDGET_S:-540}
DRY_RUN=${DRY_RUN:-0}
PY=${PYTHON:-python}
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1
export IGPT_CACHE="$OUT/cache"                  # JIT extension + dispatch cache, fresh per run
export XDG_CACHE_HOME="$OUT/cache"
exec > >(tee -a "$OUT/log.txt") 2>&1
t0=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - t0))); }
cap() { local t; t=$(left); echo $(( t < $1 ? t : $1 )); }

echo "== $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null) dry_run=$DRY_RUN"
{
  if [ "$DRY_RUN" = 1 ]; then echo "nvidia-smi: skipped (dry run)"; else nvidia-smi; fi
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/info.txt" 2>&1
cat "$OUT/info.txt"
if [ "$DRY_RUN" != 1 ]; then
  $PY -m pip install -q --no-build-isolation --no-deps -e . || { echo "install failed"; exit 1; }
fi
echo "installed after $(( $(date +%s) - t0 )) s"

echo "== igpt selftest"
# First, so that a kernel that is wrong on this GPU shows before anything else runs; its
# verdicts go into the dispatch cache that the benchmarks' backend="auto" then reads.
# Default kernel configs (IGPT_AUTOTUNE=0), as the cuda tests: autotuning would compile all.
IGPT_AUTOTUNE=0 timeout "$(cap 150)" $PY -m igpt selftest --json "$OUT/selftest.json"
echo "selftest rc=$?"
$PY -m igpt info >> "$OUT/info.txt" 2>&1; tail -n 12 "$OUT/info.txt"

collect=(); [ "$DRY_RUN" = 1 ] && collect=(--collect-only -q)
echo "== the judge on the real kernels"
# Next: the judge against our compiled kernels with one fault put around them, and the real
# kernels on random calls (tests/test_trust.py's cuda tests): a judge that passes a wrong
# kernel, or rejects a right one, on real rounding is worth knowing before any figure.
timeout "$(cap 150)" $PY -m pytest -q -m cuda tests/test_trust.py -p no:cacheprovider -rf \
  --tb=short "${collect[@]}" 2>&1 | tail -n 40
echo "judge tests rc=${PIPESTATUS[0]}"

echo "== cuda tests"
# Default kernel configs only: autotuning every config would spend the budget compiling.
IGPT_AUTOTUNE=0 timeout "$(cap 240)" $PY -m pytest -q -m cuda tests -p no:cacheprovider \
  --junitxml="$OUT/cuda-tests.xml" -rf --tb=long "${collect[@]}" > "$OUT/cuda-pytest.txt" 2>&1
echo "cuda tests rc=$?"
tail -n 25 "$OUT/cuda-pytest.txt"
# The long tracebacks of failures only (pytest prints them between these banners).
sed -n '/^=* FAILURES =*$/,/^=* short test summary/p' "$OUT/cuda-pytest.txt" > "$OUT/cuda-failures.txt"
rm -f "$OUT/cuda-pytest.txt"

echo "== benchmarks"
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(attention judge ln_mlp palette train hf_patch probe sample data)
quick=(--quick); [ "${FULL:-0}" = 1 ] && quick=()
export TRITON_PRINT_AUTOTUNING=1 IGPT_AUTOTUNE_LOG="$OUT/autotune.jsonl"
for name in "${names[@]}"; do
  script="benchmarks/bench_$name.py"
  [ -f "$script" ] || { echo "no benchmark $name"; continue; }
  t=$(( $(left) - 30 ))
  if [ "$t" -lt 30 ]; then echo "-- $name skipped: budget spent"; continue; fi
  echo "-- $name (up to $t s)"
  if [ "$DRY_RUN" = 1 ]; then
    if grep -q -- "--dry-run" "$script"; then args=(--dry-run --out "$OUT/results"); else args=(--help); fi
    timeout "$t" $PY "$script" "${args[@]}" > /dev/null
  else
    timeout "$t" $PY "$script" --out "$OUT/results" "${quick[@]}"
  fi
  echo "$name rc=$?"
done
unset TRITON_PRINT_AUTOTUNING IGPT_AUTOTUNE_LOG
touch "$OUT/autotune.jsonl"
$PY -c "import json, igpt_kernels; print(json.dumps(igpt_kernels.dispatch_table(), indent=1))" \
  > "$OUT/dispatch.json" 2>&1 || echo "dispatch table unavailable"
tar -czf "$OUT/results.tar.gz" -C "$OUT" results && rm -rf "$OUT/results"
rm -rf "$OUT/cache"
echo "== done $(date -u +%FT%TZ) after $(( $(date +%s) - t0 )) s"
