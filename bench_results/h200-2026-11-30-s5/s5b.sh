#!/usr/bin/env bash
# Session 5, call 2 (nvidia-h200-x2): A) the fix (no copy_to_host_async) at 24 layers on 1x2;
# B) 48 layers on 1x2, start-up cold + warm with the compilation cache; C) the server on one
# GPU at 32 slots (main, then the grouped-prefill branch), then 8 slots (main); D) a profile
# of the 1x2 decode step. Everything lands in $OUT/s5b.tgz.
T0=$SECONDS; BUDGET=${BUDGET:-575}
R=/tmp/s5b; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s5b.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
trap 'tar czf "${OUT:-/tmp}/s5b.tgz" -C /tmp s5b' EXIT
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $R/gpus.csv 2>&1
git log -1 --format=%H > $R/commit.txt 2>/dev/null
cp .scratch/tokenizer.model tokenizer.model
log "A: 24 layers 1x2, the fix"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s ABRT 100 python3 -X faulthandler run.py --random-weights --layers 24 \
    --mesh 1x2 --max-len 8 --temperature 0 --compile-cache off > $R/A_24L.log 2>&1
A=$?; log "A exit $A"; grep -v "^I0\|^W0" $R/A_24L.log | tail -4
if [ $A = 0 ]; then
  for phase in cold warm; do
    log "B: 48 layers 1x2 $phase"
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s ABRT $([ $phase = cold ] && echo 160 || echo 80) python3 -X faulthandler \
        run.py --random-weights --layers 48 --mesh 1x2 --max-len 8 --temperature 0 --tokenizer tokenizer.model \
        --compile-cache /tmp/cc48 --timings-json $R/B_48_$phase.json > $R/B_48_$phase.log 2>&1 || { log "exit $?"; break; }
    grep -v "^I0\|^W0" $R/B_48_$phase.log | tail -5
  done
fi
rm -f tokenizer.model
serve() {  # tree slots name
  [ "$(left)" -lt 100 ] && { log "skip serve $3"; return; }
  log "C: serve $3"
  (cd $1 && CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 60 )) python3 bench.py serve \
      --layers 4 --slots $2 --clients $((2 * $2)) --rounds 3 --seconds 8 --json $R/C_$3.json) > $R/C_$3.log 2>&1
  log "exit $?"; tail -4 $R/C_$3.log
}
serve . 32 main_32
serve .scratch/gp 32 grouped_32
serve . 8 main_8
if [ "$(left)" -gt 75 ]; then
  log "D: profile 1x2"
  timeout $(( $(left) - 8 )) python3 bench.py profile --layers 4 --batch 1 --mesh 1x2 --json $R/D_prof_1x2.json \
      > $R/D_prof.log 2>&1; log "exit $?"; tail -30 $R/D_prof.log
fi
log done
