#!/usr/bin/env bash
# Session 7, call G (nvidia-h200-x2): stable_probe.py, the decode step with its logits written
# into a donated buffer against the plain step, 8 layers on 1 GPU and on 1x2.
#   OUT=$OUT bash .scratch/s7g.sh     -> $OUT/s7g.tgz
R=/tmp/s7g; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
trap 'tar czf "${OUT:-/tmp}/s7g.tgz" -C /tmp s7g' EXIT
CUDA_VISIBLE_DEVICES=0 timeout 120 python3 .scratch/stable_probe.py 8 1 > $R/L8_1gpu.log 2>&1; echo "L8 1gpu exit $?" >> $R/s7g.log
timeout 120 python3 .scratch/stable_probe.py 8 2 > $R/L8_1x2.log 2>&1; echo "L8 1x2 exit $?" >> $R/s7g.log
grep -h "layers," $R/L8_*.log >> $R/s7g.log
cat $R/s7g.log
