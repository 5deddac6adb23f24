#!/usr/bin/env bash
# Session 8, call I (nvidia-h200-x2, ~4 min): main with the decode step in place on 2 GPUs.
#   git archive HEAD -o .scratch/new.tar; BUDGET=230 OUT=$OUT bash .scratch/s8i.sh
# 1. the 24-layer hang guard on 1x2 (greedy text as in sessions 7 and 8);
# 2. bench.py model on 1x2, layers 2 and 8, batch 1 and 8: the in-place step's device and
#    host time per layer, with XLA's default command buffers and with COLLECTIVES added (now
#    that the graphs are not updated, one graph for the whole step may pay).
T0=$SECONDS; BUDGET=${BUDGET:-230}
R=/tmp/s8i; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s8i.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
trap 'tar czf "${OUT:-/tmp}/s8i.tgz" -C /tmp s8i' EXIT
mkdir -p /tmp/new && tar xf .scratch/new.tar -C /tmp/new
(cd /tmp/new && XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s ABRT 100 python3 -X faulthandler run.py \
    --random-weights --layers 24 --mesh 1x2 --max-len 8 --temperature 0 --compile-cache off) > $R/A_24L_new.log 2>&1
log "24 layers 1x2: exit $?; $(grep -m1 'tokens in' $R/A_24L_new.log)$(grep -m1 -A1 'Current thread' $R/A_24L_new.log | tail -1)"
grep -A1 "^Output for prompt" $R/A_24L_new.log >> $R/s8i.log
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], round(d['ms'], 4), round(d['roofline_pct'], 1), round(d.get('dispatch_ms', -1), 4)) for d in map(ast.literal_eval, sys.stdin)])"; }
for flags in default "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,COLLECTIVES"; do
  name=$([ "$flags" = default ] && echo default || echo coll)
  for n in 2 8; do
    [ "$(left)" -lt 30 ] && { log "out of time"; break 2; }
    (cd /tmp/new && XLA_FLAGS="$([ "$flags" = default ] || echo "$flags")" XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
      timeout $(( $(left) - 5 )) python3 bench.py model --layers $n --batches 1,8 --modes fast --prefill 0 \
      --context 1024 --iters 10 --compile-layers 0 --mesh 1x2 --json $R/m-1x2-$name-L$n.json) > $R/m-1x2-$name-L$n.log 2>&1
    log "1x2 $name layers $n: exit $? (batch, step ms, roofline %, host ms): $(summ $R/m-1x2-$name-L$n.log)"
  done
done
log done
