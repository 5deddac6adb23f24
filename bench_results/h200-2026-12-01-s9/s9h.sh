#!/usr/bin/env bash
# Session 9, call H (one H200, ~3 min): branch fewer-kernels at 5e04fac (the gated expert kernel
# reads the token rows itself: no dispatch copy) against aad61ef (call G's "fewer").
#   git archive aad61ef -o .scratch/prev.tar; git archive fewer-kernels -o .scratch/fewer.tar
#   BUDGET=170 OUT=$OUT bash .scratch/s9h.sh      -> $OUT/s9h.tgz
# run.py 8 layers (greedy text), profile (4 layers, batch 1) of both, slopes (2 and 8 layers,
# batch 1 and 8) of both, the fast-vs-reference check at 2 layers with the new tree.
T0=$SECONDS; BUDGET=${BUDGET:-170}
R=/tmp/s9h; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s9h.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s9h.tgz" -C /tmp s9h' EXIT
log "$(nvidia-smi -L | head -1)"
for t in prev fewer; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
(cd /tmp/fewer && XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 90 python3 run.py \
    --random-weights --layers 8 --max-len 16 --temperature 0 --compile-cache off) > $R/run8-fewer.log 2>&1
log "run.py 8 layers fewer: exit $?; $(grep -m1 'tokens in' $R/run8-fewer.log)"
grep -A1 "^Output for prompt" $R/run8-fewer.log >> $R/s9h.log
for t in prev fewer; do
  (cd /tmp/$t && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
      timeout 120 python3 bench.py profile --layers 4 --batch 1 --json $R/prof-$t.json) > $R/prof-$t.log 2>&1
  log "profile $t: exit $?; $(head -1 $R/prof-$t.log); $(grep 'per layer, by kind' $R/prof-$t.log); $(grep -A7 "the host's side" $R/prof-$t.log | tr -s ' ' | tr '\n' ';')"
done
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], d['mode'], round(d['ms'], 4), round(d['roofline_pct'], 1), round(d.get('dispatch_ms', -1), 4)) for d in map(ast.literal_eval, sys.stdin)])"; }
for n in 2 8; do for t in prev fewer; do
  [ "$(left)" -lt 25 ] && { log "out of time"; break 2; }
  modes=fast; [ $n = 2 ] && [ $t = fewer ] && modes=fast,reference
  (cd /tmp/$t && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 5 )) python3 bench.py model \
      --layers $n --batches 1,8 --modes $modes --prefill 0 --context 1024 --iters 10 --compile-layers 0 \
      --json $R/m-$t-L$n.json) > $R/m-$t-L$n.log 2>&1
  log "$t layers $n: exit $? (batch, mode, step ms, roofline %, host ms): $(summ $R/m-$t-L$n.log); $(grep -m1 -i 'vs reference' $R/m-$t-L$n.log)"
done; done
log done
