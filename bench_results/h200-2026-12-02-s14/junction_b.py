"""Session 14, call D: the second junction (kernels.residual_norm after the MoE) takes the one-token output
kernel's 8 partial sums at one device's share of 8; call A-C profiles put it at 4.3 us against 2.4 with one
part. Two modes, from a tree's root (PYTHONPATH=.):
  python3 junction_b.py sweep OUT.json   the junction alone by the GPU's time (bench.device_seconds, 200 calls
                                         queued), 8 parts, no router, per (slices, warps); prints "best S W";
  python3 junction_b.py S W -- <bench.py arguments>   bench.py with junctions of >= 4 parts patched to S x W."""
import json
import sys

import kernels

if sys.argv[1] == "sweep":
    import jax
    import jax.numpy as jnp
    import numpy as np

    import bench

    D = 6144
    rng = np.random.default_rng(0)
    f32 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    args = (f32(1, D), f32(8, 1, D), f32(D), f32(D))
    rows = []
    for slices in (4, 8, 16):
        for warps in (4, 8, 16, 32):
            kernels.JUNCTION_SLICES, kernels.JUNCTION_WARPS = slices, warps
            fn = jax.jit(lambda *a: kernels.residual_norm(*a, y_dtype=jnp.bfloat16))
            jax.block_until_ready(fn(*args))
            us = bench.device_seconds(fn, args, 200) * 1e6
            rows.append(dict(slices=slices, warps=warps, us=us))
            print(f"slices {slices:2d} warps {warps:2d}: {us:.2f} us", flush=True)
    json.dump(rows, open(sys.argv[2], "w"), indent=1)
    best = min(rows, key=lambda r: r["us"])
    print(f"best {best['slices']} {best['warps']}", flush=True)
else:
    SLICES, WARPS = int(sys.argv[1]), int(sys.argv[2])
    call = kernels._residual_norm_call

    def patched(h, parts, scale_1, scale_2, router, *, slices, warps, **kw):
        if parts.shape[0] >= 4 * h.shape[0]:
            slices, warps = SLICES, WARPS
        return call(h, parts, scale_1, scale_2, router, slices=slices, warps=warps, **kw)

    kernels._residual_norm_call = patched
    import bench  # noqa: E402

    bench.main(sys.argv[4:])
