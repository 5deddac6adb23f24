"""Session 13: the junction kernel (kernels.residual_norm) at one device's share of 8, batch 1, by the GPU's
own time (bench.device_seconds: 200 calls queued, a profiler trace), per (slices, warps):
  A: after attention, the output projection's 2 partial sums, the router's logits (D 6144, E 8);
  B: after the MoE, one part, the next norm, no router.
python3 junction_sweep.py OUT.json  (from a tree's root, PYTHONPATH=.)  -> prints one line per setting and the
fastest A + B as "best SLICES WARPS"."""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import bench
import kernels

D, E = 6144, 8
rng = np.random.default_rng(0)
f32 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
args_a = (f32(1, D), f32(2, 1, D), f32(D), f32(D), f32(D, E))
args_b = (f32(1, D), f32(1, 1, D), f32(D), f32(D))
rows = []
for slices in (4, 8, 12, 24, 48):
    for warps in (2, 4, 8, 16):
        kernels.JUNCTION_SLICES, kernels.JUNCTION_WARPS = slices, warps
        fn = jax.jit(lambda *a: kernels.residual_norm(*a, y_dtype=jnp.bfloat16))
        jax.block_until_ready(fn(*args_a))
        jax.block_until_ready(fn(*args_b))
        a = bench.device_seconds(fn, args_a, 200) * 1e6
        b = bench.device_seconds(fn, args_b, 200) * 1e6
        rows.append(dict(slices=slices, warps=warps, a_us=a, b_us=b))
        print(f"slices {slices:2d} warps {warps:2d}: A {a:.2f} us, B {b:.2f} us, A + B {a + b:.2f} us", flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
best = min(rows, key=lambda r: r["a_us"] + r["b_us"])
print(f"best {best['slices']} {best['warps']}", flush=True)
