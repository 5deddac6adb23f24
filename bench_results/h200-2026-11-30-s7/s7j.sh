#!/usr/bin/env bash
# Session 7, call J (one GPU): keep the step's temporaries at a fixed address so that XLA
# need not re-record its CUDA graph: stable_probe.py (8 layers) with XLA's defaults, with
# --xla_gpu_temp_buffer_use_separate_color=true, with --xla_gpu_command_buffer_update_mode=SKIP_TEMP.
#   OUT=$OUT bash .scratch/s7j.sh     -> $OUT/s7j.tgz
R=/tmp/s7j; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s7j.tgz" -C /tmp s7j' EXIT
declare -A FL
FL[default]=""
FL[sepcolor]="--xla_gpu_temp_buffer_use_separate_color=true"
FL[skiptemp]="--xla_gpu_command_buffer_update_mode=SKIP_TEMP"
for v in sepcolor skiptemp default; do
  XLA_FLAGS="${FL[$v]}" TRACE_DIR=/tmp/tr_$v timeout 75 python3 .scratch/stable_probe.py 8 1 > $R/L8_$v.log 2>&1
  echo "$v exit $?: $(grep -h 'layers,' $R/L8_$v.log | tr '\n' ' ')" >> $R/s7j.log
  tail -3 $R/L8_$v.log | grep -iv "layers," | cut -c1-300 >> $R/s7j.log
done
cat $R/s7j.log
