#!/usr/bin/env bash
# call 3 (FA4 installed by call 2 on this warm machine): ours at the same shape and data, with recompile logging
# (the cu_seqlens dynamic mark: no recompile after the warmup); then a small compiled model through a
# TRAIN_SEQ_SCHEDULE 1024 -> 2048 -> 3072 with DOC_ATTENTION=1 (each length warmed before the clock).
set -o pipefail; export PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/fa4/site-packages:/tmp/fa4/site-packages/nvidia_cutlass_dsl/dsl_packages
python3 -c "import flash_attn.cute" || { echo "FA4 not installed on this machine (call 2 did not run here)"; exit 5; }
date -u +%T
TORCH_LOGS=recompiles timeout -k 10 ${OURS_T:-330} python3 -u bench/bench_vs_record.py --out /tmp/vs_ours --data .carry/vsrec_sp8192 \
  --record .carry/records/pr1855_train_gpt.py --parts speed --which ours --speed-steps 50 --speed-log-every 2 --timeout ${OURS_T:-320} 2>&1 | tail -12
echo "ours recompiles (all): $(grep -c 'Recompiling' /tmp/vs_ours/bench_vs_record_runs.log)"
date -u +%T
D=.carry/vsrec_sp8192
TORCH_LOGS=recompiles ATTN_BACKEND=fa4 DOC_ATTENTION=1 NUM_LAYERS=4 MODEL_DIM=256 NUM_HEADS=4 NUM_KV_HEADS=2 LOOP_START=1 LOOP_END=2 \
  PARALLEL_START_LAYER=3 TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1 ITERATIONS=60 MAX_WALLCLOCK_SECONDS=0 WARMUP_STEPS=2 \
  TRAIN_SEQ_SCHEDULE=1024@0,2048@0.3,3072@0.6 TTT_ENABLED=0 QUANT=rtn TRAIN_LOG_EVERY=1 VAL_LOSS_EVERY=0 DATA_PATH=$D \
  TOKENIZER_PATH=$D/tokenizer.model RUN_DIR=/tmp/vs_ours/prog timeout -k 10 ${PROG_T:-200} python3 -u train_gpt.py > /tmp/vs_ours/prog.out 2>&1
echo "prog rc=$? $(date -u +%T)"
python3 - <<'PY'
import re
lines = open('/tmp/vs_ours/prog.out').read().splitlines()
w = next((i for i, l in enumerate(lines) if l.startswith('event:warmup')), None)
print('warmup line:', lines[w][:300] if w is not None else None)
rec = [i for i, l in enumerate(lines) if 'Recompiling' in l]
print('recompiles before warmup end:', sum(i < (w or 0) for i in rec), 'after:', sum(i > (w or 10**9) for i in rec))
print('\n'.join(l[:200] for l in lines if l.startswith(('event:seq_len', 'event:layer_loop', 'event:stop', 'event:error'))))
steps = [l for l in lines if l.startswith('event:train ')]
print('\n'.join(l[:200] for l in steps[::3]))
print('\n'.join(l[:300] for l in lines if 'Recompiling' in l)[:3000])
PY
tar czf $OUT/vs_ours.tgz -C /tmp vs_ours
