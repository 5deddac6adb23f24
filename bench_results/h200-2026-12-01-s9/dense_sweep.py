"""Session 9 call K: the dense decode kernel at one device's share of 8 (M = 1 row), by tiling.

q/k/v: x [1, 6144] times three int8 weights stored [N, K] (768, 128, 128 columns; one scale
block), as int8_matmuls runs them in one launch; out: x [1, 768] times [6144, 768]-stored
(one scale block). 12 weight copies are rotated so that L2 (50 MB) never holds them; the
time per call is a chain of 12 calls in one jit. Prints the default tiling's time, then each
tiling's, checked against the xla backend."""
import itertools, statistics, time
import jax, jax.numpy as jnp, numpy as np
import kernels

COPIES, REPS = 12, 20


def weights(key, n, k, nb=1):
    w = jax.random.randint(key, (COPIES, n, k), -127, 128, jnp.int32).astype(jnp.int8)  # [N, K] stored
    s = (jax.random.uniform(jax.random.fold_in(key, 1), (COPIES, nb, n)) * 0.01).astype(jnp.bfloat16)
    return w, s


def case(name, k, widths, key):
    x = jax.random.normal(key, (1, k), jnp.float32).astype(jnp.bfloat16)
    ws = [weights(jax.random.fold_in(key, i + 2), n, k) for i, n in enumerate(widths)]

    def chain(cfg, backend):
        @jax.jit
        def f(x, ws):
            outs = []
            for c in range(COPIES):
                ys = kernels.int8_matmuls(x, [(w[c], s[c]) for w, s in ws], backend=backend, config=cfg,
                                          out_dtype=jnp.float32, transposed=True)
                outs.append(jnp.concatenate(ys, axis=-1))
            return jnp.stack(outs)
        return f

    want = chain(None, "xla")(x, ws)
    def timed(f):
        jax.block_until_ready(f(x, ws))
        ts = []
        for _ in range(REPS):
            t = time.perf_counter(); jax.block_until_ready(f(x, ws)); ts.append(time.perf_counter() - t)
        return statistics.median(ts) / COPIES * 1e6
    bytes_ = k * sum(widths)
    print(f"{name}: K={k} N={widths} ({bytes_ / 1e6:.1f} MB, {bytes_ / 4.2e12 * 1e6:.1f} us at 4.2 TB/s)", flush=True)
    print(f"  default: {timed(chain(None, 'pallas')):.1f} us; xla: {timed(chain(None, 'xla')):.1f} us", flush=True)
    for bn, bk, split, stages in itertools.product((32, 64, 128), (128, 256), (1, 2, 4, 8, 16), (3,)):
        cfg = kernels.KernelConfig(block_n=bn, block_k=bk, split_k=split, num_warps=4, num_stages=stages)
        try:
            f = chain(cfg, "pallas")
            got = f(x, ws)
            err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
            print(f"  bn {bn:3} bk {bk} split {split:2} stages {stages}: {timed(f):6.1f} us  err {err:.1e}", flush=True)
        except Exception as e:  # a tiling these shapes cannot take
            print(f"  bn {bn:3} bk {bk} split {split:2} stages {stages}: {type(e).__name__}: {str(e)[:80]}", flush=True)


case("q/k/v, share of 8", 6144, (768, 128, 128), jax.random.key(0))
case("output projection, share of 8", 768, (6144,), jax.random.key(1))
