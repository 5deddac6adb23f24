#!/usr/bin/env bash
# Session 10, call F (one H200, ~2 min): bench.py profile with kernels placed by HLO instruction, on a
# GPU for the first time: the share of 8 at batch 1 for main and fewer-kernels, and the whole model
# (4 layers, batch 1) for main.
#   git archive main -o .scratch/new.tar; git archive fewer-kernels -o .scratch/fewer.tar
#   OUT=$OUT bash .scratch/s10f.sh -> $OUT/s10f.tgz
R=/tmp/s10f; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s10f.tgz" -C /tmp s10f' EXIT TERM
for t in new fewer; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
for run in "new 8" "fewer 8" "new 0"; do
  set -- $run; opt=""; [ $2 = 8 ] && opt="--share 8"
  (cd /tmp/$1 && XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout 90 python3 bench.py profile $opt --layers 4 --batch 1 \
      --json $R/prof-$1-share$2.json) > $R/prof-$1-share$2.log 2>&1
  echo "$1 share $2: exit $?; $(grep 'per layer, by kind' $R/prof-$1-share$2.log)" >> $R/s10f.log
  sed -n '/Stream/,/per layer, by kind/p' $R/prof-$1-share$2.log | head -24 >> $R/s10f.log
done
cat $R/s10f.log
