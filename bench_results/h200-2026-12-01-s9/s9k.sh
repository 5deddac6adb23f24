#!/usr/bin/env bash
# Session 9, call K (one H200, ~2 min): dense_sweep.py, the dense decode kernel's tilings at one
# device's share of 8 (q/k/v [6144 -> 1024], output projection [768 -> 6144], M = 1), fewer-kernels.
#   git archive fewer-kernels -o .scratch/fewer.tar; OUT=$OUT bash .scratch/s9k.sh -> $OUT/s9k.tgz
R=/tmp/s9k; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s9k.tgz" -C /tmp s9k' EXIT
mkdir -p /tmp/fewer && tar xf .scratch/fewer.tar -C /tmp/fewer && cp .scratch/dense_sweep.py /tmp/fewer/
(cd /tmp/fewer && XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout 95 python3 dense_sweep.py) > $R/dense_sweep.log 2>&1
echo "exit $?" >> $R/dense_sweep.log
cat $R/dense_sweep.log
