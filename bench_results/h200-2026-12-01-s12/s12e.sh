#!/usr/bin/env bash
# Session 12, call E (one H200, ~2.5 min): the gated decode kernel's pipeline stages at one device's share of 8
# (32-column blocks since session 10's rule): bench.py profile --share 8 --layers 4 --batch 1 of fewer-kernels
# (1c43b0c) with num_stages patched (gated_probe.py STAGES), two rounds interleaved.
#   BUDGET=200 OUT=$OUT bash .scratch/s12e.sh -> $OUT/s12e.tgz
T0=$SECONDS; BUDGET=${BUDGET:-200}
R=/tmp/s12e; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s12e.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s12e.tgz" -C /tmp s12e' EXIT
trap 'exit 1' TERM INT
log "$(nvidia-smi -L | head -1)"
mkdir -p /tmp/head4 && tar xf .scratch/head4.tar -C /tmp/head4 && cp .scratch/gated_probe.py /tmp/head4/
for round in 1 2; do for st in 3 4 6; do
  [ "$(left)" -lt 25 ] && { log "out of time"; break 2; }
  name=prof-r$round-stages$st
  (cd /tmp/head4 && XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout $(( $(left) - 5 )) env PYTHONPATH=.:/tmp/site \
      python3 gated_probe.py $st $R/$name.json) > $R/$name.log 2>&1
  log "stages $st round $round: exit $?; $(grep -E 'int8_gated_matmul' $R/$name.log | awk '{print $NF"="$1}' | tr '\n' ' ') $(grep "a layer's kernels" $R/$name.log | sed 's/.*a layer/a layer/')"
done; done
log done
