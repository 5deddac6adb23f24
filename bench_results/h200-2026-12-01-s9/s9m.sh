#!/usr/bin/env bash
# Session 9, call M (one H200, ~90 s): the junction kernel (8 warps) against XLA's norms at
# 1, 2, 4, 8 and 16 rows (norm_sweep.py): where NORM_MAX_ROWS should stop fusing.
#   git archive fewer-kernels -o .scratch/fewer.tar; OUT=$OUT bash .scratch/s9m.sh -> $OUT/s9m.tgz
R=/tmp/s9m; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s9m.tgz" -C /tmp s9m' EXIT
mkdir -p /tmp/fewer && tar xf .scratch/fewer.tar -C /tmp/fewer && cp .scratch/norm_sweep.py /tmp/fewer/
(cd /tmp/fewer && ROWS="1 2 4 8 16" WARPS=8 CHAIN=32 XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout 100 python3 norm_sweep.py) > $R/norm_sweep.log 2>&1
echo "exit $?" >> $R/norm_sweep.log
cat $R/norm_sweep.log
