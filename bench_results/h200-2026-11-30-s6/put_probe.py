"""How host->GPU transfers of numpy arrays behave, for the loader (issue 11).
1) one thread: device_put of 64 MB arrays, seconds per GB (returned = queued; then ready);
2) the same while a Python thread counts: does device_put hold the GIL?
3) two and four threads putting at once: GB/s in all;
4) the same arrays put in one batched jax.device_put call;
5) staging into pinned host memory first (memory_kind='pinned_host'), then to the device."""
import json, os, sys, threading, time
import numpy as np
import jax

dev = jax.devices()[0]
MB = 64
N = 32  # 2 GB per pass
rng = np.random.default_rng(0)
arrays = [rng.integers(-128, 127, size=MB << 20, dtype=np.int8) for _ in range(N)]
for a in arrays:
    a += 0  # touch every page
gb = N * MB / 1024
out = {}

def put_all(arrs):
    t0 = time.perf_counter()
    ys = [jax.device_put(a, dev) for a in arrs]
    t1 = time.perf_counter()
    jax.block_until_ready(ys)
    return t1 - t0, time.perf_counter() - t0

put_all(arrays[:2])  # warm-up
for rep in range(3):
    q, r = put_all(arrays)
    out.setdefault("one_thread", []).append({"queue_s_per_gb": q / gb, "ready_s_per_gb": r / gb})

# GIL: count Python loop iterations in a thread, alone and during device_put.
def counter(stop, res):
    n = 0
    while not stop.is_set():
        n += 1
    res.append(n)

for label, work in (("idle", lambda: time.sleep(1.0)), ("during_put", lambda: put_all(arrays))):
    stop, res = threading.Event(), []
    th = threading.Thread(target=counter, args=(stop, res)); th.start()
    t0 = time.perf_counter(); work(); dt = time.perf_counter() - t0
    stop.set(); th.join()
    out[f"counter_per_s_{label}"] = res[0] / dt

for threads in (2, 4, 8):
    parts = [arrays[i::threads] for i in range(threads)]
    res = [None] * threads
    def run(i):
        res[i] = put_all(parts[i])
    t0 = time.perf_counter()
    ths = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    [t.start() for t in ths]; [t.join() for t in ths]
    out[f"threads_{threads}_s_per_gb"] = (time.perf_counter() - t0) / gb

t0 = time.perf_counter()
ys = jax.device_put(arrays, dev); t1 = time.perf_counter(); jax.block_until_ready(ys)
out["batched_call"] = {"queue_s_per_gb": (t1 - t0) / gb, "ready_s_per_gb": (time.perf_counter() - t0) / gb}
del ys

try:
    pinned = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    t0 = time.perf_counter(); hs = [jax.device_put(a, pinned) for a in arrays]; jax.block_until_ready(hs)
    t1 = time.perf_counter(); ys = [jax.device_put(h, dev) for h in hs]; jax.block_until_ready(ys)
    t2 = time.perf_counter()
    out["pinned"] = {"to_pinned_s_per_gb": (t1 - t0) / gb, "pinned_to_device_s_per_gb": (t2 - t1) / gb}
except Exception as e:
    out["pinned"] = repr(e)[:300]

t0 = time.perf_counter()
for a in arrays:
    np.copyto(np.empty_like(a), a)
out["numpy_copy_s_per_gb"] = (time.perf_counter() - t0) / gb
out["jax"] = jax.__version__
print(json.dumps(out, indent=1))
