#!/usr/bin/env bash
# call B2 (same warm machine as B1): finish the FA4 install (second half of the cu13 wheel), then record #1855 and
# ours at the 8xH100 per-GPU shape (786,432 tok/step = 8 x 98,304), both through FA4, with kernel profiles of two
# steps looping off and two looping on (bench_vs_record --profile; the kernel tables land in bench_vs_record.json).
set -o pipefail; export PYTHONUNBUFFERED=1
ls /tmp/stage/cu13.part_aa >/dev/null || { echo "call B1's staging is not on this machine"; exit 3; }
W=/tmp/stage/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
cat /tmp/stage/cu13.part_aa .carry/c2/cu13.part_ab > $W || exit 3
echo "cu13 $(sha256sum $W | cut -c1-64) expected $(cat .carry/c2/cu13.sha256)"
rm /tmp/stage/cu13.part_aa
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fa4/site-packages /tmp/stage/*.whl || exit 4
export PYTHONPATH=/tmp/fa4/site-packages:/tmp/fa4/site-packages/nvidia_cutlass_dsl/dsl_packages
python3 -c "import flash_attn.cute as f; print('fa4 import ok', f.__file__)" || exit 5
for which in record ours; do
  date -u +%T
  [ $which = record ] && T=${REC_T:-360} || T=${OURS_T:-200}
  timeout -k 10 $((T + 5)) python3 -u bench/bench_vs_record.py --out $OUT/vs_$which --data .carry/vsrec_sp8192 \
    --record .carry/records/pr1855_train_gpt.py --parts speed --which $which --speed-steps 20 --speed-log-every 1 \
    --record-set WARMUP_STEPS=0 --profile 6:8,16:18 --timeout $T 2>&1 | tail -8 | cut -c1-400
  tar czf $OUT/vs_${which}_runs.tgz -C $OUT/vs_$which runs 2>/dev/null
done
date -u +%T
