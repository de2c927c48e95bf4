#!/usr/bin/env bash
# call B: issue-18 eval-side levers on call A's artifact (80 steps, COMPILE=0, SDPA), val cut before its two longest docs
set -o pipefail; export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site
date -u +%T
export ARTIFACT=.carry/art/final_model.ptz TTT_T=${TTT_T:-150} TTT_COMMON=${TTT_COMMON:-VAL_MAX_TOKENS=143944}
export TTT_VARIANTS=${TTT_VARIANTS:-"base: ngram:NGRAM_TILT_ENABLED=1 noqv075:TTT_MASK=no_qv,TTT_LOCAL_LR_MULT=0.75 ctx2560:EVAL_SEQ_LEN=2560,TTT_EVAL_SEQ_LEN=2560 chunks:TTT_CHUNK_SCHEDULE=256:8,2000:24 p64:TTT_DOCS_PER_BATCH=32,PHASED_TTT_PREFIX_DOCS=64 asym_p64:ASYM_LOGIT_RESCALE=1,TTT_DOCS_PER_BATCH=32,PHASED_TTT_PREFIX_DOCS=64"}
timeout -k 10 ${ALL_T:-560} bash bench/run_levers.sh /tmp/lev .carry/ttt .carry/ttt/tokenizer.model 2>&1 | tee $OUT/run.log
date -u +%T
tar czf $OUT/lev.tgz -C /tmp lev
