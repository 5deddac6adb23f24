#!/usr/bin/env bash
# Session 11, call A (one H200, ~5 min): fewer-kernels (0180cb8) against fold (98230f7: the dense kernel reads
# x unpadded and scaled, the junction adds its partial sums). First the new kernels on the GPU against float64
# numpy, then one device's share of 8: bench.py model slopes from 2 to 16 layers (batches 1 and 8), trees
# interleaved, three rounds (round 1 with the reference mode: fast vs reference logits); one profile of each.
#   git archive 0180cb8 -o .scratch/fewer.tar; git archive 98230f7 -o .scratch/fold.tar
#   BUDGET=330 OUT=$OUT bash .scratch/s11a.sh -> $OUT/s11a.tgz
T0=$SECONDS; BUDGET=${BUDGET:-330}
R=/tmp/s11a; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s11a.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s11a.tgz" -C /tmp s11a' EXIT TERM
log "$(nvidia-smi -L | head -1)"
for t in fold fewer; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
(cd /tmp/fold && timeout 90 python3 $OLDPWD/.scratch/gpu_check.py) > $R/gpu_check.log 2>&1
log "gpu_check: exit $?; $(grep -c OK $R/gpu_check.log) OK, $(grep -c BAD $R/gpu_check.log) BAD"; tail -3 $R/gpu_check.log
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], d['mode'], round(d['ms'], 4), round(d['roofline_pct'], 1)) for d in map(ast.literal_eval, sys.stdin)])"; }
for round in 1 2 3; do for n in 2 16; do for t in fold fewer; do
  [ "$(left)" -lt 45 ] && { log "out of time"; break 3; }
  modes=fast; [ $round = 1 ] && [ $n = 2 ] && modes=fast,reference
  (cd /tmp/$t && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 40 )) python3 bench.py model --share 8 \
      --layers $n --batches 1,8 --modes $modes --prefill 0 --context 1024 --iters 10 --compile-layers 0 \
      --json $R/m-r$round-$t-L$n.json) > $R/m-r$round-$t-L$n.log 2>&1
  log "round $round $t layers $n: exit $? (batch, mode, step ms, roofline %): $(summ $R/m-r$round-$t-L$n.log) $(grep -m1 -i 'vs reference' $R/m-r$round-$t-L$n.log)"
done; done; done
for t in fold fewer; do
  [ "$(left)" -lt 18 ] && break
  (cd /tmp/$t && XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout $(( $(left) - 3 )) python3 bench.py profile --share 8 \
      --layers 4 --batch 1 --json $R/prof-$t-share8-b1.json) > $R/prof-$t-share8-b1.log 2>&1
  log "profile $t share 8: exit $?; $(grep "a layer's kernels" $R/prof-$t-share8-b1.log | head -1); $(grep 'per layer, by kind' $R/prof-$t-share8-b1.log)"
done
log done
