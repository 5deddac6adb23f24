#!/usr/bin/env bash
# Next GPU session, call A (nvidia-h200-x2): A) the runner at 24 layers on 1x2 (the hang guard:
# the decode program must be session 5's); B) the server on one GPU at 32 slots with the early
# slot hand-over and the prefill's pad skipping, buckets 128,1024 and 32,128,1024; then 8 slots.
#   BUDGET=575 OUT=$OUT bash .scratch/s6a.sh     -> $OUT/s6a.tgz
T0=$SECONDS; BUDGET=${BUDGET:-575}
R=/tmp/s6a; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s6a.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
trap 'tar czf "${OUT:-/tmp}/s6a.tgz" -C /tmp s6a' EXIT
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s ABRT 80 python3 -X faulthandler run.py --random-weights --layers 24 \
    --mesh 1x2 --max-len 8 --temperature 0 --compile-cache off > $R/A_24L.log 2>&1
log "A 24 layers: exit $?; $(grep -m1 'tokens in' $R/A_24L.log)$(grep -m1 -A1 'Current thread' $R/A_24L.log | tail -1)"
serve() {  # slots buckets name
  [ "$(left)" -lt 110 ] && { log "skip $3"; return; }
  log "B serve $3"
  CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 8 )) python3 bench.py serve \
      --layers 4 --slots $1 --clients $((2 * $1)) --rounds 3 --seconds 8 --pad-sizes $2 --json $R/B_$3.json \
      > $R/B_$3.log 2>&1
  log "exit $?"; tail -1 $R/B_$3.log | tee -a $R/s6a.log
}
serve 32 128,1024 s32_b128
serve 32 32,128,1024 s32_b32
serve 8 32,128,1024 s8_b32
log done
