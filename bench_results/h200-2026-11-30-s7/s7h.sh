#!/usr/bin/env bash
# Session 7, call H (one GPU): stable_probe.py with host traces: does the step with donated
# logits still update its CUDA graph at every step? 2 and 8 layers.
#   OUT=$OUT bash .scratch/s7h.sh     -> $OUT/s7h.tgz
R=/tmp/s7h; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s7h.tgz" -C /tmp s7h' EXIT
for n in 2 8; do
  TRACE_DIR=/tmp/tr_$n timeout 120 python3 .scratch/stable_probe.py $n 1 > $R/L${n}_1gpu.log 2>&1; echo "L$n exit $?" >> $R/s7h.log
done
grep -h "layers," $R/L*_1gpu.log >> $R/s7h.log
cat $R/s7h.log
