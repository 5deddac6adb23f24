#!/usr/bin/env bash
# Session 12, call B (one H200, ~6 min): main (ac24fc2) against fewer-kernels (065360d); both now trace and
# lower each kernel call once for all layers (main: the route kernel; the branch: route and junctions).
# 1. one device's share of 2 and of 4: bench.py model slopes (2 -> 8 layers for 2, 2 -> 16 for 4), batch 1
#    and 8, two rounds interleaved: with call A's 1 GPU and share-of-8 slopes, the fixed part of a layer
#    before any collective (t(n) = F + V/n over n = 1, 2, 4, 8);
# 2. the used prefix on the branch's attention (partial sums and RoPE in the kernel): batch 32, 1024 tokens,
#    8192- against 1152-position caches, 2 layers, one GPU, both trees;
# 3. the decode program's lowering time at 16 layers (bench.py's lower_s), against call A's trees.
#   git archive ac24fc2 -o .scratch/main2.tar -- . ':!bench_results'; the same for 065360d -> head2.tar
#   BUDGET=420 OUT=$OUT bash .scratch/s12b.sh -> $OUT/s12b.tgz
T0=$SECONDS; BUDGET=${BUDGET:-420}
R=/tmp/s12b; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s12b.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s12b.tgz" -C /tmp s12b' EXIT
trap 'exit 1' TERM INT
log "$(nvidia-smi -L | head -1)"
TREES="head2 main2"
for t in $TREES; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], d['mode'], round(d['ms'], 4), round(d['roofline_pct'], 1), round(d['lower_s'], 2)) for d in map(ast.literal_eval, sys.stdin)])"; }
model() {  # tree share layers round name [extra args]
  local t=$1 s=$2 n=$3 r=$4 name=$5; shift 5
  local opt=""; [ $s != 0 ] && opt="--share $s"
  (cd /tmp/$t && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 10 )) python3 bench.py model $opt \
      --layers $n --modes fast --prefill 0 --iters 10 --compile-layers 0 "$@" \
      --json $R/$name.json) > $R/$name.log 2>&1
  log "$name: exit $? (batch, mode, step ms, roofline %, lower s): $(summ $R/$name.log)"
}
for round in 1 2; do
  for t in $TREES; do
    [ "$(left)" -lt 40 ] && { log "out of time"; break 2; }
    model $t 0 2 $round b32-r$round-$t-c1152 --batches 32 --context 1024
    model $t 0 2 $round b32-r$round-$t-c8192 --batches 32 --context 1024 --cache-len 8192
  done
  for s in 2 4; do
    hi=8; [ $s = 4 ] && hi=16
    for n in 2 $hi; do for t in $TREES; do
      [ "$(left)" -lt 40 ] && { log "out of time"; break 4; }
      model $t $s $n $round m-s$s-r$round-$t-L$n --batches 1,8 --context 1024
    done; done
  done
done
log done
