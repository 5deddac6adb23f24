#!/usr/bin/env bash
# Session 4, call A on nvidia-h200-x2: issue 15's depth rounds (decode at 2, 8, 48 layers on a 1x2
# mesh, 3 rounds interleaved, fresh process per point) which also give issue 11's 1x2 slope of the
# current code (2 -> 8 layers).  BUDGET seconds from the start.
T0=$SECONDS
BUDGET=${BUDGET:-570}
OUT=${OUT:-/tmp/s4out}
mkdir -p "$OUT"
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*"; }
stamp() { while IFS= read -r l; do printf '%s %s\n' "$(date +%T)" "$l"; done; }
noise='^W0\|^I0\|^E0\|cuda_timer'
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
{ date -u; nvidia-smi --query-gpu=index,name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)"; git log -1 --format=%H; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
mkdir -p /tmp/depth
log "depth: start"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout $(( $(left) - 10 )) python3 bench.py depth \
    --layers "${DLAYERS:-2,8,48}" --mesh 1x2 --parts decode --repeats "${REPEATS:-3}" \
    --cache-root /tmp/dc --out /tmp/depth --json "$OUT/depth.json" 2>&1 \
  | grep --line-buffered -v "$noise" | stamp | tee "$OUT/depth.out"
log "depth: end"
cp /tmp/depth/*.json "$OUT/" 2>/dev/null
tar czf "$OUT/depth_logs.tgz" -C /tmp depth
log done
