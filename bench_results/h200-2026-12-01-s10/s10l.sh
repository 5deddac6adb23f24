#!/usr/bin/env bash
# Session 10, call L (one H200, ~1.5 min): fewer-kernels with the router's partial sums added up in the
# route kernel (the commit "The router's matmul as partial sums ..."): profiles at the share of 8 and of
# the whole model (4 layers, batch 1), then bench.py model at 2 layers with the fast-vs-reference check.
#   git archive fewer-kernels -o .scratch/fewer.tar; OUT=$OUT bash .scratch/s10l.sh -> $OUT/s10l.tgz
R=/tmp/s10l; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s10l.tgz" -C /tmp s10l' EXIT TERM
mkdir -p /tmp/fewer && tar xf .scratch/fewer.tar -C /tmp/fewer
for share in 8 0; do
  opt=""; [ $share = 8 ] && opt="--share 8"
  (cd /tmp/fewer && XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout 90 python3 bench.py profile $opt --layers 4 --batch 1 \
      --json $R/prof-fewer-share$share.json) > $R/prof-fewer-share$share.log 2>&1
  echo "share $share: exit $?; $(grep 'per layer, by kind' $R/prof-fewer-share$share.log)" >> $R/s10l.log
  sed -n '/Stream/,/per layer, by kind/p' $R/prof-fewer-share$share.log | head -22 >> $R/s10l.log
done
(cd /tmp/fewer && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 100 python3 bench.py model --layers 2 --batches 1,8 \
    --modes fast,reference --prefill 0 --context 1024 --iters 5 --compile-layers 0 --json $R/m-L2.json) > $R/m-L2.log 2>&1
echo "model 2 layers: exit $?; $(grep -m1 "fast vs reference" $R/m-L2.log)" >> $R/s10l.log
cat $R/s10l.log
