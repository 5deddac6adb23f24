#!/usr/bin/env bash
# Session 10, call G (one H200, ~1 min): stats_probe.py in main's tree (be2e61b + the profile change).
R=/tmp/s10g; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s10g.tgz" -C /tmp s10g' EXIT TERM
mkdir -p /tmp/new && tar xf .scratch/new.tar -C /tmp/new && cp .scratch/stats_probe.py /tmp/new/
(cd /tmp/new && XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout 80 python3 stats_probe.py) > $R/probe.log 2>&1
echo "exit $?" >> $R/probe.log
grep "PLANE\|LINE\|EVENT\|exit" $R/probe.log | cut -c1-900 | head -80
