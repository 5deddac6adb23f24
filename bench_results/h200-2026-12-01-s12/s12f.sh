#!/usr/bin/env bash
# Session 12, call F (one H200, ~2 min): fewer-kernels' final head of the session (final: the dense kernel's
# narrower blocks and the gated kernel's extra stage at the share of 8) at the share of 8: bench.py model, 2 and
# 16 layers, batches 1 and 8 (2 layers with the reference mode: fast against reference), and its profile.
#   BUDGET=200 OUT=$OUT bash .scratch/s12f.sh -> $OUT/s12f.tgz
T0=$SECONDS; BUDGET=${BUDGET:-200}
R=/tmp/s12f; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s12f.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s12f.tgz" -C /tmp s12f' EXIT
trap 'exit 1' TERM INT
log "$(nvidia-smi -L | head -1)"
mkdir -p /tmp/final && tar xf .scratch/final.tar -C /tmp/final
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], d['mode'], round(d['ms'], 4), round(d['roofline_pct'], 1)) for d in map(ast.literal_eval, sys.stdin)])"; }
for n in 2 16; do
  modes=fast; [ $n = 2 ] && modes=fast,reference
  (cd /tmp/final && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 20 )) python3 bench.py model --share 8 \
      --layers $n --batches 1,8 --modes $modes --prefill 0 --context 1024 --iters 10 --compile-layers 0 \
      --json $R/m-s8-final-L$n.json) > $R/m-s8-final-L$n.log 2>&1
  log "layers $n: exit $? (batch, mode, step ms, roofline %): $(summ $R/m-s8-final-L$n.log) $(grep -m1 -i 'vs reference' $R/m-s8-final-L$n.log)"
done
(cd /tmp/final && XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout $(( $(left) - 3 )) python3 bench.py \
    profile --share 8 --layers 4 --batch 1 --json $R/prof-final-share8-b1.json) > $R/prof-final-share8-b1.log 2>&1
log "profile final share 8: exit $?; $(grep "a layer's kernels" $R/prof-final-share8-b1.log | head -1)"
log done
