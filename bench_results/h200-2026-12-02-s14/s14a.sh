#!/usr/bin/env bash
# Session 14, call A (one H200, ~9.5 min): main before this session (adc62fe, "base") against main with the
# one-token MoE (4da0c16, "moe") and with decode_qkv too (the session's head, "new").
# 1. gpu_check.py in new's tree: moe_one_token, the joined partial sums, decode_qkv, decode_attention(heads=);
# 2. the share of 8: bench.py model slopes from 2 to 16 layers, batches 1 and 8, three rounds interleaved
#    (round 1 at 2 layers with the reference mode), then new's profile (4 layers, batch 1);
# 3. run.py --random-weights --layers 16 on one GPU, greedy, base and new: the same text?
# 4. the whole model on one GPU: slopes from 2 to 8 layers, two rounds, base and new;
# 5. batch 32, 1024 tokens, 2 layers on one GPU, 1152- against 8192-position caches, new.
#   git archive REV -o $PWD/.scratch/TREE.tar -- . ':!bench_results'   (base adc62fe, moe 4da0c16, new HEAD)
#   BUDGET=570 OUT=$OUT bash bench_results/h200-2026-12-02-s14/s14a.sh -> $OUT/s14a.tgz
T0=$SECONDS; BUDGET=${BUDGET:-570}
R=/tmp/s14a; mkdir -p $R
HERE=$PWD; S14=$HERE/bench_results/h200-2026-12-02-s14
left() { echo $((BUDGET - (SECONDS - T0))); }
log() { echo "$(date +%T) [t=$((SECONDS - T0)) s, $(left) s left] $*" | tee -a $R/s14a.log; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s14a.tgz" -C /tmp s14a' EXIT
trap 'exit 1' TERM INT
log "$(nvidia-smi -L | head -1)"
for t in new moe base; do mkdir -p /tmp/$t && tar xf .scratch/$t.tar -C /tmp/$t; done
# 1.
(cd /tmp/new && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 120 env PYTHONPATH=.:/tmp/site python3 \
    $S14/gpu_check.py) > $R/gpu_check.log 2>&1
log "gpu_check: exit $?; $(grep -c ' OK$' $R/gpu_check.log) OK, $(grep -c ' BAD$' $R/gpu_check.log) BAD"
summ() { grep "^{'kind': 'decode'" $1 | python3 -c "import sys, ast; print([(d['batch'], d['mode'], round(d['ms'], 4), round(d['roofline_pct'], 1), round(d['dispatch_ms'], 3)) for d in map(ast.literal_eval, sys.stdin)])"; }
model() {  # tree share layers name [extra bench.py args]
  local opt="" t=$1 s=$2 n=$3 name=$4; shift 4
  [ $s != 0 ] && opt="--share $s"
  (cd /tmp/$t && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout $(( $(left) - 20 )) env PYTHONPATH=.:/tmp/site \
      python3 bench.py model $opt --layers $n --batches 1,8 --modes fast --prefill 0 --context 1024 --iters 10 \
      --compile-layers 0 --json $R/m-s$s-$name-$t-L$n.json "$@") > $R/m-s$s-$name-$t-L$n.log 2>&1
  log "share $s $name $t layers $n: exit $? (batch, mode, step ms, roofline %, host ms): $(summ $R/m-s$s-$name-$t-L$n.log) $(grep -m1 -i 'vs reference' $R/m-s$s-$name-$t-L$n.log)"
}
# 2.
for round in 1 2 3; do
  for n in 2 16; do for t in new moe base; do
    [ "$(left)" -lt 200 ] && { log "out of time for the share of 8"; break 3; }
    if [ $round = 1 ] && [ $n = 2 ]; then model $t 8 $n r$round --modes fast,reference; else model $t 8 $n r$round; fi
  done; done
  if [ $round = 1 ]; then
    (cd /tmp/new && XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 60 python3 \
        bench.py profile --share 8 --layers 4 --batch 1 --json $R/profile-s8-new.json) > $R/profile-s8-new.log 2>&1
    log "profile: exit $?; $(grep 'a layer' $R/profile-s8-new.log)"
  fi
done
# 3.
for t in new base; do
  [ "$(left)" -lt 150 ] && { log "out of time for run.py"; break; }
  (cd /tmp/$t && XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout -s ABRT 100 python3 -X faulthandler run.py \
      --random-weights --layers 16 --max-len 16 --temperature 0 --compile-cache off \
      --timings-json $R/run16-$t.json) > $R/run16-$t.log 2>&1
  log "run.py 16 layers $t: exit $?; $(grep -m1 'tokens in' $R/run16-$t.log)"
  grep -A1 "^Output for prompt" $R/run16-$t.log >> $R/s14a.log
done
# 4.
for round in 1 2; do for n in 2 8; do for t in new base; do
  [ "$(left)" -lt 60 ] && { log "out of time for one GPU"; break 3; }
  model $t 0 $n r$round
done; done; done
# 5.
for c in 1152 8192; do
  [ "$(left)" -lt 30 ] && { log "out of time for batch 32"; break; }
  model new 0 2 b32-c$c --batches 32 --cache-len $c
done
log done
