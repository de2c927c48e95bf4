#!/usr/bin/env bash
# Same behaviour before/after a refactor, on a CPU: run a set of tiny configs (PRESET=smoke, 12 steps) in two
# checkouts and compare, per config, the stored tensors of final_model.ptz and every logged loss / val_bpb.
#   bash bench/same_behaviour.sh OLD_CHECKOUT NEW_CHECKOUT OUT_DIR      (about 10 min on 2 cores)
# The stored config may differ (new fields); the tensors and the losses must not.
set -u
OLD=$(realpath "$1"); NEW=$(realpath "$2"); OUT=$(realpath -m "$3"); mkdir -p "$OUT"
HERE=$(dirname "$(realpath "$0")")
CONFIGS=("base" "doc DOC_ATTENTION=1" "noloop NUM_LOOPS=0 PARALLEL_START_LAYER=0" "ttt TTT_ENABLED=1 TTT_MODE=phased"
         "tttc TTT_ENABLED=1 TTT_MODE=chunked" "lqer LQER_ENABLED=1 LQER_RANK=2 GATE_QUANT_INT8=0" "pg COMPRESSOR=pergroup")
status=0
for c in "${CONFIGS[@]}"; do
  set -- $c; name=$1; shift
  for side in old new; do
    repo=$OLD; [ $side = new ] && repo=$NEW
    d=$OUT/$side/$name; rm -rf "$d"; mkdir -p "$OUT/$side"
    (cd "$repo" && env PRESET=smoke RUN_DIR="$d" ITERATIONS=12 TRAIN_LOG_EVERY=3 VAL_MAX_TOKENS=4096 "$@" \
       python3 train_gpt.py > "$d.out" 2>&1) || { echo "$name: $side run failed (see $d.out)"; status=1; }
  done
  losses() { grep -o " loss:[0-9.]*\|val_bpb:[0-9.]*" "$1/train.log"; }
  same_losses=$(diff <(losses "$OUT/old/$name") <(losses "$OUT/new/$name") > /dev/null && echo 1 || echo 0)
  tensors=$(python3 "$HERE/compare_artifacts.py" "$OUT/old/$name/final_model.ptz" "$OUT/new/$name/final_model.ptz" "$NEW")
  echo "config:$name same_losses:$same_losses $tensors"
  [ "$same_losses" = 1 ] && [[ $tensors == *"same_tensors:1"* ]] || status=1
done
exit $status
