#!/usr/bin/env bash
# call 2: FA4 install; issue 18 quantization levers on ONE trained full-size model (bench_quant, default config =
# DOC_ATTENTION=1 via FA4 varlen, local sp8192 sample) + QK_GAIN_INIT 5.0 vs 5.25 over 2 seeds (3 more trainings, base
# quantization only), all in parallel; and the cu_seqlens dynamic-mark recompile check (small model)
set -o pipefail; export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
. .carry/sh/fa4.sh || exit 1
D=.carry/ttt; mkdir -p /tmp/keep
TR="--set DATA_PATH=$D --set TOKENIZER_PATH=$D/tokenizer.model --set TRAIN_BATCH_TOKENS=49152 --set GRAD_ACCUM_STEPS=1 --set ITERATIONS=${ITERS:-250} --set MAX_WALLCLOCK_SECONDS=0 --set WARMUP_STEPS=2 --set TRAIN_LOG_EVERY=50"
date +%T
(timeout ${Q_T:-540} python3 bench/bench_quant.py --out $OUT/q_a $TR --save-artifact --threads 6 --variant base: --variant awq:AWQ_LITE_ENABLED=1 \
   --variant awq7:AWQ_LITE_ENABLED=1,AWQ_LITE_BITS=7 --variant calib32:GPTQ_CALIBRATION_BATCHES=32 --variant lqer:LQER_ENABLED=1 \
   --variant lqer32:LQER_ENABLED=1,LQER_GROUP=32 > $OUT/q_a.out 2>&1; echo q_a_rc=$?; cp $OUT/q_a/final_model.ptz /tmp/keep/ 2>/dev/null) &
for r in "qk525_s1337 QK_GAIN_INIT=5.25 SEED=1337" "qk500_s2 QK_GAIN_INIT=5.0 SEED=2" "qk525_s2 QK_GAIN_INIT=5.25 SEED=2"; do
  set -- $r; n=$1; shift
  (timeout ${Q_T:-540} python3 bench/bench_quant.py --out $OUT/$n $TR --set $1 --set $2 --variant base: > $OUT/$n.out 2>&1; echo ${n}_rc=$?) &
done
sleep 20
export ATTN_BACKEND=fa4 DOC_ATTENTION=1 NUM_LAYERS=4 MODEL_DIM=256 NUM_HEADS=4 NUM_KV_HEADS=2 LOOP_START=1 LOOP_END=2 PARALLEL_START_LAYER=3
RUN_DIR=$OUT/cuseq TORCH_LOGS=recompiles timeout ${T:-300} env TRAIN_BATCH_TOKENS=65536 GRAD_ACCUM_STEPS=1 ITERATIONS=40 MAX_WALLCLOCK_SECONDS=0 \
  WARMUP_STEPS=2 TTT_ENABLED=0 QUANT=rtn VAL_MAX_TOKENS=65536 TRAIN_LOG_EVERY=1 DATA_PATH=$D TOKENIZER_PATH=$D/tokenizer.model \
  python3 train_gpt.py 2>&1 | grep -v "UserWarning\|^  \|aux_data" > $OUT/cuseq.log
unset ATTN_BACKEND DOC_ATTENTION NUM_LAYERS MODEL_DIM NUM_HEADS NUM_KV_HEADS LOOP_START LOOP_END PARALLEL_START_LAYER
echo cuseq_recompiles_after_warmup=$(awk '/event:warmup /{w=1} w && /Recompiling/' $OUT/cuseq.log | wc -l) all=$(grep -c Recompiling $OUT/cuseq.log)
grep "event:warmup\|event:stop\|event:env\|event:error" $OUT/cuseq.log | cut -c1-250
awk '/event:train /' $OUT/cuseq.log | awk '{for(i=1;i<=NF;i++) if($i ~ /^ms_step:/) print $i}' | sort -t: -k2 -n | tail -3
date +%T; wait; date +%T
for f in $OUT/*.out; do echo "== $f"; grep "event:prequant\|event:variant\|event:packed\|event:stop\|event:warmup\|Error\|error" $f | cut -c1-260; done
nvidia-smi --query-gpu=memory.used --format=csv; ls -la /tmp/keep
