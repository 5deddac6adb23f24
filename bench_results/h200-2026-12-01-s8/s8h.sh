#!/usr/bin/env bash
# Session 8, call H (one H200, ~3 min): the server at 32 slots (issue 14's setting) on main
# b77dcc3, whose engine runs the decode step in place (runners.DecodeStep: take + recycle
# under the pipelined dispatch/collect of the server). Same command as session 7's call B.
#   git archive b77dcc3 -o .scratch/new.tar; BUDGET=200 OUT=$OUT bash .scratch/s8h.sh
T0=$SECONDS; BUDGET=${BUDGET:-200}
R=/tmp/s8h; mkdir -p $R
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s] $*" | tee -a $R/s8h.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s8h.tgz" -C /tmp s8h' EXIT
mkdir -p /tmp/new && tar xf .scratch/new.tar -C /tmp/new
(cd /tmp/new && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $((BUDGET - 15)) python3 bench.py serve --layers 4 --slots 32 \
    --clients 64 --rounds 3 --seconds 8 --pad-sizes 32,128,1024 --stream-interval-ms 20 --json $R/serve_new.json) \
    > $R/serve_new.log 2>&1
log "serve new: exit $?"; tail -1 $R/serve_new.log | tee -a $R/s8h.log
