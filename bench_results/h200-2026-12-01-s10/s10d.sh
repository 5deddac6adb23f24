#!/usr/bin/env bash
# Session 10, call D (one H200, ~4 min): one device's share of 8 with the share's own scale blocks,
# main (be2e61b) against fewer-kernels with main merged in (e696bbe): bench.py model slopes from 2 to
# 16 layers (batches 1 and 8), trees interleaved, three rounds; then one profile of each (4 layers, batch 1).
#   git archive main -o .scratch/new.tar; git archive fewer-kernels -o .scratch/fewer.tar
#   BUDGET=330 OUT=$OUT bash .scratch/s10d.sh -> $OUT/s10d.tgz
T0=$SECONDS; BUDGET=${BUDGET:-330}
R=/tmp/s10d; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s10d.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s10d.tgz" -C /tmp s10d' EXIT TERM
log "$(nvidia-smi -L | head -1)"
for t in new fewer; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], round(d['ms'], 4), round(d['roofline_pct'], 1)) for d in map(ast.literal_eval, sys.stdin)])"; }
for round in 1 2 3; do for n in 2 16; do for t in new fewer; do
  [ "$(left)" -lt 45 ] && { log "out of time"; break 3; }
  (cd /tmp/$t && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 40 )) python3 bench.py model --share 8 \
      --layers $n --batches 1,8 --modes fast --prefill 0 --context 1024 --iters 10 --compile-layers 0 \
      --json $R/m-r$round-$t-L$n.json) > $R/m-r$round-$t-L$n.log 2>&1
  log "round $round $t layers $n: exit $? (batch, step ms, roofline %): $(summ $R/m-r$round-$t-L$n.log)"
done; done; done
for t in new fewer; do
  [ "$(left)" -lt 18 ] && break
  (cd /tmp/$t && XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout $(( $(left) - 3 )) python3 bench.py profile --share 8 \
      --layers 4 --batch 1 --json $R/prof-$t-share8-b1.json) > $R/prof-$t-share8-b1.log 2>&1
  log "profile $t share 8: exit $?; $(grep 'per layer, by kind' $R/prof-$t-share8-b1.log)"
done
log done
