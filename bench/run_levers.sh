#!/usr/bin/env bash
# Issue-18 levers on ONE GPU in one call, one process at a time (GPTQ loops or phased-TTT passes sharing a GPU stall:
# BENCHMARKS.md "Post-deadline levers"):
#   1. bench_quant.py: train the default config once, then quantize it every way of QUANT_VARIANTS (bytes + roundtrip
#      bpb on the same weights), and save the first variant's artifact;
#   2. bench_ttt.py on that artifact, no TTT and phased TTT, once per eval-side lever of TTT_VARIANTS;
#   3. OUT/LEVERS.md (bench/levers_table.py): one table per part (deltas against the first row).
#
#   bash bench/run_levers.sh OUT DATA_PATH TOKENIZER_PATH [extra bench_quant --set args]
#   LEVERS_TINY=1 bash bench/run_levers.sh OUT            # CPU check: the smoke preset and its own data
#
# Env knobs: ITERS (training steps, default 80: ~4 passes over the 0.9 M-token local sample, before it is memorized),
# TRAIN_TOKENS (tokens/step = one micro-batch, default 49152),
# QUANT_T / TTT_T (timeout per process, s; default 420 / 300), TTT_DOCS (TTT_DOCS_PER_BATCH, default: the config's),
# QUANT_VARIANTS / TTT_VARIANTS (space-separated NAME:K=V,K=V; an eval variant NAME@REF:... is compared with REF, not
# with the first row), TTT_COMMON (K=V,K=V added to every bench_ttt run, e.g.
# VAL_MAX_TOKENS=143944 to leave out the long documents that make one phased pass take minutes), ARTIFACT (an existing
# final_model.ptz: skip bench_quant and run only the eval side on it), PYTHON. A process that times out keeps its log;
# the next one still runs, and LEVERS.md lists what finished.
set -u
OUT="${1:?usage: bash bench/run_levers.sh OUT DATA_PATH TOKENIZER_PATH [--set K=V ...]}"; shift
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
QV=${QUANT_VARIANTS:-"base: awq:AWQ_LITE_ENABLED=1 calib16:GPTQ_CALIBRATION_BATCHES=16 lqer:LQER_ENABLED=1 lqer32:LQER_ENABLED=1,LQER_GROUP=32"}
if [ -n "${LEVERS_TINY:-}" ]; then
  TRAIN=(--tiny); D="$OUT/quant/smoke_data"; T="$D/smoke.model"; LONG=160; CHUNKS="64:8,200:16"
else
  D="${1:?DATA_PATH}"; T="${2:?TOKENIZER_PATH}"; shift 2
  TRAIN=(--set "DATA_PATH=$D" --set "TOKENIZER_PATH=$T" --set "TRAIN_BATCH_TOKENS=${TRAIN_TOKENS:-49152}" --set GRAD_ACCUM_STEPS=1
         --set "ITERATIONS=${ITERS:-80}" --set MAX_WALLCLOCK_SECONDS=0)
  LONG=2560; CHUNKS="256:8,2000:24"
fi
# AsymLogit's c+ / c- train only in global SGD phases, which the local val set's 200 documents never reach at the
# defaults (PHASED_TTT_PREFIX_DOCS=2500): asym runs with phases and is compared with the same settings alone
PHASES="phases:TTT_DOCS_PER_BATCH=32,PHASED_TTT_PREFIX_DOCS=64"; [ -n "${LEVERS_TINY:-}" ] && PHASES="phases:PHASED_TTT_PREFIX_DOCS=8"
TV=${TTT_VARIANTS:-"base: no_ngram:NGRAM_TILT_ENABLED=0 noqv075:TTT_MASK=no_qv,TTT_LOCAL_LR_MULT=0.75 ctx$LONG:EVAL_SEQ_LEN=$LONG,TTT_EVAL_SEQ_LEN=$LONG chunks:TTT_CHUNK_SCHEDULE=$CHUNKS $PHASES asym@phases:ASYM_LOGIT_RESCALE=1,${PHASES#*:}"}
# a variant's settings are split at the commas that start a new KEY= (so TTT_CHUNK_SCHEDULE=256:8,2000:24 stays whole)
sets() { [ -n "$1" ] && printf '%s\n' "$1" | sed -E 's/,([A-Z_][A-Z0-9_]*=)/\n\1/g' | while IFS= read -r kv; do printf -- '--set\n%s\n' "$kv"; done; }

if [ -n "${ARTIFACT:-}" ]; then
  ART="$ARTIFACT"; [ -f "$ART" ] || { echo "ARTIFACT=$ART: no such file" >&2; exit 2; }
else
  echo "=== bench_quant ($(date -u +%T), timeout ${QUANT_T:-420}s)"
  args=(); for v in $QV; do args+=(--variant "$v"); done
  timeout -k 15 "${QUANT_T:-420}" "$PY" -u bench/bench_quant.py --out "$OUT/quant" "${TRAIN[@]}" --save-artifact "${args[@]}" "$@" \
    > "$OUT/quant.out" 2>&1
  echo "bench_quant rc=$?"; grep "event:prequant\|event:variant\|event:error" "$OUT/quant.out"
  ART="$OUT/quant/final_model.ptz"
fi
if [ -f "$ART" ]; then
  for v in $TV; do
    name=${v%%:*}; name=${name%%@*}   # NAME@REF:SETTINGS: REF is only the table's reference row
    mapfile -t extra < <(sets "${TTT_COMMON:-}"; sets "${v#*:}"; [ -n "${TTT_DOCS:-}" ] && printf -- '--set\nTTT_DOCS_PER_BATCH=%s\n' "$TTT_DOCS")
    echo "=== bench_ttt $name ($(date -u +%T), timeout ${TTT_T:-300}s)"
    timeout -k 15 "${TTT_T:-300}" "$PY" -u bench/bench_ttt.py "$ART" --data-path "$D" --tokenizer "$T" --modes none,phased \
      "${extra[@]}" --out "$OUT/ttt_$name" > "$OUT/ttt_$name.out" 2>&1
    echo "bench_ttt $name rc=$?"; grep "event:bench_ttt" "$OUT/ttt_$name.out" | cut -c1-200
  done
else
  echo "no artifact from bench_quant: the eval-side levers are skipped"
fi

"$PY" bench/levers_table.py "$OUT" $(for v in $TV; do printf '%s ' "${v%%:*}"; done) > "$OUT/LEVERS.md"
cat "$OUT/LEVERS.md"
