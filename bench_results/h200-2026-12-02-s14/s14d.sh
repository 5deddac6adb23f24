#!/usr/bin/env bash
# Session 14, call D (one H200, ~5 min): the second junction's tiling with 8 partial sums (junction_b.py):
# 1. the junction alone, per (slices, warps); 2. if the best is not main's 8 x 8: profiles at the share of 8
# (4 layers, batch 1) and slopes from 2 to 16 layers, main ("new") against main with the junctions of >= 4
# parts patched to the best ("jb"), two rounds interleaved.
#   git archive HEAD -o $PWD/.scratch/new.tar -- . ':!bench_results'
#   BUDGET=290 OUT=$OUT bash bench_results/h200-2026-12-02-s14/s14d.sh -> $OUT/s14d.tgz
T0=$SECONDS; BUDGET=${BUDGET:-290}
R=/tmp/s14d; mkdir -p $R
HERE=$PWD; S14=$HERE/bench_results/h200-2026-12-02-s14
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s14d.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s14d.tgz" -C /tmp s14d' EXIT
trap 'exit 1' TERM INT
log "$(nvidia-smi -L | head -1)"
rm -rf /tmp/new; mkdir -p /tmp/new && tar xf .scratch/new.tar -C /tmp/new
(cd /tmp/new && timeout 90 env PYTHONPATH=.:/tmp/site python3 $S14/junction_b.py sweep $R/junction_b.json) \
    > $R/junction_b.log 2>&1
log "sweep: exit $?; $(grep -E '^slices|^best' $R/junction_b.log | tr '\n' ';')"
read -r _ SL WA <<< "$(grep '^best' $R/junction_b.log || echo best 8 8)"
[ "$SL $WA" = "8 8" ] && { log "main's tiling is the best; done"; exit 0; }
run() {  # tree name bench.py-args...
  local t=$1 name=$2 prog=bench.py; shift 2
  [ $t = jb ] && prog="$S14/junction_b.py $SL $WA --"
  (cd /tmp/new && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 10 )) env PYTHONPATH=.:/tmp/site \
      python3 $prog "$@") > $R/$name-$t.log 2>&1
  echo $?
}
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], round(d['ms'], 4), round(d['dispatch_ms'], 3)) for d in map(ast.literal_eval, sys.stdin)])"; }
for round in 1 2; do
  for t in new jb; do
    [ "$(left)" -lt 30 ] && break 2
    rc=$(run $t profile-r$round profile --share 8 --layers 4 --batch 1 --json $R/profile-r$round-$t.json)
    log "profile r$round $t: exit $rc; $(grep -o "a layer's kernels: [0-9.]* us" $R/profile-r$round-$t.log); $(grep -E 'residual_norm' $R/profile-r$round-$t.log | tr -s ' ' | tr '\n' ';')"
  done
  for n in 2 16; do for t in new jb; do
    [ "$(left)" -lt 25 ] && break 3
    rc=$(run $t m-s8-r$round-L$n model --share 8 --layers $n --batches 1 --modes fast --prefill 0 --context 1024 \
        --iters 10 --compile-layers 0 --json $R/m-s8-r$round-$t-L$n.json)
    log "share 8 r$round $t layers $n: exit $rc (batch, ms, host ms): $(summ $R/m-s8-r$round-L$n-$t.log)"
  done; done
done
log done
