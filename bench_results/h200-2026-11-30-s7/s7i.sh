#!/usr/bin/env bash
# Session 7, call I (one GPU): XLA's own log of its command-buffer updates (VLOG of
# command_buffer_thunk and friends) for the 2-layer plain step of stable_probe.py: which
# buffers moved so that every step re-records its CUDA graph.
#   OUT=$OUT bash .scratch/s7i.sh     -> $OUT/s7i.tgz
R=/tmp/s7i; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s7i.tgz" -C /tmp s7i' EXIT
TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=command_buffer_thunk=3,command_buffer_cmd=2,command_buffer_cmd_emitter=2,gpu_command_buffer=2 \
  timeout 100 python3 .scratch/stable_probe.py 2 1 > $R/vlog_full.log 2>&1; echo "exit $?" >> $R/s7i.log
wc -l $R/vlog_full.log >> $R/s7i.log
grep -i "command" $R/vlog_full.log | sed 's/^[IWE][0-9]* [0-9:.]* *[0-9]* //' | cut -c1-300 | sort | uniq -c | sort -rn | head -60 >> $R/s7i.log
grep -i "alloc\|changed\|update" $R/vlog_full.log | cut -c1-300 | head -80 > $R/vlog_update_lines.log
tail -c 2000000 $R/vlog_full.log > $R/vlog_tail.log; rm $R/vlog_full.log
cat $R/s7i.log | head -80
