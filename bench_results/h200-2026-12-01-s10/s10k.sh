#!/usr/bin/env bash
# Session 10, call K (one H200, ~1 min): fewer-kernels with RoPE's sign on the sin table (the
# commit "RoPE: the rotate-half sign rides on the sin table"): does the negated half's kernel go?
# bench.py profile, the share of 8 and the whole model, 4 layers, batch 1.
#   git archive fewer-kernels -o .scratch/fewer.tar; OUT=$OUT bash .scratch/s10k.sh -> $OUT/s10k.tgz
R=/tmp/s10k; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s10k.tgz" -C /tmp s10k' EXIT TERM
mkdir -p /tmp/fewer && tar xf .scratch/fewer.tar -C /tmp/fewer
for share in 8 0; do
  opt=""; [ $share = 8 ] && opt="--share 8"
  (cd /tmp/fewer && XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout 90 python3 bench.py profile $opt --layers 4 --batch 1 \
      --json $R/prof-fewer-share$share.json) > $R/prof-fewer-share$share.log 2>&1
  echo "share $share: exit $?; $(grep 'per layer, by kind' $R/prof-fewer-share$share.log)" >> $R/s10k.log
  sed -n '/Stream/,/per layer, by kind/p' $R/prof-fewer-share$share.log | head -26 >> $R/s10k.log
done
cat $R/s10k.log
