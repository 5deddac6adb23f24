#!/usr/bin/env bash
# Session 5, call 4 (nvidia-h200-x2), main with the host-side fix and the grouped prefills:
# A) 24 layers on 1x2; B) 48 layers cold + warm; C) serve on one GPU at 32 and 8 slots. -> $OUT/s5d.tgz
T0=$SECONDS; BUDGET=${BUDGET:-575}
R=/tmp/s5d; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s5d.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
trap 'tar czf "${OUT:-/tmp}/s5d.tgz" -C /tmp s5d' EXIT
git log -1 --format=%H > $R/commit.txt 2>/dev/null; git status --short > $R/status.txt 2>/dev/null
cp .scratch/tokenizer.model tokenizer.model
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s ABRT 80 python3 -X faulthandler run.py --random-weights --layers 24 \
    --mesh 1x2 --max-len 8 --temperature 0 --compile-cache off > $R/A_24L.log 2>&1
log "A 24 layers: exit $?; $(grep -m1 'tokens in' $R/A_24L.log)$(grep -m1 -A1 'Current thread' $R/A_24L.log | tail -1)"
for phase in cold warm; do
  log "B 48 layers $phase"
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s ABRT $([ $phase = cold ] && echo 170 || echo 80) python3 -X faulthandler \
      run.py --random-weights --layers 48 --mesh 1x2 --max-len 8 --temperature 0 --tokenizer tokenizer.model \
      --compile-cache /tmp/cc48 --timings-json $R/B_48_$phase.json > $R/B_48_$phase.log 2>&1 || { log "exit $?"; break; }
  grep -v "^I0\|^W0" $R/B_48_$phase.log | tail -5 | tee -a $R/s5d.log
done
rm -f tokenizer.model
for slots in 32 8; do
  [ "$(left)" -lt 100 ] && { log "skip serve $slots"; continue; }
  log "C serve $slots"
  CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 10 )) python3 bench.py serve \
      --layers 4 --slots $slots --clients $((2 * slots)) --rounds 3 --seconds 8 --json $R/C_serve_$slots.json \
      > $R/C_serve_$slots.log 2>&1
  log "exit $?"; tail -1 $R/C_serve_$slots.log | tee -a $R/s5d.log
done
log done
