#!/usr/bin/env bash
# Session 12, call D (one H200, ~4 min): fewer-kernels with the dense decode kernel's narrower column blocks
# at the share of 8 (rule, 284d38e) against the branch without it (norule, f6de585):
# 1. bench.py model --share 8 slopes from 2 to 16 layers, batches 1 and 8, three rounds interleaved (round 1 at
#    2 layers with the reference mode);
# 2. a profile of rule at the share of 8 (4 layers, batch 1).
#   BUDGET=300 OUT=$OUT bash .scratch/s12d.sh -> $OUT/s12d.tgz
T0=$SECONDS; BUDGET=${BUDGET:-300}
R=/tmp/s12d; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s12d.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s12d.tgz" -C /tmp s12d' EXIT
trap 'exit 1' TERM INT
log "$(nvidia-smi -L | head -1)"
TREES="rule norule"
for t in $TREES; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], d['mode'], round(d['ms'], 4), round(d['roofline_pct'], 1)) for d in map(ast.literal_eval, sys.stdin)])"; }
for round in 1 2 3; do for n in 2 16; do for t in $TREES; do
  [ "$(left)" -lt 40 ] && { log "out of time"; break 3; }
  modes=fast; [ $round = 1 ] && [ $n = 2 ] && modes=fast,reference
  name=m-s8-r$round-$t-L$n
  (cd /tmp/$t && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 20 )) python3 bench.py model --share 8 \
      --layers $n --batches 1,8 --modes $modes --prefill 0 --context 1024 --iters 10 --compile-layers 0 \
      --json $R/$name.json) > $R/$name.log 2>&1
  log "$name: exit $? (batch, mode, step ms, roofline %): $(summ $R/$name.log) $(grep -m1 -i 'vs reference' $R/$name.log)"
done; done; done
[ "$(left)" -gt 25 ] && (cd /tmp/rule && XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout $(( $(left) - 3 )) python3 bench.py \
    profile --share 8 --layers 4 --batch 1 --json $R/prof-rule-share8-b1.json) > $R/prof-rule-share8-b1.log 2>&1
log "profile rule share 8: exit $?; $(grep "a layer's kernels" $R/prof-rule-share8-b1.log | head -1)"
log done
