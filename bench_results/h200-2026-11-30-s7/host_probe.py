"""Session 7 probe (issue 11's host floor): what the host's time to enqueue a jitted program
grows with, on this GPU: the number of argument buffers, and the number of kernels. Each
point: the median over 30 calls of the time until the call returns, the device idle
(each call waits for the one before). Run once per XLA_FLAGS variant."""
import json, os, statistics, sys, time
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

def dispatch_us(f, *a, reps=30):
    jax.block_until_ready(f(*a)); jax.block_until_ready(f(*a))
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); o = f(*a); ts.append(time.perf_counter() - t); jax.block_until_ready(o)
    return statistics.median(ts) * 1e6

out = {"flags": os.environ.get("XLA_FLAGS", ""), "devices": []}
ndev = int(sys.argv[1]) if len(sys.argv) > 1 else 1
devs = jax.devices()[:ndev]
mesh = jax.make_mesh((ndev,), ("model",), devices=devs, axis_types=(jax.sharding.AxisType.Auto,))
sh = NamedSharding(mesh, P("model"))
out["devices"] = [str(d) for d in devs]
res = {}
for n in (1, 64, 256, 1024):
    xs = [jax.device_put(jnp.full((1024,), i, jnp.float32), sh) for i in range(n)]
    f = jax.jit(lambda *a: a[0] + 1)
    res[f"args_{n}"] = dispatch_us(f, *xs)
x = jax.device_put(jnp.ones((ndev, 1024), jnp.float32), NamedSharding(mesh, P("model", None)))
for k in (1, 16, 64, 256):
    def chain(x, k=k):
        for i in range(k):
            x = jax.lax.optimization_barrier(x * 1.0001 + 1.0)
        return x
    res[f"barrier_chain_{k}"] = dispatch_us(jax.jit(chain), x)
    def sorts(x, k=k):
        for i in range(k):
            x = jnp.sort(x * -1.0)
        return x
    res[f"sort_chain_{k}"] = dispatch_us(jax.jit(sorts), x)
w = jax.device_put(jnp.eye(1024, dtype=jnp.bfloat16), NamedSharding(mesh, P()))
xb = jax.device_put(jnp.ones((ndev * 8, 1024), jnp.bfloat16), NamedSharding(mesh, P("model", None)))
for k in (1, 16, 64):
    def dots(x, w, k=k):
        for i in range(k):
            x = jnp.tanh(x @ w)
        return x
    res[f"dot_tanh_chain_{k}"] = dispatch_us(jax.jit(dots), xb, w)
# The same launches with 1000x the device work: does enqueueing wait for the device?
wb = jax.device_put(jnp.eye(8192, dtype=jnp.bfloat16) * 0.5, NamedSharding(mesh, P()))
xbb = jax.device_put(jnp.ones((ndev * 4096, 8192), jnp.bfloat16), NamedSharding(mesh, P("model", None)))
for k in (1, 16):
    def bigdots(x, w, k=k):
        for i in range(k):
            x = jnp.tanh(x @ w)
        return x
    res[f"big_dot_tanh_chain_{k}"] = dispatch_us(jax.jit(bigdots), xbb, wb, reps=10)
# Donated arguments (as the KV cache is): each comes back as an output.
for n in (64, 256):
    f = jax.jit(lambda *a: tuple(x + 1 for x in a), donate_argnums=tuple(range(n)))
    state = {"xs": [jax.device_put(jnp.full((1024,), i, jnp.float32), sh) for i in range(n)]}
    def call(f=f, state=state):
        state["xs"] = f(*state["xs"])
        return state["xs"]
    res[f"donated_args_{n}"] = dispatch_us(call)
if ndev > 1:
    y = jax.device_put(jnp.ones((ndev * 8,), jnp.float32), sh)
    for k in (1, 16, 64):
        @jax.jit
        def psums(y, k=k):
            def body(v):
                for i in range(k):
                    v = jax.lax.psum(v * 0.5, "model") * 0.5
                return v
            return jax.shard_map(body, mesh=mesh, in_specs=P("model"), out_specs=P("model"))(y)
        res[f"psum_chain_{k}"] = dispatch_us(psums, y)
out["dispatch_us"] = res
for k, v in res.items():
    print(f"{k:>20} {v:9.1f} us")
print(json.dumps(out))
