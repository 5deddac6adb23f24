#!/usr/bin/env bash
# Does the loader's single placing thread pay a one-time transfer start-up? restore() onto the
# GPU in a fresh process, with and without warming the transfer path first (outside the timing).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
mkdir -p /tmp/w && tar xf .scratch/new.tar -C /tmp/w && cd /tmp/w || exit 1
export CUDA_VISIBLE_DEVICES=0 JAX_PLATFORMS=cuda
D=/tmp/ckpt_bench
python3 -c "import bench; print(bench.write_bench_checkpoint('$D', 4.0))" 2>&1 | tail -1
WARM='import time, jax, numpy as np; from jax.sharding import NamedSharding, Mesh, PartitionSpec as P
t=time.perf_counter(); d=jax.devices()[0]; m=Mesh(np.array([d]).reshape(1,1),("data","model"))
a=np.ones((1024,1024),np.int8); jax.block_until_ready([jax.device_put(a,d), jax.make_array_from_callback(a.shape, NamedSharding(m,P()), lambda i: a[i])])
print("warm-up s", round(time.perf_counter()-t,3), flush=True)'
for r in 1 2 3; do
  for v in plain warm; do
    pre=""; [ $v = warm ] && pre="$WARM"
    python3 -c "$pre
import sys, bench; bench.main(sys.argv[1:])" _loader_child --dir $D --method loader_devices --workers 32 --cold 2>&1 \
      | grep -v "^W0000\|^I0000" | python3 -c "
import sys, json
for line in sys.stdin:
    if line.startswith('{'):
        r = json.loads(line); print('$v r$r', round(r['seconds'], 3), 's', [l.split('; ',1)[1] for l in r['log'] if 'placing' in l])
    else: print('$v r$r', line.strip())"
  done
done
