#!/usr/bin/env bash
# Session 14, call B (one H200, ~8 min): main before this session (adc62fe, "base"), call A's head (d2c88f2,
# "qkv": one-token MoE + decode_qkv) and the head with the one-token output kernel summing its experts
# ("fold"). The script as run called down_probe2.py / down_probe.py without the TILES argument; merged since.
# 1. gpu_check.py in fold's tree;
# 2. the one-token output kernel's tiling (block_n, split_k) at the share of 8: bench.py profile (4 layers,
#    batch 1) through down_probe.py; the best by a layer's kernels becomes tree "tuned" if it is not the default;
# 3. the share of 8: slopes from 2 to 16 layers, batches 1 and 8, three rounds interleaved;
# 4. the whole model on one GPU: slopes from 2 to 8 layers, two rounds, qkv and fold.
#   git archive REV -o $PWD/.scratch/TREE.tar -- . ':!bench_results'   (base adc62fe, qkv d2c88f2, fold HEAD)
#   BUDGET=540 OUT=$OUT bash bench_results/h200-2026-12-02-s14/s14b.sh -> $OUT/s14b.tgz
T0=$SECONDS; BUDGET=${BUDGET:-540}
R=/tmp/s14b; mkdir -p $R
HERE=$PWD; S14=$HERE/bench_results/h200-2026-12-02-s14
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s14b.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s14b.tgz" -C /tmp s14b' EXIT
trap 'exit 1' TERM INT
log "$(nvidia-smi -L | head -1)"
for t in fold qkv base; do rm -rf /tmp/$t; mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
# 1.
(cd /tmp/fold && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 120 env PYTHONPATH=.:/tmp/site python3 \
    $S14/gpu_check.py) > $R/gpu_check.log 2>&1
log "gpu_check: exit $?; $(grep -c ' OK$' $R/gpu_check.log) OK, $(grep -c ' BAD$' $R/gpu_check.log) BAD"
# 2.
best="" best_us=999
for cfg in "128 4" "128 2" "64 2" "64 4" "32 2" "32 4" "64 1"; do
  set -- $cfg
  (cd /tmp/fold && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 60 env PYTHONPATH=.:/tmp/site python3 \
      $S14/down_probe.py 1 $1 $2 -- profile --share 8 --layers 4 --batch 1 --json $R/profile-down-$1-$2.json) \
      > $R/profile-down-$1-$2.log 2>&1
  us=$(grep -o "a layer's kernels: [0-9.]*" $R/profile-down-$1-$2.log | grep -o "[0-9.]*$")
  log "down $1 cols x $2 slices: exit $?; a layer's kernels ${us:-?} us; $(grep -E 'int8_grouped_matmul|residual_norm' $R/profile-down-$1-$2.log | tr -s ' ' | tr '\n' ';')"
  [ -n "$us" ] && python3 -c "import sys; sys.exit(0 if $us < $best_us else 1)" && { best="$1 $2"; best_us=$us; }
done
log "best: $best ($best_us us)"
TREES="fold qkv base"; [ -n "$best" ] && [ "$best" != "128 4" ] && TREES="fold tuned qkv base"
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], d['mode'], round(d['ms'], 4), round(d['roofline_pct'], 1), round(d['dispatch_ms'], 3)) for d in map(ast.literal_eval, sys.stdin)])"; }
model() {  # tree share layers name [extra bench.py args]
  local opt="" t=$1 s=$2 n=$3 name=$4 dir=$1 run=bench.py; shift 4
  [ $s != 0 ] && opt="--share $s"
  [ $t = tuned ] && { dir=fold; run="$S14/down_probe.py 1 $best --"; }
  (cd /tmp/$dir && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 20 )) env PYTHONPATH=.:/tmp/site \
      python3 $run model $opt --layers $n --batches 1,8 --modes fast --prefill 0 --context 1024 --iters 10 \
      --compile-layers 0 --json $R/m-s$s-$name-$t-L$n.json "$@") > $R/m-s$s-$name-$t-L$n.log 2>&1
  log "share $s $name $t layers $n: exit $? (batch, mode, step ms, roofline %, host ms): $(summ $R/m-s$s-$name-$t-L$n.log) $(grep -m1 -i 'vs reference' $R/m-s$s-$name-$t-L$n.log)"
}
# 3.
for round in 1 2 3; do
  for n in 2 16; do for t in $TREES; do
    [ "$(left)" -lt 110 ] && { log "out of time for the share of 8"; break 3; }
    if [ $round = 1 ] && [ $n = 2 ]; then model $t 8 $n r$round --modes fast,reference; else model $t 8 $n r$round; fi
  done; done
done
# 4.
for round in 1 2; do for n in 2 8; do for t in fold qkv; do
  [ "$(left)" -lt 30 ] && { log "out of time for one GPU"; break 3; }
  model $t 0 $n r$round
done; done; done
log done
