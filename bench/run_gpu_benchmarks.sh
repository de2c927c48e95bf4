#!/usr/bin/env bash
# Run the GPU benchmarks in sequence; everything lands flat in OUT_DIR (8 files, ~8 min on one H100).
#
#   bash bench/run_gpu_benchmarks.sh OUT_DIR [extra bench_speed args, e.g. --set NUM_LOOPS=0]
#
# OUT_DIR/SUMMARY.md                    environment + both markdown snippets (incl. the kernel profile)
# OUT_DIR/stdout.txt                    environment, all stdout/stderr of both benchmarks
# OUT_DIR/bench_speed.{log,json,md}     speed of ours (loop off / on / time-weighted) vs reference, MFU, profile
# OUT_DIR/bench_features.{log,json,md}  per-feature ms/step deltas (eager) + attention microbenchmark
#
# Env knobs: BENCH_BUDGET_S (total wall budget, default 500), SPEED_TIMEOUT_S (default 330),
# SPEED_STEPS (timed steps per loop mode, default 8), FEATURE_STEPS (default 8), PYTHON (default python3),
# FEATURE_ARGS (extra bench_features args, e.g. "--rows base,loops_off"), BENCH_TINY=1 (pass --tiny to
# both: a CPU check of this script).
# Both scripts rewrite their JSON/markdown after every stage, so a timeout keeps what was measured.
set -u
OUT="${1:?usage: bash bench/run_gpu_benchmarks.sh OUT_DIR [extra bench_speed args]}"
shift
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
BUDGET="${BENCH_BUDGET_S:-500}"
SPEED_TIMEOUT="${SPEED_TIMEOUT_S:-330}"
T0=$(date +%s)
mkdir -p "$OUT"
LOG="$OUT/stdout.txt"
: > "$LOG"
RC=0
TINY=()
[ -n "${BENCH_TINY:-}" ] && TINY=(--tiny)

ENV_TXT=$(
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 || echo "nvidia-smi: not available"
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())' 2>&1
  "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1 | tail -1
  echo "PYTHONPATH=${PYTHONPATH:-}"
  echo "git $(git rev-parse --short HEAD 2>/dev/null) $(git status --short 2>/dev/null | wc -l) changed files"
)
echo "$ENV_TXT" | tee -a "$LOG"

echo "=== bench_speed (timeout ${SPEED_TIMEOUT}s) ===" | tee -a "$LOG"
timeout -k 15 "$SPEED_TIMEOUT" "$PY" -u bench/bench_speed.py "${TINY[@]}" --out "$OUT" --set WARMUP_STEPS=2 \
  --steps "${SPEED_STEPS:-8}" --profile "$@" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && { echo "bench_speed exit $rc" | tee -a "$LOG"; RC=$rc; }

LEFT=$(( BUDGET - ($(date +%s) - T0) ))
if [ "$LEFT" -gt 60 ]; then
  echo "=== bench_features (timeout ${LEFT}s) ===" | tee -a "$LOG"
  timeout -k 15 "$LEFT" "$PY" -u bench/bench_features.py "${TINY[@]}" --out "$OUT" --budget-s $(( LEFT - 15 )) \
    --steps "${FEATURE_STEPS:-8}" ${FEATURE_ARGS:-} 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && { echo "bench_features exit $rc" | tee -a "$LOG"; RC=$rc; }
else
  echo "bench_features skipped: only ${LEFT}s of the ${BUDGET}s budget left" | tee -a "$LOG"
fi

{
  echo "# GPU benchmarks $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo '```'; echo "$ENV_TXT"; echo '```'
  for f in "$OUT/bench_speed.md" "$OUT/bench_features.md"; do
    [ -f "$f" ] && { echo; cat "$f"; }
  done
} > "$OUT/SUMMARY.md"
echo "=== done in $(( $(date +%s) - T0 ))s (exit $RC); summary: $OUT/SUMMARY.md ===" | tee -a "$LOG"
exit $RC
