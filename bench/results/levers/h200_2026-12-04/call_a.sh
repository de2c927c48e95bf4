#!/usr/bin/env bash
# call A: issue-18 quantization levers (bench_quant, 5 variants, one trained model) + eval levers base/ngram on its artifact
set -o pipefail; export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.used,clocks.sm,clocks.max.sm --format=csv
date -u +%T
export ITERS=${ITERS:-80} QUANT_T=${QUANT_T:-330} TTT_T=${TTT_T:-200}
export TTT_VARIANTS=${TTT_VARIANTS:-"base: ngram:NGRAM_TILT_ENABLED=1"}
timeout -k 10 ${ALL_T:-555} bash bench/run_levers.sh /tmp/lev .carry/ttt .carry/ttt/tokenizer.model \
  --set COMPILE=0 --set ATTN_BACKEND=sdpa --set DOC_ATTENTION=0 2>&1 | tee $OUT/run.log
date -u +%T
[ -f /tmp/lev/quant/final_model.ptz ] && cp /tmp/lev/quant/final_model.ptz $OUT/
tar czf $OUT/lev.tgz --exclude final_model.ptz -C /tmp lev
ls -la $OUT
