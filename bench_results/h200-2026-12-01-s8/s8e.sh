#!/usr/bin/env bash
# Session 8, call E (nvidia-h200-x2, ~9 min; on one GPU the 1x2 parts are skipped): the decode step in place (2636e20, "new")
# against the commit before it (b46db5e, "old": route kernel merged, fresh outputs).
#   git archive b46db5e -o .scratch/old.tar; git archive 2636e20 -o .scratch/new.tar
#   BUDGET=540 OUT=$OUT bash .scratch/s8e.sh      -> $OUT/s8e.tgz
# 1. hang guard: run.py 24 layers on 1x2 with the new tree (greedy text as before);
# 2. the runner's decode step (runner_probe.py): host enqueue and queued step, old/new
#    interleaved, 1 GPU at 2 and 8 layers, 1x2 at 8 layers, batch 1;
# 3. XLA's command-buffer log of the new runner step (updates per execution);
# 4. bench.py model slopes (layers 2 and 8, batch 1 and 8, 1 GPU and 1x2), old/new
#    interleaved; the fast-vs-reference check at 2 layers;
# 5. bench.py profile, new tree, 4 layers, 1 GPU.
T0=$SECONDS; BUDGET=${BUDGET:-540}
R=/tmp/s8e; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s8e.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
trap 'tar czf "${OUT:-/tmp}/s8e.tgz" -C /tmp s8e' EXIT
NGPU=$(nvidia-smi -L | wc -l); log "$NGPU GPU(s)"
for t in old new; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t && cp .scratch/runner_probe.py /tmp/$t/; done
if [ $NGPU -ge 2 ]; then
(cd /tmp/new && XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s ABRT 100 python3 -X faulthandler run.py \
    --random-weights --layers 24 --mesh 1x2 --max-len 8 --temperature 0 --compile-cache off) > $R/A_24L_new.log 2>&1
log "24 layers new: exit $?; $(grep -m1 'tokens in' $R/A_24L_new.log)$(grep -m1 -A1 'Current thread' $R/A_24L_new.log | tail -1)"
grep -A1 "^Output for prompt" $R/A_24L_new.log >> $R/s8e.log
fi
for spec in "2 1 1x1" "8 1 1x1" "8 1 1x2" "8 8 1x1"; do
  set -- $spec
  [ $3 = 1x2 ] && [ $NGPU -lt 2 ] && continue
  for t in old new; do
    [ "$(left)" -lt 60 ] && { log "out of time"; break 2; }
    if [ $3 = 1x1 ]; then dev="CUDA_VISIBLE_DEVICES=0"; else dev="CUDA_VISIBLE_DEVICES=0,1"; fi
    (cd /tmp/$t && env $dev XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 80 python3 runner_probe.py $1 $2 $3) \
      > $R/r-$t-L$1-b$2-$3.log 2>&1
    log "$t: exit $? $(grep -h 'runner decode' $R/r-$t-L$1-b$2-$3.log)"
  done
done
(cd /tmp/new && CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 TF_CPP_MIN_LOG_LEVEL=0 \
  TF_CPP_VMODULE=command_buffer_thunk=3,command_executor=3 ROUNDS=1 timeout 80 python3 runner_probe.py 2 1) > $R/vlog_new.log 2>&1
log "VLOG new runner: exit $?; executions $(grep -c 'Execute command buffer' $R/vlog_new.log), updates $(grep -c 'Updated command buffer in' $R/vlog_new.log)"
grep -h "updated_allocs\|Updated [0-9]* commands" $R/vlog_new.log | sed 's/^[IWE][0-9]* [0-9:.]* *[0-9]* //' \
  | sed 's/in [0-9]* μs/in N us/; s/after [0-9]* executions/after K executions/' | cut -c1-300 | sort | uniq -c | sort -rn | head -8 >> $R/s8e.log
gzip $R/vlog_new.log
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], d['mode'], round(d['ms'], 4), round(d.get('dispatch_ms', -1), 4)) for d in map(ast.literal_eval, sys.stdin)])"; }
WHERE="1gpu 1x2"; [ $NGPU -lt 2 ] && WHERE=1gpu
for where in $WHERE; do
  for n in 2 8; do
    for t in old new; do
      [ "$(left)" -lt 45 ] && { log "out of time"; break 3; }
      if [ $where = 1gpu ]; then dev="CUDA_VISIBLE_DEVICES=0"; mesh=""; else dev=""; mesh="--mesh 1x2"; fi
      modes=fast; [ $n = 2 ] && modes=fast,reference
      (cd /tmp/$t && env $dev XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 5 )) python3 bench.py model \
          --layers $n --batches 1,8 --modes $modes --prefill 0 --context 1024 --iters 10 --compile-layers 0 \
          $mesh --json $R/m-$where-$t-L$n.json) > $R/m-$where-$t-L$n.log 2>&1
      log "$where $t layers $n: exit $? (batch, mode, step ms, host ms): $(summ $R/m-$where-$t-L$n.log); $(grep -m1 -i 'vs reference' $R/m-$where-$t-L$n.log)"
    done
  done
done
[ "$(left)" -gt 30 ] && { (cd /tmp/new && CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 5 )) \
  python3 bench.py profile --layers 4 --batch 1 --json $R/prof-new.json) > $R/prof-new.log 2>&1
  log "profile new: exit $?; $(grep -A7 "the host's side" $R/prof-new.log | tr -s ' ' | tr '\n' ';')"; }
log done
