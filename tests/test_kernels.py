"""kernels.py against float64 numpy references written from SPEC.md (block-scale rule,
top-k MoE with raw gates, tanh gelu), for the "xla" backend and the Pallas kernels run with
interpret=True. Sizes are tiny; the GPU path is checked by kernel_bench.py on the device.
"""

import functools

import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import kernels

BACKENDS = ["xla", "interpret"]
E = 8
D, F = 64, 96  # F is no power of two: the column tiling must cut it into 32-wide blocks


# ---------------------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------------------


def dequant_np(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """weight [..., K, N] * scales [..., nb, N]: rows [b*K/nb, (b+1)*K/nb) use block b."""
    k, nb = w.shape[-2], s.shape[-2]
    w, s = np.asarray(w, np.float64), f64(s)
    return w * np.repeat(s, k // nb, axis=-2)


def gelu_np(a: np.ndarray) -> np.ndarray:
    return 0.5 * a * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (a + 0.044715 * a**3)))


def moe_np(x, idx, gates, w, ws, v, vs, w1, w1s):
    """Loop over tokens and their k slots: sum_j g * (gelu(x W_e) * (x V_e)) W1_e."""
    wd, vd, w1d = dequant_np(w, ws), dequant_np(v, vs), dequant_np(w1, w1s)
    x = x.astype(np.float64)
    out = np.zeros((x.shape[0], w1.shape[-1]))
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            h = gelu_np(x[t] @ wd[e]) * (x[t] @ vd[e])
            out[t] += float(gates[t, j]) * (h @ w1d[e])
    return out


def rel_err(got, want) -> float:
    got = f64(got)
    assert not np.isnan(got).any(), "NaN in kernel output"
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# ---------------------------------------------------------------------------------------
# Random inputs
# ---------------------------------------------------------------------------------------


def bf16(a) -> jax.Array:
    """A bf16 device array, rounded on the host (no eager device op to compile)."""
    return jnp.asarray(np.asarray(a, np.float32).astype(ml_dtypes.bfloat16))


def f64(a) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def quantized(rng, shape, nb):
    """int8 weight [E, K, N] and bf16 scales [E, nb, N] of varied size per block."""
    w = jnp.asarray(rng.integers(-127, 128, shape).astype(np.int8))
    s = bf16(rng.uniform(0.3, 3.0, (*shape[:-2], nb, shape[-1])) / (127 * np.sqrt(shape[-2])))
    return w, s


def routing(rng, m, k, case):
    """expert_idx [m, k] (distinct per token) and gates [m, k] float32."""
    if case == "uneven":  # experts 0, 3, 4, 6 get rows in very different numbers; 1, 2, 5, 7 none
        pool, p = np.array([0, 3, 4, 6]), np.array([0.55, 0.25, 0.15, 0.05])
    else:
        pool, p = np.arange(E), np.full(E, 1.0 / E)
    idx = np.stack([rng.choice(pool, size=k, replace=False, p=p) for _ in range(m)])
    gates = rng.uniform(0.05, 0.6, (m, k)).astype(np.float32)
    return jnp.asarray(idx.astype(np.int32)), jnp.asarray(gates)


CASES = [(1, "uniform"), (13, "uneven")]  # M=1 (decode), uneven groups with empty experts

# One compiled program per call keeps the suite fast (eager mode compiles every small op).
make_plan = jax.jit(kernels.make_plan, static_argnums=(1, 2))
dispatch = jax.jit(kernels.dispatch)
combine = jax.jit(kernels.combine)


# ---------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["comparing", "counting"])
@pytest.mark.parametrize("m,k,block_m,case", [(1, 2, 16, "uniform"), (13, 2, 4, "uneven"),
                                              (40, 2, 8, "uniform"), (7, 1, 2, "uneven")])
def test_make_plan_groups_rows_by_expert(m, k, block_m, case, path, monkeypatch):
    """Both ways of building the plan (pairwise comparisons for decode, cumulative counts
    for prefill) against the plan's definition."""
    monkeypatch.setattr(kernels, "_COMPARING_PLAN_MAX_ROWS", 256 if path == "comparing" else 0)
    rng = np.random.default_rng(m * 10 + k)
    idx, _ = routing(rng, m, k, case)
    plan = kernels.make_plan(idx, E, block_m)  # not jitted: a cached trace would ignore the patch
    assert_plan_groups(plan, np.asarray(idx), block_m)


def assert_plan_groups(plan: kernels.MoEPlan, idx: np.ndarray, block_m: int) -> None:
    """The plan's definition, for the rows of expert_idx [M, k] (all experts real)."""
    m, k = idx.shape
    idx = idx.reshape(-1)
    row_pos, row_token = np.asarray(plan.row_pos), np.asarray(plan.row_token)
    tile_expert, num_tiles = np.asarray(plan.tile_expert), int(plan.num_tiles)

    counts = np.bincount(idx, minlength=E)
    used = int(sum(-(-c // block_m) for c in counts))
    assert plan.block_m == block_m
    assert num_tiles == used and len(tile_expert) >= used
    assert row_token.shape == (len(tile_expert) * block_m,)
    assert len(set(row_pos.tolist())) == m * k  # a permutation into the padded rows
    np.testing.assert_array_equal(row_token[row_pos], np.arange(m * k) // k)
    np.testing.assert_array_equal(tile_expert[row_pos // block_m], idx)  # right expert's tile
    pad = np.setdiff1d(np.arange(len(row_token)), row_pos)
    assert (row_token[pad] == m).all()
    assert (tile_expert[used:] == -1).all()
    for e in range(E):  # ceil(count / block_m) tiles per expert, rows in token order
        assert (tile_expert[:used] == e).sum() == -(-counts[e] // block_m)
        pos = row_pos[idx == e]
        assert (np.diff(pos) > 0).all()
    assert (np.diff(tile_expert[:used]) >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,k,block_m,case", [(1, 2, 16, "normal"), (8, 2, 16, "ties"), (32, 2, 16, "normal"),
                                              (3, 2, 16, "normal"), (4, 1, 4, "normal"), (16, 4, 8, "normal")])
def test_route_is_softmax_top_k_and_the_plan(m, k, block_m, case, backend):
    """route() against float64: the top-k of the softmax (ties to the lower expert, as
    lax.top_k), raw probabilities as gates, and a plan that groups the rows by expert. With
    "interpret" and a power-of-two M the one-kernel path runs (M=3: the plain JAX one)."""
    rng = np.random.default_rng(m)
    logits = rng.standard_normal((m, E)).astype(np.float32)
    if case == "ties":  # equal logits: the lower expert wins, as in lax.top_k
        logits[:, 5] = logits[:, 2] = logits.max(axis=1) + 1.0
    gates, experts, plan = jax.jit(functools.partial(kernels.route, k=k, block_m=block_m, backend=backend))(
        jnp.asarray(logits))
    probs = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    want = np.stack([sorted(range(E), key=lambda e: (-logits[t, e], e))[:k] for t in range(m)])
    np.testing.assert_array_equal(np.asarray(experts), want)
    if case == "ties":
        assert (want == [2, 5]).all()
    np.testing.assert_allclose(np.asarray(gates, np.float64), np.take_along_axis(probs, want, axis=1), rtol=2e-6)
    assert_plan_groups(plan, want, block_m)
    fused = backend == "interpret" and m in (1, 4, 8, 16, 32)
    tiles = kernels.route_tiles(m, k, E, block_m) if fused else kernels.max_tiles(m * k, E, block_m)
    assert plan.tile_expert.shape == (tiles,)  # the one kernel rounds the tiles up to a power of two


@pytest.mark.parametrize("path", ["comparing", "counting"])
def test_rows_of_no_expert_get_no_place_and_combine_to_zero(path, monkeypatch):
    """Rows routed to expert E (pad tokens: "no expert") take no tile and no padded row;
    the other rows are placed as without them; combine gives a pad token zeros."""
    monkeypatch.setattr(kernels, "_COMPARING_PLAN_MAX_ROWS", 256 if path == "comparing" else 0)
    rng = np.random.default_rng(5)
    m, k, block_m = 11, 2, 4
    idx, gates = routing(rng, m, k, "uneven")
    pads = np.array([1, 4, 5, 10])  # tokens that go to no expert
    idx = np.asarray(idx).copy()
    idx[pads] = E
    gates = np.asarray(gates).copy()
    gates[pads] = 0.0
    plan = kernels.make_plan(jnp.asarray(idx), E, block_m, pads=True)
    row_pos, row_token = np.asarray(plan.row_pos), np.asarray(plan.row_token)
    tile_expert, num_tiles = np.asarray(plan.tile_expert), int(plan.num_tiles)
    flat = idx.reshape(-1)
    real = flat < E
    counts = np.bincount(flat[real], minlength=E)
    assert num_tiles == sum(-(-c // block_m) for c in counts)
    assert (row_pos[~real] >= len(row_token)).all()  # no place
    assert len(set(row_pos[real].tolist())) == real.sum() and (row_pos[real] < len(row_token)).all()
    np.testing.assert_array_equal(row_token[row_pos[real]], np.arange(m * k)[real] // k)
    np.testing.assert_array_equal(tile_expert[row_pos[real] // block_m], flat[real])
    assert not np.isin(row_token, pads).any()  # no tile row reads a pad token
    ys = bf16(rng.standard_normal((len(row_token), D)))
    out = np.asarray(kernels.combine(ys, jnp.asarray(gates), plan, pads=True), np.float64)
    ys64 = f64(ys)
    ref = np.zeros((m, D))
    for t in range(m):
        for j in range(k):
            if idx[t, j] < E:
                ref[t] += gates[t, j] * ys64[row_pos[t * k + j]]
    assert (out[pads] == 0).all() and not np.isnan(out).any()
    assert rel_err(out, ref) < 1e-2


def test_dispatch_and_combine_use_raw_gates():
    rng = np.random.default_rng(1)
    m, k = 9, 2
    idx, gates = routing(rng, m, k, "uneven")
    plan = make_plan(idx, E, 4)
    x = bf16(rng.standard_normal((m, D)))
    xs = dispatch(x, plan)
    row_token = np.asarray(plan.row_token)
    want = np.where((row_token < m)[:, None], f64(x)[np.minimum(row_token, m - 1)], 0.0)
    np.testing.assert_array_equal(f64(xs), want)  # pad rows exactly zero

    ys = bf16(rng.standard_normal(xs.shape))
    out = combine(ys, gates, plan)
    ys64, g, ix = f64(ys), np.asarray(gates, np.float64), np.asarray(idx)
    # Independent of row_pos: find each (token, slot) row as the j-th row of its token in
    # its expert's tiles, in token order.
    ref = np.zeros((m, D))
    tile_expert = np.asarray(plan.tile_expert)
    for t in range(m):
        for j in range(k):
            e = ix[t, j]
            first = np.argmax(tile_expert == e) * plan.block_m
            rank = int(((ix == e).any(axis=1)[:t]).sum())
            ref[t] += g[t, j] * ys64[first + rank]
    assert rel_err(out, ref) < 1e-2


# ---------------------------------------------------------------------------------------
# Grouped matmuls
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nb", [1, 8])
@pytest.mark.parametrize("m,case", CASES)
@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_matmul_and_gated(backend, nb, m, case, transposed):
    rng = np.random.default_rng(nb * 100 + m)
    k = 2
    idx, _ = routing(rng, m, k, case)
    plan = make_plan(idx, E, kernels.default_block_m(m * k))
    x = bf16(rng.standard_normal((m, D)))
    w, ws = quantized(rng, (E, D, F), nb)
    v, vs = quantized(rng, (E, D, F), nb)
    w1, w1s = quantized(rng, (E, F, D), nb)
    # The kernels' transposed layout holds the same matrices stored [E, N, K].
    layout = (lambda a: jnp.swapaxes(a, -1, -2)) if transposed else (lambda a: a)

    @jax.jit
    def run(x, plan, w, ws, v, vs, w1, w1s):
        xs = kernels.dispatch(x, plan)
        h = kernels.grouped_matmul_gated(xs, w, ws, v, vs, plan, backend=backend, transposed=transposed)
        return h, kernels.grouped_matmul(h, w1, w1s, plan, backend=backend, transposed=transposed)

    h, y = run(x, plan, layout(w), ws, layout(v), vs, layout(w1), w1s)
    assert h.shape == (plan.num_padded_rows, F) and h.dtype == jnp.bfloat16
    assert y.shape == (plan.num_padded_rows, D) and y.dtype == jnp.bfloat16

    wd, vd, w1d = dequant_np(w, ws), dequant_np(v, vs), dequant_np(w1, w1s)
    ix, x64, h64 = np.asarray(idx).reshape(-1), f64(x), f64(h)
    row_pos = np.asarray(plan.row_pos)
    h_ref = np.stack([gelu_np(x64[r // k] @ wd[e]) * (x64[r // k] @ vd[e]) for r, e in enumerate(ix)])
    # The output layer is checked on the kernel's own (bf16) h, so each op is checked alone.
    y_ref = np.stack([h64[row_pos[r]] @ w1d[e] for r, e in enumerate(ix)])
    y64 = f64(y)
    assert rel_err(h64[row_pos], h_ref) < 1e-2
    assert rel_err(y64[row_pos], y_ref) < 1e-2
    pad = np.setdiff1d(np.arange(plan.num_padded_rows), row_pos)
    assert not h64[pad].any() and not y64[pad].any()


@pytest.mark.parametrize("backend,nb,m,case", [("xla", 8, 1, "uniform"), ("interpret", 1, 13, "uneven")])
def test_sparse_moe_end_to_end(backend, nb, m, case):
    rng = np.random.default_rng(7 + nb + m)
    idx, gates = routing(rng, m, 2, case)
    x = bf16(rng.standard_normal((m, D)))
    lin, lin_v, lin_1 = quantized(rng, (E, D, F), nb), quantized(rng, (E, D, F), nb), quantized(rng, (E, F, D), nb)
    out = jax.jit(lambda *a: kernels.sparse_moe(*a, backend=backend))(x, idx, gates, lin, lin_v, lin_1)
    ref = moe_np(f64(x), np.asarray(idx), np.asarray(gates), *lin, *lin_v, *lin_1)
    assert out.shape == (m, D) and out.dtype == jnp.bfloat16
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nb,transposed,dtype,split_k", [(1, False, "bfloat16", 1), (8, True, "float32", 1),
                                                          (8, False, "float32", 4), (1, True, "bfloat16", 2)])
def test_moe_one_token_weights_each_expert_by_its_gate(backend, nb, transposed, dtype, split_k):
    """One token, no plan: the output kernel's parts [k * S, 1, D] are, S at a time, each chosen
    expert's output times its gate (float64 reference); a float32 x and its hidden rows stay
    unrounded (1e-4), bf16 ones are rounded (1e-2)."""
    rng = np.random.default_rng(nb + split_k)
    experts, gates = np.array([5, 2], np.int32), np.array([0.45, 0.3], np.float32)
    x = rng.standard_normal((1, D)).astype(np.float32)
    x = jnp.asarray(x) if dtype == "float32" else bf16(x)
    mats = [quantized(rng, (E, D, F), nb), quantized(rng, (E, D, F), nb), quantized(rng, (E, F, D), nb)]
    layout = (lambda a: jnp.swapaxes(a, -1, -2)) if transposed else (lambda a: a)
    configs = (None, kernels.KernelConfig(block_n=32, block_k=16, split_k=split_k))
    run = jax.jit(functools.partial(kernels.moe_one_token, backend=backend, transposed=transposed, configs=configs))
    parts = run(x, jnp.asarray(gates), jnp.asarray(experts), *[(layout(w), s) for w, s in mats])
    s = 1 if backend == "xla" else split_k
    assert parts.dtype == jnp.float32 and parts.shape == ((1 if backend == "xla" else 2 * s), 1, D)
    tol = 1e-4 if dtype == "float32" else 1e-2
    if backend != "xla":
        for j in range(2):
            alone = moe_np(f64(x), experts[None, j:j + 1], gates[None, j:j + 1], *mats[0], *mats[1], *mats[2])
            assert rel_err(np.sum(f64(parts[j * s:(j + 1) * s]), axis=0), alone) < tol
    want = moe_np(f64(x), experts[None], gates[None], *mats[0], *mats[1], *mats[2])
    assert rel_err(np.sum(f64(parts), axis=0), want) < tol


def test_gated_decode_tiling_narrows_only_when_few_programs():
    # Grok-1's expert width F = 32768 on one device, 16384 on each of 2, 8192 on each of 4,
    # 4096 on each of 8; 2 tiles of 16 rows at batch 1, 8 at batch 8. Only one device's share
    # of 8 at batch 1 (128 programs of 64 columns, 132 SMs) narrows to 32 columns.
    tuned = kernels._TUNED[("gated", "decode", True)].block_n

    def block_n(width, tiles):
        return kernels.default_config("gated", 16, tiles, 6144, width, transposed=True).block_n
    assert tuned == 64
    assert [block_n(f, t) for f in (32768, 16384, 8192) for t in (2, 8)] == [64] * 6
    assert (block_n(4096, 2), block_n(4096, 8)) == (32, 64)
    assert kernels.default_config("gated", 64, 2, 6144, 4096, transposed=True).block_n == 128  # prefill: as tuned
    # The narrowed tile keeps one more stage of loads in flight; the others keep the table's.
    stages = kernels._TUNED[("gated", "decode", True)].num_stages
    assert kernels.default_config("gated", 16, 2, 6144, 4096, transposed=True).num_stages == stages + 1
    assert kernels.default_config("gated", 16, 8, 6144, 4096, transposed=True).num_stages == stages


def test_dense_decode_tiling_narrows_only_when_few_programs():
    # Grok-1's attention projections at batch 1 (one tile of 16 rows): q/k/v [6144 -> 8192]
    # and the output projection [6144 -> 6144] on one device, their 1/n shares on each of n.
    # Programs are column blocks x K slices (the slices stop at 256 rows of K); only one
    # device's share of 8 (128 and 96 programs of 128 columns, 132 SMs) narrows, to 64.
    def tiling(k, n):
        cfg = kernels.default_config("dense", 16, 1, k, n, transposed=True)
        return cfg.block_n, cfg.split_k

    assert kernels._TUNED[("dense", "decode", True)].block_n == 128
    assert [tiling(6144, 8192 // n) for n in (1, 2, 4)] == [(128, 8), (128, 16), (128, 16)]
    assert [tiling(6144 // n, 6144) for n in (1, 2, 4)] == [(128, 8), (128, 8), (128, 4)]
    assert tiling(6144, 1024) == (64, 16) and tiling(768, 6144) == (64, 2)  # the share of 8
    for k, n in ((6144, 1024), (768, 6144)):  # what each program covers still tiles the weight
        block_n, split = tiling(k, n)
        assert n % block_n == 0 and k % split == 0 and (n // block_n) * split >= kernels._NUM_SMS


@pytest.mark.parametrize("dequant,split_k,nb", [("bits", 2, 8), ("asm", 4, 1), ("cast", 3, 2)])
def test_pallas_variants_split_k_and_dequant(dequant, split_k, nb):
    """Split-K partial sums (slices crossing or inside scale blocks) and the bit-trick
    int8 -> bf16 conversion give the same function (split 3 falls back to a divisor)."""
    rng = np.random.default_rng(split_k)
    m, k_dim, n_dim = 6, 128, 64
    idx, _ = routing(rng, m, 2, "uneven")
    plan = make_plan(idx, E, 8)
    w, ws = quantized(rng, (E, k_dim, n_dim), nb)
    w = np.array(w)
    w[0, :4, :4] = [-128, 127, 0, -1]  # extremes of int8
    w = jnp.asarray(w)
    xs = dispatch(bf16(rng.standard_normal((m, k_dim))), plan)
    cfg = kernels.KernelConfig(block_n=32, block_k=16, split_k=split_k, dequant=dequant)
    y = jax.jit(functools.partial(kernels.grouped_matmul, backend="interpret", config=cfg))(xs, w, ws, plan)
    wd, xs64, te = dequant_np(w, ws), f64(xs), np.asarray(plan.tile_expert)
    y_ref = np.stack([xs64[p] @ wd[te[p // 8]] if te[p // 8] >= 0 else np.zeros(n_dim)
                      for p in range(plan.num_padded_rows)])
    assert rel_err(y, y_ref) < 1e-2


# ---------------------------------------------------------------------------------------
# Dense int8 linear
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nb,lead,transposed", [(1, (1,), False), (8, (2, 1, 3), False), (8, (1,), True),
                                                (8, (3, 200), True)])
def test_int8_matmul_keeps_leading_dims(backend, nb, lead, transposed):
    """Rows fewer than a tile's, and 600 rows in 5 tiles of 128 of which the last is part
    pad: the Pallas kernel masks the rows past x's on load and on store."""
    rng = np.random.default_rng(nb + len(lead))
    x = bf16(rng.standard_normal((*lead, D)))
    w, s = quantized(rng, (D, F), nb)
    stored = w.T if transposed else w  # the transposed layout holds the same matrix [F, D]
    y = jax.jit(functools.partial(kernels.int8_matmul, backend=backend, transposed=transposed))(x, stored, s)
    assert y.shape == (*lead, F) and y.dtype == jnp.bfloat16
    ref = f64(x).reshape(-1, D) @ dequant_np(w, s)
    assert rel_err(f64(y).reshape(-1, F), ref) < 1e-2


def test_int8_matmul_under_shard_map_with_local_scale_blocks():
    """K sharded 2 ways with 8 scale blocks: each shard holds 4 whole blocks; psum of the
    local products equals the full product (what the model does under shard_map)."""
    from jax.sharding import Mesh, PartitionSpec as P

    rng = np.random.default_rng(3)
    x = bf16(rng.standard_normal((4, D)))
    w, s = quantized(rng, (D, F), 8)
    mesh = Mesh(np.array(jax.devices()[:2]), ("model",))

    def local(x, w, s):
        return jax.lax.psum(kernels.int8_matmul(x, w, s, backend="xla", out_dtype=jnp.float32), "model")

    y = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(None, "model"), P("model", None), P("model", None)),
                              out_specs=P(), check_vma=False))(x, w, s)
    assert rel_err(y, f64(x) @ dequant_np(w, s)) < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nb,transposed,split_k", [(1, True, 1), (2, False, 2), (1, True, 4)])
def test_int8_matmuls_run_several_weights_side_by_side(backend, nb, transposed, split_k):
    """q, k and v in one launch: widths 96, 32 and 32 (column blocks of 32: 3 + 1 + 1), each
    output equal to its own product; split-K sums across the fused output."""
    rng = np.random.default_rng(10 + nb)
    x = bf16(rng.standard_normal((1, 3, D)))
    mats = [quantized(rng, (D, n), nb) for n in (F, 32, 32)]
    stored = [(w.T if transposed else w, s) for w, s in mats]
    cfg = kernels.KernelConfig(block_n=128, block_k=16, split_k=split_k)
    fn = jax.jit(functools.partial(kernels.int8_matmuls, backend=backend, transposed=transposed, config=cfg,
                                   out_dtype=jnp.float32))
    ys = fn(x, stored)
    assert [y.shape for y in ys] == [(1, 3, F), (1, 3, 32), (1, 3, 32)]
    for y, (w, s) in zip(ys, mats):
        assert rel_err(f64(y).reshape(3, -1), f64(x).reshape(3, D) @ dequant_np(w, s)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split_k", [1, 4])
def test_int8_matmuls_hand_back_float32_partial_sums(backend, split_k):
    """partial_sums=True: [S, ..., N] float32 slices of K whose sum is the product, unrounded
    (S = split_k on the Pallas path, 1 on XLA's), for the junction kernel to add."""
    rng = np.random.default_rng(20 + split_k)
    x = bf16(rng.standard_normal((1, 1, D)))
    w, s = quantized(rng, (D, F), 2)
    cfg = kernels.KernelConfig(block_n=32, block_k=16, split_k=split_k)
    [parts] = jax.jit(functools.partial(kernels.int8_matmuls, backend=backend, transposed=True, config=cfg,
                                        partial_sums=True))(x, [(w.T, s)])
    slices = split_k if backend == "interpret" else 1
    assert parts.shape == (slices, 1, 1, F) and parts.dtype == jnp.float32
    assert rel_err(f64(parts).sum(0).reshape(1, F), f64(x).reshape(1, D) @ dequant_np(w, s)) < 1e-6


def rope_np(x: np.ndarray, pos: float, base: float = 10000.0) -> np.ndarray:
    """SPEC's rotate-half RoPE in float64 at one position: x [..., K]; frequencies
    base^(-2i/K), pair (i, i + K/2) rotated by pos * frequency i."""
    k = x.shape[-1]
    angle = pos * base ** (-np.arange(0, k, 2) / k)
    x1, x2 = x[..., : k // 2], x[..., k // 2 :]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_qkv_adds_rotates_and_writes_one_position(backend):
    """decode_qkv against float64: q (its group's heads, rotated at each row's step) from the
    sum of the partial sums, the rotated key and the value written at step (the last position,
    and a step past the cache clamped to it as dynamic_update_slice does), every other cache
    entry untouched."""
    rng = np.random.default_rng(3)
    s, b, g, h, k, length = 3, 3, 2, 6, 16, 8
    parts = rng.standard_normal((s, b, (h + 2 * g) * k)).astype(np.float32)
    keys, values = bf16(rng.standard_normal((b, length, g, k))), bf16(rng.standard_normal((b, length, g, k)))
    step = np.array([3, 7, 11], np.int32)
    q, new_k, new_v = jax.jit(functools.partial(kernels.decode_qkv, q_heads=h, backend=backend))(
        jnp.asarray(parts), keys, values, jnp.asarray(step))
    rows = kernels.attention_rows(h // g, backend)
    assert q.shape == (b, g, rows, k) and q.dtype == jnp.float32 and new_k.dtype == keys.dtype
    total = f64(parts).sum(0).reshape(b, h + 2 * g, k)
    for row in range(b):
        want_q = rope_np(total[row, :h], step[row]).reshape(g, h // g, k)
        assert rel_err(q[row, :, : h // g], want_q) < 1e-5
        assert not f64(q[row, :, h // g :]).any()
        slot, others = min(step[row], length - 1), np.arange(length) != min(step[row], length - 1)
        # the written key and value within bf16 rounding (2^-8), every other entry exactly as it was
        np.testing.assert_allclose(f64(new_k[row, slot]), rope_np(total[row, h : h + g], step[row]), rtol=2**-8)
        np.testing.assert_allclose(f64(new_v[row, slot]), total[row, h + g :], rtol=2**-8)
        np.testing.assert_array_equal(f64(new_k[row, others]), f64(keys[row, others]))
        np.testing.assert_array_equal(f64(new_v[row, others]), f64(values[row, others]))


def attention_np(q, keys, values, lengths, scale, cap):
    """float64 decode attention from SPEC: logits q.k * scale, capped cap * tanh(x / cap),
    softmax over the keys [0, length), weighted sum of values; zeros where nothing is visible.
    q [B, G, Hg, K], keys/values [B, S, G, K]."""
    q, keys, values = f64(q), f64(keys), f64(values)
    out = np.zeros(q.shape)
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        logits = np.einsum("ghk,sgk->ghs", q[b], keys[b, :n]) * scale
        logits = cap * np.tanh(logits / cap)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        out[b] = np.einsum("ghs,sgk->ghk", p / p.sum(-1, keepdims=True), values[b, :n])
    return out


@pytest.mark.parametrize("splits,q_scale", [(1, 2.0), (3, 2.0), (None, 2.0), (3, 60.0)])
def test_decode_attention_reads_each_rows_keys(splits, q_scale):
    """Per-row lengths (0, 1, a block and a bit, the whole cache) against float64; positions
    past a row's length hold large values that must not leak in. q_scale 60: logits pinned
    against the cap of 30 from both sides."""
    rng = np.random.default_rng(splits or 0)
    b, s, g, hg, k = 4, 128, 2, 3, 16
    q = jnp.asarray(rng.standard_normal((b, g, hg, k)).astype(np.float32) * q_scale)
    keys, values = bf16(rng.standard_normal((b, s, g, k))), bf16(rng.standard_normal((b, s, g, k)))
    lengths = np.array([0, 1, 70, 128], np.int32)
    for row, n in enumerate(lengths):  # poison what a row must not read
        keys = keys.at[row, n:].set(1e4)
        values = values.at[row, n:].set(1e4)
    out = kernels.decode_attention(q, keys, values, jnp.asarray(lengths), scale=0.25, cap=30.0,
                                   backend="interpret", splits=splits)
    assert out.shape == (b, g, hg, k) and out.dtype == jnp.float32
    want = attention_np(q, keys, values, lengths, 0.25, 30.0)
    assert np.all(f64(out)[0] == 0)
    assert rel_err(out, want) < 1e-5
    with pytest.raises(ValueError, match="Pallas kernel"):
        kernels.decode_attention(q, keys, values, jnp.asarray(lengths), scale=0.25, cap=30.0, backend="xla")


# ---------------------------------------------------------------------------------------
# Float32 activations: used unrounded (float32 math on the CPU, the hi/lo split elsewhere)
# ---------------------------------------------------------------------------------------


def test_split_bf16_is_exact_to_2_pow_minus_16():
    x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32) * np.float32(1e3)
    hi, lo = jax.jit(kernels.split_bf16)(jnp.asarray(x))
    assert hi.dtype == lo.dtype == jnp.bfloat16
    back = f64(hi) + f64(lo)
    assert np.all(np.abs(back - x) <= 2.0**-16 * np.abs(x))
    assert np.array_equal(f64(hi), f64(x.astype(ml_dtypes.bfloat16)))


@pytest.mark.parametrize("path", ["xla", "xla split", "interpret"])
@pytest.mark.parametrize("transposed", [False, True])
def test_float32_activations_are_not_rounded(path, transposed, monkeypatch):
    """A float32 x reaches the int8 matmuls unrounded: float32 math on the CPU's XLA path,
    bf16 hi + lo against the same int8 tile in the Pallas kernels and in XLA off the CPU
    ("xla split" forces that here). The error against float64 on the same float32 input
    is ~1e-5; rounding x to bf16 gives ~2e-3."""
    if path == "xla split":
        monkeypatch.setattr(kernels, "_xla_split", lambda x: x.dtype == jnp.float32)
    backend = "interpret" if path == "interpret" else "xla"
    rng = np.random.default_rng(11)
    m, k = 5, 2
    idx, _ = routing(rng, m, k, "uneven")
    plan = make_plan(idx, E, kernels.default_block_m(m * k))
    x = jnp.asarray(rng.standard_normal((m, D)).astype(np.float32))
    (w, ws), (v, vs), (w1, w1s) = (quantized(rng, (E, D, F), 8), quantized(rng, (E, D, F), 8),
                                   quantized(rng, (E, F, D), 8))
    layout = (lambda a: jnp.swapaxes(a, -1, -2)) if transposed else (lambda a: a)
    f32 = jnp.float32

    @jax.jit
    def run(x, plan, w, ws, v, vs, w1, w1s):
        xs = kernels.dispatch(x, plan)
        h = kernels.grouped_matmul_gated(xs, w, ws, v, vs, plan, backend=backend, out_dtype=f32,
                                         transposed=transposed)
        y = kernels.grouped_matmul(h, w1, w1s, plan, backend=backend, out_dtype=f32, transposed=transposed)
        dense = kernels.int8_matmul(x, w[0], ws[0], backend=backend, out_dtype=f32, transposed=transposed)
        return h, y, dense

    h, y, dense = run(x, plan, layout(w), ws, layout(v), vs, layout(w1), w1s)
    wd, vd, w1d = dequant_np(w, ws), dequant_np(v, vs), dequant_np(w1, w1s)
    ix, x64, h64, rp = np.asarray(idx).reshape(-1), f64(x), f64(h), np.asarray(plan.row_pos)
    h_ref = np.stack([gelu_np(x64[r // k] @ wd[e]) * (x64[r // k] @ vd[e]) for r, e in enumerate(ix)])
    y_ref = np.stack([h64[rp[r]] @ w1d[e] for r, e in enumerate(ix)])
    assert rel_err(h64[rp], h_ref) < 1e-4
    assert rel_err(f64(y)[rp], y_ref) < 1e-4
    assert rel_err(dense, x64 @ wd[0]) < 1e-4


# ---------------------------------------------------------------------------------------
# Decode junctions
# ---------------------------------------------------------------------------------------


def rms_norm_np(x: np.ndarray, scale: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """SPEC's RMSNorm in float64: x / sqrt(mean(x^2) + eps) * scale."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,n_parts,d,outputs", [(1, 2, 64, "y+router"), (1, 1, 48, "y+router"), (2, 3, 48, "y"),
                                                 (1, 4, 64, "h")])
def test_residual_norm_adds_a_blocks_partials_and_takes_the_next_norm(backend, m, n_parts, d, outputs):
    """h' = h + rms_norm(sum of the partial sums, scale_1); y = rms_norm(h', scale_2); the router's
    logits from y unrounded, as partial sums over slices of D. D = 48 leaves the kernel's slices
    (8 of 6 columns) short of a power of two, so its loads and stores are masked."""
    rng = np.random.default_rng(d + n_parts)
    h = rng.standard_normal((m, d)) * 3
    parts = rng.standard_normal((n_parts, m, d))
    s1, s2 = rng.uniform(0.5, 1.5, d), rng.uniform(0.5, 1.5, d)
    router = rng.standard_normal((d, 8)) / np.sqrt(d)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    with_y, with_router = outputs != "h", outputs == "y+router"
    run = jax.jit(functools.partial(kernels.residual_norm, backend=backend, y_dtype=jnp.bfloat16))
    h_new, y, logits = run(f32(h), f32(parts), f32(s1), f32(s2) if with_y else None,
                           f32(router) if with_router else None)
    h32, parts32 = f64(f32(h)), f64(f32(parts))  # the float32 inputs, exactly
    want_h = h32 + rms_norm_np(parts32.sum(0), f64(f32(s1)))
    want_y = rms_norm_np(want_h, f64(f32(s2)))
    assert h_new.shape == (m, d) and h_new.dtype == jnp.float32
    assert rel_err(h_new, want_h) < 1e-6
    if not with_y:
        assert y is None and logits is None
        return
    assert y.dtype == jnp.bfloat16 and rel_err(y, want_y) < 2**-8
    if with_router:
        assert logits.ndim == 3 and logits.shape[1:] == (m, 8)
        assert rel_err(f64(logits).sum(0), want_y @ f64(f32(router))) < 1e-5
    else:
        assert logits is None


def test_route_adds_partial_logits():
    """route([P, M, E]) is route of their sum: the junction hands the router's logits over in parts."""
    rng = np.random.default_rng(3)
    parts = rng.standard_normal((8, 4, E)).astype(np.float32)
    for backend in ("interpret", "xla"):
        g1, e1, _ = kernels.route(jnp.asarray(parts), 2, 16, backend=backend)
        g2, e2, _ = kernels.route(jnp.asarray(parts.sum(0)), 2, 16, backend=backend)
        np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


def test_errors_name_the_problem():
    rng = np.random.default_rng(0)
    w, s = quantized(rng, (D, F), 8)
    with pytest.raises(ValueError, match="nb dividing K"):
        kernels.int8_matmul(bf16(np.ones((1, D))), w, s[:5], backend="xla")  # 5 does not divide 64
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.int8_matmul(bf16(np.ones((1, D))), w, s, backend="cuda")
    idx, _ = routing(rng, 3, 2, "uniform")
    plan = make_plan(idx, E, 16)
    we, se = quantized(rng, (E, D, 24), 1)  # N=24: no power-of-two block >= 16 divides it
    xs = dispatch(bf16(np.ones((3, D))), plan)
    with pytest.raises(ValueError, match="backend='xla'"):
        kernels.grouped_matmul(xs, we, se, plan, backend="pallas")
    with pytest.raises(ValueError, match="M_pad"):
        kernels.grouped_matmul(xs[:-1], we, se, plan, backend="xla")
    with pytest.raises(ValueError, match=r"weight 1 .*\(K\)"):  # the fused q/k/v must share K
        kernels.int8_matmuls(bf16(np.ones((1, D))), [(w, s), (w[:32], s)], backend="xla")
    q, cache = jnp.zeros((1, 2, 3, 16)), jnp.zeros((1, 64, 2, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="cap=50.0"):
        kernels.decode_attention(q, cache, cache, jnp.ones((1,), jnp.int32), scale=1.0, cap=50.0, backend="interpret")
    with pytest.raises(ValueError, match=r"lengths \(2,\)"):
        kernels.decode_attention(q, cache, cache, jnp.ones((2,), jnp.int32), scale=1.0, cap=30.0, backend="interpret")
    with pytest.raises(ValueError, match="auto_backend"):
        with kernels.auto_backend("auto"):
            pass
