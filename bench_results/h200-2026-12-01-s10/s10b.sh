#!/usr/bin/env bash
# Session 10, call B (one H200, ~9 min), main at 8715025 and fewer-kernels at 13eef86:
# 1. moe_sweep.py 8: the MoE decode kernels' tilings at the share of 8, by the device's time (profiler);
# 2. moe_prof_ab.py: the share of 8 profiled in the model, default tilings against the sweep's best;
# 3. bench.py model slopes (layers 2 and 8, batches 1 and 8), main against fewer-kernels, on the
#    whole model and on the share of 8, trees interleaved, two rounds (fewer: NORM_MAX_ROWS = 1).
#   git archive main -o .scratch/main.tar; git archive fewer-kernels -o .scratch/fewer.tar
#   BUDGET=560 OUT=$OUT bash .scratch/s10b.sh -> $OUT/s10b.tgz
T0=$SECONDS; BUDGET=${BUDGET:-560}
R=/tmp/s10b; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s10b.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s10b.tgz" -C /tmp s10b' EXIT TERM
log "$(nvidia-smi -L | head -1)"
for t in main fewer; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
cp .scratch/moe_sweep.py .scratch/moe_prof_ab.py /tmp/main/
(cd /tmp/main && OUT=$R XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout 240 python3 moe_sweep.py 8 200) > $R/moe_sweep.log 2>&1
log "moe_sweep: exit $?"; grep "==\|best\|trace\|done" $R/moe_sweep.log | tee -a $R/s10b.log
(cd /tmp/main && XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout 120 python3 moe_prof_ab.py $R/moe_sweep_share8.json) > $R/moe_prof_ab.log 2>&1
log "moe_prof_ab: exit $?"; grep "tuned:\|RESULT" $R/moe_prof_ab.log | tee -a $R/s10b.log
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], round(d['ms'], 4), round(d['roofline_pct'], 1)) for d in map(ast.literal_eval, sys.stdin)])"; }
for round in 1 2; do for share in 0 8; do for n in 2 8; do for t in main fewer; do
  [ "$(left)" -lt 20 ] && { log "out of time"; break 4; }
  opt=""; [ $share = 8 ] && opt="--share 8"
  (cd /tmp/$t && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 5 )) python3 bench.py model $opt \
      --layers $n --batches 1,8 --modes fast --prefill 0 --context 1024 --iters 10 --compile-layers 0 \
      --json $R/m-r$round-s$share-$t-L$n.json) > $R/m-r$round-s$share-$t-L$n.log 2>&1
  log "round $round share $share $t layers $n: exit $? (batch, step ms, roofline %): $(summ $R/m-r$round-s$share-$t-L$n.log)"
done; done; done; done
log done
