#!/usr/bin/env bash
# Next session, call B (nvidia-h200-x2, ~9 min): the branch route-kernel (kernels.route: the
# router's softmax, top-2 and the MoE plan in one Pallas kernel) against main.
#   Make the trees first (here):  git archive main -o .scratch/main.tar
#                                 git archive route-kernel -o .scratch/route.tar
#   BUDGET=560 OUT=$OUT bash .scratch/s8b.sh      -> $OUT/s8b.tgz
# 1. the hang guard: 24 layers on 1x2 with the branch (greedy text = main's);
# 2. bench.py profile, 4 layers, 1 GPU, batch 1 and 8, both trees: kernels per step and the
#    host's events (the branch should show 7 kernels fewer per layer);
# 3. bench.py model slopes, layers 2 and 8, batch 1,8, 1 GPU and 1x2, trees interleaved:
#    step ms, host ms (dispatch_ms), and the fast-vs-reference first-step check.
T0=$SECONDS; BUDGET=${BUDGET:-560}
R=/tmp/s8b; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s8b.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
trap 'tar czf "${OUT:-/tmp}/s8b.tgz" -C /tmp s8b' EXIT
for t in main route; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
(cd /tmp/route && XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s ABRT 100 python3 -X faulthandler run.py \
    --random-weights --layers 24 --mesh 1x2 --max-len 8 --temperature 0 --compile-cache off) > $R/A_24L_route.log 2>&1
log "24 layers route: exit $?; $(grep -m1 'tokens in' $R/A_24L_route.log)$(grep -m1 -A1 'Current thread' $R/A_24L_route.log | tail -1)"
grep -A1 "^Output for prompt" $R/A_24L_route.log >> $R/s8b.log
for t in main route; do
  (cd /tmp/$t && CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 120 python3 bench.py profile \
      --layers 4 --batch 1 --json $R/prof-$t.json) > $R/prof-$t.log 2>&1
  log "profile $t: exit $?; $(grep -A7 "the host's side" $R/prof-$t.log | tr -s ' ' | tr '\n' ';')"
done
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], d['mode'], round(d['ms'], 4), round(d.get('dispatch_ms', -1), 4)) for d in map(ast.literal_eval, sys.stdin)])"; }
for where in 1gpu 1x2; do
  for n in 2 8; do
    for t in main route; do
      [ "$(left)" -lt 45 ] && { log "out of time"; break 3; }
      if [ $where = 1gpu ]; then dev="CUDA_VISIBLE_DEVICES=0"; mesh=""; else dev=""; mesh="--mesh 1x2"; fi
      (cd /tmp/$t && env $dev XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 5 )) python3 bench.py model \
          --layers $n --batches 1,8 --modes fast,reference --prefill 128 --context 1024 --iters 10 --compile-layers 0 \
          $mesh --json $R/m-$where-$t-L$n.json) > $R/m-$where-$t-L$n.log 2>&1
      log "$where $t layers $n: exit $? (batch, mode, step ms, host ms): $(summ $R/m-$where-$t-L$n.log); $(grep -m2 -i 'vs reference\|rel_l2' $R/m-$where-$t-L$n.log | tr '\n' ' ')"
    done
  done
done
log done
