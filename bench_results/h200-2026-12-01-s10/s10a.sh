#!/usr/bin/env bash
# Session 10, call A (one H200, ~8 min): moe_sweep.py (the MoE decode kernels' tilings at the share of 8)
# then moe_ab.py (the best tilings against the defaults in the model at the share of 8), main at 8715025.
#   git archive main -o .scratch/main.tar; OUT=$OUT bash .scratch/s10a.sh -> $OUT/s10a.tgz
R=/tmp/s10a; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s10a.tgz" -C /tmp s10a' EXIT TERM
mkdir -p /tmp/main && tar xf .scratch/main.tar -C /tmp/main && cp .scratch/moe_sweep.py .scratch/moe_ab.py /tmp/main/
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $R/gpu.txt
cd /tmp/main
OUT=$R XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout 260 python3 moe_sweep.py 8 220 > $R/moe_sweep.log 2>&1
echo "exit $?" >> $R/moe_sweep.log
grep "==\|best\|done\|exit\|Error" $R/moe_sweep.log
XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout 230 python3 moe_ab.py $R/moe_sweep_share8.json 3 > $R/moe_ab.log 2>&1
echo "exit $?" >> $R/moe_ab.log
grep "tuned\|round\|median\|exit\|Error" $R/moe_ab.log
