#!/usr/bin/env bash
# Three seeds of a small local-sample config, run with the PACKED train_gpt.py (the file a submission
# ships), in parallel on one GPU. Used to produce the example folder under records/ (a local sample,
# not FineWeb, not a leaderboard claim). Usage: bash bench/run_records_demo.sh OUT_DIR DATA_DIR TOKENIZER
set -euo pipefail
OUT=${1:?out dir}; DATA=$(realpath "${2:?data dir}"); TOK=$(realpath "${3:?tokenizer}")
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
python3 "$REPO/tools/pack_code.py" "$REPO/train_gpt.py" -o "$WORK/train_gpt.py"
cd "$WORK"
for SEED in 1 2 3; do
  SEED=$SEED RUN_ID=demo_seed$SEED DATA_PATH=$DATA TOKENIZER_PATH=$TOK COMPILE=0 NUM_LAYERS=9 MLP_MULT=3 \
  NUM_LOOPS=1 LOOP_START=3 LOOP_END=4 PARALLEL_START_LAYER=7 TRAIN_BATCH_TOKENS=131072 \
  MAX_WALLCLOCK_SECONDS=90 GPTQ_RESERVE_SECONDS=15 WARMUP_STEPS=2 TRAIN_LOG_EVERY=5 PYTHONUNBUFFERED=1 \
    python3 train_gpt.py > "$WORK/seed$SEED.out" 2>&1 &
done
wait || true
tail -n 4 "$WORK"/seed*.out
tar czf "$OUT/demo_runs.tgz" --exclude='*.ptz' -C "$WORK" runs seed1.out seed2.out seed3.out
ls -la "$WORK"/runs/*/
