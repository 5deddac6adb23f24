#!/usr/bin/env bash
# Session 8, call D (one GPU, ~5 min): cb_probe.py. Which variants of the decode step keep
# every allocation still (no CUDA-graph update), and what that saves the host.
# 1. each variant at 2 layers with XLA's command-buffer VLOG: updated_allocs and how many
#    commands are updated per execution;
# 2. host enqueue and queued step time at 2 and 8 layers (no VLOG), variants interleaved.
#   OUT=$OUT bash .scratch/s8d.sh     -> $OUT/s8d.tgz
T0=$SECONDS; R=/tmp/s8d; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s8d.tgz" -C /tmp s8d' EXIT
for v in fwd_plain fwd_keep fwd_into run_decode run_dev run_keep; do
  TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=command_buffer_thunk=3,command_executor=3 ROUNDS=1 \
    timeout 90 python3 .scratch/cb_probe.py $v 2 > $R/vlog_$v.log 2>&1
  echo "== $v VLOG exit $? [t=$((SECONDS - T0))]: $(grep -h 'layers batch\|donated parameters' $R/vlog_$v.log | tr '\n' ' ')" >> $R/s8d.log
  grep -h "updated_allocs\|Updated [0-9]* commands" $R/vlog_$v.log | sed 's/^[IWE][0-9]* [0-9:.]* *[0-9]* //' \
    | sed 's/in [0-9]* μs/in N us/; s/after [0-9]* executions/after K executions/' | cut -c1-300 | sort | uniq -c | sort -rn | head -8 >> $R/s8d.log
  echo "  executions without update: $(grep -c 'Execute command buffer' $R/vlog_$v.log), updates: $(grep -c 'Updated command buffer in' $R/vlog_$v.log)" >> $R/s8d.log
  gzip -f $R/vlog_$v.log
done
for L in 2 8; do for rep in 1 2; do for v in fwd_plain fwd_into run_dev run_keep; do
  [ $((SECONDS - T0)) -gt 520 ] && { echo "out of time" >> $R/s8d.log; break 3; }
  timeout 90 python3 .scratch/cb_probe.py $v $L > $R/t_${v}_L${L}_$rep.log 2>&1
  echo "exit $? [t=$((SECONDS - T0))] $(grep -h 'layers batch' $R/t_${v}_L${L}_$rep.log)" >> $R/s8d.log
done; done; done
cat $R/s8d.log
