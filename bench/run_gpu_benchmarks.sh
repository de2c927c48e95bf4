#!/usr/bin/env bash
# Run the GPU benchmarks in sequence, everything under one output folder (~8 min on one H100).
#
#   bash bench/run_gpu_benchmarks.sh OUT_DIR [extra --set KEY=VAL args for bench_speed]
#
# OUT_DIR/env.txt                 nvidia-smi, torch / triton / python versions
# OUT_DIR/speed/                  bench_speed.{log,json,md}, bench_speed_profile.{json,md}, stdout.txt
# OUT_DIR/features/               bench_features.{log,json,md}, stdout.txt
# OUT_DIR/SUMMARY.md              the markdown snippets concatenated
#
# Knobs (env): BENCH_BUDGET_S (total wall budget, default 540), SPEED_TIMEOUT_S (default 330),
# SPEED_STEPS (timed steps per loop mode, default 8), FEATURE_STEPS (default 8), PYTHON (default python3).
# A benchmark that hits its timeout still leaves the JSON/markdown written so far (written after every stage).
set -u
OUT="${1:?usage: bash bench/run_gpu_benchmarks.sh OUT_DIR [--set KEY=VAL ...]}"
shift
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
BUDGET="${BENCH_BUDGET_S:-540}"
SPEED_TIMEOUT="${SPEED_TIMEOUT_S:-330}"
T0=$(date +%s)
mkdir -p "$OUT/speed" "$OUT/features"
RC=0

{
  date -u
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())'
  "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1 || true
  "$PY" -c 'import train_gpt; print("train_gpt", train_gpt.__file__, "flash_attn", train_gpt.FLASH_ATTN)' 2>&1
  echo "PYTHONPATH=${PYTHONPATH:-}"
  git rev-parse HEAD 2>/dev/null && git status --short 2>/dev/null | head -20
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "=== bench_speed (timeout ${SPEED_TIMEOUT}s) ==="
timeout -k 15 "$SPEED_TIMEOUT" "$PY" -u bench/bench_speed.py --out "$OUT/speed" --set WARMUP_STEPS=2 \
  --steps "${SPEED_STEPS:-8}" --profile "$@" 2>&1 | tee "$OUT/speed/stdout.txt"
rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && { echo "bench_speed exit $rc"; RC=$rc; }

LEFT=$(( BUDGET - ($(date +%s) - T0) ))
if [ "$LEFT" -gt 60 ]; then
  echo "=== bench_features (timeout ${LEFT}s) ==="
  timeout -k 15 "$LEFT" "$PY" -u bench/bench_features.py --out "$OUT/features" --budget-s $(( LEFT - 20 )) \
    --steps "${FEATURE_STEPS:-8}" 2>&1 | tee "$OUT/features/stdout.txt"
  rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && { echo "bench_features exit $rc"; RC=$rc; }
else
  echo "bench_features skipped: only ${LEFT}s of the ${BUDGET}s budget left"
fi

{
  echo "# GPU benchmarks $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo '```'; head -40 "$OUT/env.txt" | grep -v '^$'; echo '```'
  for f in "$OUT/speed/bench_speed.md" "$OUT/speed/bench_speed_profile.md" "$OUT/features/bench_features.md"; do
    [ -f "$f" ] && { echo; cat "$f"; }
  done
} > "$OUT/SUMMARY.md"
echo "=== done in $(( $(date +%s) - T0 ))s (exit $RC); summary: $OUT/SUMMARY.md ==="
exit $RC
