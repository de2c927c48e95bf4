#!/usr/bin/env bash
# call 4: TRAIN_SEQ_SCHEDULE 1024 -> 2048 -> 3072 on a small compiled model (no FA4 on this machine: SDPA / FlexAttention):
# recompiles after the warmup (expect 0: each (length, loop mode) of the plan is warmed before the clock) and ms/step
# per length; DOC_ATTENTION=0 then 1.
set -o pipefail; export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/w/*.whl || exit 1
export PYTHONPATH=/tmp/site
D=.carry/vsrec_sp8192; mkdir -p /tmp/prog
for doc in 0 1; do
  date -u +%T
  TORCH_LOGS=recompiles DOC_ATTENTION=$doc NUM_LAYERS=4 MODEL_DIM=256 NUM_HEADS=4 NUM_KV_HEADS=2 LOOP_START=1 LOOP_END=2 \
    PARALLEL_START_LAYER=3 TRAIN_BATCH_TOKENS=61440 GRAD_ACCUM_STEPS=1 ITERATIONS=60 MAX_WALLCLOCK_SECONDS=0 WARMUP_STEPS=2 \
    TRAIN_SEQ_SCHEDULE=1024@0,2048@0.3,3072@0.6 TTT_ENABLED=0 QUANT=rtn TRAIN_LOG_EVERY=1 VAL_LOSS_EVERY=0 SLIDING_EVAL=0 \
    NGRAM_TILT_ENABLED=0 VAL_MAX_TOKENS=65536 DATA_PATH=$D TOKENIZER_PATH=$D/tokenizer.model RUN_DIR=/tmp/prog/doc$doc \
    timeout -k 10 ${PROG_T:-150} python3 -u train_gpt.py > /tmp/prog/doc$doc.out 2>&1
  echo "doc$doc rc=$? $(date -u +%T)"
  python3 - /tmp/prog/doc$doc.out <<'PY'
import re, statistics, sys
lines = open(sys.argv[1]).read().splitlines()
w = next((i for i, l in enumerate(lines) if l.startswith('event:warmup')), None)
print('warmup:', lines[w][:200] if w is not None else None)
rec = [i for i, l in enumerate(lines) if 'Recompiling' in l]
print('recompiles before warmup end:', sum(i < (w if w is not None else 10**9) for i in rec), 'after:', sum(w is not None and i > w for i in rec))
print('\n'.join(l[:200] for l in lines if l.startswith(('event:seq_len', 'event:layer_loop', 'event:stop', 'event:error', 'event:env'))))
ms, L = {}, None
for l in lines:
    m = re.match(r'event:seq_len step:\d+ seq_len:(\d+)', l)
    if m: L = m.group(1)
    m = re.match(r'event:train step:(\d+) .*ms_step:([\d.]+)', l)
    if m and L: ms.setdefault(L, []).append(float(m.group(2)))
print('ms/step median per length:', {k: round(statistics.median(v[1:] or v), 2) for k, v in ms.items()}, 'max:', {k: round(max(v[1:] or v), 1) for k, v in ms.items()})
for i in rec:
    if w is not None and i > w: print(lines[i][:300])
PY
done
tar czf $OUT/prog.tgz -C /tmp prog
