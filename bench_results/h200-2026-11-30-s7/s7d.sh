#!/usr/bin/env bash
# Session 7, call D (nvidia-h200-x2): what the host's enqueue time grows with (host_probe.py):
# argument buffers, kernels, all-reduces; 1 GPU with XLA's defaults and with command buffers
# off, then 2 GPUs with the defaults.
#   OUT=$OUT bash .scratch/s7d.sh     -> $OUT/s7d.tgz
R=/tmp/s7d; mkdir -p $R
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
trap 'tar czf "${OUT:-/tmp}/s7d.tgz" -C /tmp s7d' EXIT
CUDA_VISIBLE_DEVICES=0 timeout 150 python3 .scratch/host_probe.py 1 > $R/probe_1gpu_default.log 2>&1; echo "1gpu default exit $?" >> $R/s7d.log
CUDA_VISIBLE_DEVICES=0 XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 150 python3 .scratch/host_probe.py 1 > $R/probe_1gpu_cboff.log 2>&1; echo "1gpu cboff exit $?" >> $R/s7d.log
timeout 150 python3 .scratch/host_probe.py 2 > $R/probe_2gpu_default.log 2>&1; echo "2gpu default exit $?" >> $R/s7d.log
for f in $R/probe_*.log; do echo "== $f"; grep -v "^{" $f | tail -25; done >> $R/s7d.log
cat $R/s7d.log
