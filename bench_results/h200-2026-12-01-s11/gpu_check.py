"""On the GPU: the dense kernel with a scaled x, unpadded rows and partial sums, and the junction
adding partial sums, against float64 numpy (shapes of one device's share of 8)."""
import ml_dtypes, numpy as np, jax, jax.numpy as jnp
import kernels

rng = np.random.default_rng(0)
K = 6144
def quant(n, k, nb=1):
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)  # transposed [N, K]
    s = (rng.uniform(0.3, 3, (nb, n)) / (127 * np.sqrt(k))).astype(ml_dtypes.bfloat16)
    return w, s
mats = [quant(n, K) for n in (768, 128, 128)]
for m in (1, 3, 8):
    x = rng.standard_normal((m, K)).astype(np.float32)
    sc = rng.uniform(0.5, 2, K).astype(np.float32)
    xin = (x.astype(np.float64) * sc).astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    for partial in (False, True):
        f = jax.jit(lambda x, sc, ws: kernels.int8_matmuls(x, ws, backend="pallas", transposed=True, x_scale=sc,
                                                            x_dtype=jnp.bfloat16, out_dtype=jnp.float32,
                                                            partial_sums=partial))
        ys = f(jnp.asarray(x), jnp.asarray(sc), [(jnp.asarray(w), jnp.asarray(s)) for w, s in mats])
        for y, (w, s) in zip(ys, mats):
            want = xin @ (w.astype(np.float64) * s.astype(np.float64)).T
            got = np.asarray(y, np.float64)
            got = got.sum(0) if partial else got
            err = np.linalg.norm(got - want) / np.linalg.norm(want)
            print(f"dense m={m} partial={partial} shape={tuple(y.shape)} rel err {err:.2e}", "OK" if err < 1e-5 else "BAD")
for s_parts in (1, 4):
    n, d = 1, 6144
    h, x = rng.normal(size=(n, d)), rng.normal(size=(s_parts, n, d))
    sx, sy = rng.normal(size=d), rng.normal(size=d)
    rms = lambda v, s: v / np.sqrt(np.mean(v * v, -1, keepdims=True) + 1e-5) * s
    wh = h + rms(x.sum(0), sx); wy = rms(wh, sy)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    gh, gy = kernels.residual_norm(f32(h), f32(x), f32(sx), f32(sy), backend="pallas")
    e = max(np.abs(np.asarray(gh) - wh).max() / np.abs(wh).max(), np.abs(np.asarray(gy) - wy).max() / np.abs(wy).max())
    print(f"junction parts={s_parts} max rel err {e:.2e}", "OK" if e < 1e-5 else "BAD")
