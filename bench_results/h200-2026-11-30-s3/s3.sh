#!/usr/bin/env bash
# Session s3 on nvidia-h200-x2: issue 15 (depth, mesh 1x2), issue 11 (loader onto the GPU),
# issue 14 (server under load on a GPU). Steps run in priority order and each is skipped or
# cut when the time left (BUDGET seconds from the start of this script) is too short.
#   PHASES="env depth loader serve" BUDGET=540 bash .scratch/s3.sh
# A step that finished leaves /tmp/s3_<step>_done, so a second call on the same (warm)
# machine skips it. Test overrides: DEPTH_X, LOADER_X, SERVE_X (extra args), SIZE_GB, DLAYERS.
T0=$SECONDS
BUDGET=${BUDGET:-540}
PHASES=${PHASES:-env depth loader serve}
OUT=${OUT:-/tmp/s3out}
mkdir -p "$OUT"
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*"; }
stamp() { while IFS= read -r l; do printf '%s %s\n' "$(date +%T)" "$l"; done; }
want() { [[ " $PHASES " == *" $1 "* ]] && [ ! -f /tmp/s3_$1_done ]; }
noise='^W0\|^I0\|^E0\|cuda_timer'

if [ -d .whl ] && [ -z "$SKIP_WHL" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
log "phases: $PHASES; budget $BUDGET s"

if want env; then
  { date -u; nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm \
      --format=csv; nvidia-smi topo -m; echo "cpus $(nproc)"; free -g; df -hT /tmp .; uname -r
    python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)"
    python3 -m pip show anyio h11 click prometheus-client sentencepiece numpy 2>/dev/null | grep -E '^(Name|Version)'
    python3 -c "import server, starlette, uvicorn, pydantic; print('server import ok', starlette.__version__, uvicorn.__version__, pydantic.__version__)"
  } > "$OUT/env.txt" 2>&1
  head -5 "$OUT/env.txt"; tail -1 "$OUT/env.txt"
  touch /tmp/s3_env_done
fi

if want depth && [ "$(left)" -gt 120 ]; then
  mkdir -p /tmp/depth
  log "depth: start (decode only, 3 rounds interleaved, compilation cache /tmp/dc per depth)"
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout $(( $(left) - 15 )) python3 bench.py depth \
      --layers "${DLAYERS:-2,8,16,32,48}" --mesh 1x2 --parts decode --repeats 3 \
      --cache-root /tmp/dc --out /tmp/depth --json "$OUT/depth.json" $DEPTH_X 2>&1 \
    | grep --line-buffered -v "$noise" | stamp | tee /tmp/depth/depth.out
  log "depth: end"
  tar czf "$OUT/depth_logs.tgz" -C /tmp depth
  touch /tmp/s3_depth_done
fi

if want loader && [ "$(left)" -gt "${LOADER_MIN:-110}" ]; then
  RESERVE=5; want serve && RESERVE=75   # keep time for a short serve window
  [ $(( $(left) - RESERVE )) -lt "${LOADER_MIN:-110}" ] && RESERVE=5   # too short for both: the loader first
  SIZE=${SIZE_GB:-$([ $(( $(left) - RESERVE )) -ge 200 ] && echo 16 || echo 8)}
  D=/tmp/ckpt_bench
  [ "$(stat -f -c %T /tmp)" = tmpfs ] && D=$PWD/.ckpt_bench
  log "loader: start, $SIZE GB checkpoint in $D ($(stat -f -c %T "$(dirname "$D")")), timeout $(( $(left) - RESERVE )) s"
  CUDA_VISIBLE_DEVICES=0 JAX_PLATFORMS=${LOADER_PLATFORM:-cuda} timeout $(( $(left) - RESERVE )) python3 -c \
      "import sys, bench; bench.METHODS.pop('release_devices'); bench.main(sys.argv[1:])" \
      loader --dir "$D" --size-gb "$SIZE" --repeats 1 --json "$OUT/loader_gpu.json" $LOADER_X 2>&1 \
    | grep --line-buffered -v "$noise" | stamp | tee "$OUT/loader.out"
  log "loader: end"
  rm -rf "$D"
  touch /tmp/s3_loader_done
fi

if want serve && [ "$(left)" -gt 70 ]; then
  S=$(( $(left) - 55 )); [ $S -gt 60 ] && S=60
  log "serve: start, --seconds $S"
  CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 3 )) python3 bench.py serve \
      ${SERVE_ARGS:---layers 4} --slots 8 --clients 16 --seconds $S --json "$OUT/serve_gpu.json" 2>&1 \
    | grep --line-buffered -v "$noise" | stamp | tee "$OUT/serve.out"
  log "serve: end"
  touch /tmp/s3_serve_done
fi
log "done"
