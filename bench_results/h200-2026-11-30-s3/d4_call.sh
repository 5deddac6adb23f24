#!/usr/bin/env bash
# Session 3, 1 x H200: the final code against the same without split-K in the decode dense
# and down kernels (32-wide column blocks instead), slope from layers 2 and 8, interleaved;
# the first-step fast-vs-reference check on the final code.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
ROOT=$PWD
B="model --iters 5 --compile-layers 0 --compile-cache off --prefill 0 --batches 1,8"
run() { local name=$1 limit=$2 dir=$3; shift 3; echo "=== $name"; local t0=$SECONDS
  (cd $dir && timeout $limit "$@" --json $OUT/$name.json 2>&1 | grep "^decode\|Error\|first decode" | tail -6); echo "($((SECONDS - t0)) s)"; }
run final_l2 60 .scratch/after python3 bench.py $B --modes fast,reference --layers 2
run nosplit_l2 40 .scratch/after python3 $ROOT/.scratch/variant.py nosplit=32 -- $B --modes fast --layers 2
run final_l8 40 .scratch/after python3 bench.py $B --modes fast --layers 8
run nosplit_l8 40 .scratch/after python3 $ROOT/.scratch/variant.py nosplit=32 -- $B --modes fast --layers 8
ls $OUT
