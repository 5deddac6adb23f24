#!/usr/bin/env bash
# Session 9, call I (one H200, ~2 min): bench.py model --share 8 and --share 2 with branch
# fewer-kernels: one device's part of a 1x8 and a 1x2 mesh, on one device, without collectives.
#   git archive fewer-kernels -o .scratch/fewer.tar; BUDGET=110 OUT=$OUT bash .scratch/s9i.sh -> $OUT/s9i.tgz
T0=$SECONDS; BUDGET=${BUDGET:-110}
R=/tmp/s9i; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s9i.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s9i.tgz" -C /tmp s9i' EXIT
log "$(nvidia-smi -L | head -1)"
mkdir -p /tmp/fewer && tar xf .scratch/fewer.tar -C /tmp/fewer
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], d['mode'], round(d['ms'], 4), round(d['roofline_pct'], 1), round(d.get('dispatch_ms', -1), 4)) for d in map(ast.literal_eval, sys.stdin)])"; }
for share in 8 2; do for n in 2 8; do
  [ "$(left)" -lt 20 ] && { log "out of time"; break 2; }
  (cd /tmp/fewer && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 3 )) python3 bench.py model \
      --share $share --layers $n --batches 1,8 --modes fast --prefill 0 --context 1024 --iters 10 --compile-layers 0 \
      --json $R/m-share$share-L$n.json) > $R/m-share$share-L$n.log 2>&1
  log "share $share layers $n: exit $? (batch, mode, step ms, roofline %, host ms): $(summ $R/m-share$share-L$n.log)"
done; done
log done
