#!/usr/bin/env bash
# Next session, call A (nvidia-h200-x2): issue 11's fixed part F. XLA's one-shot all-reduce
# kernel (--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true) for the two small
# all-reduces per layer, against NCCL's: first the hang guard (24 layers, 1x2, greedy text
# compared), then decode slopes 2 -> 8 layers on 1x2, interleaved, two rounds; 1 GPU; the projection.
#   BUDGET=570 OUT=$OUT bash .scratch/s7a.sh     -> $OUT/s7a.tgz
T0=$SECONDS; BUDGET=${BUDGET:-570}
R=/tmp/s7a; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s7a.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
trap 'tar czf "${OUT:-/tmp}/s7a.tgz" -C /tmp s7a' EXIT
ONESHOT=--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true
for v in nccl oneshot; do
  flags=""; [ $v = oneshot ] && flags=$ONESHOT
  XLA_FLAGS="$flags" XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s ABRT 90 python3 -X faulthandler run.py \
      --random-weights --layers 24 --mesh 1x2 --max-len 8 --temperature 0 --compile-cache off > $R/A_24L_$v.log 2>&1
  log "24 layers $v: exit $?; $(grep -m1 'tokens in' $R/A_24L_$v.log)$(grep -m1 -A1 'Current thread' $R/A_24L_$v.log | tail -1)"
  grep -A1 "^Output for prompt" $R/A_24L_$v.log >> $R/s7a.log
done
for rep in 0 1; do
  for n in 2 8; do
    for v in nccl oneshot; do
      [ "$(left)" -lt 45 ] && { log "slopes: out of time"; break 3; }
      flags=""; [ $v = oneshot ] && flags=$ONESHOT
      XLA_FLAGS="$flags" XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 5 )) python3 bench.py model \
          --layers $n --batches 1,8 --modes fast --prefill 128 --context 1024 --iters 10 --compile-layers 0 \
          --mesh 1x2 --compile-cache /tmp/cc-$v-L$n --json $R/slope-$v-L$n-r$rep.json > $R/slope-$v-L$n-r$rep.log 2>&1
      log "slope $v layers $n rep $rep: exit $?; $(grep "^{'kind': 'decode'" $R/slope-$v-L$n-r$rep.log \
            | python3 -c "import sys, ast; print([(d['batch'], round(d['ms'], 4), round(d['roofline_ms'], 4)) for d in map(ast.literal_eval, sys.stdin)])")"
    done
  done
done
# One GPU (no all-reduce: the flag cannot matter) for the F + V/n fit, then the 8-GPU projection
# from this run's files with and without the one-shot kernel.
for n in 2 8; do
  [ "$(left)" -lt 40 ] && { log "1 GPU: out of time"; break; }
  CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 5 )) python3 bench.py model \
      --layers $n --batches 1,8 --modes fast --prefill 128 --context 1024 --iters 10 --compile-layers 0 \
      --compile-cache /tmp/cc-1gpu-L$n --json $R/slope-1gpu-L$n.json > $R/slope-1gpu-L$n.log 2>&1
  log "1 GPU layers $n: exit $?"
done
for v in nccl oneshot; do
  [ -s $R/slope-1gpu-L8.json ] && [ -s $R/slope-$v-L8-r0.json ] && python3 bench.py project --devices 8 \
      --device-kind h200 --from-json $R/slope-1gpu-L2.json $R/slope-1gpu-L8.json $R/slope-$v-L2-r0.json \
      $R/slope-$v-L8-r0.json --json $R/project-$v.json > $R/project-$v.log 2>&1 && tail -8 $R/project-$v.log | tee -a $R/s7a.log
done
log done
