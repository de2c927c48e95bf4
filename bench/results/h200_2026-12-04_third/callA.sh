#!/usr/bin/env bash
# call A: stage the first half of the FA4 cu13 wheel and the small wheels for call B; then, WITHOUT a flash kernel,
# the default config (DOC_ATTENTION=1 -> FlexAttention with the block-level BlockMask) at the 8xH100 per-GPU shape:
# CE_KERNEL torch, then triton. Before the flex fix this config OOMed in create_block_mask (72 GiB).
set -o pipefail; export PYTHONUNBUFFERED=1
mkdir -p /tmp/stage && cp .carry/c1/cu13.part_aa .carry/c1/*.whl /tmp/stage/ && ls /tmp/stage | wc -l
python3 -m pip install -q --no-index --no-deps --target /tmp/pk .carry/c1/brotli-*.whl .carry/c1/zstandard-*.whl && export PYTHONPATH=/tmp/pk
nvidia-smi --query-gpu=name,memory.used,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for ce in torch triton; do
  date -u +%T
  timeout -k 5 ${T_ONE:-280} python3 -u bench/bench_speed.py --out $OUT/flex_ce_$ce --ref 0 --steps 6 --settle 2 \
    --set WARMUP_STEPS=2 --set CE_KERNEL=$ce > $OUT/flex_ce_$ce.out 2>&1
  echo "ce=$ce rc=$?"; grep -E "Error|error|OutOfMemory" $OUT/flex_ce_$ce.out | tail -3; tail -6 $OUT/flex_ce_$ce.out | cut -c1-300
done
date -u +%T
