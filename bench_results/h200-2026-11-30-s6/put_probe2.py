"""Host->GPU transfers of FRESH numpy arrays (as the loader has) vs arrays put before."""
import json, threading, time
import numpy as np
import jax
from jax.sharding import SingleDeviceSharding

dev = jax.devices()[0]
MB, N = 64, 32
gb = N * MB / 1024
out = {}

def fresh():
    arrs = [np.empty(MB << 20, np.int8) for _ in range(N)]
    for a in arrs:
        a.fill(1)  # touch every page, as a file read would
    return arrs

def put_all(arrs, sharding=dev):
    t0 = time.perf_counter()
    ys = [jax.device_put(a, sharding) for a in arrs]
    t1 = time.perf_counter()
    jax.block_until_ready(ys)
    return ys, t1 - t0, time.perf_counter() - t0

put_all(fresh()[:4])
for rep in range(3):
    arrs = fresh()
    _, q, r = put_all(arrs)
    _, q2, r2 = put_all(arrs)
    out.setdefault("fresh_then_same", []).append([round(q / gb, 4), round(r / gb, 4), round(q2 / gb, 4), round(r2 / gb, 4)])

for threads in (1, 4):
    arrs = fresh()
    parts = [arrs[i::threads] for i in range(threads)]
    t0 = time.perf_counter()
    ths = [threading.Thread(target=put_all, args=(p,)) for p in parts]
    [t.start() for t in ths]; [t.join() for t in ths]
    out[f"fresh_threads_{threads}_s_per_gb"] = round((time.perf_counter() - t0) / gb, 4)

t0 = time.perf_counter(); arrs = fresh(); out["fresh_alloc_touch_s_per_gb"] = round((time.perf_counter() - t0) / gb, 4)
t0 = time.perf_counter()
for a in arrs:
    b = np.empty_like(a); np.copyto(b, a)
out["numpy_copy_fresh_dst_s_per_gb"] = round((time.perf_counter() - t0) / gb, 4)
try:
    pinned = SingleDeviceSharding(dev, memory_kind="pinned_host")
    onto = SingleDeviceSharding(dev, memory_kind="device")
    arrs = fresh()
    hs, q, r = put_all(arrs, pinned)
    ys, q2, r2 = put_all(hs, onto)
    out["pinned_stage"] = {"to_pinned": [round(q / gb, 4), round(r / gb, 4)], "pinned_to_device": [round(q2 / gb, 4), round(r2 / gb, 4)]}
except Exception as e:
    out["pinned_stage"] = repr(e)[:300]
print(json.dumps(out))
