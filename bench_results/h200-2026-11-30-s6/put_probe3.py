"""The loader's placing path: make_array_from_callback vs device_put, many leaves (fresh)."""
import json, time
import numpy as np
import jax
from jax.sharding import NamedSharding, Mesh, PartitionSpec as P

dev = jax.devices()[0]
mesh = Mesh(np.array([dev]).reshape(1, 1), ("data", "model"))
out = {}

def leaves(n, mb):
    arrs = []
    for _ in range(n):
        w = np.empty((mb << 20) // 4096, dtype=(np.int8, 4096)).reshape(-1, 4096); w.fill(1)
        s = np.ones((8, 4096), np.float32)
        arrs += [w, s]
    return arrs

def run(label, place, n=300, mb=12):
    arrs = leaves(n, mb)
    t0 = time.perf_counter(); ys = [place(a) for a in arrs]; t1 = time.perf_counter()
    jax.block_until_ready(ys); t2 = time.perf_counter()
    out[label] = {"queue_s": round(t1 - t0, 3), "ready_s": round(t2 - t0, 3), "gb": round(sum(a.nbytes for a in arrs) / 1e9, 2),
                  "per_call_ms": round(1e3 * (t1 - t0) / len(arrs), 3)}

run("warmup_device_put", lambda a: jax.device_put(a, dev), n=50)
for r in range(2):
    run(f"device_put_{r}", lambda a: jax.device_put(a, dev))
    run(f"callback_named_{r}", lambda a: jax.make_array_from_callback(a.shape, NamedSharding(mesh, P()), lambda idx: a[idx]))
    run(f"device_put_named_{r}", lambda a: jax.device_put(a, NamedSharding(mesh, P())))
print(json.dumps(out))
