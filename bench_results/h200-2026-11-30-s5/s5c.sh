#!/usr/bin/env bash
# Session 5, call 3 (nvidia-h200-x2): which of ff418a1's two changes to the decode path hangs
# the runner at 24 layers on 1x2 (main at 8a683a4 still hangs without copy_to_host_async)?
#  v1: _to_host back to np.asarray(a.addressable_data(0));  v2: decode's live = active;
#  v3: both. Then 48 layers cold + warm with the first variant that works. -> $OUT/s5c.tgz
T0=$SECONDS; BUDGET=${BUDGET:-575}
R=/tmp/s5c; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s5c.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
trap 'tar czf "${OUT:-/tmp}/s5c.tgz" -C /tmp s5c' EXIT
ROOT=$PWD
run24() {  # tree name
  (cd $1 && timeout -s ABRT 80 python3 -X faulthandler run.py --random-weights --layers 24 --mesh 1x2 --max-len 8 \
      --temperature 0 --compile-cache off) > $R/$2_24L.log 2>&1
  local rc=$?; log "$2: exit $rc; $(grep -m1 'tokens in' $R/$2_24L.log)$(grep -m1 -A1 'Current thread' $R/$2_24L.log | tail -1)"
  return $rc
}
good=""
run24 .scratch/v/v3 v3 && good=.scratch/v/v3
run24 .scratch/v/v1 v1 && good=.scratch/v/v1
run24 .scratch/v/v2 v2 && good=.scratch/v/v2
if [ -z "$good" ]; then
  run24 .scratch/bisect/e07404f e07404f_again
else
  cp .scratch/tokenizer.model $good/tokenizer.model
  for phase in cold warm; do
    [ "$(left)" -lt 100 ] && break
    log "48 layers $good $phase"
    (cd $good && timeout -s ABRT $([ $phase = cold ] && echo 170 || echo 80) python3 -X faulthandler \
        run.py --random-weights --layers 48 --mesh 1x2 --max-len 8 --temperature 0 --tokenizer tokenizer.model \
        --compile-cache /tmp/cc48 --timings-json $R/B_48_$phase.json) > $R/B_48_$phase.log 2>&1 || { log "exit $?"; break; }
    grep -v "^I0\|^W0" $R/B_48_$phase.log | tail -5 | tee -a $R/s5c.log
  done
  rm -f $good/tokenizer.model
fi
log "done (good: ${good:-none})"
