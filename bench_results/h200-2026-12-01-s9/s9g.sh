#!/usr/bin/env bash
# Session 9, call G (one H200, ~4 min): branch fewer-kernels at aad61ef (the decode-attention kernel
# writes the cache; one XLA fusion makes q, k and v; junction kernels; the dense decode kernel's
# pad rows unwritten) against main (4e0dbac).
#   git archive main -o .scratch/main.tar; git archive fewer-kernels -o .scratch/fewer.tar
#   BUDGET=240 OUT=$OUT bash .scratch/s9g.sh      -> $OUT/s9g.tgz
# 1. run.py --random-weights --layers 8 greedy text with fewer (the engine through the kernel);
# 2. bench.py profile, 4 layers, batch 1, both trees; the fewer tree's optimized HLO, and any
#    copy of a cache-shaped buffer in it (the kernel must write the cache in place);
# 3. bench.py model slopes, layers 2 and 8, batch 1 and 8, trees interleaved, two rounds.
T0=$SECONDS; BUDGET=${BUDGET:-240}
R=/tmp/s9g; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s9g.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s9g.tgz" -C /tmp s9g' EXIT
log "$(nvidia-smi -L | head -1)"
for t in main fewer; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
(cd /tmp/fewer && XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 90 python3 run.py \
    --random-weights --layers 8 --max-len 16 --temperature 0 --compile-cache off) > $R/run8-fewer.log 2>&1
log "run.py 8 layers fewer: exit $?; $(grep -m1 'tokens in' $R/run8-fewer.log)"
grep -A1 "^Output for prompt" $R/run8-fewer.log >> $R/s9g.log
for t in main fewer; do
  dump=""; [ $t = fewer ] && dump="--xla_dump_to=$R/hlo-$t --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*apply_fn.*"
  (cd /tmp/$t && XLA_FLAGS="$dump" XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
      timeout 120 python3 bench.py profile --layers 4 --batch 1 --json $R/prof-$t.json) > $R/prof-$t.log 2>&1
  log "profile $t: exit $?; $(grep 'per layer, by kind' $R/prof-$t.log); $(grep -A7 "the host's side" $R/prof-$t.log | tr -s ' ' | tr '\n' ';')"
done
if [ -d $R/hlo-fewer ]; then
  find $R/hlo-fewer -type f ! -name '*after_optimizations.txt' -delete
  log "cache-shaped copies in the optimized step: $(cat $R/hlo-fewer/*after_optimizations.txt | grep -c 'bf16\[1,1152,8,128\]{[0-9,]*} copy(')"
  gzip -r $R/hlo-fewer
fi
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], d['mode'], round(d['ms'], 4), round(d['roofline_pct'], 1), round(d.get('dispatch_ms', -1), 4)) for d in map(ast.literal_eval, sys.stdin)])"; }
for round in 1 2; do for n in 2 8; do for t in main fewer; do
  [ "$(left)" -lt 30 ] && { log "out of time"; break 3; }
  modes=fast; [ $n = 2 ] && [ $round = 1 ] && modes=fast,reference
  (cd /tmp/$t && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 5 )) python3 bench.py model \
      --layers $n --batches 1,8 --modes $modes --prefill 0 --context 1024 --iters 10 --compile-layers 0 \
      --json $R/m-r$round-$t-L$n.json) > $R/m-r$round-$t-L$n.log 2>&1
  log "round $round $t layers $n: exit $? (batch, mode, step ms, roofline %, host ms): $(summ $R/m-r$round-$t-L$n.log); $(grep -m1 -i 'vs reference' $R/m-r$round-$t-L$n.log)"
done; done; done
log done
