"""Session 10 calls A and B: the MoE decode kernels' tilings at one device's share of N (default 8).

Weights stored [E, N, K] as the model keeps them: gated W, V [8, F/n, 6144] (one scale block),
down [8, 6144, F/n] (one scale block: a share of 8 holds one of the release's 8 row blocks).
M = 1 token (2 routed rows) and M = 8 (16 rows). Each timed call is a chain of CHAIN kernel
calls in one jit, each routed to other experts than the one before (M = 1), so L2 (50 MB)
never holds the weights read. Each tiling is checked against the xla backend. Prints per
call: the device's microseconds (all kernels of the call, from a profiler trace) and their
% of the bytes' time at the measured copy bandwidth. (Call A timed the chains by the wall
clock instead: host-bound, about twice the kernels' time in the model's profile.)

    python3 moe_sweep.py [share] [budget_s] -> moe_sweep.json in $OUT (or .)
"""
import itertools, json, os, sys, time
import jax, jax.numpy as jnp, numpy as np
import bench, kernels as K
from devtime import device_times

SHARE = int(sys.argv[1]) if len(sys.argv) > 1 else 8
BUDGET = float(sys.argv[2]) if len(sys.argv) > 2 else 240
E, D, F = 8, 6144, 32768 // SHARE
DRY = os.environ.get("DRY") == "1"  # CPU dry run: interpreted kernels, tiny chain, two tilings
CHAIN, REPS = (2, 1) if DRY else (8, 15)
PALLAS = "interpret" if DRY else "pallas"
T0 = time.time()
OUT = os.environ.get("OUT", ".")
res = {"share": SHARE, "cases": {}}


def save():
    json.dump(res, open(f"{OUT}/moe_sweep_share{SHARE}.json", "w"), indent=1)


def qweights(key, n, k):
    w = jax.random.randint(key, (E, n, k), -127, 128, jnp.int32).astype(jnp.int8)  # [E, N, K] stored
    s = (jax.random.uniform(jax.random.fold_in(key, 1), (E, 1, n), minval=0.5, maxval=1.5) / (64 * np.sqrt(k)))
    return w, s.astype(jnp.bfloat16)


key = jax.random.key(0)
gw, gv, dw = qweights(jax.random.fold_in(key, 1), F, D), qweights(jax.random.fold_in(key, 2), F, D), \
    qweights(jax.random.fold_in(key, 3), D, F)
bw = 4.2e12 if DRY else bench.copy_bandwidth(1.0)
res["bandwidth"] = bw
print(f"share {SHARE}: F = {F}; copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)


def routes(m):
    """CHAIN routings [M, 2]: at M = 1 pairs that never repeat an expert of the call before."""
    if m == 1:
        pairs = [(0, 1), (2, 3), (4, 5), (6, 7), (1, 2), (3, 4), (5, 6), (7, 0)]
        return [jnp.array([p], jnp.int32) for p in pairs[:CHAIN]]
    rng = np.random.default_rng(m)
    return [jnp.array(np.stack([rng.choice(E, 2, replace=False) for _ in range(m)]), jnp.int32)
            for _ in range(CHAIN)]


def case(op, m, cfgs):
    idxs = routes(m)
    bm = K.default_block_m(2 * m)
    plans = [K.make_plan(i, E, bm) for i in idxs]
    x = jax.random.normal(jax.random.key(m), (m, D), jnp.float32).astype(jnp.bfloat16)
    xs = [K.dispatch(x, p) for p in plans]  # [M_pad, D]
    h = [jax.random.normal(jax.random.key(m + 100), (p.num_padded_rows, F), jnp.float32).astype(jnp.bfloat16)
         for p in plans]
    touched = np.mean([np.unique(np.asarray(i)).size for i in idxs])
    nbytes = touched * (2 * F * D if op == "gated" else F * D)

    def chain(cfg, backend):
        @jax.jit
        def f(xs, h, plans, gw, gv, dw):
            if op == "gated":
                outs = [K.grouped_matmul_gated(a, *gw, *gv, p, backend=backend, config=cfg, transposed=True)
                        for a, p in zip(xs, plans)]
            else:
                outs = [K.grouped_matmul(a, *dw, p, backend=backend, config=cfg, transposed=True)
                        for a, p in zip(h, plans)]
            return jnp.stack(outs).astype(jnp.float32)
        return f

    args = (xs, h, plans, gw, gv, dw)
    want = chain(None, "xla")(*args)
    n_tiles = plans[0].tile_expert.shape[0]
    default = K.default_config(op, bm, n_tiles, D if op == "gated" else F, F if op == "gated" else D, True)
    name = f"{op} M={m}"
    recs = []
    res["cases"][name] = {"bytes": float(nbytes), "tiles": n_tiles, "default": default._asdict(), "runs": recs}
    print(f"== {name}: {n_tiles} tiles of {bm} rows, {nbytes / 1e6:.1f} MB per call "
          f"({nbytes / bw * 1e6:.1f} us at the copy bandwidth); default {default}", flush=True)
    t_case = time.time()
    fns, recs_ok = [], []
    for cfg in [None] + (cfgs[:2] if DRY else cfgs):
        if time.time() - t_case > BUDGET / 4:
            print("  budget: stop", flush=True)
            break
        try:
            f = chain(cfg, PALLAS)
            got = f(*args)
            err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
            rec = {"cfg": (cfg or default)._asdict(), "default": cfg is None, "err": err}
            fns.append(f)
            recs_ok.append(rec)
        except Exception as e:  # a tiling these shapes cannot take
            rec = {"cfg": cfg._asdict(), "error": f"{type(e).__name__}: {str(e)[:200]}"}
        recs.append(rec)
    for rec, dev in zip(recs_ok, device_times(fns, args, f"/tmp/trace_{op}_{m}", REPS, CHAIN)):
        if dev is not None:
            rec["us"], rec["kernel_us"] = dev
            rec["pct"] = 100 * nbytes / bw / (rec["us"] * 1e-6)
    for rec in recs:
        label = "default" if rec.get("default") else str(tuple(rec["cfg"].values())[:5])
        if "us" in rec:
            print(f"  {label:44} {rec['us']:7.1f} us {rec['pct']:5.1f}% (Pallas kernel {rec['kernel_us']:.1f})"
                  f"  err {rec['err']:.1e}", flush=True)
        else:
            print(f"  {label:44} {rec.get('error', 'no device time')[:100]}", flush=True)
    save()
    ok = sorted((r for r in recs if "us" in r and r["err"] < 1e-2), key=lambda r: r["us"])
    print(f"  best: {[(round(r['us'], 1), tuple(r['cfg'].values())[:5]) for r in ok[:3]]}", flush=True)


C = K.KernelConfig
gated = [C(block_n=bn, block_k=bk, split_k=1, num_warps=w, num_stages=st, dequant="cast")
         for bn, bk, (w, st) in itertools.product((32, 64, 128), (128, 256, 512), ((4, 3), (4, 4), (8, 3)))]
down = [C(block_n=bn, block_k=bk, split_k=sp, num_warps=4, num_stages=st)
        for bn, bk, sp, st in itertools.product((32, 64, 128), (128, 256), (1, 2, 4, 8), (3,))]
for m in (1, 8):
    case("gated", m, gated)
    case("down", m, down)
print(f"done in {time.time() - T0:.0f} s", flush=True)
