#!/usr/bin/env bash
# Session 13, call D (one H200, ~6 min): main with the gated kernel reading its rows itself ("new", dispatch
# folded) against main with both junctions only (54b5b8c, "junc"); base (37fd65e) for the greedy text.
# 1. gpu_check.py in new's tree (dense, partial sums, junction, route, the gated kernel's gather) vs float64;
# 2. run.py --random-weights --layers 16 on one GPU, greedy, new and base: the same text?
# 3. the share of 8: bench.py model slopes from 2 to 16 layers, batches 1 and 8, three rounds interleaved;
# 4. the whole model on one GPU (the gather at full width): slopes from 2 to 8 layers, one round;
# 5. new's profile at the share of 8 (4 layers, batch 1).
#   git archive 54b5b8c -o $PWD/.scratch/junc.tar -- . ':!bench_results'; HEAD -> new.tar; 37fd65e -> base.tar
#   BUDGET=420 OUT=$OUT bash bench_results/h200-2026-12-01-s13/s13d.sh -> $OUT/s13d.tgz
T0=$SECONDS; BUDGET=${BUDGET:-420}
R=/tmp/s13d; mkdir -p $R
HERE=$PWD; S13=$HERE/bench_results/h200-2026-12-01-s13
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s13d.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s13d.tgz" -C /tmp s13d' EXIT
trap 'exit 1' TERM INT
log "$(nvidia-smi -L | head -1)"
for t in new junc base; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
# 1.
(cd /tmp/new && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 120 env PYTHONPATH=.:/tmp/site python3 \
    $S13/gpu_check.py) > $R/gpu_check.log 2>&1
log "gpu_check: exit $?; $(grep -c ' OK$' $R/gpu_check.log) OK, $(grep -c ' BAD$' $R/gpu_check.log) BAD"
# 2.
for t in new base; do
  (cd /tmp/$t && XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s ABRT 100 python3 -X faulthandler run.py \
      --random-weights --layers 16 --max-len 16 --temperature 0 --compile-cache off \
      --timings-json $R/run16-$t.json) > $R/run16-$t.log 2>&1
  log "run.py 16 layers $t: exit $?; $(grep -m1 'tokens in' $R/run16-$t.log)"
  grep -A1 "^Output for prompt" $R/run16-$t.log >> $R/s13d.log
done
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], d['mode'], round(d['ms'], 4), round(d['roofline_pct'], 1), round(d['dispatch_ms'], 3)) for d in map(ast.literal_eval, sys.stdin)])"; }
model() {  # tree share layers round [modes]
  local opt=""; [ $2 != 0 ] && opt="--share $2"
  (cd /tmp/$1 && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 15 )) python3 bench.py model $opt \
      --layers $3 --batches 1,8 --modes ${5:-fast} --prefill 0 --context 1024 --iters 10 --compile-layers 0 \
      --json $R/m-s$2-r$4-$1-L$3.json) > $R/m-s$2-r$4-$1-L$3.log 2>&1
  log "share $2 round $4 $1 layers $3: exit $? (batch, mode, step ms, roofline %, host ms): $(summ $R/m-s$2-r$4-$1-L$3.log) $(grep -m1 -i 'vs reference' $R/m-s$2-r$4-$1-L$3.log)"
}
# 3. and 4.
for round in 1 2 3; do
  for n in 2 16; do for t in new junc; do
    [ "$(left)" -lt 45 ] && { log "out of time"; break 3; }
    modes=fast; [ $round = 1 ] && [ $n = 2 ] && modes=fast,reference
    model $t 8 $n $round $modes
  done; done
  [ $round = 1 ] && for n in 2 8; do for t in new junc; do
    [ "$(left)" -lt 45 ] && { log "out of time"; break 3; }
    model $t 0 $n $round
  done; done
done
# 5.
[ "$(left)" -gt 30 ] && (cd /tmp/new && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 5 )) python3 \
    bench.py profile --share 8 --layers 4 --batch 1 --json $R/profile-s8-new.json) > $R/profile-s8-new.log 2>&1
log "profile: exit $?"
log done
