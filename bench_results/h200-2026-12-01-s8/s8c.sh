#!/usr/bin/env bash
# Next session, call C (one GPU, ~2 min): scan_probe.py, layers unrolled (today's step) against
# a lax.scan over stacked weights: the host's enqueue time per layer, with XLA's defaults and
# with WHILE/CONDITIONAL in the command buffers (the loop itself in a CUDA graph).
#   OUT=$OUT bash .scratch/s8c.sh     -> $OUT/s8c.tgz
R=/tmp/s8c; mkdir -p $R
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s8c.tgz" -C /tmp s8c' EXIT
timeout 100 python3 .scratch/scan_probe.py > $R/scan_default.log 2>&1; echo "default exit $?" >> $R/s8c.log
XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,WHILE,CONDITIONAL" \
  timeout 100 python3 .scratch/scan_probe.py > $R/scan_while.log 2>&1; echo "while exit $?" >> $R/s8c.log
grep -h "layers:" $R/scan_*.log >> $R/s8c.log; tail -3 $R/scan_while.log >> $R/s8c.log
cat $R/s8c.log
