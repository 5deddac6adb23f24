"""Session 9: kernels.residual_norm on a GPU by NORM_NUM_WARPS, against XLA's own norms.

A chain of CHAIN junctions in one jit (each one's h feeds the next, so they run in order),
timed as a whole; per junction = total / CHAIN. Call D (s9d.sh) ran CHAIN=64 with warps
4, 8, 16, 32; call F (s9f.sh) CHAIN=32 with warps 8, 16, 32 (the env vars below; both calls
ran this file with those values written in; ROWS, the rows per junction, 1 and 8 there).
Call M ran ROWS="1 2 4 8 16" WARPS=8. 'xla' is the same junction in plain JAX (XLA makes a
reduction kernel per norm plus fused applies). Prints one line per (rows, variant)."""
import os, sys, time
import jax, jax.numpy as jnp, numpy as np
import kernels

D, CHAIN = 6144, int(os.environ.get("CHAIN", "32"))


def chain(backend, scaled):
    def f(h, x, sx, sy):
        for _ in range(CHAIN):
            h, y = kernels.residual_norm(h, x, sx, sy if scaled else None, backend=backend)
            x = y  # the next junction's block output: keeps every junction's outputs live
        return h, x
    return jax.jit(f)


def timed(f, *args, reps=30):
    out = f(*args); jax.block_until_ready(out)
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t)
    return float(np.median(ts)) / CHAIN * 1e6


rng = np.random.default_rng(0)
for rows in [int(r) for r in os.environ.get("ROWS", "1 8").split()]:
    h = jnp.asarray(rng.normal(size=(rows, D)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(rows, D)), jnp.float32)
    sx, sy = (jnp.asarray(rng.normal(size=D), jnp.float32) for _ in range(2))
    want = chain("xla", True)(h, x, sx, sy)
    for scaled in (True, False):
        print(f"rows {rows} scaled {scaled} xla: {timed(chain('xla', scaled), h, x, sx, sy):.2f} us/junction", flush=True)
    for warps in [int(w) for w in os.environ.get("WARPS", "8 16 32").split()]:
        kernels.NORM_NUM_WARPS = warps
        f = chain("pallas", True)
        got = f(h, x, sx, sy)
        err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(got, want))
        print(f"rows {rows} warps {warps}: {timed(f, h, x, sx, sy):.2f} us/junction (scaled), "
              f"{timed(chain('pallas', False), h, x, sx, sy):.2f} (unscaled); max rel diff vs xla {err:.1e}", flush=True)
