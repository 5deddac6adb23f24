#!/usr/bin/env bash
# Session 8, call F (one or two H200s, ~5 min): the runner's decode step, three trees:
#   old  b46db5e  fresh StepOutput (the route kernel merged)
#   prev 2636e20  step in place, StepOutput copied by `take` into fresh buffers
#   new  e664762  step in place, `take` writes over outputs the host has read (recycle)
#   git archive <commit> -o .scratch/<tree>.tar ;  BUDGET=300 OUT=$OUT bash .scratch/s8f.sh
# With two GPUs, first the 24-layer hang guard on 1x2 (new) and then 1x2 runner probes.
T0=$SECONDS; BUDGET=${BUDGET:-300}
R=/tmp/s8f; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s8f.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
trap 'tar czf "${OUT:-/tmp}/s8f.tgz" -C /tmp s8f' EXIT
NGPU=$(nvidia-smi -L | wc -l); log "$NGPU GPU(s)"
for t in old prev new; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t && cp .scratch/runner_probe.py /tmp/$t/; done
if [ $NGPU -ge 2 ]; then
  (cd /tmp/new && XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s ABRT 100 python3 -X faulthandler run.py \
      --random-weights --layers 24 --mesh 1x2 --max-len 8 --temperature 0 --compile-cache off) > $R/A_24L_new.log 2>&1
  log "24 layers new: exit $?; $(grep -m1 'tokens in' $R/A_24L_new.log)$(grep -m1 -A1 'Current thread' $R/A_24L_new.log | tail -1)"
  grep -A1 "^Output for prompt" $R/A_24L_new.log >> $R/s8f.log
fi
(cd /tmp/new && CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 TF_CPP_MIN_LOG_LEVEL=0 \
  TF_CPP_VMODULE=command_buffer_thunk=3,command_executor=3 ROUNDS=1 timeout 80 python3 runner_probe.py 2 1) > $R/vlog_new.log 2>&1
log "VLOG new runner: exit $?; $(grep -h 'runner decode' $R/vlog_new.log); executions $(grep -c 'Execute command buffer' $R/vlog_new.log), updates $(grep -c 'Updated command buffer in' $R/vlog_new.log)"
grep -h "updated_allocs\|Updated [0-9]* commands" $R/vlog_new.log | sed 's/^[IWE][0-9]* [0-9:.]* *[0-9]* //' \
  | sed 's/in [0-9]* μs/in N us/; s/after [0-9]* executions/after K executions/' | cut -c1-300 | sort | uniq -c | sort -rn | head -8 >> $R/s8f.log
gzip $R/vlog_new.log
SPECS="2 1 1x1;8 1 1x1;8 8 1x1"; [ $NGPU -ge 2 ] && SPECS="$SPECS;2 1 1x2;8 1 1x2"
IFS=';'; for spec in $SPECS; do IFS=' '
  set -- $spec
  for t in old prev new; do
    [ "$(left)" -lt 25 ] && { log "out of time"; break 2; }
    if [ $3 = 1x1 ]; then dev="CUDA_VISIBLE_DEVICES=0"; else dev="CUDA_VISIBLE_DEVICES=0,1"; fi
    (cd /tmp/$t && env $dev XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 60 python3 runner_probe.py $1 $2 $3) \
      > $R/r-$t-L$1-b$2-$3.log 2>&1
    log "$t: exit $? $(grep -h 'runner decode' $R/r-$t-L$1-b$2-$3.log)"
  done
done
log done
