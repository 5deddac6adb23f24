#!/usr/bin/env bash
# Session 9, call C (one H200, ~6 min): the branch norm-kernel (kernels.residual_norm, each
# residual junction of a layer in one Pallas kernel) against main, on one GPU:
#   git archive main -o .scratch/main.tar; git archive norm-kernel -o .scratch/norm.tar
#   BUDGET=420 OUT=$OUT bash .scratch/s9c.sh      -> $OUT/s9c.tgz
# 1. run.py --random-weights --layers 8 greedy text, both trees (the engine through the kernel);
# 2. bench.py profile, 4 layers, batch 1, both trees, with XLA's optimized HLO (which fusion is what);
# 3. bench.py model slopes, layers 2 and 8, batch 1 and 8, trees interleaved, two rounds, the
#    fast-vs-reference check at 2 layers.
T0=$SECONDS; BUDGET=${BUDGET:-420}
R=/tmp/s9c; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s9c.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s9c.tgz" -C /tmp s9c' EXIT
log "$(nvidia-smi -L | head -1)"
for t in main norm; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
for t in main norm; do
  (cd /tmp/$t && XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 90 python3 run.py \
      --random-weights --layers 8 --max-len 16 --temperature 0 --compile-cache off) > $R/run8-$t.log 2>&1
  log "run.py 8 layers $t: exit $?; $(grep -m1 'tokens in' $R/run8-$t.log)"
  grep -A1 "^Output for prompt" $R/run8-$t.log >> $R/s9c.log
done
for t in main norm; do
  (cd /tmp/$t && XLA_FLAGS="--xla_dump_to=$R/hlo-$t --xla_dump_hlo_as_text" XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
      timeout 120 python3 bench.py profile --layers 4 --batch 1 --json $R/prof-$t.json) > $R/prof-$t.log 2>&1
  log "profile $t: exit $?; $(grep 'per layer, by kind' $R/prof-$t.log); $(grep -A7 "the host's side" $R/prof-$t.log | tr -s ' ' | tr '\n' ';')"
  find $R/hlo-$t -type f ! -name '*after_optimizations.txt' ! -name '*buffer-assignment.txt' -delete
  find $R/hlo-$t -type f -size -20k -delete; gzip -r $R/hlo-$t
done
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], d['mode'], round(d['ms'], 4), round(d['roofline_pct'], 1), round(d.get('dispatch_ms', -1), 4)) for d in map(ast.literal_eval, sys.stdin)])"; }
for round in 1 2; do for n in 2 8; do for t in main norm; do
  [ "$(left)" -lt 40 ] && { log "out of time"; break 3; }
  modes=fast; [ $n = 2 ] && [ $round = 1 ] && modes=fast,reference
  (cd /tmp/$t && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 5 )) python3 bench.py model \
      --layers $n --batches 1,8 --modes $modes --prefill 0 --context 1024 --iters 10 --compile-layers 0 \
      --json $R/m-r$round-$t-L$n.json) > $R/m-r$round-$t-L$n.log 2>&1
  log "round $round $t layers $n: exit $? (batch, mode, step ms, roofline %, host ms): $(summ $R/m-r$round-$t-L$n.log); $(grep -m1 -i 'vs reference' $R/m-r$round-$t-L$n.log)"
done; done; done
log done
