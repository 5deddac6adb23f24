#!/usr/bin/env bash
# Prepared in session 10, updated in sessions 11-13, for nvidia-h200-x2 (not lent in sessions 9-13; NOT RUN).
# Ask `status` first. Main as session 13 left it ("new": the dense kernel unpadded and narrowed, the cache
# write in place, both junction kernels at batch 1) against main before it (37fd65e, "base"), on 2 GPUs, ~9 min.
#   git archive HEAD -o $PWD/.scratch/new.tar -- . ":!bench_results"; 37fd65e -> $PWD/.scratch/base.tar
#   BUDGET=560 OUT=$OUT bash bench_results/h200-2026-12-01-s13/x2_prepared_not_run.sh   -> $OUT/x2.tgz
# In order of need:
# 1. the hang guard: 24 layers on 1x2 with new (greedy text as base's): main's decode program changed in
#    session 13 without it (the junction kernels under shard_map ran on 2 and 8 forced CPU devices only);
# 2. bench.py model slopes from 2 to 16 layers, batches 1 and 8, on 1 GPU and on 1x2, trees
#    interleaved, two rounds: F and V (t(n) = F + V/n) of both trees from one machine;
# 3. bench.py model --share 2 (GPU 0), same layers: one device's part of a 1x2 mesh without the
#    collectives, so 1x2 minus share 2 is what the collectives and shard_map boundaries cost per layer;
# 4. bench.py profile on 1x2, 4 layers, batch 1, both trees (kernels placed by HLO instruction);
# 5. bench.py project to 8 GPUs per tree and round: the 1 GPU / 1x2 fit, and session 13's share-of-8
#    runs (s13c, another H200) plus this machine's collectives (1x2 less its share of 2);
# 6. XLA's one-shot all-reduce kernel instead of NCCL's for the psums (a flag; 2 -> 16 layers on 1x2, new):
#    what two all-reduces per layer cost with it.
T0=$SECONDS; BUDGET=${BUDGET:-560}; ROOT=$PWD
R=/tmp/x2; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/x2.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
trap 'tar czf "${OUT:-/tmp}/x2.tgz" -C /tmp x2' EXIT
trap 'exit 1' TERM INT
log "$(nvidia-smi -L | tr '\n' ' ')"
for t in new base; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], d['mode'], round(d['ms'], 4), round(d['roofline_pct'], 1), round(d.get('dispatch_ms', -1), 4)) for d in map(ast.literal_eval, sys.stdin)])"; }
# 1.
for t in new base; do
  (cd /tmp/$t && XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s ABRT 100 python3 -X faulthandler run.py \
      --random-weights --layers 24 --mesh 1x2 --max-len 8 --temperature 0 --compile-cache off) > $R/guard24-$t.log 2>&1
  log "24 layers 1x2 $t: exit $?; $(grep -m1 'tokens in' $R/guard24-$t.log)$(grep -m1 -A1 'Current thread' $R/guard24-$t.log | tail -1)"
  grep -A1 "^Output for prompt" $R/guard24-$t.log >> $R/x2.log
done
# 2. and 3.
for round in 1 2; do for where in 1x2 1gpu share2; do for n in 2 16; do for t in new base; do
  [ "$(left)" -lt 60 ] && { log "out of time"; break 4; }
  case $where in
    1gpu) dev="CUDA_VISIBLE_DEVICES=0"; opt="";;
    share2) dev="CUDA_VISIBLE_DEVICES=0"; opt="--share 2";;
    1x2) dev=""; opt="--mesh 1x2";;
  esac
  modes=fast; [ $n = 2 ] && [ $where = 1x2 ] && [ $round = 1 ] && modes=fast,reference
  (cd /tmp/$t && env $dev XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 5 )) python3 bench.py model \
      --layers $n --batches 1,8 --modes $modes --prefill 0 --context 1024 --iters 10 --compile-layers 0 \
      $opt --json $R/m-r$round-$where-$t-L$n.json) > $R/m-r$round-$where-$t-L$n.log 2>&1
  log "round $round $where $t layers $n: exit $? (batch, mode, step ms, roofline %, host ms): $(summ $R/m-r$round-$where-$t-L$n.log); $(grep -m1 -i 'vs reference' $R/m-r$round-$where-$t-L$n.log)"
done; done; done; done
# 4.
for t in new base; do
  [ "$(left)" -lt 45 ] && { log "no time for the 1x2 profiles"; break; }
  (cd /tmp/$t && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 5 )) python3 bench.py profile --layers 4 \
      --batch 1 --mesh 1x2 --json $R/prof-1x2-$t.json) > $R/prof-1x2-$t.log 2>&1
  log "profile 1x2 $t: exit $?; $(grep 'per layer, by kind' $R/prof-1x2-$t.log)"
done
# 5.
for round in 1 2; do for t in new base; do
  f="$R/m-r$round-1gpu-$t-L2.json $R/m-r$round-1gpu-$t-L16.json $R/m-r$round-1x2-$t-L2.json $R/m-r$round-1x2-$t-L16.json"
  f="$f $R/m-r$round-share2-$t-L2.json $R/m-r$round-share2-$t-L16.json"
  s13=$ROOT/bench_results/h200-2026-12-01-s13/s13c  # session 13's share-of-8 runs of both trees (call C)
  f="$f $s13/m-s8-r$round-$t-L2.json $s13/m-s8-r$round-$t-L16.json"
  (cd /tmp/$t && python3 bench.py project --devices 8 --device-kind h200 --from-json $f \
      --json $R/project-r$round-$t.json) > $R/project-r$round-$t.log 2>&1
  log "project 8 GPUs, round $round, $t: exit $?"; tail -4 $R/project-r$round-$t.log | tee -a $R/x2.log
done; done
# 6.
for n in 2 16; do
  [ "$(left)" -lt 40 ] && { log "no time for the one-shot all-reduce"; break; }
  (cd /tmp/new && XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true" \
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 5 )) python3 bench.py model --layers $n --batches 1,8 \
      --modes fast --prefill 0 --context 1024 --iters 10 --compile-layers 0 --mesh 1x2 \
      --json $R/m-oneshot-1x2-new-L$n.json) > $R/m-oneshot-1x2-new-L$n.log 2>&1
  log "one-shot all-reduce, 1x2, new, layers $n: exit $? $(summ $R/m-oneshot-1x2-new-L$n.log)"
done
log done
