#!/usr/bin/env bash
# Session 7, call E (one GPU): which of the decode step's ops XLA puts into command buffers
# (CUDA graphs). The optimized HLO of a 2-layer bench.py model run, dumped with XLA's defaults
# and with the full command-buffer list; the command_buffer computations are counted after.
#   OUT=$OUT bash .scratch/s7e.sh     -> $OUT/s7e.tgz
R=/tmp/s7e; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
trap 'tar czf "${OUT:-/tmp}/s7e.tgz" -C /tmp s7e' EXIT
for v in default cball; do
  flags="--xla_dump_to=/tmp/dump_$v --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=command-buffer"
  [ $v = cball ] && flags="$flags --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,COLLECTIVES --xla_gpu_graph_min_graph_size=1"
  XLA_FLAGS="$flags" XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 120 python3 bench.py model --layers 2 --batches 1 \
      --modes fast --prefill 128 --context 1024 --iters 5 --compile-layers 0 > $R/model_$v.log 2>&1
  echo "$v exit $?" >> $R/s7e.log
  mkdir -p $R/$v
  # the optimized HLO of the three largest modules (the decode step is among them)
  ls -S /tmp/dump_$v/*after_optimizations.txt | head -4 | xargs -I{} cp {} $R/$v/
  ls /tmp/dump_$v | grep -i command | head -50 >> $R/s7e.log
  ls -S /tmp/dump_$v/*command* 2>/dev/null | head -4 | xargs -I{} cp {} $R/$v/
  ls -la $R/$v >> $R/s7e.log
  for f in $R/$v/*.txt; do echo "$f: $(grep -c 'command_buffer' $f) command_buffer lines" >> $R/s7e.log; done
done
cat $R/s7e.log
