#!/usr/bin/env bash
# call 1 (2026-12-04 second session): TTT_ROWS_PER_FORWARD time/memory on last session's artifact (80-step eager
# default model), val cut to its first 78 docs; a real CUDA OOM (process capped at 20 % of the GPU) for the fallback.
# Also stages the first half of FA4's cu13 wheel for call 2.
set -o pipefail; export PYTHONUNBUFFERED=1
mkdir -p /tmp/stage /tmp/r && cp .carry/c1/cu13.part_aa .carry/c1/*.whl /tmp/stage/ && ls -la /tmp/stage
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/w/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u +%T
A=(.carry/art/final_model.ptz --data-path .carry/ttt --tokenizer .carry/ttt/tokenizer.model --modes phased --set VAL_MAX_TOKENS=143944 --set NGRAM_TILT_ENABLED=1)
for r in 0 32; do
  timeout -k 10 150 python3 -u bench/bench_ttt.py "${A[@]}" --set TTT_ROWS_PER_FORWARD=$r --out /tmp/r/rows$r > /tmp/r/rows$r.out 2>&1
  echo "rows$r rc=$? $(date -u +%T)"; grep "event:bench_ttt\|ttt_oom" /tmp/r/rows$r.out | cut -c1-300
done
timeout -k 10 170 python3 -u -c "import sys, runpy, torch; torch.cuda.set_per_process_memory_fraction(0.2); print('memory cap GiB', 0.2 * torch.cuda.get_device_properties(0).total_memory / 2**30); sys.argv = ['bench/bench_ttt.py'] + sys.argv[1:]; runpy.run_path('bench/bench_ttt.py', run_name='__main__')" "${A[@]}" --out /tmp/r/oom20 > /tmp/r/oom20.out 2>&1
echo "oom20 rc=$? $(date -u +%T)"; grep "memory cap\|event:bench_ttt\|ttt_oom\|Error" /tmp/r/oom20.out | cut -c1-300
tar czf $OUT/rows.tgz -C /tmp r
