#!/usr/bin/env bash
# Session 11, call D (one H200, ~6 min): fewer-kernels before (0180cb8) and after (1b0446b: session 11's folds
# and the bench's logits record) this session.
# 1. run.py --random-weights --layers 16 on one GPU, greedy: the whole runner path with the new kernels; the
#    same text from both trees, and their decode steps' times;
# 2. the share of 8: bench.py model slopes from 2 to 16 layers (batches 1 and 8), two rounds (round 1 at 2
#    layers with the reference mode), now with the right roofline at batch 1;
# 3. the whole model on one GPU, slopes from 2 to 8 layers, one round;
# 4. a profile of the final tree at the share of 8 (4 layers, batch 1).
#   git archive 0180cb8 -o .scratch/fewer.tar; git archive 1b0446b -o .scratch/final.tar
#   BUDGET=400 OUT=$OUT bash .scratch/s11d.sh -> $OUT/s11d.tgz
T0=$SECONDS; BUDGET=${BUDGET:-400}
R=/tmp/s11d; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s11d.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s11d.tgz" -C /tmp s11d' EXIT TERM
log "$(nvidia-smi -L | head -1)"
for t in final fewer; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
for t in final fewer; do
  (cd /tmp/$t && XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s ABRT 110 python3 -X faulthandler run.py \
      --random-weights --layers 16 --max-len 16 --temperature 0 --compile-cache off \
      --timings-json $R/run16-$t.json) > $R/run16-$t.log 2>&1
  log "run.py 16 layers $t: exit $?; $(grep -m1 'tokens in' $R/run16-$t.log)"
  grep -A1 "^Output for prompt" $R/run16-$t.log >> $R/s11d.log
done
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], d['mode'], round(d['ms'], 4), round(d['roofline_pct'], 1)) for d in map(ast.literal_eval, sys.stdin)])"; }
model() {  # tree share layers round [modes]
  local opt=""; [ $2 != 0 ] && opt="--share $2"
  (cd /tmp/$1 && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 20 )) python3 bench.py model $opt \
      --layers $3 --batches 1,8 --modes ${5:-fast} --prefill 0 --context 1024 --iters 10 --compile-layers 0 \
      --json $R/m-s$2-r$4-$1-L$3.json) > $R/m-s$2-r$4-$1-L$3.log 2>&1
  log "share $2 round $4 $1 layers $3: exit $? (batch, mode, step ms, roofline %): $(summ $R/m-s$2-r$4-$1-L$3.log) $(grep -m1 -i 'vs reference' $R/m-s$2-r$4-$1-L$3.log)"
}
for round in 1 2; do for n in 2 16; do for t in final fewer; do
  [ "$(left)" -lt 100 ] && { log "out of time for the share"; break 3; }
  modes=fast; [ $round = 1 ] && [ $n = 2 ] && modes=fast,reference
  model $t 8 $n $round $modes
done; done; done
for n in 2 8; do for t in final fewer; do
  [ "$(left)" -lt 45 ] && { log "out of time for one GPU"; break 2; }
  model $t 0 $n 1
done; done
[ "$(left)" -gt 25 ] && (cd /tmp/final && XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout $(( $(left) - 3 )) python3 bench.py \
    profile --share 8 --layers 4 --batch 1 --json $R/prof-final-share8-b1.json) > $R/prof-final-share8-b1.log 2>&1
log "profile final share 8: exit $?; $(grep "a layer's kernels" $R/prof-final-share8-b1.log | head -1)"
log done
