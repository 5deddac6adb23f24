#!/usr/bin/env bash
# Session 9, call D (one H200, ~7 min): branch fewer-kernels (a57f12c: the cache write as a
# scatter promised in bounds, the attention split merge in one kernel, both residual junctions
# as kernels.residual_norm, the second also making the next layer's norm) against main (4e0dbac).
#   git archive main -o .scratch/main.tar; git archive fewer-kernels -o .scratch/fewer.tar
#   BUDGET=450 OUT=$OUT bash .scratch/s9d.sh      -> $OUT/s9d.tgz
# 1. norm_sweep.py: the junction kernel by NORM_NUM_WARPS against XLA's norms; the fastest
#    count is written into the fewer tree's kernels.py for what follows;
# 2. run.py --random-weights --layers 8 greedy text, both trees;
# 3. bench.py profile, 4 layers, batch 1, both trees, with the fewer tree's optimized HLO;
# 4. bench.py model slopes, layers 2 and 8, batch 1 and 8, trees interleaved, two rounds.
T0=$SECONDS; BUDGET=${BUDGET:-450}
R=/tmp/s9d; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s9d.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s9d.tgz" -C /tmp s9d' EXIT
log "$(nvidia-smi -L | head -1)"
for t in main fewer; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
cp .scratch/norm_sweep.py /tmp/fewer/
(cd /tmp/fewer && XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout 120 python3 norm_sweep.py) > $R/norm_sweep.log 2>&1
log "norm sweep: exit $?"; cat $R/norm_sweep.log | grep "^rows" | tee -a $R/s9d.log
best=$(grep "^rows 1 warps" $R/norm_sweep.log | sed 's/rows 1 warps \([0-9]*\): \([0-9.]*\) us.*/\2 \1/' | sort -n | head -1 | cut -d' ' -f2)
if [ -n "$best" ]; then sed -i "s/^NORM_NUM_WARPS = .*/NORM_NUM_WARPS = $best/" /tmp/fewer/kernels.py; fi
log "fewer tree runs with $(grep '^NORM_NUM_WARPS' /tmp/fewer/kernels.py)"
for t in main fewer; do
  (cd /tmp/$t && XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 90 python3 run.py \
      --random-weights --layers 8 --max-len 16 --temperature 0 --compile-cache off) > $R/run8-$t.log 2>&1
  log "run.py 8 layers $t: exit $?; $(grep -m1 'tokens in' $R/run8-$t.log)"
  grep -A1 "^Output for prompt" $R/run8-$t.log >> $R/s9d.log
done
for t in main fewer; do
  dump=""; [ $t = fewer ] && dump="--xla_dump_to=$R/hlo-$t --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*apply_fn.*"
  (cd /tmp/$t && XLA_FLAGS="$dump" XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
      timeout 120 python3 bench.py profile --layers 4 --batch 1 --json $R/prof-$t.json) > $R/prof-$t.log 2>&1
  log "profile $t: exit $?; $(grep 'per layer, by kind' $R/prof-$t.log); $(grep -A7 "the host's side" $R/prof-$t.log | tr -s ' ' | tr '\n' ';')"
done
[ -d $R/hlo-fewer ] && { find $R/hlo-fewer -type f ! -name '*after_optimizations.txt' -delete; gzip -r $R/hlo-fewer; }
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], d['mode'], round(d['ms'], 4), round(d['roofline_pct'], 1), round(d.get('dispatch_ms', -1), 4)) for d in map(ast.literal_eval, sys.stdin)])"; }
for round in 1 2; do for n in 2 8; do for t in main fewer; do
  [ "$(left)" -lt 40 ] && { log "out of time"; break 3; }
  modes=fast; [ $n = 2 ] && [ $round = 1 ] && modes=fast,reference
  (cd /tmp/$t && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 5 )) python3 bench.py model \
      --layers $n --batches 1,8 --modes $modes --prefill 0 --context 1024 --iters 10 --compile-layers 0 \
      --json $R/m-r$round-$t-L$n.json) > $R/m-r$round-$t-L$n.log 2>&1
  log "round $round $t layers $n: exit $? (batch, mode, step ms, roofline %, host ms): $(summ $R/m-r$round-$t-L$n.log); $(grep -m1 -i 'vs reference' $R/m-r$round-$t-L$n.log)"
done; done; done
log done
