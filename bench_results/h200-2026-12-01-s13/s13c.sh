#!/usr/bin/env bash
# Session 13, call C (one H200, ~9 min): main at the session's start (37fd65e, "base") against main with both
# junction kernels ("new"), and new with the junction's best tiling from step 1 ("tuned", junction_probe.py).
# 1. junction_sweep.py: the junction kernel's device time per (slices, warps) at the share of 8, batch 1;
# 2. gpu_check.py in new's tree: the dense kernel, its partial sums, the junction and route, against float64;
# 3. run.py --random-weights --layers 16 on one GPU, greedy, base and new: the same text?
# 4. the share of 8: bench.py model slopes from 2 to 16 layers, batches 1 and 8, three rounds interleaved
#    (round 1 at 2 layers with the reference mode);
# 5. the whole model on one GPU: slopes from 2 to 8 layers, two rounds, base and new;
# 6. new's profile at the share of 8 (4 layers, batch 1).
#   git archive 37fd65e -o $PWD/.scratch/base.tar -- . ':!bench_results'; the same for HEAD -> new.tar
#   BUDGET=560 OUT=$OUT bash bench_results/h200-2026-12-01-s13/s13c.sh -> $OUT/s13c.tgz
T0=$SECONDS; BUDGET=${BUDGET:-560}
R=/tmp/s13c; mkdir -p $R
HERE=$PWD; S13=$HERE/bench_results/h200-2026-12-01-s13
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s13c.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s13c.tgz" -C /tmp s13c' EXIT
trap 'exit 1' TERM INT
log "$(nvidia-smi -L | head -1)"
for t in new base; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
# 1.
(cd /tmp/new && timeout 150 env PYTHONPATH=.:/tmp/site python3 $S13/junction_sweep.py $R/junction_sweep.json) \
    > $R/junction_sweep.log 2>&1
log "junction_sweep: exit $?; $(grep '^best' $R/junction_sweep.log)"
read -r _ SL WA <<< "$(grep '^best' $R/junction_sweep.log || echo best 8 8)"
# 2.
(cd /tmp/new && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 150 env PYTHONPATH=.:/tmp/site python3 \
    $S13/gpu_check.py) > $R/gpu_check.log 2>&1
log "gpu_check: exit $?; $(grep -c ' OK$' $R/gpu_check.log) OK, $(grep -c ' BAD$' $R/gpu_check.log) BAD"
# 3.
for t in new base; do
  (cd /tmp/$t && XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s ABRT 110 python3 -X faulthandler run.py \
      --random-weights --layers 16 --max-len 16 --temperature 0 --compile-cache off \
      --timings-json $R/run16-$t.json) > $R/run16-$t.log 2>&1
  log "run.py 16 layers $t: exit $?; $(grep -m1 'tokens in' $R/run16-$t.log)"
  grep -A1 "^Output for prompt" $R/run16-$t.log >> $R/s13c.log
done
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], d['mode'], round(d['ms'], 4), round(d['roofline_pct'], 1), round(d['dispatch_ms'], 3)) for d in map(ast.literal_eval, sys.stdin)])"; }
model() {  # tree share layers round [modes]
  local opt="" dir=$1 run="bench.py"
  [ $2 != 0 ] && opt="--share $2"
  [ $1 = tuned ] && { dir=new; run="$S13/junction_probe.py $SL $WA --"; }
  (cd /tmp/$dir && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 20 )) env PYTHONPATH=.:/tmp/site \
      python3 $run model $opt --layers $3 --batches 1,8 --modes ${5:-fast} --prefill 0 --context 1024 --iters 10 \
      --compile-layers 0 --json $R/m-s$2-r$4-$1-L$3.json) > $R/m-s$2-r$4-$1-L$3.log 2>&1
  log "share $2 round $4 $1 layers $3: exit $? (batch, mode, step ms, roofline %, host ms): $(summ $R/m-s$2-r$4-$1-L$3.log) $(grep -m1 -i 'vs reference' $R/m-s$2-r$4-$1-L$3.log)"
}
TREES="new base"; [ "$SL $WA" != "8 8" ] && TREES="new tuned base"
# 4. and 5., interleaved by round
for round in 1 2 3; do
  for n in 2 16; do for t in $TREES; do
    [ "$(left)" -lt 60 ] && { log "out of time"; break 3; }
    modes=fast; [ $round = 1 ] && [ $n = 2 ] && modes=fast,reference
    model $t 8 $n $round $modes
  done; done
  [ $round = 3 ] && break
  for n in 2 8; do for t in new base; do
    [ "$(left)" -lt 60 ] && { log "out of time"; break 3; }
    model $t 0 $n $round
  done; done
done
# 6.
[ "$(left)" -gt 40 ] && (cd /tmp/new && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 10 )) python3 \
    bench.py profile --share 8 --layers 4 --batch 1 --json $R/profile-s8-new.json) > $R/profile-s8-new.log 2>&1
log "profile: exit $?"
log done
