#!/usr/bin/env bash
# Session 6, call D (nvidia-h200-x2): issue 15's third decode round at 16 and 32 layers on 1x2
# (rounds 1-2 in call B), then issue 14's 32-slot server again (a second sample of call A's).
#   BUDGET=380 OUT=$OUT bash .scratch/s6d.sh     -> $OUT/s6d.tgz
T0=$SECONDS; BUDGET=${BUDGET:-380}
R=/tmp/s6d; mkdir -p $R /tmp/w
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s6d.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
tar xf .scratch/head.tar -C /tmp/w && cp .scratch/tokenizer.model /tmp/w/ && cd /tmp/w || exit 1   # session 5's main
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
trap 'tar czf "${OUT:-/tmp}/s6d.tgz" -C /tmp s6d' EXIT
log "depth decode 16,32, one round"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout $(( $(left) - 170 )) python3 bench.py depth --layers 16,32 --mesh 1x2 \
    --parts decode --repeats 1 --child-timeout 100 --out $R/depth --json $R/depth.json > $R/depth.log 2>&1
log "exit $?"; grep "layers:" $R/depth.log | tee -a $R/s6d.log
if [ "$(left)" -ge 150 ]; then
  log "serve 32 slots, buckets 32,128,1024"
  CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 5 )) python3 bench.py serve \
      --layers 4 --slots 32 --clients 64 --rounds 3 --seconds 8 --pad-sizes 32,128,1024 --json $R/serve_s32_b32.json \
      > $R/serve_s32_b32.log 2>&1
  log "exit $?"; tail -1 $R/serve_s32_b32.log | tee -a $R/s6d.log
else log "skip serve"; fi
log done
