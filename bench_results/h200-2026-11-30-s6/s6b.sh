#!/usr/bin/env bash
# Next GPU session, call B (nvidia-h200-x2): issue 15's missing points: decode rounds 2 and 3
# at 16 and 32 layers on 1x2, and the start-up (cold and warm) at 8, 16 and 32 layers.
#   BUDGET=575 OUT=$OUT bash .scratch/s6b.sh     -> $OUT/s6b.tgz
T0=$SECONDS; BUDGET=${BUDGET:-575}
R=/tmp/s6b; mkdir -p $R
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s] $*" | tee -a $R/s6b.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
trap 'tar czf "${OUT:-/tmp}/s6b.tgz" -C /tmp s6b' EXIT
log "depth decode 16,32 x2"
timeout $((BUDGET - 200)) python3 bench.py depth --layers 16,32 --mesh 1x2 --parts decode --repeats 2 \
    --child-timeout 150 --out $R/depth --json $R/depth.json > $R/depth.log 2>&1; log "exit $?"
log "depth startup 8,16,32"
timeout $((BUDGET - (SECONDS - T0) - 10)) python3 bench.py depth --layers 8,16,32 --mesh 1x2 --parts startup \
    --repeats 1 --child-timeout 120 --out $R/startup --json $R/startup.json > $R/startup.log 2>&1; log "exit $?"
log done
