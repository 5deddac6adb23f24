#!/usr/bin/env bash
# Session 3, issue 11 on 2 x H200: before (c60a8b5) / after (decode branch), per-layer slope
# from layers 2 and 8 on one GPU (interleaved) and on the 1x2 mesh; batch 32 with 8192- vs
# 1152-position caches; a profile of the new decode step; the new kernels checked.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
ROOT=$PWD
B="model --prefill 128 --iters 5 --compile-layers 0 --compile-cache off --modes fast"
run() { local name=$1 limit=$2 dir=$3; shift 3; echo "=== $name: $*"; local t0=$SECONDS
  (cd $dir && timeout $limit "$@" --json $OUT/$name.json 2>&1 | grep -v "^W0\|^I0\|^E0" | tail -${TAILN:-6}); echo "($((SECONDS - t0)) s)"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
TAILN=12 run kern 100 .scratch/after env CUDA_VISIBLE_DEVICES=0 python3 $ROOT/.scratch/s3_kernels.py
for L in 2 8; do
  run before_l$L 100 .scratch/before env CUDA_VISIBLE_DEVICES=0 python3 bench.py $B --batches 1,8 --layers $L
  run after_l$L 100 .scratch/after env CUDA_VISIBLE_DEVICES=0 python3 bench.py $B --batches 1,8 --layers $L
done
run after2_l2 100 .scratch/after python3 bench.py $B --batches 1,8,32 --layers 2 --mesh 1x2
run after2_l8 100 .scratch/after python3 bench.py $B --batches 1,8 --layers 8 --mesh 1x2
run after2_b32_c8192 90 .scratch/after python3 bench.py $B --batches 32 --layers 2 --mesh 1x2 --cache-len 8192
TAILN=45 run prof_after 90 .scratch/after env CUDA_VISIBLE_DEVICES=0 python3 bench.py profile --layers 4 --batch 1 --trace-dir /tmp/pa
ls $OUT
