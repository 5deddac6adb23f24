#!/usr/bin/env bash
# Session 10, call I (one H200, ~2 min): bench.py kernels timing by the device (main at the commit
# "bench.py kernels: times are the device's ..."), at one device's share of 8 (--dims 6144 4096) as
# session 9's call J ran it by the wall clock (s9j/kernels-share8.log).
#   git archive main -o .scratch/new.tar; OUT=$OUT bash .scratch/s10i.sh -> $OUT/s10i.tgz
R=/tmp/s10i; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s10i.tgz" -C /tmp s10i' EXIT TERM
mkdir -p /tmp/new && tar xf .scratch/new.tar -C /tmp/new
(cd /tmp/new && timeout 200 python3 bench.py kernels --dims 6144 4096 --ms 1 8 --layer-backends pallas \
    --checks quick --quick --budget-s 180 --out $R/kernels-share8.json) > $R/kernels-share8.log 2>&1
echo "exit $?" >> $R/kernels-share8.log
grep "layer\[\|sweep\|exit\|Error" $R/kernels-share8.log | cut -c1-220
