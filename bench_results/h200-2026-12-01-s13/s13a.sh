#!/usr/bin/env bash
# Session 13, call A (one H200, ~8 min): main at the session's start (37fd65e, "base") against main with this
# session's first changes ("new": the dense kernel's narrower columns and unpadded rows, the gated kernel's
# stages, the one-row cache write in place, RoPE's frequencies from the host).
# 1. gpu_check.py in new's tree: the dense kernel compiled, against float64 numpy;
# 2. the share of 8: bench.py model slopes from 2 to 16 layers, batches 1 and 8, two rounds interleaved
#    (round 1 at 2 layers with the reference mode);
# 3. a profile of each tree at the share of 8 (4 layers, batch 1): what kernels a layer still runs.
#   git archive 37fd65e -o $PWD/.scratch/base.tar -- . ':!bench_results'; the same for HEAD -> new.tar
#   BUDGET=540 OUT=$OUT bash bench_results/h200-2026-12-01-s13/s13a.sh -> $OUT/s13a.tgz
T0=$SECONDS; BUDGET=${BUDGET:-540}
R=/tmp/s13a; mkdir -p $R
HERE=$PWD
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s13a.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s13a.tgz" -C /tmp s13a' EXIT
trap 'exit 1' TERM INT
log "$(nvidia-smi -L | head -1)"
TREES="new base"
for t in $TREES; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
# 1.
(cd /tmp/new && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 150 env PYTHONPATH=.:/tmp/site python3 \
    $HERE/bench_results/h200-2026-12-01-s13/gpu_check.py) > $R/gpu_check.log 2>&1
log "gpu_check: exit $?; $(grep -c ' OK$' $R/gpu_check.log) OK, $(grep -c ' BAD$' $R/gpu_check.log) BAD"
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], d['mode'], round(d['ms'], 4), round(d['roofline_pct'], 1), round(d['dispatch_ms'], 3)) for d in map(ast.literal_eval, sys.stdin)])"; }
model() {  # tree share layers round [modes]
  local opt=""; [ $2 != 0 ] && opt="--share $2"
  (cd /tmp/$1 && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 20 )) python3 bench.py model $opt \
      --layers $3 --batches 1,8 --modes ${5:-fast} --prefill 0 --context 1024 --iters 10 --compile-layers 0 \
      --json $R/m-s$2-r$4-$1-L$3.json) > $R/m-s$2-r$4-$1-L$3.log 2>&1
  log "share $2 round $4 $1 layers $3: exit $? (batch, mode, step ms, roofline %, host ms): $(summ $R/m-s$2-r$4-$1-L$3.log) $(grep -m1 -i 'vs reference' $R/m-s$2-r$4-$1-L$3.log)"
}
# 2.
for round in 1 2; do
  for n in 2 16; do for t in $TREES; do
    [ "$(left)" -lt 100 ] && { log "out of time"; break 3; }
    modes=fast; [ $round = 1 ] && [ $n = 2 ] && modes=fast,reference
    model $t 8 $n $round $modes
  done; done
done
# 3.
for t in $TREES; do
  [ "$(left)" -lt 40 ] && { log "no time for the profile of $t"; break; }
  (cd /tmp/$t && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 10 )) python3 bench.py profile --share 8 \
      --layers 4 --batch 1 --json $R/profile-s8-$t.json) > $R/profile-s8-$t.log 2>&1
  log "profile $t: exit $?"
done
log done
