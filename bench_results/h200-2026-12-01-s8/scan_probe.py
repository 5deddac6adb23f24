"""Next session's probe (issue 11's host floor): does a loop over layers (lax.scan over stacked
weights) cost the host less per layer than the unrolled layers of today's step? Per layer a
few kernels (an MLP-ish body on [8, 1024] bf16); L = 8, 32, 64 layers; unrolled (L weight
arguments) against scan ([L, ...] stacked, one argument). Host enqueue time with the device
idle (median of 20) and the time per call queued back to back; with XLA's defaults (the
script is run once per XLA_FLAGS variant by s8c.sh)."""
import os, statistics, sys, time
import jax, jax.numpy as jnp

D = 1024


def body(x, w):
    h = jnp.tanh(x @ w[0])
    h = h * jax.nn.sigmoid(x @ w[1])
    return x + (h @ w[2]) * 0.1


def dispatch_us(f, *a, reps=20):
    jax.block_until_ready(f(*a))
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); out = f(*a); ts.append(time.perf_counter() - t); jax.block_until_ready(out)
    return statistics.median(ts) * 1e6


def queued_ms(f, *a, n=20):
    jax.block_until_ready(f(*a))
    t = time.perf_counter()
    for _ in range(n):
        out = f(*a)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n * 1e3


x = jnp.ones((8, D), jnp.bfloat16)
for layers in (8, 32, 64):
    key = jax.random.key(layers)
    stacked = (jax.random.normal(key, (layers, 3, D, D), jnp.float32) * 0.03).astype(jnp.bfloat16)
    separate = [stacked[i] for i in range(layers)]
    unrolled = jax.jit(lambda x, ws: [x := body(x, w) for w in ws][-1])
    scanned = jax.jit(lambda x, ws: jax.lax.scan(lambda c, w: (body(c, w), None), x, ws)[0])
    res = {}
    for name, f, arg in (("unrolled", unrolled, separate), ("scan", scanned, stacked)):
        res[name] = (dispatch_us(f, x, arg), queued_ms(f, x, arg))
    print(f"{layers} layers: " + "; ".join(f"{n}: host {h:.0f} us ({h / layers:.1f} per layer), queued {q:.3f} ms"
                                          for n, (h, q) in res.items()), flush=True)
