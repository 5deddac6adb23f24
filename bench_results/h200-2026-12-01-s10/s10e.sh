#!/usr/bin/env bash
# Session 10, call E (one H200, ~4 min): dense_sweep2.py (the dense decode kernel's tilings at the
# share of 8, by the device's time), then gaps.py (the idle time between a decode step's kernels, by
# the pair of kernels around it): main (be2e61b) and fewer-kernels (e696bbe), the share of 8 and the
# whole model, batch 1.
#   git archive main -o .scratch/new.tar; git archive fewer-kernels -o .scratch/fewer.tar
#   OUT=$OUT bash .scratch/s10e.sh -> $OUT/s10e.tgz
R=/tmp/s10e; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s10e.tgz" -C /tmp s10e' EXIT TERM
for t in new fewer; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t && cp .scratch/gaps.py /tmp/$t/; done
cp .scratch/dense_sweep2.py .scratch/devtime.py /tmp/new/
(cd /tmp/new && OUT=$R XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout 200 python3 dense_sweep2.py) > $R/dense_sweep2.log 2>&1
echo "dense_sweep2: exit $?" >> $R/s10e.log; grep -v "^  trace" $R/dense_sweep2.log | grep "==\|us (kernel\|Error" >> $R/s10e.log
for share in 8 0; do for t in new fewer; do
  (cd /tmp/$t && OUT=$R XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout 60 python3 gaps.py $share $t-share$share) \
      > $R/gaps-$t-share$share.log 2>&1
  echo "$t share $share: exit $?" >> $R/s10e.log; grep "^GAPS" $R/gaps-$t-share$share.log | head -12 >> $R/s10e.log
done; done
cat $R/s10e.log
