#!/usr/bin/env bash
# Next session, call A (one GPU, ~2 min): which buffers make XLA re-record the decode step's
# CUDA graph at every step (issue 11's host floor; BENCHMARKS "Session 7"). stable_probe.py at
# 2 layers, each variant in its own process (plain step; logits written into a donated
# buffer), with XLA's command-buffer logs at VLOG 3 (command_buffer_thunk, command_executor,
# command_buffer_cmd) and the buffer assignment dumped, so that the logged allocation indices
# can be named.
#   OUT=$OUT bash .scratch/s8a.sh     -> $OUT/s8a.tgz   (stable_probe.py: ../h200-2026-11-30-s7/stable_probe.py)
R=/tmp/s8a; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s8a.tgz" -C /tmp s8a' EXIT
for v in plain aliased; do
  XLA_FLAGS="--xla_dump_to=/tmp/dump_$v --xla_dump_hlo_as_text" ONLY=$v TF_CPP_MIN_LOG_LEVEL=0 \
  TF_CPP_VMODULE=command_buffer_thunk=3,command_executor=3,command_buffer_cmd=3 \
    timeout 100 python3 .scratch/stable_probe.py 2 1 > $R/vlog_$v.log 2>&1
  echo "$v exit $?; $(grep -h 'layers,' $R/vlog_$v.log)" >> $R/s8a.log
  grep -h "updated_allocs\|Skip updating\|Updated [0-9]* commands\|requires_update\|allocation" $R/vlog_$v.log \
    | sed 's/^[IWE][0-9]* [0-9:.]* *[0-9]* //' | cut -c1-400 | sort | uniq -c | sort -rn | head -40 >> $R/s8a.log
  mkdir -p $R/$v; ls -S /tmp/dump_$v/*buffer-assignment* 2>/dev/null | head -3 | xargs -I{} cp {} $R/$v/
  tail -c 3000000 $R/vlog_$v.log > $R/vlog_${v}_tail.log; rm $R/vlog_$v.log
done
# Control: one donated buffer in and out, nothing else moves. Is the graph still re-recorded?
TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=command_buffer_thunk=3,command_executor=3 \
  timeout 60 python3 .scratch/cb_minimal.py > $R/vlog_minimal.log 2>&1
echo "minimal exit $?" >> $R/s8a.log
grep -h "updated_allocs\|Skip updating\|Updated [0-9]* commands\|Updated command buffer" $R/vlog_minimal.log \
  | sed 's/^[IWE][0-9]* [0-9:.]* *[0-9]* //' | cut -c1-300 | sort | uniq -c | sort -rn | head -12 >> $R/s8a.log
cat $R/s8a.log | head -120
