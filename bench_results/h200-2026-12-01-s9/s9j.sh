#!/usr/bin/env bash
# Session 9, call J (one H200, ~4 min): what one device's share of 8 spends its 91.7 us per layer
# on (s9i), and whether the MoE kernels have better tilings at its sizes (F = 32768 / 8 = 4096).
#   git archive fewer-kernels -o .scratch/fewer.tar; BUDGET=200 OUT=$OUT bash .scratch/s9j.sh -> $OUT/s9j.tgz
# 1. bench.py profile --share 8, 4 layers, batch 1 (and batch 8);
# 2. bench.py kernels --dims 6144 4096: the MoE layer at M = 1 and 8 with the default tilings,
#    then the tiling sweep (quick), each checked against the xla backend.
T0=$SECONDS; BUDGET=${BUDGET:-200}
R=/tmp/s9j; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s9j.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s9j.tgz" -C /tmp s9j' EXIT
log "$(nvidia-smi -L | head -1)"
mkdir -p /tmp/fewer && tar xf .scratch/fewer.tar -C /tmp/fewer
for b in 1 8; do
  (cd /tmp/fewer && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 90 python3 bench.py profile --share 8 \
      --layers 4 --batch $b --json $R/prof-share8-b$b.json) > $R/prof-share8-b$b.log 2>&1
  log "profile share 8 batch $b: exit $?; $(head -1 $R/prof-share8-b$b.log); $(grep 'per layer, by kind' $R/prof-share8-b$b.log)"
done
(cd /tmp/fewer && timeout $(( $(left) - 10 )) python3 bench.py kernels --dims 6144 4096 --ms 1 8 --layer-backends pallas \
    --checks quick --quick --dense-ms 1 --budget-s $(( $(left) - 25 )) --out $R/kernels-share8.json) > $R/kernels-share8.log 2>&1
log "kernels at the share of 8: exit $?"
tail -30 $R/kernels-share8.log >> $R/s9j.log
log done
