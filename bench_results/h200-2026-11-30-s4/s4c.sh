#!/usr/bin/env bash
# Session 4, call C on nvidia-h200-x2: issue 15's 48-layer start-up (cold, then warm cache) with a
# traceback dump if it stalls; then the batch-1 decode slopes lost from call B (1 GPU and 1x2).
T0=$SECONDS
BUDGET=${BUDGET:-400}
OUT=${OUT:-/tmp/s4out}
mkdir -p "$OUT" /tmp/c
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*"; }
stamp() { while IFS= read -r l; do printf '%s %s\n' "$(date +%T)" "$l"; done; }
noise='^W0\|^I0\|^E0\|cuda_timer'
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cp .scratch/tokenizer.model tokenizer.model
for phase in cold warm; do
  [ $phase = warm ] && [ ! -s /tmp/c/start48_cold.json ] && { log "no cold result: skip warm"; break; }
  lim=$([ $phase = cold ] && echo ${COLD_LIMIT:-240} || echo 100)
  log "startup $phase: limit $lim s"
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s ABRT $lim python3 -X faulthandler run.py --random-weights \
      --layers 48 --mesh 1x2 --max-len 8 --temperature 0 --tokenizer tokenizer.model --compile-cache /tmp/cc48 \
      --timings-json /tmp/c/start48_$phase.json > /tmp/c/start48_$phase.log 2>&1
  log "startup $phase: exit $?"
  grep -v "$noise" /tmp/c/start48_$phase.log | tail -${TAIL:-45}
done
rm -f tokenizer.model
for rep in 0 1; do
  for m in 1 2; do
    for n in 2 8; do
      [ "$(left)" -lt 25 ] && { log "slopes: out of time"; break 3; }
      if [ $m = 1 ]; then env_=(CUDA_VISIBLE_DEVICES=0); mesh=(); else env_=(); mesh=(--mesh 1x2); fi
      env "${env_[@]}" XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 5 )) python3 bench.py model --layers $n \
          --batches 1,8 --modes fast --prefill 128 --context 1024 --iters 10 --compile-layers 0 "${mesh[@]}" \
          --compile-cache /tmp/cc-m$m-L$n --json /tmp/c/slope-m$m-L$n-r$rep.json > /tmp/c/slope-m$m-L$n-r$rep.log 2>&1
      log "slope mesh $m layers $n rep $rep: $(grep "^{'kind': 'decode'" /tmp/c/slope-m$m-L$n-r$rep.log \
            | python3 -c "import sys, ast; print([(d['batch'], round(d['ms'], 4), round(d['roofline_ms'], 4)) for d in map(ast.literal_eval, sys.stdin)])")"
    done
  done
done
tar czf "$OUT/callC.tgz" -C /tmp c
log done
