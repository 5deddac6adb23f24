#!/usr/bin/env bash
# Session 11, call C (one H200, ~8 min). Trees: fewer (0180cb8), fold2 (26b3aef), fold4 (4f7e03a: fold2 + the
# attention kernel adds q/k/v's partials and applies RoPE + the first junction makes the router's logits),
# f2r (b57a5d2: fold2 + the router's logits only), fold4c (fold4 with the dense decode tiling patched: block_n 32,
# K slices of >= 1536 rows, so q/k/v hand the attention 4 partials, not 16).
# 1. the share of 8: bench.py model slopes from 2 to 16 layers (batches 1 and 8), trees interleaved, three rounds
#    (round 1 at 2 layers with the reference mode for the new trees: fast vs reference logits);
# 2. a profile of fold4 at the share of 8 (4 layers, batch 1) with its optimized HLO;
# 3. the whole model on one GPU, fold4 against fewer, slopes from 2 to 8 layers, one round.
#   BUDGET=480 OUT=$OUT bash .scratch/s11c.sh -> $OUT/s11c.tgz
T0=$SECONDS; BUDGET=${BUDGET:-480}
R=/tmp/s11c; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s11c.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s11c.tgz" -C /tmp s11c' EXIT TERM
log "$(nvidia-smi -L | head -1)"
TREES="fold4 f2r fold4c fold2 fewer"
for t in $TREES; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], d['mode'], round(d['ms'], 4), round(d['roofline_pct'], 1)) for d in map(ast.literal_eval, sys.stdin)])"; }
model() {  # tree share layers round [modes]
  local opt=""; [ $2 != 0 ] && opt="--share $2"
  (cd /tmp/$1 && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 20 )) python3 bench.py model $opt \
      --layers $3 --batches 1,8 --modes ${5:-fast} --prefill 0 --context 1024 --iters 10 --compile-layers 0 \
      --json $R/m-s$2-r$4-$1-L$3.json) > $R/m-s$2-r$4-$1-L$3.log 2>&1
  log "share $2 round $4 $1 layers $3: exit $? (batch, mode, step ms, roofline %): $(summ $R/m-s$2-r$4-$1-L$3.log) $(grep -m1 -i 'vs reference' $R/m-s$2-r$4-$1-L$3.log)"
}
for round in 1 2 3; do for n in 2 16; do for t in $TREES; do
  [ "$(left)" -lt 110 ] && { log "out of time for the share"; break 3; }
  modes=fast; [ $round = 1 ] && [ $n = 2 ] && case $t in fold4|f2r|fold4c) modes=fast,reference;; esac
  model $t 8 $n $round $modes
done; done; done
(cd /tmp/fold4 && XLA_FLAGS="--xla_dump_to=$R/hlo-fold4-share8 --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*apply_fn.*" \
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout 60 python3 bench.py profile --share 8 --layers 4 --batch 1 \
    --json $R/prof-fold4-share8-b1.json) > $R/prof-fold4-share8-b1.log 2>&1
log "profile fold4 share 8: exit $?; $(grep "a layer's kernels" $R/prof-fold4-share8-b1.log | head -1)"
find $R/hlo-fold4-share8 -type f ! -name '*after_optimizations.txt' -delete 2>/dev/null; gzip -r $R/hlo-fold4-share8 2>/dev/null
for n in 2 8; do for t in fold4 fewer; do
  [ "$(left)" -lt 40 ] && { log "out of time for one GPU"; break 2; }
  model $t 0 $n 1
done; done
log done
