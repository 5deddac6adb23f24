"""Session 10 call E: the dense decode kernel at one device's share of 8, by tiling, timed by
the device (devtime.device_times: all kernels of a call, its split-K sum included).

q/k/v: x [M, 6144] times three int8 weights stored [N, K] (768, 128, 128 columns, one scale
block), as int8_matmuls runs them in one launch; out: x [M, 768] times [6144, 768] (one scale
block: the share of 8 holds one of the release's 8). COPIES weight copies rotate so that L2
(50 MB) never holds the one read; a chain of COPIES calls in one jit. M = 1 (the model takes this kernel below 8 rows).
Each tiling is checked against the xla backend.
    python3 dense_sweep2.py -> dense_sweep2.json in $OUT (or .)
"""
import itertools, json, os
import jax, jax.numpy as jnp, numpy as np
import bench, kernels
from devtime import device_times

COPIES, REPS = 16, 10
OUT = os.environ.get("OUT", ".")
bw = bench.copy_bandwidth(1.0)
res = {"bandwidth": bw, "cases": {}}


def weights(key, n, k):
    w = jax.random.randint(key, (COPIES, n, k), -127, 128, jnp.int32).astype(jnp.int8)  # [N, K] stored
    s = jax.random.uniform(jax.random.fold_in(key, 1), (COPIES, 1, n), minval=0.5, maxval=1.5) / (64 * np.sqrt(k))
    return w, s.astype(jnp.bfloat16)


def case(name, m, k, widths, key):
    x = jax.random.normal(key, (m, k), jnp.float32).astype(jnp.bfloat16)
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
    nbytes = k * sum(widths)
    cfgs = [None] + [kernels.KernelConfig(block_n=bn, block_k=bk, split_k=split, num_warps=4, num_stages=3)
                     for bn, bk, split in itertools.product((32, 64, 128), (64, 128, 256), (1, 2, 4, 8, 16, 32))]
    fns, recs = [], []
    for cfg in cfgs:
        try:
            f = chain(cfg, "pallas")
            err = float(jnp.linalg.norm(f(x, ws) - want) / jnp.linalg.norm(want))
            fns.append(f)
            recs.append({"cfg": None if cfg is None else cfg._asdict(), "err": err})
        except Exception as e:  # a tiling these shapes cannot take
            pass
    for rec, dev in zip(recs, device_times(fns, (x, ws), f"/tmp/trace_dense_{m}_{k}", REPS, COPIES)):
        if dev is not None:
            rec["us"], rec["kernel_us"] = dev
    ok = sorted((r for r in recs if "us" in r and r["err"] < 1e-2), key=lambda r: r["us"])
    default = next((r for r in recs if r["cfg"] is None and "us" in r), None)
    res["cases"][name] = {"bytes": nbytes, "runs": recs}
    json.dump(res, open(f"{OUT}/dense_sweep2.json", "w"), indent=1)
    print(f"== {name}: {nbytes / 1e6:.1f} MB ({nbytes / bw * 1e6:.1f} us at the copy bandwidth); {len(recs)} tilings ran; "
          f"default {default and round(default['us'], 2)} us (kernel {default and round(default['kernel_us'], 2)})", flush=True)
    for r in ok[:6]:
        c = r["cfg"] and tuple(r["cfg"].values())[:3]
        print(f"   {r['us']:6.2f} us (kernel {r['kernel_us']:.2f})  {c or 'default'}  err {r['err']:.1e}", flush=True)


for m in (1,):
    case(f"q/k/v M={m}", m, 6144, (768, 128, 128), jax.random.key(m))
    case(f"output M={m}", m, 768, (6144,), jax.random.key(10 + m))
