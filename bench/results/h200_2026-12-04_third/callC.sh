#!/usr/bin/env bash
# call C: kernel profile of ours looping off at the 8xH100 per-GPU shape, no flash kernel (FlexAttention, block-level
# BlockMask), CE_KERNEL=triton then torch: what the fused CE kernel costs per step (record #1855's: 15.3 ms).
set -o pipefail; export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/pk .carry/c3/*.whl && export PYTHONPATH=/tmp/pk
for ce in triton torch; do
  date -u +%T
  timeout -k 5 ${T_ONE:-250} python3 -u bench/bench_speed.py --out $OUT/prof_ce_$ce --ref 0 --modes off --steps 4 --settle 1 \
    --profile --profile-mode off --profile-steps 2 --set WARMUP_STEPS=2 --set CE_KERNEL=$ce > $OUT/prof_ce_$ce.out 2>&1
  echo "ce=$ce rc=$?"; grep -E "Error|error|OutOfMemory" $OUT/prof_ce_$ce.out | tail -3; grep -E "ours_speed|ours_warmup" $OUT/prof_ce_$ce.out | cut -c1-200
done
date -u +%T
