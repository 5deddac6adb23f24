#!/usr/bin/env bash
# Session 5, call 5 (nvidia-h200-x2, one GPU used): the server with a 32-token prompt bucket
# beside 128 and 1024 (the bench's prompts have 2-14 tokens), 32 then 8 slots. -> $OUT/s5e.tgz
T0=$SECONDS; BUDGET=${BUDGET:-330}
R=/tmp/s5e; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s5e.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
trap 'tar czf "${OUT:-/tmp}/s5e.tgz" -C /tmp s5e' EXIT
for slots in 32 8; do
  [ "$(left)" -lt 90 ] && { log "skip serve $slots"; continue; }
  log "serve $slots, buckets 32,128,1024"
  CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 8 )) python3 bench.py serve \
      --layers 4 --slots $slots --clients $((2 * slots)) --rounds 3 --seconds 8 --pad-sizes 32,128,1024 \
      --json $R/serve_b32_$slots.json > $R/serve_b32_$slots.log 2>&1
  log "exit $?"; tail -1 $R/serve_b32_$slots.log | tee -a $R/s5e.log
done
log done
