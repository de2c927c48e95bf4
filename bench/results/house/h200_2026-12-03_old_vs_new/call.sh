#!/usr/bin/env bash
# call 1: stage FA4's big .so (background); issue 17 OLD (9649489) vs NEW (HEAD) bench_speed, same kernel (cuDNN SDPA,
# DOC_ATTENTION=0), one after the other; then the progressive-context / TTT-chunk recompile check (smoke size)
set -o pipefail; export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site
mkdir -p /tmp/stage && (xz -dc .carry/fa4a/ir.xz > /tmp/stage/ir && echo staged > /tmp/stage/ok) &
nvidia-smi --query-gpu=name,memory.used,clocks.sm,clocks.max.sm --format=csv
COMMON="--ref 0 --steps 6 --set WARMUP_STEPS=2 --set ATTN_BACKEND=sdpa --set DOC_ATTENTION=0"
for side in old new; do
  date +%T; dir=.; [ $side = old ] && dir=.carry/old
  (cd $dir && python3 -c "import sys; sys.path.insert(0,'.'); import train_gpt, hashlib; print('side:$side train_gpt', train_gpt.__file__, hashlib.sha256(open(train_gpt.__file__,'rb').read()).hexdigest()[:12])"
   timeout ${BS_T:-240} python3 bench/bench_speed.py --out $OUT/$side $COMMON 2>&1 | grep -v "^ " | tail -22)
done
date +%T
export PRESET=smoke COMPILE=1 TRAIN_SEQ_SCHEDULE=128@0,256@0.3,384@0.6 TRAIN_BATCH_TOKENS=3072 EVAL_SEQ_LEN=384 ITERATIONS=60 \
  WARMUP_STEPS=2 TTT_ENABLED=1 TTT_COMPILE=1 TTT_EVAL_SEQ_LEN=384 TTT_CHUNK_SIZE=32 TTT_CHUNK_SCHEDULE=64:8,200:16 \
  TTT_DOCS_PER_BATCH=16 PHASED_TTT_PREFIX_DOCS=32 PHASED_TTT_NUM_PHASES=1 TTT_LORA_RANK=8 GLOBAL_TTT_CHUNK_TOKENS=2048 \
  DATA_PATH=/tmp/pcdata TOKENIZER_PATH=/tmp/pcdata/smoke.model
RUN_DIR=$OUT/pc TORCH_LOGS=recompiles timeout ${PC_T:-170} python3 train_gpt.py > $OUT/pc.log 2>&1; echo pc_rc=$?
echo train_recompiles=$(awk '/event:warmup /{w=1} /event:stop /{w=0} w && /Recompiling/' $OUT/pc.log | wc -l) \
     ttt_recompiles=$(awk '/event:ttt_warmup /{w=1} /event:ttt /{w=0} w && /Recompiling/' $OUT/pc.log | wc -l) \
     all_recompiles=$(grep -c Recompiling $OUT/pc.log)
grep "event:warmup\|event:seq_len\|event:stop\|event:ttt_warmup\|event:ttt \|event:done\|event:error" $OUT/pc.log | cut -c1-250
date +%T; wait; ls -la /tmp/stage
