#!/usr/bin/env bash
# Session 12, call C (one H200, ~4 min): the dense decode kernel's tiling at one device's share of 8, in the
# model: bench.py profile --share 8 --layers 4 --batch 1 of fewer-kernels (f6de585) with the dense decode
# tiling patched (dense_probe.py BLOCK_N BLOCK_K MIN_SPLIT_ROWS), two rounds interleaved.
#   git -C <branch> archive f6de585 -o .scratch/head3.tar -- . ':!bench_results'
#   BUDGET=300 OUT=$OUT bash .scratch/s12c.sh -> $OUT/s12c.tgz
T0=$SECONDS; BUDGET=${BUDGET:-300}
R=/tmp/s12c; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s12c.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s12c.tgz" -C /tmp s12c' EXIT
trap 'exit 1' TERM INT
log "$(nvidia-smi -L | head -1)"
mkdir -p /tmp/head3 && tar xf .scratch/head3.tar -C /tmp/head3 && cp .scratch/dense_probe.py /tmp/head3/
for round in 1 2; do for v in "128 128 256" "64 128 256" "64 64 256" "64 128 128" "32 128 256"; do
  [ "$(left)" -lt 25 ] && { log "out of time"; break 2; }
  name=prof-r$round-$(echo $v | tr ' ' '-')
  (cd /tmp/head3 && XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout $(( $(left) - 5 )) env PYTHONPATH=.:/tmp/site \
      python3 dense_probe.py $v $R/$name.json) > $R/$name.log 2>&1
  log "$v round $round: exit $?; $(grep -E 'int8_dense_matmul|decode_attention|residual_norm  |residual_norm$' $R/$name.log | awk '{print $NF"="$1}' | tr '\n' ' ') $(grep "a layer's kernels" $R/$name.log | sed 's/.*a layer/a layer/')"
done; done
log done
