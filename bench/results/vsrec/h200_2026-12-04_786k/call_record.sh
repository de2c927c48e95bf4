#!/usr/bin/env bash
# call 2: finish the FA4 install (second half of the cu13 wheel; the first came in call 1) and time record #1855 at
# the 8xH100 per-GPU shape (786,432 tok/step = 8 x 98,304) through the FA4 stand-in, alone on the GPU.
set -o pipefail; export PYTHONUNBUFFERED=1
W=/tmp/stage/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
cat /tmp/stage/cu13.part_aa .carry/c2/cu13.part_ab > $W || exit 3
echo "cu13 $(sha256sum $W | cut -c1-64) expected $(cat .carry/c2/cu13.sha256 2>/dev/null)"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fa4/site-packages /tmp/stage/*.whl .carry/c2/*.whl .carry/w/*.whl || exit 4
export PYTHONPATH=/tmp/fa4/site-packages:/tmp/fa4/site-packages/nvidia_cutlass_dsl/dsl_packages
python3 -c "import flash_attn.cute as f; print('fa4 import ok', f.__file__)" || exit 5
date -u +%T
timeout -k 10 ${REC_T:-470} python3 -u bench/bench_vs_record.py --out /tmp/vs_rec --data .carry/vsrec_sp8192 \
  --record .carry/records/pr1855_train_gpt.py --parts speed --which record --speed-steps 50 --speed-log-every 2 \
  --record-set WARMUP_STEPS=0 --timeout ${REC_T:-460} 2>&1 | tail -20
date -u +%T
tar czf $OUT/vs_rec.tgz -C /tmp vs_rec
