#!/usr/bin/env bash
# Session 11, call E (one H200, ~5 min). Trees: fewer (0180cb8, before this session), final (1b0446b: calls A-D's
# folds), merge (122d403: + the attention's row sums as wide as the rows, so XLA merges the splits in one kernel),
# gather (0ed8a22: + the gated kernel gathers its rows itself, no dispatch kernel).
# 1. the share of 8: bench.py model slopes from 2 to 16 layers (batches 1 and 8), trees interleaved, two rounds
#    (round 1 at 2 layers with the reference mode for the new trees);
# 2. a profile of gather at the share of 8 (4 layers, batch 1).
#   BUDGET=330 OUT=$OUT bash .scratch/s11e.sh -> $OUT/s11e.tgz
T0=$SECONDS; BUDGET=${BUDGET:-330}
R=/tmp/s11e; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s11e.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s11e.tgz" -C /tmp s11e' EXIT TERM
log "$(nvidia-smi -L | head -1)"
TREES="gather merge final fewer"
for t in $TREES; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], d['mode'], round(d['ms'], 4), round(d['roofline_pct'], 1)) for d in map(ast.literal_eval, sys.stdin)])"; }
model() {  # tree share layers round [modes]
  local opt=""; [ $2 != 0 ] && opt="--share $2"
  (cd /tmp/$1 && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 20 )) python3 bench.py model $opt \
      --layers $3 --batches 1,8 --modes ${5:-fast} --prefill 0 --context 1024 --iters 10 --compile-layers 0 \
      --json $R/m-s$2-r$4-$1-L$3.json) > $R/m-s$2-r$4-$1-L$3.log 2>&1
  log "share $2 round $4 $1 layers $3: exit $? (batch, mode, step ms, roofline %): $(summ $R/m-s$2-r$4-$1-L$3.log) $(grep -m1 -i 'vs reference' $R/m-s$2-r$4-$1-L$3.log)"
}
for round in 1 2; do for n in 2 16; do for t in $TREES; do
  [ "$(left)" -lt 40 ] && { log "out of time for the share"; break 3; }
  modes=fast; [ $round = 1 ] && [ $n = 2 ] && case $t in gather|merge) modes=fast,reference;; esac
  model $t 8 $n $round $modes
done; done; done
[ "$(left)" -gt 22 ] && (cd /tmp/gather && XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout $(( $(left) - 3 )) python3 bench.py \
    profile --share 8 --layers 4 --batch 1 --json $R/prof-gather-share8-b1.json) > $R/prof-gather-share8-b1.log 2>&1
log "profile gather share 8: exit $?; $(grep "a layer's kernels" $R/prof-gather-share8-b1.log | head -1)"
log done
