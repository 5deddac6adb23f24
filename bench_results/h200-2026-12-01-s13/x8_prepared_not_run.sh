#!/usr/bin/env bash
# Prepared in session 12, updated in session 13, for nvidia-h200-x8 (never lent so far; NOT RUN). Ask `status`
# first. ~9.5 min. On nvidia-h200-x4 run it with MESH=1x4 (64 layers fit: about 80 GB of weights per GPU).
# Issue 11's 8-GPU target measured as it is meant, not projected: the whole 64-layer Grok-1 (random int8
# weights made on the devices) on a 1x8 mesh ($MESH), main as session 13 left it (new) against main before
# it (37fd65e, base).
#   git archive HEAD -o $PWD/.scratch/new.tar -- . ":!bench_results"; 37fd65e -> $PWD/.scratch/base.tar
#   BUDGET=570 OUT=$OUT bash bench_results/h200-2026-12-01-s13/x8_prepared_not_run.sh   -> $OUT/x8.tgz
# In order of need:
# 1. new through the runner at full depth on 8 GPUs (its hang guard, with Grok-1's tokenizer when
#    .scratch/tokenizer.model is carried): start-up split, decode steps, peak memory against the plan;
# 2. bench.py model --mesh $MESH at 64 layers, batches 1 and 8, both trees interleaved, two rounds: the step
#    itself against the roofline (the target: batch 1 >= 50%); round 1 also checks fast against reference;
# 3. the same for new with XLA's one-shot all-reduce kernel in place of NCCL's;
# 4. bench.py profile on the mesh, 4 layers, batch 1, new: the collectives' share of a layer;
# 5. base through the runner at full depth (the same greedy text?).
# Dry run (session 12, main against the branch then): this script on a CPU with 8 (MESH=1x8) and 4 (MESH=1x4)
# forced devices, --tiny --layers 2 for --layers 64 and --context 64, ran every step to its end.
T0=$SECONDS; BUDGET=${BUDGET:-570}; MESH=${MESH:-1x8}
R=/tmp/x8; mkdir -p $R
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/x8.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
trap 'tar czf "${OUT:-/tmp}/x8.tgz" -C /tmp x8' EXIT
trap 'exit 1' TERM INT
log "$(nvidia-smi -L | tr '\n' ' ')"
TOK=""; [ -f .scratch/tokenizer.model ] && TOK="--tokenizer $PWD/.scratch/tokenizer.model"
for t in base new; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], d['mode'], round(d['ms'], 3), round(d['tokens_per_s'], 1), round(d['roofline_pct'], 1), round(d.get('dispatch_ms', -1), 3)) for d in map(ast.literal_eval, sys.stdin)])"; }
runner() {  # tree: 64 layers through run.py on the mesh
  (cd /tmp/$1 && XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s ABRT $(( $(left) < 200 ? $(left) - 10 : 200 )) \
      python3 -X faulthandler run.py --random-weights --layers 64 --mesh $MESH --max-len 16 --temperature 0 \
      --compile-cache off $TOK --timings-json $R/run64-$1.json) > $R/run64-$1.log 2>&1
  log "run.py 64 layers $MESH $1: exit $?; $(grep -m1 'tokens in' $R/run64-$1.log)$(grep -m1 -A1 'Current thread' $R/run64-$1.log | tail -1)"
  grep -A1 "^Output for prompt" $R/run64-$1.log >> $R/x8.log
}
model() {  # tree name [modes] [extra XLA flags]
  (cd /tmp/$1 && XLA_FLAGS="${XLA_FLAGS:-} ${4:-}" XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 5 )) python3 bench.py model \
      --mesh $MESH --layers 64 --batches 1,8 --modes ${3:-fast} --prefill 0 --context 1024 --iters 10 \
      --compile-layers 0 --json $R/$2.json) > $R/$2.log 2>&1
  log "$2: exit $? (batch, mode, step ms, tok/s, roofline %, host ms): $(summ $R/$2.log) $(grep -m1 -i 'vs reference' $R/$2.log)"
}
# 1.
runner new
# 2.
for round in 1 2; do for t in new base; do
  [ "$(left)" -lt 90 ] && { log "out of time for the 64-layer step"; break 2; }
  modes=fast; [ $round = 1 ] && modes=fast,reference
  model $t m64-$MESH-r$round-$t $modes
done; done
# 3.
[ "$(left)" -gt 90 ] && model new m64-$MESH-oneshot-new fast --xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true
# 4.
[ "$(left)" -gt 45 ] && (cd /tmp/new && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 5 )) python3 bench.py \
    profile --layers 4 --batch 1 --mesh $MESH --json $R/prof-$MESH-new.json) > $R/prof-$MESH-new.log 2>&1
log "profile $MESH new: exit $?; $(grep 'per layer, by kind' $R/prof-$MESH-new.log | head -1)"
# 5.
[ "$(left)" -gt 120 ] && runner base
log done
