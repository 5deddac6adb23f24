#!/usr/bin/env bash
# Session 7, call C (nvidia-h200-x2): issue 11's host floor. s7a measured the host's time to
# enqueue a decode step at 0.196 ms per layer (12.5 ms at 64 layers, more than the projected
# 8-GPU device time). Does XLA put the step's kernels into CUDA graphs (command buffers)? Print
# the flag defaults, then bench.py model (host ms and step ms) at 2 and 8 layers on 1 GPU and
# 1x2 with the default, with command buffers for everything incl. collectives (min graph size 1),
# and with command buffers off, interleaved; last, the 24-layer 1x2 hang guard with the full list.
#   BUDGET=500 OUT=$OUT bash .scratch/s7c.sh     -> $OUT/s7c.tgz
T0=$SECONDS; BUDGET=${BUDGET:-500}
R=/tmp/s7c; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s7c.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
trap 'tar czf "${OUT:-/tmp}/s7c.tgz" -C /tmp s7c' EXIT
XLA_FLAGS=--help python3 -c "import jax; jax.devices()" > $R/xla_help.txt 2>&1
grep -i "command_buffer\|graph_min\|graph_enable\|graph_level" $R/xla_help.txt | cut -c1-400 | tee -a $R/s7c.log
declare -A FL
FL[default]=""
FL[cball]="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,COLLECTIVES --xla_gpu_graph_min_graph_size=1"
FL[cboff]="--xla_gpu_enable_command_buffer="
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], round(d['ms'], 4), round(d.get('dispatch_ms', -1), 4)) for d in map(ast.literal_eval, sys.stdin)])"; }
for where in 1gpu 1x2; do
  for n in 2 8; do
    for v in default cball cboff; do
      [ "$(left)" -lt 40 ] && { log "out of time"; break 3; }
      if [ $where = 1gpu ]; then dev="CUDA_VISIBLE_DEVICES=0"; mesh=""; b=1,8; else dev=""; mesh="--mesh 1x2"; b=1; fi
      env $dev XLA_FLAGS="${FL[$v]}" XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 5 )) python3 bench.py model \
          --layers $n --batches $b --modes fast --prefill 128 --context 1024 --iters 10 --compile-layers 0 $mesh \
          --json $R/m-$where-$v-L$n.json > $R/m-$where-$v-L$n.log 2>&1
      log "$where $v layers $n: exit $? (batch, step ms, host ms): $(summ $R/m-$where-$v-L$n.log)"
    done
  done
done
if [ "$(left)" -ge 60 ]; then
  XLA_FLAGS="${FL[cball]}" XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s ABRT $(( $(left) - 5 )) python3 -X faulthandler run.py \
      --random-weights --layers 24 --mesh 1x2 --max-len 8 --temperature 0 --compile-cache off > $R/A_24L_cball.log 2>&1
  log "24 layers cball: exit $?; $(grep -m1 'tokens in' $R/A_24L_cball.log)$(grep -m1 -A1 'Current thread' $R/A_24L_cball.log | tail -1)"
  grep -A1 "^Output for prompt" $R/A_24L_cball.log >> $R/s7c.log
fi
log done
