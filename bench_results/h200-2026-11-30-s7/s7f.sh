#!/usr/bin/env bash
# Session 7, call F (nvidia-h200-x2): the host side of the decode step's trace (host_trace.py):
# every host thread's events summed per step, 2 and 8 layers on 1 GPU, 8 layers on 1x2.
#   OUT=$OUT bash .scratch/s7f.sh     -> $OUT/s7f.tgz
export R=/tmp/s7f; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
trap 'tar czf "${OUT:-/tmp}/s7f.tgz" -C /tmp s7f' EXIT
CUDA_VISIBLE_DEVICES=0 timeout 100 python3 .scratch/host_trace.py 2 1 /tmp/tr_2_1 > $R/ht_L2_1gpu.log 2>&1; echo "L2 1gpu exit $?" >> $R/s7f.log
CUDA_VISIBLE_DEVICES=0 timeout 100 python3 .scratch/host_trace.py 8 1 /tmp/tr_8_1 > $R/ht_L8_1gpu.log 2>&1; echo "L8 1gpu exit $?" >> $R/s7f.log
timeout 120 python3 .scratch/host_trace.py 8 2 /tmp/tr_8_2 > $R/ht_L8_1x2.log 2>&1; echo "L8 1x2 exit $?" >> $R/s7f.log
cat $R/s7f.log
