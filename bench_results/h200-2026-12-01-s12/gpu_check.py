"""Session 12, on the GPU: fewer-kernels' decode kernels compiled (backend "pallas") against float64 numpy,
at one device's share of 8 and at full width (Grok-1's D 6144, key size 128, 48 q / 8 kv heads, F 32768):
1. int8_matmuls(partial_sums=True): q/k/v at 1 and 3 unpadded rows, the partials' sum;
2. residual_norm: x as S partial sums, the next norm's scale, y rounded to bf16, the router's logits slices;
3. route: top-2 from the junction's logits partials;
4. grouped_matmul_gated(gather=True): the kernel gathers the tokens' rows itself;
5. decode_attention: heads as partial sums, RoPE at positions, the token written at pos.
Run from the tree's root:  python3 gpu_check.py  -> one line per check, "OK"/"BAD", exit 1 on any BAD."""
import os
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import kernels

rng = np.random.default_rng(0)
BF16 = ml_dtypes.bfloat16
BACKEND = os.environ.get("BACKEND", "pallas")  # "interpret" with SMALL=1: a dry run of this script on a CPU
D, KEY, QH, KVH, F = (512, 32, 48, 8, 1024) if os.environ.get("SMALL") else (6144, 128, 48, 8, 32768)
bad = 0


def report(name: str, err: float, tol: float) -> None:
    global bad
    ok = np.isfinite(err) and err < tol
    bad += not ok
    print(f"{name}: rel err {err:.2e} (tol {tol:.0e})", "OK" if ok else "BAD", flush=True)


def rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def quant(*shape):  # int8 [.., N, K] (the inference layout) and bf16 scales [.., 1, N]
    w = rng.integers(-127, 128, shape, dtype=np.int8)
    s = (rng.uniform(0.3, 3, (*shape[:-2], 1, shape[-2])) / (127 * np.sqrt(shape[-1]))).astype(BF16)
    return w, s


def deq(w, s):  # [.., N, K] float64
    return w.astype(np.float64) * np.swapaxes(s.astype(np.float64), -1, -2)


def rms(v, s):
    return v / np.sqrt(np.mean(v * v, -1, keepdims=True) + 1e-5) * s


for share in (8, 1):
    # 1. q/k/v of one device's share: partial sums over slices of K, rows unpadded.
    mats = [quant(n // share, D) for n in (QH * KEY, KVH * KEY, KVH * KEY)]
    for m in (1, 3):
        x = rng.standard_normal((m, D)).astype(BF16)
        parts = jax.jit(lambda x, ws: kernels.int8_matmuls(x, ws, backend=BACKEND, transposed=True,
                                                           partial_sums=True))(
            jnp.asarray(x), [(jnp.asarray(w), jnp.asarray(s)) for w, s in mats])
        want = x.astype(np.float64) @ np.concatenate([deq(w, s) for w, s in mats]).T
        report(f"share {share}: q/k/v partials {tuple(parts.shape)}, {m} rows", rel(np.asarray(parts).sum(0), want),
               1e-5)

    # 2. the junction: partial sums in, the next norm, y in bf16, the router's logits partials.
    for s_parts in (1, 16):
        h, xp = rng.normal(size=(1, D)), rng.normal(size=(s_parts, 1, D))
        sx, sy, router = rng.normal(size=D), rng.normal(size=D), rng.normal(size=(D, 8)) / np.sqrt(D)
        f32 = lambda a: jnp.asarray(a, jnp.float32)
        gh, gy, glog = kernels.residual_norm(f32(h), f32(xp), f32(sx), f32(sy), backend=BACKEND,
                                             y_dtype=jnp.bfloat16, router=f32(router))
        wh = h + rms(xp.sum(0), sx)
        wy = rms(wh, sy)
        report(f"share {share}: junction h', {s_parts} partials", rel(gh, wh), 1e-6)
        report(f"share {share}: junction y (bf16)", rel(np.asarray(gy.astype(jnp.float32)), wy), 2**-8)
        report(f"share {share}: junction router logits {tuple(glog.shape)}", rel(np.asarray(glog).sum(0), wy @ router),
               1e-5)
        # 3. route from those partials: top-2 softmax gates and experts.
        gates, experts, plan = kernels.route(glog, 2, kernels.default_block_m(2), backend=BACKEND)
        p = np.exp(wy @ router - (wy @ router).max())
        p /= p.sum()
        top = np.argsort(-p[0])[:2]
        same = sorted(np.asarray(experts)[0].tolist()) == sorted(top.tolist())
        report(f"share {share}: route experts {np.asarray(experts)[0].tolist()} vs {top.tolist()}",
               0.0 if same else 1.0, 0.5)
        report(f"share {share}: route gates", rel(np.sort(np.asarray(gates)[0]), np.sort(p[0, top])), 1e-5)

    # 4. the gated kernel gathering its rows (bf16 x), against float64 and against dispatch's path.
    f = F // share
    w, ws = quant(8, f, D)
    v, vs = quant(8, f, D)
    for m in (1, 8) if share == 8 else (1,):
        x = rng.standard_normal((m, D)).astype(BF16)
        logits = rng.standard_normal((m, 8)).astype(np.float32)
        bm = kernels.default_block_m(m * 2)
        gates, experts, plan = kernels.route(jnp.asarray(logits), 2, bm, backend=BACKEND)
        args = (jnp.asarray(w), jnp.asarray(ws), jnp.asarray(v), jnp.asarray(vs), plan)
        got = kernels.grouped_matmul_gated(jnp.asarray(x), *args, backend=BACKEND, transposed=True, gather=True,
                                           out_dtype=jnp.float32)
        ref = kernels.grouped_matmul_gated(kernels.dispatch(jnp.asarray(x), plan), *args, backend=BACKEND,
                                           transposed=True, out_dtype=jnp.float32)
        rows = np.asarray(plan.row_token)
        live = rows < m
        xs = x.astype(np.float64)[rows[live]]
        te = np.repeat(np.asarray(plan.tile_expert), bm)[live]
        a, b = np.zeros((len(xs), f)), np.zeros((len(xs), f))
        for e in np.unique(te):  # one expert's float64 matrices at a time (1.6 GB each at full width)
            a[te == e] = xs[te == e] @ deq(w[e], ws[e]).T
            b[te == e] = xs[te == e] @ deq(v[e], vs[e]).T
        want = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3))) * b
        report(f"share {share}: gated gather, {m} tokens, vs float64", rel(np.asarray(got)[live], want), 1e-4)
        report(f"share {share}: gated gather vs dispatch + gated", rel(np.asarray(got)[live], np.asarray(ref)[live]),
               1e-6)

    # 5. decode attention: q/k/v partial sums, RoPE, the token written at pos, 1024 tokens in the cache.
    g, hg, b, s = KVH // share if share < 8 else 1, QH // KVH, 2, 2048
    keys = rng.standard_normal((b, s, g, KEY)).astype(BF16)
    values = rng.standard_normal((b, s, g, KEY)).astype(BF16)
    heads = rng.standard_normal((b, g * hg + 2 * g, KEY)) * 2
    parts = rng.standard_normal((16, b, g * hg + 2 * g, KEY))
    parts[-1] = heads - parts[:-1].sum(0)
    pos = np.array([1023, 700], np.int32)
    positions = np.array([1023, 3000], np.int32)
    lengths = pos + 1
    out, gk, gv = kernels.decode_attention(jnp.asarray(parts, jnp.float32), jnp.asarray(keys), jnp.asarray(values),
                                           jnp.asarray(lengths), num_q_heads=g * hg, pos=jnp.asarray(pos),
                                           rope_positions=jnp.asarray(positions), scale=0.08838834764831845,
                                           cap=30.0, backend=BACKEND)

    def rope(x, t):
        ph = t[:, None, None] / 10000.0 ** (np.arange(0, KEY, 2) / KEY)
        ph = np.concatenate([ph, ph], -1)
        return x * np.cos(ph) + np.concatenate([-x[..., KEY // 2:], x[..., :KEY // 2]], -1) * np.sin(ph)

    q = rope(heads[:, :g * hg], positions).reshape(b, g, hg, KEY)
    new_k = rope(heads[:, g * hg:g * hg + g], positions)
    report(f"share {share}: attention key written at pos", rel(np.asarray(gk.astype(jnp.float32))[[0, 1], pos], new_k),
           2**-8)
    kc, vc = np.asarray(gk.astype(jnp.float32), np.float64), np.asarray(gv.astype(jnp.float32), np.float64)
    want = np.zeros(q.shape)
    for r in range(b):
        lg = np.einsum("ghk,sgk->ghs", q[r], kc[r, :lengths[r]]) * 0.08838834764831845
        lg = 30.0 * np.tanh(lg / 30.0)
        pr = np.exp(lg - lg.max(-1, keepdims=True))
        want[r] = np.einsum("ghs,sgk->ghk", pr / pr.sum(-1, keepdims=True), vc[r, :lengths[r]])
    report(f"share {share}: attention out {tuple(out.shape)}", rel(out, want), 1e-4)  # float32 RoPE at 3000

print(f"{jax.devices()[0].device_kind}: {bad} BAD", flush=True)
sys.exit(1 if bad else 0)
