#!/usr/bin/env bash
# Session 4, call B: issue 11 (1 GPU against 1x2 decode slopes, same machine, interleaved),
# issue 12 (precision study on one GPU), issue 14 (server under load on one GPU).
#   PHASES="slopes precision serve" BUDGET=570 bash .scratch/s4b.sh
T0=$SECONDS
BUDGET=${BUDGET:-570}
PHASES=${PHASES:-slopes precision startup}
OUT=${OUT:-/tmp/s4out}
mkdir -p "$OUT"
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*"; }
stamp() { while IFS= read -r l; do printf '%s %s\n' "$(date +%T)" "$l"; done; }
want() { [[ " $PHASES " == *" $1 "* ]]; }
noise='^W0\|^I0\|^E0\|cuda_timer'
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
{ date -u; nvidia-smi --query-gpu=index,name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)"; } > "$OUT/env_b.txt" 2>&1
cat "$OUT/env_b.txt"
NGPU=$(nvidia-smi -L | wc -l)

if want slopes; then
  log "slopes: start ($NGPU GPUs)"
  MESHES="1"; [ "$NGPU" -ge 2 ] && MESHES="1 2"
  for rep in ${SLOPE_REPS:-0 1}; do
    for m in $MESHES; do
      for n in 2 8; do
        [ "$(left)" -lt $(( ${SLOPE_RESERVE:-330} )) ] && { log "slopes: out of time"; break 3; }
        if [ $m = 1 ]; then env_=(CUDA_VISIBLE_DEVICES=0); mesh=(); else env_=(); mesh=(--mesh 1x2); fi
        env "${env_[@]}" XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 150 python3 bench.py model --layers $n \
            --batches 1,8 --modes fast --prefill 128 --context 1024 --iters 10 --compile-layers 0 "${mesh[@]}" \
            --compile-cache /tmp/cc-m$m-L$n --json "$OUT/slope-m$m-L$n-r$rep.json" 2>&1 \
          | grep --line-buffered -v "$noise" | stamp > "$OUT/slope-m$m-L$n-r$rep.log"
        log "slopes: mesh $m layers $n rep $rep: $(grep -c . "$OUT/slope-m$m-L$n-r$rep.log") lines"
        grep -i "decode" "$OUT/slope-m$m-L$n-r$rep.log" | tail -3
      done
    done
  done
fi

if want precision && [ "$(left)" -gt 200 ]; then
  log "precision: start"
  CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 165 )) python3 bench.py precision --seeds 3 --ablation-seeds 0 \
      --json "$OUT/precision_gpu.json" 2>&1 | grep --line-buffered -v "$noise" | grep -v " seed " | stamp \
    | tee "$OUT/precision.out" | head -12
  log "precision: end"
fi

if want startup && [ "$(left)" -gt 150 ]; then
  cp .scratch/tokenizer.model tokenizer.model   # Grok-1's, as in session 2's start-up run
  log "startup: 48 layers, cold then warm compilation cache"
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout $(( $(left) - 5 )) python3 bench.py depth --layers 48 --mesh 1x2 \
      --parts startup --repeats 1 --steps 16 --cache-root /tmp/sc --out /tmp/startup --json "$OUT/startup.json" 2>&1 \
    | grep --line-buffered -v "$noise" | stamp | tee "$OUT/startup.out"
  cp /tmp/startup/*.json /tmp/startup/*.log "$OUT/" 2>/dev/null
  rm -f tokenizer.model
  log "startup: end"
fi

if want serve && [ "$(left)" -gt 90 ]; then
  for slots in ${SERVE_SLOTS:-8 32}; do
    [ "$(left)" -lt 75 ] && break
    S=$(( ($(left) - 60) / 3 )); [ $S -gt 10 ] && S=10
    log "serve: slots $slots, 3 rounds of $S s"
    CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 3 )) python3 bench.py serve \
        --layers 4 --slots $slots --clients $((2 * slots)) --rounds 3 --seconds $S \
        --json "$OUT/serve_gpu_$slots.json" 2>&1 | grep --line-buffered -v "$noise" | stamp > "$OUT/serve_$slots.out"
    tail -8 "$OUT/serve_$slots.out"
    [ -z "$SERVE_BOTH" ] && [ "$(left)" -lt 150 ] && break
  done
fi
log done
