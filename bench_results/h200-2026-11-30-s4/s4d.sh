#!/usr/bin/env bash
# Session 4, call D on nvidia-h200-x2: why did run.py --random-weights --layers 48 --mesh 1x2 hang
# in its first decode step (call C)? Short runs with limits, each printing its tail.
T0=$SECONDS
OUT=${OUT:-/tmp/s4out}
mkdir -p "$OUT" /tmp/d
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s] $*"; }
noise='^I0\|cuda_timer'
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
NOPALLAS="import sys, kernels; kernels.uses_pallas = lambda backend='auto': False; import run; sys.exit(run.main(sys.argv[1:]))"
try() {  # name limit [env...] -- args
  local name=$1 lim=$2; shift 2
  local envs=(); while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  log "$name: start (limit $lim s)"
  env "${envs[@]}" timeout -s ABRT $lim python3 -X faulthandler "$@" --random-weights --max-len 8 --temperature 0 \
      --compile-cache off > /tmp/d/$name.log 2>&1
  local rc=$?
  log "$name: exit $rc"
  grep -v "$noise" /tmp/d/$name.log | grep -v "^  File \|^Extension\|^$" | tail -${TAIL:-14}
  return $rc
}
if try A_2L_1x2 75 -- run.py --layers 2 --mesh 1x2; then
  if try B_24L_1x2 120 -- run.py --layers 24 --mesh 1x2; then
    try E_48L_1x2_nopallasattn 160 -- -c "$NOPALLAS" --layers 48 --mesh 1x2
  else
    try E_24L_1x2_nopallasattn 110 -- -c "$NOPALLAS" --layers 24 --mesh 1x2
  fi
else
  try C_2L_1gpu 70 CUDA_VISIBLE_DEVICES=0 -- run.py --layers 2
  try D_2L_1x2_nopallasattn 75 -- -c "$NOPALLAS" --layers 2 --mesh 1x2
fi
tar czf "$OUT/callD.tgz" -C /tmp d
log done
