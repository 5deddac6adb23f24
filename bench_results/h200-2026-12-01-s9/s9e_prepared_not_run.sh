#!/usr/bin/env bash
# Session 9, call E (nvidia-h200-x2, ~5 min): branch fewer-kernels against main (4e0dbac) on 2 GPUs.
#   git archive main -o .scratch/main.tar; git archive fewer-kernels -o .scratch/fewer.tar
#   BUDGET=260 OUT=$OUT bash .scratch/s9e.sh      -> $OUT/s9e.tgz
# In order of need:
# 1. the hang guard: 24 layers on 1x2 with fewer-kernels (greedy text as main's);
# 2. bench.py model slopes, layers 2 and 8, batch 1 and 8, on 1 GPU and on 1x2, trees
#    interleaved, so F (t(n) = F + V/n) of both trees comes from one machine;
# 3. bench.py model --share 2 (fewer, GPU 0): one device's part of a 1x2 mesh without
#    collectives (1x2 minus share 2 = what the collectives and shard_map boundaries cost);
# 4. bench.py profile on 1x2, 4 layers, batch 1, both trees (fewer's optimized HLO kept), and
#    of one device's part of a 1x8 mesh (--share 8, GPU 0);
# 5. XLA's command-buffer log of the runner's step on 1x2 at batch 1 and 8 (main): why the host's
#    time per layer at batch 8 did not fall with the step in place (s8 call I);
# 6. fewer on 1x2 with XLA's all-reduces synchronous (--xla_gpu_disable_async_collectives=ALLREDUCE).
T0=$SECONDS; BUDGET=${BUDGET:-260}; BUDGET=$(( BUDGET > 200 ? 200 : BUDGET ))  # device time left: ~275 s
R=/tmp/s9e; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s9e.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
trap 'tar czf "${OUT:-/tmp}/s9e.tgz" -C /tmp s9e' EXIT
trap 'exit 1' TERM INT
log "$(nvidia-smi -L | tr '\n' ' ')"
for t in main fewer; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t && cp .scratch/runner_probe.py /tmp/$t/; done
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], d['mode'], round(d['ms'], 4), round(d['roofline_pct'], 1), round(d.get('dispatch_ms', -1), 4)) for d in map(ast.literal_eval, sys.stdin)])"; }
# 1.
(cd /tmp/fewer && XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s ABRT 100 python3 -X faulthandler run.py \
    --random-weights --layers 24 --mesh 1x2 --max-len 8 --temperature 0 --compile-cache off) > $R/A_24L_fewer.log 2>&1
log "24 layers 1x2 fewer: exit $?; $(grep -m1 'tokens in' $R/A_24L_fewer.log)$(grep -m1 -A1 'Current thread' $R/A_24L_fewer.log | tail -1)"
grep -A1 "^Output for prompt" $R/A_24L_fewer.log >> $R/s9e.log
# 2.
for where in 1x2 1gpu; do for n in 2 8; do for t in main fewer; do
  [ "$(left)" -lt 40 ] && { log "out of time"; break 3; }
  if [ $where = 1gpu ]; then dev="CUDA_VISIBLE_DEVICES=0"; mesh=""; else dev=""; mesh="--mesh 1x2"; fi
  modes=fast; [ $n = 2 ] && [ $where = 1x2 ] && [ $t = fewer ] && modes=fast,reference
  (cd /tmp/$t && env $dev XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 5 )) python3 bench.py model \
      --layers $n --batches 1,8 --modes $modes --prefill 0 --context 1024 --iters 10 --compile-layers 0 \
      $mesh --json $R/m-$where-$t-L$n.json) > $R/m-$where-$t-L$n.log 2>&1
  log "$where $t layers $n: exit $? (batch, mode, step ms, roofline %, host ms): $(summ $R/m-$where-$t-L$n.log); $(grep -m1 -i 'vs reference' $R/m-$where-$t-L$n.log)"
done; done; done
# 3.
for share in 2; do for n in 2 8; do
  [ "$(left)" -lt 40 ] && { log "no time for share $share"; break 2; }
  (cd /tmp/fewer && CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 5 )) python3 bench.py model \
      --share $share --layers $n --batches 1,8 --modes fast --prefill 0 --context 1024 --iters 10 --compile-layers 0 \
      --json $R/m-share$share-fewer-L$n.json) > $R/m-share$share-fewer-L$n.log 2>&1
  log "share $share fewer layers $n: exit $? (batch, mode, step ms, roofline %, host ms): $(summ $R/m-share$share-fewer-L$n.log)"
done; done
# 4.
for t in main fewer; do
  [ "$(left)" -lt 40 ] && { log "no time for the 1x2 profiles"; break; }
  dump=""; [ $t = fewer ] && dump="--xla_dump_to=$R/hlo-$t --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*apply_fn.*"
  (cd /tmp/$t && XLA_FLAGS="$dump" XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
      timeout 100 python3 bench.py profile --layers 4 --batch 1 --mesh 1x2 --json $R/prof-1x2-$t.json) > $R/prof-1x2-$t.log 2>&1
  log "profile 1x2 $t: exit $?; $(head -1 $R/prof-1x2-$t.log); $(grep 'per layer, by kind' $R/prof-1x2-$t.log); $(grep -A7 "the host's side" $R/prof-1x2-$t.log | tr -s ' ' | tr '\n' ';')"
done
if [ "$(left)" -ge 40 ]; then  # one device's part of a 1x8 mesh: what its 91.7 us per layer (s9i) are made of
  (cd /tmp/fewer && CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
      timeout 100 python3 bench.py profile --layers 4 --batch 1 --share 8 --json $R/prof-share8-fewer.json) > $R/prof-share8-fewer.log 2>&1
  log "profile share 8 fewer: exit $?; $(head -1 $R/prof-share8-fewer.log); $(grep 'per layer, by kind' $R/prof-share8-fewer.log)"
fi
[ -d $R/hlo-fewer ] && { find $R/hlo-fewer -type f ! -name '*after_optimizations.txt' -delete; gzip -r $R/hlo-fewer; }
# 5.
for b in 1 8; do
  [ "$(left)" -lt 40 ] && { log "no time for the command-buffer log"; break; }
  (cd /tmp/main && TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=command_buffer_thunk=3,command_executor=3 ROUNDS=1 \
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 60 python3 runner_probe.py 2 $b 1x2) > $R/vlog_b$b.log 2>&1
  log "vlog batch $b: exit $?; $(grep -h 'runner decode' $R/vlog_b$b.log); executions $(grep -c 'Execute command buffer' $R/vlog_b$b.log), updates $(grep -c 'Updated command buffer in' $R/vlog_b$b.log)"
  grep -h "updated_allocs\|Updated [0-9]* commands" $R/vlog_b$b.log | sed 's/^[IWE][0-9]* [0-9:.]* *[0-9]* //' \
    | sed 's/in [0-9]* μs/in N us/; s/after [0-9]* executions/after K executions/' | cut -c1-300 | sort | uniq -c | sort -rn | head -12 >> $R/s9e.log
  tail -c 3000000 $R/vlog_b$b.log | gzip > $R/vlog_b$b.tail.gz; rm $R/vlog_b$b.log
done
# 6.
for n in 2 8; do
  [ "$(left)" -lt 40 ] && { log "no time for the sync all-reduce runs"; break; }
  (cd /tmp/fewer && XLA_FLAGS=--xla_gpu_disable_async_collectives=ALLREDUCE XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
      timeout $(( $(left) - 5 )) python3 bench.py model --layers $n --batches 1,8 --modes fast --prefill 0 \
      --context 1024 --iters 10 --compile-layers 0 --mesh 1x2 --json $R/m-1x2-fewer-syncar-L$n.json) > $R/m-1x2-fewer-syncar-L$n.log 2>&1
  log "1x2 fewer sync all-reduce layers $n: exit $? (batch, mode, step ms, roofline %, host ms): $(summ $R/m-1x2-fewer-syncar-L$n.log)"
done
log done
