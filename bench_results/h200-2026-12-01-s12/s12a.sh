#!/usr/bin/env bash
# Session 12, call A (one H200, ~8 min): main (c2bc319) against fewer-kernels' head (410ac75: session 11's
# folds, the gated kernel's own gather, the RoPE frequencies made on the host), neither run as such before.
# 1. gpu_check.py in the head's tree: its decode kernels compiled, against float64 numpy, at the share of 8
#    and at full width;
# 2. run.py --random-weights --layers 16 on one GPU, greedy: the same text from both trees?
# 3. the share of 8: bench.py model slopes from 2 to 16 layers, batches 1 and 8, three rounds (round 1 at 2
#    layers with the reference mode);
# 4. the whole model on one GPU (the gather's first run at full width): slopes from 2 to 8 layers, three rounds;
# 5. a profile of the head at the share of 8 (4 layers, batch 1).
#   git archive c2bc319 -o .scratch/main.tar -- . ':!bench_results'; the same for fewer-kernels -> head.tar
#   BUDGET=540 OUT=$OUT bash .scratch/s12a.sh -> $OUT/s12a.tgz
T0=$SECONDS; BUDGET=${BUDGET:-540}
R=/tmp/s12a; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s12a.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s12a.tgz" -C /tmp s12a' EXIT
trap 'exit 1' TERM INT
log "$(nvidia-smi -L | head -1)"
TREES="head main"
for t in $TREES; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
# 1.
(cd /tmp/head && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 120 env PYTHONPATH=.:/tmp/site python3 \
    $OLDPWD/.scratch/gpu_check.py) > $R/gpu_check.log 2>&1
log "gpu_check: exit $?; $(grep -c ' OK$' $R/gpu_check.log) OK, $(grep -c ' BAD$' $R/gpu_check.log) BAD"
# 2.
for t in $TREES; do
  (cd /tmp/$t && XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s ABRT 110 python3 -X faulthandler run.py \
      --random-weights --layers 16 --max-len 16 --temperature 0 --compile-cache off \
      --timings-json $R/run16-$t.json) > $R/run16-$t.log 2>&1
  log "run.py 16 layers $t: exit $?; $(grep -m1 'tokens in' $R/run16-$t.log)"
  grep -A1 "^Output for prompt" $R/run16-$t.log >> $R/s12a.log
done
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], d['mode'], round(d['ms'], 4), round(d['roofline_pct'], 1)) for d in map(ast.literal_eval, sys.stdin)])"; }
model() {  # tree share layers round [modes]
  local opt=""; [ $2 != 0 ] && opt="--share $2"
  (cd /tmp/$1 && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 20 )) python3 bench.py model $opt \
      --layers $3 --batches 1,8 --modes ${5:-fast} --prefill 0 --context 1024 --iters 10 --compile-layers 0 \
      --json $R/m-s$2-r$4-$1-L$3.json) > $R/m-s$2-r$4-$1-L$3.log 2>&1
  log "share $2 round $4 $1 layers $3: exit $? (batch, mode, step ms, roofline %): $(summ $R/m-s$2-r$4-$1-L$3.log) $(grep -m1 -i 'vs reference' $R/m-s$2-r$4-$1-L$3.log)"
}
# 3. and 4., interleaved by round
for round in 1 2 3; do
  for n in 2 16; do for t in $TREES; do
    [ "$(left)" -lt 60 ] && { log "out of time"; break 3; }
    modes=fast; [ $round = 1 ] && [ $n = 2 ] && modes=fast,reference
    model $t 8 $n $round $modes
  done; done
  for n in 2 8; do for t in $TREES; do
    [ "$(left)" -lt 60 ] && { log "out of time"; break 3; }
    model $t 0 $n $round
  done; done
done
# 5.
[ "$(left)" -gt 30 ] && (cd /tmp/head && XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout $(( $(left) - 3 )) python3 bench.py \
    profile --share 8 --layers 4 --batch 1 --json $R/prof-head-share8-b1.json) > $R/prof-head-share8-b1.log 2>&1
log "profile head share 8: exit $?; $(grep "a layer's kernels" $R/prof-head-share8-b1.log | head -1)"
log done
