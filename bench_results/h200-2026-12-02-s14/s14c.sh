#!/usr/bin/env bash
# Session 14, call C (one H200, ~4 min): the profile at the share of 8 (4 layers, batch 1) of main before this
# session (adc62fe, "base") and of the session's head ("new"), two rounds interleaved, for the kernel table on
# one machine; then the one-token output kernel's tiling at the share of 8 (down_probe.py with 2 tiles: block_n x split_k,
# 8 parts for the junction at the default 128 x 4).
#   git archive REV -o $PWD/.scratch/TREE.tar -- . ':!bench_results'   (base adc62fe, new HEAD)
#   BUDGET=300 OUT=$OUT bash bench_results/h200-2026-12-02-s14/s14c.sh -> $OUT/s14c.tgz
T0=$SECONDS; BUDGET=${BUDGET:-300}
R=/tmp/s14c; mkdir -p $R
HERE=$PWD; S14=$HERE/bench_results/h200-2026-12-02-s14
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s14c.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s14c.tgz" -C /tmp s14c' EXIT
trap 'exit 1' TERM INT
log "$(nvidia-smi -L | head -1)"
for t in new base; do rm -rf /tmp/$t; mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
profile() {  # tree name [probe args]
  local t=$1 name=$2 run=bench.py; shift 2
  [ $# -gt 0 ] && run="$S14/down_probe.py 2 $1 $2 --"
  (cd /tmp/$t && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 60 env PYTHONPATH=.:/tmp/site python3 \
      $run profile --share 8 --layers 4 --batch 1 --json $R/profile-$name-$t.json) > $R/profile-$name-$t.log 2>&1
  log "profile $name $t: exit $?; $(grep -o "a layer's kernels: [0-9.]* us" $R/profile-$name-$t.log); $(grep -E 'int8_grouped_matmul|residual_norm__1|ExecuteThunks|cuGraphLaunch' $R/profile-$name-$t.log | tr -s ' ' | tr '\n' ';')"
}
for round in 1 2; do for t in new base; do
  [ "$(left)" -lt 40 ] && break 2
  profile $t r$round
done; done
for cfg in "128 2" "64 2" "64 4" "128 4"; do
  [ "$(left)" -lt 30 ] && break
  set -- $cfg
  profile new down-$1-$2 $1 $2
done
log done
