#!/usr/bin/env bash
# Session 12, call G (one H200, ~2.5 min): the session's last trees at one device's share of 8, interleaved:
# fewer-kernels 8f450bc (final) against main cd5b735 (mainf); bench.py model --share 8, 2 and 16 layers,
# batches 1 and 8, two rounds.
#   BUDGET=240 OUT=$OUT bash .scratch/s12g.sh -> $OUT/s12g.tgz
T0=$SECONDS; BUDGET=${BUDGET:-240}
R=/tmp/s12g; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s12g.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s12g.tgz" -C /tmp s12g' EXIT
trap 'exit 1' TERM INT
log "$(nvidia-smi -L | head -1)"
TREES="final mainf"
for t in $TREES; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], d['mode'], round(d['ms'], 4), round(d['roofline_pct'], 1), round(d['dispatch_ms'], 3)) for d in map(ast.literal_eval, sys.stdin)])"; }
for round in 1 2; do for n in 2 16; do for t in $TREES; do
  [ "$(left)" -lt 30 ] && { log "out of time"; break 3; }
  name=m-s8-r$round-$t-L$n
  (cd /tmp/$t && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 10 )) python3 bench.py model --share 8 \
      --layers $n --batches 1,8 --modes fast --prefill 0 --context 1024 --iters 10 --compile-layers 0 \
      --json $R/$name.json) > $R/$name.log 2>&1
  log "$name: exit $? (batch, mode, step ms, roofline %, host ms): $(summ $R/$name.log)"
done; done; done
log done
