#!/usr/bin/env bash
# Session 10, call C (one H200, ~5 min): rule_ab.py on main with the session's changes (the gated
# decode kernel's narrower column blocks; the share's scale blocks), then one profile of the share
# of 8 at batch 1 with fewer-kernels (13eef86, the share's scale blocks as they were then).
#   git archive HEAD -o .scratch/new.tar; git archive fewer-kernels -o .scratch/fewer.tar
#   BUDGET=400 OUT=$OUT bash .scratch/s10c.sh -> $OUT/s10c.tgz
T0=$SECONDS; BUDGET=${BUDGET:-400}
R=/tmp/s10c; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s10c.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s10c.tgz" -C /tmp s10c' EXIT TERM
log "$(nvidia-smi -L | head -1)"
for t in new fewer; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
cp .scratch/rule_ab.py /tmp/new/
(cd /tmp/new && XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout $(( $(left) - 40 )) python3 rule_ab.py) > $R/rule_ab.log 2>&1
log "rule_ab: exit $?"; grep "RESULT\|SLOPE" $R/rule_ab.log | tee -a $R/s10c.log
(cd /tmp/fewer && XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout $(( $(left) - 5 )) python3 bench.py profile --share 8 \
    --layers 4 --batch 1 --json $R/prof-fewer-share8-b1.json) > $R/prof-fewer-share8-b1.log 2>&1
log "profile fewer share 8: exit $?; $(grep 'per layer, by kind' $R/prof-fewer-share8-b1.log)"
log done
