#!/usr/bin/env bash
# Session 6, call C (one GPU of nvidia-h200-x2): issue 11's loader onto a GPU, the readers
# queueing transfers (new) against one placing thread (old: 99780f6's checkpoint.py), interleaved
# rounds on one 8 GB checkpoint, cold passes.
#   BUDGET=570 OUT=$OUT bash .scratch/s6c.sh     -> $OUT/s6c.tgz
T0=$SECONDS; BUDGET=${BUDGET:-570}
R=/tmp/s6c; mkdir -p $R /tmp/new /tmp/old
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s6c.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
tar xf .scratch/new.tar -C /tmp/new && tar xf .scratch/new.tar -C /tmp/old \
  && cp .scratch/old_checkpoint.py /tmp/old/checkpoint.py || exit 1   # old = new with 99780f6's loader
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0 JAX_PLATFORMS=cuda
trap 'tar czf "${OUT:-/tmp}/s6c.tgz" -C /tmp s6c' EXIT
D=/tmp/ckpt_bench; [ "$(stat -f -c %T /tmp)" = tmpfs ] && D=$PWD/.ckpt_bench
log "checkpoint dir $D on $(stat -f -c %T "$(dirname "$D")"); $(nproc) CPUs; $(free -g | awk '/Mem/{print $2}') GiB"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> $R/s6c.log
bench() {  # tree name methods...
  local tree=$1 name=$2; shift 2
  (cd /tmp/$tree && timeout $(( $(left) - 5 )) python3 bench.py loader --methods "$(IFS=,; echo "$*")" \
    --dir "$D" --size-gb 8 --repeats 1 --reuse --keep --json $R/$name.json > $R/$name.log 2>&1)
  log "$name exit $?"; grep "cold" $R/$name.log | tee -a $R/s6c.log
}
log "write"; bench new write raw_read
for r in 1 2 3 4; do
  [ "$(left)" -lt 75 ] && break
  bench new new_r$r raw_read loader_devices loader_host loader_host_shm
  [ "$(left)" -lt 40 ] && break
  bench old old_r$r loader_devices
done
rm -rf "$D"; log done
