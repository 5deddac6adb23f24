#!/usr/bin/env bash
# Session 10, call J (one H200, ~2 min): launch_probe.py (the host's cost of a CUDA-graph node, XLA
# fusion against Pallas kernel), then the optimized HLO of fewer-kernels' decode step at the share of 8
# (bench.py profile --share 8, 4 layers, batch 1): which instruction each small kernel is.
#   git archive main -o .scratch/new.tar; git archive fewer-kernels -o .scratch/fewer.tar
#   OUT=$OUT bash .scratch/s10j.sh -> $OUT/s10j.tgz
R=/tmp/s10j; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s10j.tgz" -C /tmp s10j' EXIT TERM
for t in new fewer; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
cp .scratch/launch_probe.py /tmp/new/
(cd /tmp/new && XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 timeout 90 python3 launch_probe.py) > $R/launch_probe.log 2>&1
echo "launch_probe: exit $?" >> $R/s10j.log; grep RESULT $R/launch_probe.log >> $R/s10j.log
(cd /tmp/fewer && XLA_FLAGS="--xla_dump_to=$R/hlo-fewer-share8 --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*apply_fn.*" \
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout 90 python3 bench.py profile --share 8 --layers 4 --batch 1 \
    --json $R/prof-fewer-share8.json) > $R/prof-fewer-share8.log 2>&1
echo "profile fewer share 8: exit $?; $(grep 'per layer, by kind' $R/prof-fewer-share8.log)" >> $R/s10j.log
find $R/hlo-fewer-share8 -type f ! -name '*after_optimizations.txt' -delete 2>/dev/null; gzip -r $R/hlo-fewer-share8 2>/dev/null
cat $R/s10j.log
