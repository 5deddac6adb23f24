#!/usr/bin/env bash
# Session 3, issue 11 (and 12's decode-speed check) on 1 x H200: before (c60a8b5) / after /
# after with no split-K in the decode dense and down kernels (variant C), slope from layers
# 2 and 8, on one GPU and on the 1x2 mesh, interleaved; batch 32 at 8192 vs 1152 positions;
# first-step fast-vs-reference logits (layers 2); a profile of the new decode step.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
ROOT=$PWD
B="model --iters 5 --compile-layers 0 --compile-cache off"
PA="--prefill 0"; PB="--prefill 16"  # after: decode only; before (no such option): a short prefill
run() { local name=$1 limit=$2 dir=$3; shift 3; echo "=== $name: $*"; local t0=$SECONDS
  (cd $dir && timeout $limit "$@" --json $OUT/$name.json 2>&1 | grep -v "^W0\|^I0\|^E0" | grep "decode\|Error\|error\|logits\|rel" | tail -${TAILN:-6}); echo "($((SECONDS - t0)) s)"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
G1=""
for L in 2 8; do
  M=fast; [ $L = 2 ] && M=fast,reference
  run before_l$L 70 .scratch/before python3 bench.py $B $PB --modes fast --batches 1,8 --layers $L
  run after_l$L 80 .scratch/after python3 bench.py $B $PA --modes $M --batches 1,8 --layers $L
  run varc_l$L 60 .scratch/after python3 $ROOT/.scratch/variant.py nosplit=32 -- $B $PA --modes fast --batches 1,8 --layers $L
  run bf16act_l$L 60 .scratch/after python3 $ROOT/.scratch/variant.py splitrows=0 -- $B $PA --modes fast --batches 1,8 --layers $L
done
TAILN=50 run prof_after 50 .scratch/after python3 bench.py profile --layers 4 --batch 1 --trace-dir /tmp/pa
ls $OUT
