#!/usr/bin/env bash
# Session 7, call B (one GPU used): issue 14's 32-slot server with the 20 ms stream interval
# (the new default), twice; issue 11's loader at 16 GB with the first transfer timed apart
# (loader_devices_started); 20 ms with the engine's pipeline depth 4; 5 ms (the old default);
# a py-spy profile of the server under load (py-spy wheel in .whl) if time is left.
#   BUDGET=570 OUT=$OUT bash .scratch/s7b.sh     -> $OUT/s7b.tgz
T0=$SECONDS; BUDGET=${BUDGET:-570}
R=/tmp/s7b; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s7b.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s7b.tgz" -C /tmp s7b' EXIT
serve() {  # interval_ms name [more bench.py serve flags]
  [ "$(left)" -lt 160 ] && { log "skip serve $2"; return; }
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 10 )) python3 bench.py serve --layers 4 --slots 32 \
      --clients 64 --rounds 3 --seconds 8 --pad-sizes 32,128,1024 --stream-interval-ms $1 "${@:3}" \
      --json $R/serve_$2.json > $R/serve_$2.log 2>&1
  log "serve $2: exit $?"; tail -1 $R/serve_$2.log | tee -a $R/s7b.log
}
serve 20 20ms_r0
serve 20 20ms_r1
D=/tmp/ckpt_bench
JAX_PLATFORMS=cuda timeout 260 python3 bench.py loader --methods loader_devices,loader_devices_started,loader_host \
    --dir $D --size-gb 16 --repeats 2 --json $R/loader16.json > $R/loader16.log 2>&1
log "loader 16 GB: exit $?"; sed -n '/^method/,$p' $R/loader16.log | tee -a $R/s7b.log; rm -rf $D
serve 20 20ms_depth4 --pipeline-depth 4
serve 5 5ms_r0
if [ "$(left)" -ge 130 ]; then
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 10 )) /tmp/site/bin/py-spy record --subprocesses --threads \
      --format raw -r 200 -o $R/spy_serve.txt -- python3 bench.py serve --layers 4 --slots 32 --clients 64 --rounds 1 \
      --seconds 8 --pad-sizes 32,128,1024 > $R/spy_serve.log 2>&1
  log "py-spy serve: exit $?"; tail -1 $R/spy_serve.log | tee -a $R/s7b.log
fi
log done
