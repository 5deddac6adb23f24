#!/usr/bin/env bash
# Session 9, call L (one H200, ~90 s): dense_path_ab.py at the share of 8, fewer-kernels.
#   git archive fewer-kernels -o .scratch/fewer.tar; OUT=$OUT bash .scratch/s9l.sh -> $OUT/s9l.tgz
R=/tmp/s9l; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s9l.tgz" -C /tmp s9l' EXIT
mkdir -p /tmp/fewer && tar xf .scratch/fewer.tar -C /tmp/fewer && cp .scratch/dense_path_ab.py /tmp/fewer/
(cd /tmp/fewer && XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout 75 python3 dense_path_ab.py) > $R/ab.log 2>&1
echo "exit $?" >> $R/ab.log
grep "round\|exit\|Error" $R/ab.log
