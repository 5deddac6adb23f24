#!/usr/bin/env bash
# restore() onto one GPU, fresh process per pass, cold page cache: HEAD (old) against the
# working tree (new: the transfer warm-up on its own thread at the start of a load).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
mkdir -p /tmp/old && tar xf .scratch/new.tar -C /tmp/old || exit 1
export CUDA_VISIBLE_DEVICES=0 JAX_PLATFORMS=cuda
D=/tmp/ckpt_bench; NEW=$PWD
python3 -c "import bench; print(bench.write_bench_checkpoint('$D', 4.0))" 2>&1 | tail -1
for r in 1 2 3; do
  for v in old new; do
    tree=/tmp/old; [ $v = new ] && tree=$NEW
    (cd $tree && python3 bench.py _loader_child --dir $D --method loader_devices --workers 32 --cold 2>&1) \
      | grep "^{" | python3 -c "
import sys, json
r = json.loads(sys.stdin.read()); print('$v r$r', round(r['seconds'], 3), 's', [l.split('; ',1)[1] for l in r['log'] if 'placing' in l])"
    (cd $tree && python3 bench.py _loader_child --dir $D --method loader_host --workers 32 --cold 2>&1) \
      | grep "^{" | python3 -c "
import sys, json
r = json.loads(sys.stdin.read()); print('host($v) r$r', round(r['seconds'], 3), 's')"
  done
done
