#!/usr/bin/env bash
# Session 8, call G (one or two H200s, ~6 min): main at 6c725bd ("new": the decode step in
# place, take over recycled outputs, the route kernel's experts counted) against b46db5e
# ("old": the route kernel merged, fresh outputs).
#   git archive b46db5e -o .scratch/old.tar; git archive 6c725bd -o .scratch/new.tar
#   BUDGET=... OUT=$OUT bash .scratch/s8g.sh     -> $OUT/s8g.tgz
# Two GPUs: the 24-layer hang guard on 1x2, the runner's step on 1x2 (old/new), and
# bench.py model slopes on 1 GPU and 1x2 (new). One GPU: run.py's engine at 8 layers (old/new
# greedy text) and the 1 GPU slopes.
T0=$SECONDS; BUDGET=${BUDGET:-360}
R=/tmp/s8g; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s8g.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
trap 'tar czf "${OUT:-/tmp}/s8g.tgz" -C /tmp s8g' EXIT
NGPU=$(nvidia-smi -L | wc -l); log "$NGPU GPU(s)"
for t in old new; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t && cp .scratch/runner_probe.py /tmp/$t/; done
if [ $NGPU -ge 2 ]; then
  (cd /tmp/new && XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s ABRT 100 python3 -X faulthandler run.py \
      --random-weights --layers 24 --mesh 1x2 --max-len 8 --temperature 0 --compile-cache off) > $R/A_24L_new.log 2>&1
  log "24 layers 1x2 new: exit $?; $(grep -m1 'tokens in' $R/A_24L_new.log)$(grep -m1 -A1 'Current thread' $R/A_24L_new.log | tail -1)"
  grep -A1 "^Output for prompt" $R/A_24L_new.log >> $R/s8g.log
  for spec in "2 1" "8 1"; do set -- $spec; for t in old new; do
    [ "$(left)" -lt 150 ] && break 2
    (cd /tmp/$t && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 60 python3 runner_probe.py $1 $2 1x2) > $R/r-$t-L$1-b$2-1x2.log 2>&1
    log "$t: exit $? $(grep -h 'runner decode' $R/r-$t-L$1-b$2-1x2.log)"
  done; done
else
  for t in old new; do
    (cd /tmp/$t && CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 90 python3 run.py \
        --random-weights --layers 8 --max-len 16 --temperature 0 --compile-cache off) > $R/run8-$t.log 2>&1
    log "run.py 8 layers 1 GPU $t: exit $?; $(grep -m1 'tokens in' $R/run8-$t.log)"
    grep -A1 "^Output for prompt" $R/run8-$t.log >> $R/s8g.log
  done
fi
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], d['mode'], round(d['ms'], 4), round(d['roofline_pct'], 1), round(d.get('dispatch_ms', -1), 4)) for d in map(ast.literal_eval, sys.stdin)])"; }
WHERE="1gpu 1x2"; [ $NGPU -lt 2 ] && WHERE=1gpu
for where in $WHERE; do for n in 2 8; do
  [ "$(left)" -lt 40 ] && { log "out of time"; break 2; }
  if [ $where = 1gpu ]; then dev="CUDA_VISIBLE_DEVICES=0"; mesh=""; else dev=""; mesh="--mesh 1x2"; fi
  modes=fast; [ $n = 2 ] && modes=fast,reference
  (cd /tmp/new && env $dev XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 5 )) python3 bench.py model \
      --layers $n --batches 1,8 --modes $modes --prefill 0 --context 1024 --iters 10 --compile-layers 0 \
      $mesh --json $R/m-$where-new-L$n.json) > $R/m-$where-new-L$n.log 2>&1
  log "$where new layers $n: exit $? (batch, mode, step ms, roofline %, host ms): $(summ $R/m-$where-new-L$n.log); $(grep -m1 -i 'vs reference' $R/m-$where-new-L$n.log)"
done; done
log done
