"""Session 14, on the GPU: the new decode kernels compiled (backend "pallas") against float64 numpy, at
one device's share of 8 and at full width (Grok-1's D 6144, F 32768, key size 128, 48 q / 8 kv heads):
1. moe_one_token: one token through its two experts, no plan; each expert's parts (times its gate) and
   their sum, bf16 and float32 x, the default tilings;
2. int8_matmuls(partial_sums=True, joined=True): q/k/v side by side as partial sums;
3. decode_qkv: the parts added, RoPE on q and k, the key and value written at each row's step (batch 1
   and 8, a 1024-position cache, steps up to the last), every other cache entry untouched; then
   decode_attention(heads=) on its padded q.
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
SMALL = bool(os.environ.get("SMALL"))
D, F, KEY, QH, KVH, E = (256, 512, 32, 48, 8, 8) if SMALL else (6144, 32768, 128, 48, 8, 8)
bad = 0


def report(name: str, err: float, tol: float) -> None:
    global bad
    ok = np.isfinite(err) and err < tol
    bad += not ok
    print(f"{name}: rel err {err:.2e} (tol {tol:.0e})", "OK" if ok else "BAD", flush=True)


def rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def quant(shape, nb=1):  # int8 [..., N, K] (the inference layout) and bf16 scales [..., nb, N]
    w = rng.integers(-127, 128, shape, dtype=np.int8)
    s = (rng.uniform(0.3, 3, (*shape[:-2], nb, shape[-2])) / (127 * np.sqrt(shape[-1]))).astype(BF16)
    return w, s


def deq(w, s):  # [N, K] int8, [nb, N] -> [K, N] float64
    nb, k = s.shape[0], w.shape[1]
    return (w.astype(np.float64).T.reshape(nb, k // nb, -1) * s.astype(np.float64)[:, None, :]).reshape(k, -1)


def gelu(a):
    return 0.5 * a * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (a + 0.044715 * a**3)))


def rope(x, pos, base=10000.0):  # SPEC's rotate-half at one position, float64
    k = x.shape[-1]
    angle = pos * base ** (-np.arange(0, k, 2) / k)
    x1, x2 = x[..., : k // 2], x[..., k // 2:]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1)


def attention(q, keys, values, n, scale, cap):  # q [G, Hg, K], keys [S, G, K] -> [G, Hg, K]
    logits = np.einsum("ghk,sgk->ghs", q, keys[:n]) * scale
    logits = cap * np.tanh(logits / cap)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("ghs,sgk->ghk", p / p.sum(-1, keepdims=True), values[:n])


j = lambda a: jnp.asarray(a)
for share in (8, 1):
    f = F // share
    # 1. moe_one_token (transposed layout: linear / linear_v [E, F, D], linear_1 [E, D, F]).
    n_exp = E if share == 8 else 2  # full width: two experts' weights (1.2 GB) are enough to index
    w_in, w_v, w_out = quant((n_exp, f, D)), quant((n_exp, f, D)), quant((n_exp, D, f))
    experts, gates = np.array([n_exp - 2, n_exp - 1][::-1], np.int32), np.array([0.41, 0.27], np.float32)
    for dtype in (BF16, np.float32):
        x = rng.standard_normal((1, D)).astype(dtype)
        parts = jax.jit(lambda x, g, e, a, b, c: kernels.moe_one_token(x, g, e, a, b, c, backend=BACKEND,
                                                                     transposed=True))(
            j(x), j(gates), j(experts), *[(j(w), j(s)) for w, s in (w_in, w_v, w_out)])
        x64, per = x.astype(np.float64)[0], parts.shape[0] // 2
        total, errs = 0.0, []
        for t, e in enumerate(experts):
            h = gelu(x64 @ deq(w_in[0][e], w_in[1][e])) * (x64 @ deq(w_v[0][e], w_v[1][e]))
            y = gates[t] * (h @ deq(w_out[0][e], w_out[1][e]))
            errs.append(rel(np.asarray(parts[t * per:(t + 1) * per]).sum(0)[0], y))
            total = total + y
        tol = 1e-4 if dtype == np.float32 else 1e-2
        report(f"share {share}: moe_one_token, {np.dtype(dtype).name} x, {parts.shape[0]} parts, per expert", max(errs), tol)
        report(f"share {share}: moe_one_token, {np.dtype(dtype).name} x, the sum", rel(np.asarray(parts).sum(0)[0], total), tol)

    # 2. q/k/v as joined partial sums; 3. decode_qkv from them, then decode_attention.
    h, g = QH // share, KVH // share
    mats = [quant((n * KEY, D)) for n in (h, g, g)]
    for batch in (1, 8):
        x = rng.standard_normal((batch, D)).astype(np.float32)
        [parts] = jax.jit(lambda x, ws: kernels.int8_matmuls(x, ws, backend=BACKEND, transposed=True,
                                                             partial_sums=True, joined=True))(
            j(x), [(j(w), j(s)) for w, s in mats])
        want = np.concatenate([x.astype(np.float64) @ deq(w, s) for w, s in mats], -1)  # [B, (H + 2G) K]
        report(f"share {share}: q/k/v joined, batch {batch}, {parts.shape[0]} partial sums", rel(np.asarray(parts).sum(0), want), 1e-5)

        length = 1024
        keys = rng.standard_normal((batch, length, g, KEY)).astype(BF16)
        values = rng.standard_normal((batch, length, g, KEY)).astype(BF16)
        step = rng.integers(0, length, batch).astype(np.int32)
        step[0] = length - 1
        q, new_k, new_v = jax.jit(lambda p, k, v, s: kernels.decode_qkv(p, k, v, s, q_heads=h, backend=BACKEND))(
            parts, j(keys), j(values), j(step))
        total = np.asarray(parts, np.float64).sum(0).reshape(batch, h + 2 * g, KEY)
        q_err, pad_ok, written, untouched = [], True, [], True
        nk, nv = np.asarray(new_k, np.float64), np.asarray(new_v, np.float64)
        for r in range(batch):
            q_err.append(rel(np.asarray(q)[r, :, :h // g], rope(total[r, :h], step[r]).reshape(g, h // g, KEY)))
            pad_ok &= not np.asarray(q)[r, :, h // g:].any()
            written.append(max(rel(nk[r, step[r]], rope(total[r, h:h + g], step[r])), rel(nv[r, step[r]], total[r, h + g:])))
            others = np.arange(length) != step[r]
            untouched &= np.array_equal(nk[r, others], keys[r, others].astype(np.float64))
            untouched &= np.array_equal(nv[r, others], values[r, others].astype(np.float64))
        # float32 RoPE: its angle pos * freq carries float32's relative error, ~6e-5 rad at position 1023
        report(f"share {share}: decode_qkv q, batch {batch}", max(q_err) + (0 if pad_ok else np.inf), 1e-4)
        report(f"share {share}: decode_qkv key and value at step (bf16), batch {batch}, the rest untouched",
               max(written) + (0 if untouched else np.inf), 4e-3)
        lengths = step + 1
        out = jax.jit(lambda q, k, v, n: kernels.decode_attention(q, k, v, n, scale=0.08838834764831845, cap=30.0,
                                                                 heads=h // g, backend=BACKEND))(
            q, new_k, new_v, j(lengths))
        want_o = np.stack([attention(np.asarray(q, np.float64)[r, :, :h // g], nk[r], nv[r], lengths[r], 0.08838834764831845, 30.0)
                           for r in range(batch)])
        report(f"share {share}: decode_attention(heads={h // g}) on decode_qkv's q, batch {batch}", rel(out, want_o), 1e-5)

print("checks failed:", bad)
sys.exit(1 if bad else 0)
