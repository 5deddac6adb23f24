"""Check and time the int8 MoE and linear kernels of kernels.py on one GPU.

    PYTHONUNBUFFERED=1 python bench.py kernels --out $OUT/kernel_bench.json

This module sits below bench.py and never imports it: bench.py hands it the two ceiling
measurements and its device timer (main's `meters`), so both benches measure alike. On a GPU
every time is the device's (the kernels' durations in a profiler trace), not the wall clock's.
`python kernel_bench.py ARGS` still works: it re-executes as `python bench.py kernels ARGS`.

In one run, on random data at Grok-1 width (D=6144, F=32768, 8 experts, top-2):
1. the two ceilings: copy bandwidth (a large device-to-device elementwise pass, bytes read
   plus written) and the bf16 matmul rate (8192^3);
2. correctness: the Pallas kernels against the "xla" backend and a float32 reference on
   dequantized weights (relative L2 error < 1e-2, no NaN), for decode and prefill sizes;
3. one MoE layer at M = 1, 8, 32 (decode) and 1024 (prefill) tokens for the release's
   algorithm (dequantize all 8 experts, run every expert on every token), the "xla"
   backend and the "pallas" backend, and at M = 1 "one-token" (kernels.moe_one_token, the
   model's path at batch 1: no plan, its partial sums added), with % of roofline: for decode the bytes of the
   experts actually touched over the copy bandwidth, for prefill the top-2 FLOPs over the
   matmul rate;
4. a sweep of kernel tilings (block sizes, warps, stages, split-K, int8->bf16 conversion),
   each checked against the xla backend, then the layer again with the best tilings;
5. int8_matmul of a [6144, 6144] weight at M = 1..32 (four weight copies rotated so that
   L2 does not hold the weight);
6. attention's q, k and v projections in one int8_matmuls launch against three launches;
7. decode_attention at Grok-1's heads against float64, with % of the bytes of the used keys
   and values over the copy bandwidth.
The kernels read the int8 weights in the layout the model stores for inference, [N, K]
(model.TransposedWeight8bit); --layout kn measures the checkpoint's [K, N] instead (the
release's algorithm always gets [K, N]). Results go to a JSON file, written after every
step; a table is printed last. A time
budget (--budget-s) skips the remaining sweep steps when it runs out.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from typing import Callable, Optional, Sequence

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels as K  # noqa: E402

E, D, F, TOPK = 8, 6144, 32768, 2
PREFILL_M = 1024  # prefill token count (smaller for a dry run)
PALLAS = "pallas"  # "interpret" for a dry run of this script on a CPU (with --dims)
TRANSPOSED = True  # the kernels read the int8 weights stored [N, K], as the model does (--layout nk)
T0 = time.time()


# ---------------------------------------------------------------------------------------
# Helpers: timing, errors, results file
# ---------------------------------------------------------------------------------------


class Results:
    def __init__(self, path: str, budget_s: float):
        self.path, self.budget_s = path, budget_s
        self.data: dict = {"meta": {}, "ceilings": {}, "checks": [], "layer": [], "sweep": {},
                           "best": {}, "dense": [], "qkv": [], "attention": [], "errors": []}

    def save(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "w") as f:
            json.dump(self.data, f, indent=1, default=str)

    def left(self) -> float:
        return self.budget_s - (time.time() - T0)

    def error(self, where: str, exc: BaseException) -> None:
        msg = f"{where}: {type(exc).__name__}: {str(exc)[:1500]}"
        print("ERROR", msg, flush=True)
        self.data["errors"].append(msg)
        self.save()


def log(*a) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


# device_seconds(fn, args, calls) -> the device's seconds per call, or None where it cannot
# tell (no GPU): bench.py's, set by main().
DeviceSeconds = Callable[[Callable, tuple, int], Optional[float]]
device_seconds: Optional[DeviceSeconds] = None


def timeit(fn, *args, min_time: float = 0.2, reps: int = 5) -> dict:
    """Seconds per call after warm-up, calls queued back to back (async dispatch).

    median_s: the device's time per call where device_seconds can trace it (its kernels'
    durations: at small sizes enqueueing a call can take the host longer than the kernels
    take the GPU, and the wall clock then times the host), else the wall clock's median over
    `reps` rounds (wall_median_s); timed_by says which.
    """
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))  # compile + first run
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - t0
    n = int(max(2, min(200, min_time / max(one, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / n)
    wall = statistics.median(times)
    device = device_seconds(fn, args, n) if device_seconds is not None else None
    return {"median_s": device or wall, "timed_by": "device" if device else "wall", "wall_median_s": wall,
            "device_s": device, "min_s": min(times), "n": n, "reps": reps, "first_call_s": first}


@jax.jit
def rel_err(got, want):
    got, want = got.astype(jnp.float32), want.astype(jnp.float32)
    return (jnp.linalg.norm((got - want).ravel()) / jnp.linalg.norm(want.ravel()),
            jnp.isnan(got).any())


def check(res: Results, name: str, got, want, **extra) -> dict:
    err, nan = rel_err(got, want)
    rec = {"name": name, "rel_l2": float(err), "nan": bool(nan),
           "ok": bool(float(err) < 1e-2 and not bool(nan)), **extra}
    log("check", rec)
    res.data["checks"].append(rec)
    res.save()
    return rec


# ---------------------------------------------------------------------------------------
# Ceilings
# ---------------------------------------------------------------------------------------


# (copy_bandwidth(gbytes), matmul_rate(n), device_seconds): bench.py passes its own, so
# `bench.py model` and this bench measure alike.
Meters = tuple[Callable[[float], float], Callable[[int], float], DeviceSeconds]


def ceilings(res: Results, meters: Meters, small: bool = False) -> tuple[float, float]:
    """Copy bandwidth and bf16 matmul rate, measured by meters' first two."""
    copy_bandwidth, matmul_rate, _ = meters
    bw = copy_bandwidth(2**-8 if small else 1.0)
    rate = matmul_rate(512 if small else 8192)
    res.data["ceilings"] = {"copy_bytes_per_s": bw, "bf16_matmul_flops_per_s": rate}
    log(f"copy bandwidth {bw / 1e12:.3f} TB/s, bf16 matmul {rate / 1e12:.1f} TFLOP/s")
    res.save()
    return bw, rate


# ---------------------------------------------------------------------------------------
# Data: Grok-1-width int8 experts, routed tokens
# ---------------------------------------------------------------------------------------


def make_weights(seed: int = 0):
    """linear, linear_v [E, D, F] (one scale row) and linear_1 [E, F, D] (8 scale blocks)."""
    ks = jax.random.split(jax.random.key(seed), 6)

    @functools.partial(jax.jit, static_argnums=(2, 3))
    def q(kw, ks_, shape, nb):
        w = jax.random.randint(kw, shape, -127, 128, dtype=jnp.int8)
        # int8 values have std ~73; scale so each output has std ~1 for unit-variance inputs.
        s = jax.random.uniform(ks_, (shape[0], nb, shape[2]), jnp.float32, 0.5, 1.5)
        return w, (s / (73.0 * np.sqrt(shape[1]))).astype(jnp.bfloat16)

    lin = q(ks[0], ks[1], (E, D, F), 1)
    lin_v = q(ks[2], ks[3], (E, D, F), 1)
    lin_1 = q(ks[4], ks[5], (E, F, D), 8)
    jax.block_until_ready((lin, lin_v, lin_1))
    return lin, lin_v, lin_1


def make_tokens(m: int, seed: int):
    """x [m, D] bf16 and Grok-style routing: softmax over 8 logits, top-2 raw probabilities."""
    kx, kr = jax.random.split(jax.random.key(1000 + seed))
    x = jax.random.normal(kx, (m, D), jnp.bfloat16)
    probs = jax.nn.softmax(jax.random.normal(kr, (m, E), jnp.float32) * 2.0, axis=-1)
    gates, idx = jax.lax.top_k(probs, TOPK)
    return x, idx.astype(jnp.int32), gates


def release_layer(x, idx, gates, lin, lin_v, lin_1):
    """The release's algorithm: dequantize whole tensors, every expert on every token."""
    def deq(w, s):
        e, k, n = w.shape
        nb = s.shape[1]
        return (w.reshape(e, nb, k // nb, n).astype(jnp.bfloat16) * s[:, :, None, :]).reshape(e, k, n)

    wd, vd, w1d = deq(*lin), deq(*lin_v), deq(*lin_1)
    dense_gates = jnp.sum(jax.nn.one_hot(idx, E, dtype=jnp.float32) * gates[..., None], axis=1)  # [M, E]
    a = jnp.einsum("md,edf->emf", x, wd)
    b = jnp.einsum("md,edf->emf", x, vd)
    y = jnp.einsum("emf,efd->emd", jax.nn.gelu(a) * b, w1d)
    return jnp.einsum("emd,me->md", y.astype(jnp.float32), dense_gates).astype(jnp.bfloat16)


@jax.jit
def _expert_f32(x, gate, w, ws, v, vs, w1, w1s):
    """gate[:, None] * expert(x) in float32 on dequantized float32 weights (one expert)."""
    hi = jax.lax.Precision.HIGHEST

    def deq(w, s):
        k, n = w.shape
        nb = s.shape[0]
        return (w.reshape(nb, k // nb, n).astype(jnp.float32) * s.astype(jnp.float32)[:, None, :]).reshape(k, n)

    x = x.astype(jnp.float32)
    h = jax.nn.gelu(jnp.dot(x, deq(w, ws), precision=hi)) * jnp.dot(x, deq(v, vs), precision=hi)
    return gate[:, None] * jnp.dot(h, deq(w1, w1s), precision=hi)


def reference_f32(x, idx, gates, lin, lin_v, lin_1):
    out = jnp.zeros((x.shape[0], D), jnp.float32)
    for e in np.unique(np.asarray(idx)):
        g = jnp.sum(jnp.where(idx == e, gates, 0.0), axis=1)
        out = out + _expert_f32(x, g, lin[0][e], lin[1][e], lin_v[0][e], lin_v[1][e], lin_1[0][e], lin_1[1][e])
    return out


def kernel_layout(weights):
    """The (weight, scales) pairs in the layout the kernels are measured with (--layout)."""
    if not TRANSPOSED:
        return weights
    return tuple((jnp.swapaxes(w, -1, -2), s) for w, s in weights)


def moe_fn(backend: str, block_m=None, configs=None):
    """The MoE layer (x, idx, gates, *weights): the release's algorithm takes the
    checkpoint's layout, the kernels kernel_layout()'s. "one-token": one token (M = 1)
    through kernels.moe_one_token, its partial sums added."""
    if backend == "release":
        return jax.jit(release_layer)
    if backend == "one-token":
        def one_token(x, idx, gates, *weights):
            parts = K.moe_one_token(x, gates[0], idx[0], *weights, backend=PALLAS, transposed=TRANSPOSED,
                                    configs=configs)
            return jnp.sum(parts, axis=0)  # [1, D] float32
        return jax.jit(one_token)
    return jax.jit(functools.partial(K.sparse_moe, backend=backend, block_m=block_m, configs=configs,
                                     transposed=TRANSPOSED))


# ---------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------


def roofline(m: int, idx, t: float, bw: float, rate: float) -> dict:
    touched = int(np.unique(np.asarray(idx)).size)
    bytes_needed = touched * 3 * D * F  # int8 weights of the experts touched (scales < 0.01%)
    flops = 2 * m * TOPK * 3 * D * F
    return {"experts_touched": touched, "weight_bytes": bytes_needed,
            "t_bytes_s": bytes_needed / bw, "t_flops_s": flops / rate,
            "pct_bytes_roofline": 100 * bytes_needed / bw / t,
            "pct_matmul_rate": 100 * flops / rate / t}


def layer_step(res, weights, kweights, bw, rate, ms, backends, tag, block_m=None, configs=None):
    for m in ms:
        x, idx, gates = make_tokens(m, seed=m)
        for be in backends:
            if be == "one-token" and m != 1:
                continue
            if res.left() < 20:
                log("budget: skip layer", tag, m, be)
                return
            try:
                fn = moe_fn(be, block_m(m) if callable(block_m) else block_m,
                            configs(m) if callable(configs) else configs)
                t = timeit(fn, x, idx, gates, *(weights if be == "release" else kweights))
                rec = {"tag": tag, "m": m, "backend": be, **t,
                       **roofline(m, idx, t["median_s"], bw, rate)}
                log(f"layer[{tag}] M={m} {be}: {t['median_s'] * 1e3:.3f} ms ({t['timed_by']})  "
                    f"bytes-roofline {rec['pct_bytes_roofline']:.1f}%  matmul-rate {rec['pct_matmul_rate']:.1f}%")
                res.data["layer"].append(rec)
                res.save()
            except Exception as exc:  # keep going: record and continue
                res.error(f"layer {tag} M={m} {be}", exc)


def correctness_step(res, weights, kweights, ms):
    for m in ms:
        x, idx, gates = make_tokens(m, seed=m)
        ref = reference_f32(x, idx, gates, *weights)
        outs = {}
        for be in ("xla", PALLAS):
            try:
                outs[be] = moe_fn(be)(x, idx, gates, *kweights)
                check(res, f"layer M={m} {be} vs float32", outs[be], ref)
            except Exception as exc:
                res.error(f"check layer M={m} {be}", exc)
        if len(outs) == 2:
            check(res, f"layer M={m} pallas vs xla", outs[PALLAS], outs["xla"])
        del ref, outs
    x, idx, gates = make_tokens(1, seed=1)  # one token: the model's batch-1 path
    try:
        check(res, "layer M=1 one-token vs float32", moe_fn("one-token")(x, idx, gates, *kweights),
              reference_f32(x, idx, gates, *weights))
    except Exception as exc:
        res.error("check layer M=1 one-token", exc)
    # Dense int8 linear, [6144, 6144] with 8 scale blocks, M = 3 (leading dims kept).
    kw, ks, kx = jax.random.split(jax.random.key(7), 3)
    w = jax.random.randint(kw, (D, D), -127, 128, dtype=jnp.int8)
    s = (jax.random.uniform(ks, (8, D), jnp.float32, 0.5, 1.5) / (73 * np.sqrt(D))).astype(jnp.bfloat16)
    x = jax.random.normal(kx, (1, 3, D), jnp.bfloat16)
    ref = jnp.dot(x.astype(jnp.float32), (w.reshape(8, D // 8, D).astype(jnp.float32) * s.astype(jnp.float32)[:, None]).reshape(D, D),
                  precision=jax.lax.Precision.HIGHEST)
    for be in ("xla", PALLAS):
        try:
            y = jax.jit(functools.partial(K.int8_matmul, backend=be, transposed=TRANSPOSED))(
                x, w.T if TRANSPOSED else w, s)
            check(res, f"int8_matmul {be} vs float32", y, ref, shape=list(y.shape))
        except Exception as exc:
            res.error(f"check int8_matmul {be}", exc)


def sweep_kernel(res, name, fn_of_cfg, args, want, configs, bytes_or_flops, kind, bw, rate, reserve):
    """Time fn_of_cfg(cfg)(*args) for each cfg, each checked against `want`."""
    recs = res.data["sweep"].setdefault(name, [])
    for cfg in configs:
        if res.left() < reserve:
            log("budget: stop sweep", name)
            break
        rec = {"cfg": cfg._asdict()}
        try:
            fn = jax.jit(fn_of_cfg(cfg))
            out = fn(*args)
            err, nan = rel_err(out, want)
            rec.update(rel_l2=float(err), nan=bool(nan), ok=bool(float(err) < 1e-2 and not bool(nan)))
            t = timeit(fn, *args, min_time=0.15, reps=5)
            rec.update(t)
            ideal = bytes_or_flops / (bw if kind == "bytes" else rate)
            rec["pct_roofline"] = 100 * ideal / t["median_s"]
            log(f"sweep {name} {cfg}: {t['median_s'] * 1e3:.3f} ms ({t['timed_by']}), {rec['pct_roofline']:.1f}% "
                f"({kind}), err {rec['rel_l2']:.2e}")
        except Exception as exc:
            rec["error"] = f"{type(exc).__name__}: {str(exc)[:800]}"
            log(f"sweep {name} {cfg}: FAILED {rec['error'][:300]}")
        recs.append(rec)
        res.save()
    ok = [r for r in recs if r.get("ok")]
    if ok:
        best = min(ok, key=lambda r: r["median_s"])
        res.data["best"][name] = best
        res.save()
        return K.KernelConfig(**best["cfg"])
    return None


def sweeps(res, weights, bw, rate, quick: bool):
    """Kernel tilings, each timed on its own and checked against the xla backend.

    weights: in kernel_layout(). They are passed as arguments (a closure would embed
    gigabytes of constants)."""
    lin, lin_v, lin_1 = weights
    C = K.KernelConfig
    best = {}

    def gated_fn(cfg):
        return lambda xs, plan, w, ws, v, vs: K.grouped_matmul_gated(xs, w, ws, v, vs, plan, backend=PALLAS,
                                                                     config=cfg, transposed=TRANSPOSED)

    def down_fn(cfg):
        return lambda h, plan, w1, w1s: K.grouped_matmul(h, w1, w1s, plan, backend=PALLAS, config=cfg,
                                                         transposed=TRANSPOSED)

    gated_xla = jax.jit(functools.partial(K.grouped_matmul_gated, backend="xla", transposed=TRANSPOSED))
    down_xla = jax.jit(functools.partial(K.grouped_matmul, backend="xla", transposed=TRANSPOSED))
    make_plan = jax.jit(K.make_plan, static_argnums=(1, 2))

    # Decode, M = 1: 2 experts, 16-row tiles.
    x, idx, gates = make_tokens(1, seed=1)
    plan = make_plan(idx, E, 16)
    xs = K.dispatch(x, plan)
    touched = int(np.unique(np.asarray(idx)).size)
    gated_ref = gated_xla(xs, *lin, *lin_v, plan)
    down_ref = down_xla(gated_ref, *lin_1, plan)
    gated_bytes, down_bytes = touched * 2 * D * F, touched * F * D

    base = C(block_n=128, block_k=128, num_warps=4, num_stages=4)
    dq_cfgs = [base._replace(dequant=d) for d in ("cast", "asm", "bits")]
    b = sweep_kernel(res, "gated_decode_dequant", gated_fn, (xs, plan, *lin, *lin_v), gated_ref, dq_cfgs,
                     gated_bytes, "bytes", bw, rate, reserve=95)
    dq = b.dequant if b else "cast"
    tilings = [C(128, 256, 1, 4, 3, dq), C(64, 256, 1, 4, 4, dq), C(256, 128, 1, 8, 3, dq)]
    if quick:
        tilings = tilings[:1]
    best["gated_decode"] = sweep_kernel(res, "gated_decode", gated_fn, (xs, plan, *lin, *lin_v), gated_ref,
                                        [b or base] + tilings, gated_bytes, "bytes", bw, rate, reserve=88)
    down_cfgs = [C(128, 128, 4, 4, 4, dq), C(128, 128, 8, 4, 4, dq), C(64, 256, 4, 4, 3, dq),
                 C(128, 256, 8, 4, 3, dq)]
    if quick:
        down_cfgs = down_cfgs[:2]
    best["down_decode"] = sweep_kernel(res, "down_decode", down_fn, (gated_ref, plan, *lin_1), down_ref,
                                       down_cfgs, down_bytes, "bytes", bw, rate, reserve=80)

    # Prefill, M = 1024: 2048 rows over 8 experts; tiles of 64 or 128 rows.
    x, idx, gates = make_tokens(PREFILL_M, seed=PREFILL_M)
    flops_gated = 2 * PREFILL_M * TOPK * 2 * D * F
    flops_down = 2 * PREFILL_M * TOPK * D * F
    for bm in (64, 128):
        if res.left() < 62:
            break
        plan = make_plan(idx, E, bm)
        xs = K.dispatch(x, plan)
        gated_ref = gated_xla(xs, *lin, *lin_v, plan)
        down_ref = down_xla(gated_ref, *lin_1, plan)
        if bm == 64:
            g_cfgs = [C(128, 64, 1, 4, 3, dq), C(128, 64, 1, 8, 4, dq), C(256, 64, 1, 8, 3, dq)]
            d_cfgs = [C(128, 64, 1, 4, 3, dq), C(128, 64, 1, 8, 4, dq)]
        else:
            g_cfgs = [C(128, 64, 1, 8, 3, dq), C(256, 64, 1, 8, 3, dq)]
            d_cfgs = [C(128, 64, 1, 8, 3, dq)]
        if quick:
            g_cfgs, d_cfgs = g_cfgs[:1], d_cfgs[:1]
        best[f"gated_prefill_bm{bm}"] = sweep_kernel(
            res, f"gated_prefill_bm{bm}", gated_fn, (xs, plan, *lin, *lin_v), gated_ref, g_cfgs, flops_gated,
            "flops", bw, rate, reserve=50)
        best[f"down_prefill_bm{bm}"] = sweep_kernel(
            res, f"down_prefill_bm{bm}", down_fn, (gated_ref, plan, *lin_1), down_ref, d_cfgs, flops_down,
            "flops", bw, rate, reserve=45)
    return best


def dense_step(res, bw, rate, cfgs, ms=(1, 8, 16, 32)):
    """int8_matmul of x [M, 6144] by a [6144, 6144] weight (8 scale blocks), 4 copies rotated."""
    keys = jax.random.split(jax.random.key(11), 8)
    ws = [(jax.random.randint(keys[2 * r], (D, D), -127, 128, dtype=jnp.int8),
           (jax.random.uniform(keys[2 * r + 1], (8, D), jnp.float32, 0.5, 1.5) / (73 * np.sqrt(D))).astype(jnp.bfloat16))
          for r in range(4)]
    ws = [(w.T, s) for w, s in ws] if TRANSPOSED else ws  # the same square matrices, transposed

    def rotated(backend, cfg):
        def f(x, ws):
            return tuple(K.int8_matmul(x, w, s, backend=backend, config=cfg, transposed=TRANSPOSED) for w, s in ws)
        return jax.jit(f)

    bf16_ws = [w.astype(jnp.bfloat16) for w, _ in ws]
    plain = jax.jit(lambda x, ws: tuple(jnp.dot(x, w) for w in ws))
    for m in ms:
        if res.left() < 15:
            break
        x = jax.random.normal(jax.random.key(m), (m, D), jnp.bfloat16)
        want = rotated("xla", None)(x, ws)[0]
        variants = [("xla", None), ("bf16_dot_unquantized", None)] + [(PALLAS, c) for c in cfgs]
        for be, cfg in variants:
            try:
                if be == "bf16_dot_unquantized":
                    fn, args = plain, (x, bf16_ws)
                else:
                    fn, args = rotated(be, cfg), (x, ws)
                    err, nan = rel_err(fn(*args)[0], want)
                t = timeit(fn, *args, min_time=0.15)
                per = t["median_s"] / 4
                rec = {"m": m, "backend": be, "cfg": cfg._asdict() if cfg else None, "per_call_s": per, **t,
                       "pct_bytes_roofline": 100 * (D * D / bw) / per}
                if be != "bf16_dot_unquantized":
                    rec.update(rel_l2_vs_xla=float(err), nan=bool(nan))
                log(f"int8_matmul M={m} {be} {cfg}: {per * 1e6:.1f} us, {rec['pct_bytes_roofline']:.1f}% of bytes roofline")
                res.data["dense"].append(rec)
                res.save()
            except Exception as exc:
                res.error(f"dense M={m} {be} {cfg}", exc)


def qkv_step(res, bw, ms=(1, 8)):
    """Attention's q, k and v projections ([6144 -> 6144, 1024, 1024], per-column scales) as
    one int8_matmuls launch against three int8_matmul launches; 4 weight sets rotated."""
    widths = (D, D // 6, D // 6)
    keys = iter(jax.random.split(jax.random.key(12), 24))
    sets = [[(jax.random.randint(next(keys), (n, D) if TRANSPOSED else (D, n), -127, 128, dtype=jnp.int8),
              (jax.random.uniform(next(keys), (1, n), jnp.float32, 0.5, 1.5) / (73 * np.sqrt(D))).astype(jnp.bfloat16))
             for n in widths] for _ in range(4)]
    fused = jax.jit(lambda x, sets: [K.int8_matmuls(x, ws, backend=PALLAS, transposed=TRANSPOSED) for ws in sets])
    three = jax.jit(lambda x, sets: [[K.int8_matmul(x, w, s, backend=PALLAS, transposed=TRANSPOSED) for w, s in ws]
                                     for ws in sets])
    for m in ms:
        if res.left() < 15:
            break
        try:
            x = jax.random.normal(jax.random.key(m), (m, D), jnp.bfloat16)
            want = [K.int8_matmul(x, w, s, backend="xla", transposed=TRANSPOSED) for w, s in sets[0]]
            got = fused(x, sets)[0]
            errs = [rel_err(g, w) for g, w in zip(got, want)]
            t_fused, t_three = timeit(fused, x, sets), timeit(three, x, sets)
            per_fused, per_three = t_fused["median_s"] / 4, t_three["median_s"] / 4
            rec = {"m": m, "fused_us": per_fused * 1e6, "three_us": per_three * 1e6,
                   "rel_l2_vs_xla": max(float(e) for e, _ in errs), "nan": any(bool(n) for _, n in errs),
                   "pct_bytes_roofline_fused": 100 * (sum(widths) * D / bw) / per_fused}
            log("q/k/v", rec)
            res.data["qkv"].append(rec)
            res.save()
        except Exception as exc:
            res.error(f"qkv M={m}", exc)


def attention_np(q, keys, values, lengths, scale, cap):
    """float64 decode attention (SPEC): capped logits, softmax over keys [0, length)."""
    q, keys, values = (np.asarray(a, np.float64) for a in (q, keys, values))
    out = np.zeros(q.shape)
    for b, n in enumerate(lengths):
        logits = np.einsum("ghk,sgk->ghs", q[b], keys[b, :n]) * scale
        logits = cap * np.tanh(logits / cap)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        out[b] = np.einsum("ghs,sgk->ghk", p / p.sum(-1, keepdims=True), values[b, :n])
    return out


# (batch, cache positions, tokens in the cache): the runner's 8192-position cache at 1024
# tokens, the same tokens in a cache just big enough, and a full cache.
ATTENTION_CASES = ((1, 8192, 1024), (8, 8192, 1024), (32, 8192, 1024), (32, 1152, 1024), (1, 8192, 8192))


def attention_step(res, bw, cases=ATTENTION_CASES):
    """kernels.decode_attention at Grok-1's heads (8 KV heads of 6 queries, key size 128):
    (batch, cache positions, tokens in the cache) against float64 on the first rows, and its
    time against the bytes of the used keys and values."""
    groups, per_group, k_dim = (8, 6, 128) if D == 6144 else (2, 3, 16)
    scale = 1 / np.sqrt(k_dim)
    for b, s, used in cases:
        if res.left() < 15:
            break
        try:
            keys = jax.random.split(jax.random.key(b * s), 3)
            q = jax.random.normal(keys[0], (b, groups, per_group, k_dim), jnp.float32)
            kc = jax.random.normal(keys[1], (b, s, groups, k_dim), jnp.bfloat16)
            vc = jax.random.normal(keys[2], (b, s, groups, k_dim), jnp.bfloat16)
            lengths = np.full((b,), min(used, s), np.int32)
            lengths[0] = max(1, lengths[0] - 37)  # rows of different lengths
            fn = jax.jit(functools.partial(K.decode_attention, scale=scale, cap=30.0, backend=PALLAS))
            got = np.asarray(fn(q, kc, vc, jnp.asarray(lengths)))
            n = min(b, 4)
            want = attention_np(q[:n], kc[:n], vc[:n], lengths[:n], scale, 30.0)
            t = timeit(fn, q, kc, vc, jnp.asarray(lengths))
            moved = 2 * int(lengths.sum()) * groups * k_dim * 2  # K and V bytes of the used positions
            rec = {"batch": b, "cache": s, "used": used, "us": t["median_s"] * 1e6,
                   "rel_l2_vs_float64": float(np.linalg.norm(got[:n] - want) / np.linalg.norm(want)),
                   "nan": bool(np.isnan(got).any()), "pct_bytes_roofline": 100 * (moved / bw) / t["median_s"]}
            log("decode attention", rec)
            res.data["attention"].append(rec)
            res.save()
        except Exception as exc:
            res.error(f"decode attention b={b} s={s}", exc)


def table(res: Results) -> str:
    lines = ["| M | backend | tag | ms | % bytes roofline | % bf16 matmul rate | experts |",
             "|---|---|---|---|---|---|---|"]
    for r in res.data["layer"]:
        lines.append(f"| {r['m']} | {r['backend']} | {r['tag']} | {r['median_s'] * 1e3:.3f} | "
                     f"{r['pct_bytes_roofline']:.1f} | {r['pct_matmul_rate']:.1f} | {r['experts_touched']} |")
    dense = ["| M | int8_matmul backend | us/call | % bytes roofline |", "|---|---|---|---|"]
    for r in res.data["dense"]:
        dense.append(f"| {r['m']} | {r['backend']} {r['cfg'] or ''} | {r['per_call_s'] * 1e6:.1f} | "
                     f"{r['pct_bytes_roofline']:.1f} |")
    return "\n".join(lines + [""] + dense)


def main(argv: Optional[Sequence[str]], meters: Meters) -> None:
    """The whole run; `argv` are the options below, `meters` see Meters."""
    ap = argparse.ArgumentParser(prog="bench.py kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "kernel_bench.json"))
    ap.add_argument("--budget-s", type=float, default=330.0, help="wall-clock budget for the whole run")
    ap.add_argument("--quick", action="store_true", help="fewer sweep configs")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--dims", type=int, nargs=2, metavar=("D", "F"),
                    help="other widths: a dry run on a CPU, or one device's share on a GPU (6144 4096: of 8)")
    ap.add_argument("--pallas-backend", default="pallas", choices=("pallas", "interpret"))
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 8, 32, 1024], help="token counts of the layer runs")
    ap.add_argument("--layer-backends", nargs="+", default=["pallas", "one-token", "release", "xla"],
                    help="backends for the first (default-tiling) layer timings")
    ap.add_argument("--checks", choices=("full", "quick", "none"), default="full",
                    help="float32-reference checks: full (M=8 and prefill), quick (M=8), none")
    ap.add_argument("--dense-ms", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--layout", choices=("nk", "kn"), default="nk",
                    help="int8 weights as the model stores them for inference, [N, K] (default), or the "
                         "checkpoint's [K, N]")
    args = ap.parse_args(argv)
    global D, F, PALLAS, PREFILL_M, TRANSPOSED, device_seconds
    device_seconds = meters[2]
    PREFILL_M = max(args.ms)
    if args.dims:
        D, F = args.dims
    PALLAS = args.pallas_backend
    TRANSPOSED = args.layout == "nk"
    res = Results(args.out, args.budget_s)
    dev = jax.devices()[0]
    smi = ""
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,driver_version",
                              "--format=csv"], capture_output=True, text=True, timeout=20).stdout
    except Exception:
        pass
    res.data["meta"] = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(), "jax": jax.__version__,
                        "device": str(dev), "device_kind": getattr(dev, "device_kind", "?"), "nvidia_smi": smi,
                        "argv": list(argv) if argv is not None else sys.argv, "E": E, "D": D, "F": F, "k": TOPK,
                        "layout": args.layout}
    log("device", res.data["meta"]["device_kind"], "jax", jax.__version__, smi.replace("\n", " | "))
    res.save()

    # Small ceilings only for a dry run: on a GPU the roofline is the device's whatever the widths.
    bw, rate = ceilings(res, meters, small=jax.default_backend() == "cpu")
    weights = make_weights()
    kweights = kernel_layout(weights)
    log("weights ready, layout", args.layout)
    if args.checks != "none":
        correctness_step(res, weights, kweights, (8,) if args.checks == "quick" else (8, PREFILL_M))
    ms = tuple(args.ms)
    layer_step(res, weights, kweights, bw, rate, ms, [PALLAS if b == "pallas" else b for b in args.layer_backends],
               "default")
    best = {}
    if not args.no_sweep:
        try:
            best = sweeps(res, kweights, bw, rate, args.quick)
        except Exception as exc:
            res.error("sweeps", exc)
            traceback.print_exc()
    # The layer again with the best tilings found (decode tilings for M <= 32).
    if best.get("gated_decode") and best.get("down_decode"):
        bm_pre = 64
        pre = [(bm, best.get(f"gated_prefill_bm{bm}"), best.get(f"down_prefill_bm{bm}")) for bm in (64, 128)]
        pre = [p for p in pre if p[1] and p[2]]
        if pre:
            def total(p):
                return (res.data["best"][f"gated_prefill_bm{p[0]}"]["median_s"]
                        + res.data["best"][f"down_prefill_bm{p[0]}"]["median_s"])
            bm_pre, g_pre, d_pre = min(pre, key=total)
        else:
            g_pre = d_pre = None
        dec = (best["gated_decode"], best["down_decode"])
        layer_step(res, weights, kweights, bw, rate, [m for m in ms if m <= 32], (PALLAS,), "tuned", block_m=16,
                   configs=dec)
        if g_pre:
            layer_step(res, weights, kweights, bw, rate, (PREFILL_M,), (PALLAS,), "tuned", block_m=bm_pre,
                       configs=(g_pre, d_pre))
    dq = (best.get("gated_decode") or K.KernelConfig()).dequant
    dense_cfgs = [None, K.KernelConfig(128, 128, 8, 4, 4, dq), K.KernelConfig(64, 128, 8, 4, 4, dq),
                  K.KernelConfig(64, 256, 4, 4, 3, dq)]
    dense_step(res, bw, rate, dense_cfgs, tuple(args.dense_ms))
    qkv_step(res, bw)
    attention_step(res, bw, ((2, 128, 70), (3, 64, 64)) if args.dims else ATTENTION_CASES)
    res.data["meta"]["total_s"] = time.time() - T0
    res.save()
    print(table(res))
    print("errors:", len(res.data["errors"]))
    for e in res.data["errors"]:
        print("  ", e[:300])


if __name__ == "__main__":  # the old entry point: the same run through bench.py (above this module)
    os.execv(sys.executable, [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                           "bench.py"), "kernels", *sys.argv[1:]])
