"""Session 13, on the GPU: main's decode kernels compiled (backend "pallas") against float64 numpy, at one
device's share of 8 and at full width (Grok-1's D 6144, key size 128, 48 q / 8 kv heads):
1. int8_matmuls: q/k/v side by side and the output projection, x unpadded (1, 3, 8 and 20 rows; the kernel
   masks the tile's other rows), bf16 and float32 x, the default tilings (split-K, the narrowed columns);
   the output projection's partial sums (partial_sums=True);
2. residual_norm: the partial sums added, rms_norm_1, the add, rms_norm_2 (y in bf16), the router's logits
   as partial sums; then route from them;
3. grouped_matmul_gated(gather=True): the gated kernel reading each row's token itself, against dispatch +
   the kernel (exactly) and float64 (1 and 8 tokens at the share of 8; 1 token, 2 experts at full width).
Run from the tree's root:  python3 gpu_check.py  -> one line per check, "OK"/"BAD", exit 1 on any BAD.
BACKEND=interpret SMALL=1 is a dry run on a CPU."""
import os
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import kernels

rng = np.random.default_rng(0)
BF16 = ml_dtypes.bfloat16
BACKEND = os.environ.get("BACKEND", "pallas")
D, KEY, QH, KVH = (512, 32, 48, 8) if os.environ.get("SMALL") else (6144, 128, 48, 8)
bad = 0


def report(name: str, err: float, tol: float) -> None:
    global bad
    ok = np.isfinite(err) and err < tol
    bad += not ok
    print(f"{name}: rel err {err:.2e} (tol {tol:.0e})", "OK" if ok else "BAD", flush=True)


def rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def quant(n, k, nb=1):  # int8 [N, K] (the inference layout) and bf16 scales [nb, N]
    w = rng.integers(-127, 128, (n, k), dtype=np.int8)
    s = (rng.uniform(0.3, 3, (nb, n)) / (127 * np.sqrt(k))).astype(BF16)
    return w, s


def deq(w, s):  # [N, K] int8, [nb, N] -> [K, N] float64
    nb, k = s.shape[0], w.shape[1]
    return (w.astype(np.float64).T.reshape(nb, k // nb, -1) * s.astype(np.float64)[:, None, :]).reshape(k, -1)


for share in (8, 1):
    qkv = [quant(n // share, D) for n in (QH * KEY, KVH * KEY, KVH * KEY)]
    out_proj = [quant(D, QH * KEY // share, 8 // share)]
    for name, mats, k_in in (("q/k/v", qkv, D), ("output", out_proj, QH * KEY // share)):
        cfg = kernels.default_config("dense", 16, 1, k_in, sum(w.shape[0] for w, _ in mats), transposed=True)
        for m in (1, 3, 8, 20):
            for dtype in (BF16, np.float32):
                x = rng.standard_normal((m, k_in)).astype(dtype)
                ys = jax.jit(lambda x, ws: kernels.int8_matmuls(x, ws, backend=BACKEND, transposed=True,
                                                                out_dtype=jnp.float32))(
                    jnp.asarray(x), [(jnp.asarray(w), jnp.asarray(s)) for w, s in mats])
                want = [x.astype(np.float64) @ deq(w, s) for w, s in mats]
                shapes_ok = [y.shape for y in ys] == [v.shape for v in want]
                err = max(rel(y, v) for y, v in zip(ys, want)) if shapes_ok else np.inf
                report(f"share {share}: {name} {cfg.block_n} cols x {cfg.split_k} K slices, {m} rows, "
                       f"{np.dtype(dtype).name} x", err, 1e-5 if dtype == np.float32 else 1e-2)

    # 1b. the output projection's partial sums, as the junction takes them.
    w, sc = out_proj[0]
    x = rng.standard_normal((1, QH * KEY // share)).astype(BF16)
    [parts] = jax.jit(lambda x, w, s: kernels.int8_matmuls(x, [(w, s)], backend=BACKEND, transposed=True,
                                                          partial_sums=True))(jnp.asarray(x), jnp.asarray(w),
                                                                              jnp.asarray(sc))
    report(f"share {share}: output projection, {parts.shape[0]} partial sums", rel(np.asarray(parts).sum(0),
           x.astype(np.float64) @ deq(w, sc)), 1e-5)

    # 2. the junction, from that many partial sums (and from one).
    for n_parts in sorted({1, parts.shape[0]}):
        h, xp = rng.normal(size=(1, D)) * 3, rng.normal(size=(n_parts, 1, D))
        s1, s2, router = rng.uniform(0.5, 1.5, D), rng.uniform(0.5, 1.5, D), rng.normal(size=(D, 8)) / np.sqrt(D)
        f32 = lambda a: np.asarray(a, np.float32)
        h, xp, s1, s2, router = map(f32, (h, xp, s1, s2, router))
        gh, gy, glog = jax.jit(lambda *a: kernels.residual_norm(*a, backend=BACKEND, y_dtype=jnp.bfloat16))(
            h, xp, s1, s2, router)
        rms = lambda v, s: v / np.sqrt(np.mean(v * v, -1, keepdims=True) + 1e-5) * s
        wh = h.astype(np.float64) + rms(xp.astype(np.float64).sum(0), s1.astype(np.float64))
        wy = rms(wh, s2.astype(np.float64))
        report(f"share {share}: junction h', {n_parts} partials", rel(gh, wh), 1e-6)
        report(f"share {share}: junction y (bf16)", rel(np.asarray(gy.astype(jnp.float32)), wy), 2**-8)
        wl = wy @ router.astype(np.float64)
        report(f"share {share}: junction router logits {tuple(glog.shape)}", rel(np.asarray(glog).sum(0), wl), 1e-5)
        gates, experts, _ = kernels.route(glog, 2, kernels.default_block_m(2), backend=BACKEND)
        p = np.exp(wl - wl.max())
        p /= p.sum()
        top = np.argsort(-p[0])[:2]
        same = sorted(np.asarray(experts)[0].tolist()) == sorted(top.tolist())
        report(f"share {share}: route experts {np.asarray(experts)[0].tolist()} vs {top.tolist()}",
               0.0 if same else 1.0, 0.5)
        report(f"share {share}: route gates", rel(np.sort(np.asarray(gates)[0]), np.sort(p[0, top])), 1e-5)

    # 3. the gated kernel gathering its rows.
    f, experts = (4096, 8) if share == 8 else (32768, 2)
    f = f if not os.environ.get("SMALL") else f // 8
    w = rng.integers(-127, 128, (experts, f, D), dtype=np.int8)
    v = rng.integers(-127, 128, (experts, f, D), dtype=np.int8)
    ws, vs = ((rng.uniform(0.3, 3, (experts, 1, f)) / (127 * np.sqrt(D))).astype(BF16) for _ in range(2))
    for m in (1, 8) if share == 8 else (1,):
        x = rng.standard_normal((m, D)).astype(BF16)
        idx = np.stack([rng.permutation(experts)[:2] for _ in range(m)]).astype(np.int32)
        plan = kernels.make_plan(jnp.asarray(idx), experts, kernels.default_block_m(m * 2))
        args = (jnp.asarray(w), jnp.asarray(ws), jnp.asarray(v), jnp.asarray(vs), plan)
        gated = jax.jit(lambda x, *a, gather: kernels.grouped_matmul_gated(
            x, *a, backend=BACKEND, transposed=True, out_dtype=jnp.float32, gather=gather), static_argnames="gather")
        got = np.asarray(gated(jnp.asarray(x), *args, gather=True))
        ref = np.asarray(gated(kernels.dispatch(jnp.asarray(x), plan), *args, gather=False))
        rows = np.asarray(plan.row_token)
        live = rows < m
        te = np.repeat(np.asarray(plan.tile_expert), plan.block_m)
        a, b = np.zeros((live.sum(), f)), np.zeros((live.sum(), f))
        xs, tl = x.astype(np.float64)[rows[live]], te[live]
        for e in np.unique(tl):  # one expert's float64 matrices at a time
            a[tl == e] = xs[tl == e] @ (w[e].astype(np.float64) * ws[e].astype(np.float64).T).T
            b[tl == e] = xs[tl == e] @ (v[e].astype(np.float64) * vs[e].astype(np.float64).T).T
        want = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3))) * b
        report(f"share {share}: gated gather, {m} tokens, vs float64", rel(got[live], want), 1e-4)
        report(f"share {share}: gated gather vs dispatch + gated (pad rows zero: {not got[~live].any()})",
               0.0 if np.array_equal(got, ref) and not got[~live].any() else 1.0, 0.5)

print(f"{bad} BAD" if bad else "all OK", flush=True)
sys.exit(1 if bad else 0)
