#!/usr/bin/env bash
# Session 11, call B (one H200, ~7 min): fewer-kernels (0180cb8) against fold2 (26b3aef: the dense kernel reads x
# unpadded, the junctions add the output projection's partial sums and apply the next layer's norm) and fold3
# (e086b91: + decode attention adds q/k/v's partial sums and applies RoPE).
# 1. one device's share of 8: bench.py model slopes from 2 to 16 layers (batches 1 and 8), trees interleaved,
#    three rounds (round 1 at 2 layers with the reference mode: fast vs reference logits);
# 2. the whole model on one GPU: slopes from 2 to 8 layers, fold3 against fewer, two rounds;
# 3. one profile of fold3 at the share of 8 (4 layers, batch 1).
#   git archive 0180cb8 -o .scratch/fewer.tar; git archive 26b3aef -o .scratch/fold2.tar; git archive e086b91 -o .scratch/fold3.tar
#   BUDGET=450 OUT=$OUT bash .scratch/s11b.sh -> $OUT/s11b.tgz
T0=$SECONDS; BUDGET=${BUDGET:-450}
R=/tmp/s11b; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s11b.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s11b.tgz" -C /tmp s11b' EXIT TERM
log "$(nvidia-smi -L | head -1)"
for t in fold3 fold2 fewer; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], d['mode'], round(d['ms'], 4), round(d['roofline_pct'], 1)) for d in map(ast.literal_eval, sys.stdin)])"; }
model() {  # tree share layers round [modes]
  local opt=""; [ $2 != 0 ] && opt="--share $2"
  (cd /tmp/$1 && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 20 )) python3 bench.py model $opt \
      --layers $3 --batches 1,8 --modes ${5:-fast} --prefill 0 --context 1024 --iters 10 --compile-layers 0 \
      --json $R/m-s$2-r$4-$1-L$3.json) > $R/m-s$2-r$4-$1-L$3.log 2>&1
  log "share $2 round $4 $1 layers $3: exit $? (batch, mode, step ms, roofline %): $(summ $R/m-s$2-r$4-$1-L$3.log) $(grep -m1 -i 'vs reference' $R/m-s$2-r$4-$1-L$3.log)"
}
for round in 1 2 3; do for n in 2 16; do for t in fold3 fold2 fewer; do
  [ "$(left)" -lt 200 ] && { log "out of time for the share"; break 3; }
  modes=fast; [ $round = 1 ] && [ $n = 2 ] && modes=fast,reference
  model $t 8 $n $round $modes
done; done; done
for round in 1 2; do for n in 2 8; do for t in fold3 fewer; do
  [ "$(left)" -lt 50 ] && { log "out of time for one GPU"; break 3; }
  model $t 0 $n $round
done; done; done
[ "$(left)" -gt 25 ] && (cd /tmp/fold3 && XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout $(( $(left) - 3 )) python3 bench.py \
    profile --share 8 --layers 4 --batch 1 --json $R/prof-fold3-share8-b1.json) > $R/prof-fold3-share8-b1.log 2>&1
log "profile fold3 share 8: exit $?; $(grep "a layer's kernels" $R/prof-fold3-share8-b1.log | head -1)"
log done
