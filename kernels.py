"""Fast kernels for Grok-1 inference: the sparse mixture of experts, int8 linears (one
launch for several that share their input) and decode attention over a KV cache.

Works on raw arrays only (no Haiku, no model.py): an int8 weight [..., K, N] with bf16
block scales [..., nb, N], where rows [b*K/nb, (b+1)*K/nb) of the weight use
scales[..., b, :] (SPEC section 3). With transposed=True the int8 weight is stored
[..., N, K] instead (K contiguous; the scales keep their layout): the layout the tensor
cores take their right-hand operand in, which the Pallas kernels read at close to the copy
bandwidth on an H200 (the checkpoint's [K, N] reaches about 65%; BENCHMARKS.md). Weights
are never dequantized in memory: each kernel converts int8 tiles to bf16 in registers,
accumulates x @ w in float32 per scale block and multiplies the block's partial result by
that block's scales.

The MoE runs in four steps, each a function below, in data-flow order:

    plan = make_plan(expert_idx, E, block_m)      # sort (token, slot) rows by expert
    xs = dispatch(x, plan)                        # [M, D] -> [M_pad, D], grouped by expert
    h = grouped_matmul_gated(xs, W, Ws, V, Vs, plan)   # gelu(xs @ W) * (xs @ V): [M_pad, F]
    ys = grouped_matmul(h, W1, W1s, plan)         # [M_pad, D]
    out = combine(ys, gates, plan)                # sum_k gate * row: [M, D]

Rows are padded per expert to a multiple of `block_m`; each tile of `block_m` rows belongs to
one expert, and tiles of experts nobody chose do not exist, so weights of unchosen experts
are never read (decode at batch 1 reads 2 of 8 experts). One token (a decode step at batch
1) needs no plan: moe_one_token runs the two matmuls with its experts as the tiles.

A decode step's attention: int8_matmuls (q, k and v as partial sums side by side) ->
decode_qkv (added, RoPE, the new key and value into the cache) -> decode_attention (each
row's own keys). At batch 1 residual_norm joins each block's output to the residual stream
with the next norm, and route makes the MoE's routing in one kernel.

Backends (the `backend` argument):
- "pallas": Pallas kernels lowered through Triton, for NVIDIA GPUs.
- "interpret": the same Pallas kernels with interpret=True (CPU tests at tiny sizes).
- "xla": plain JAX, correct on any device: a loop over the used tiles, each a per-scale-block
  dot with the int8 weight converted inside the dot's operand and scales applied to the
  block results.
- "auto": "pallas" on GPU (falling back to "xla" where the shapes cannot be tiled), else "xla".

Activations: x may be bf16, or float32 to be used unrounded. A float32 x is multiplied in
float32 on the CPU's XLA path; elsewhere (Pallas, XLA on a GPU) it is split into two bf16
parts, x = hi + lo to 2^-16 relative, and both are multiplied by the same int8 tile with
float32 sums: no extra weight bytes, twice the MMAs. Callers feed float32 only where
`float32_inputs` says so: on the CPU (on an H200 the split inside the Pallas kernels made
them 2.4-5x slower; see SPLIT_MAX_ROWS).

Everything here is jit- and shard_map-friendly: it sees local shapes only, and K may be a
shard of the full input dimension as long as each shard holds whole scale blocks.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import math
from typing import NamedTuple, Optional, Sequence

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # Triton-specific Pallas APIs (compiler params, inline asm); absent on odd builds.
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None
_TritonParams = (getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams", None)
                 if plgpu is not None else None)
_WHOLE_ARRAY = getattr(pl, "no_block_spec", None) or pl.BlockSpec()  # kernel indexes the whole array


def _compiler_params(num_warps: int, num_stages: int, interpret: bool) -> dict:
    """pallas_call's Triton settings, where this build has them and the kernel runs on a GPU."""
    if _TritonParams is None or interpret:
        return {}
    return dict(compiler_params=_TritonParams(num_warps=num_warps, num_stages=num_stages))


BACKENDS = ("auto", "pallas", "interpret", "xla")
DEQUANT_MODES = ("cast", "bits", "asm")


# ---------------------------------------------------------------------------------------
# Float32 activations: the hi/lo split
# ---------------------------------------------------------------------------------------

# Up to this many rows (tokens, or routed rows tokens * k in the MoE) callers off the CPU
# keep a matmul's activations float32 (float32_inputs). 0: none. Measured on an H200
# (2026-11-30, 8 Grok-width layers, batch 1): with 64, the Pallas kernels that split a
# float32 x inside took 996 us (gated, against 192), 290 us (down, against 106) and 75 us
# (dense, against 31) per layer, a decode step 3.3x slower; so GPUs take bf16 activations
# into their matmuls, as before issue 12, and the float32 path stays for explicit float32
# inputs and the CPU.
SPLIT_MAX_ROWS = 0


def float32_inputs(num_rows: int, backend: str = "auto") -> bool:
    """Whether activations feeding a matmul of `num_rows` rows should stay float32.

    True on the CPU's XLA path (float32 arithmetic there costs no more than bf16) and up to
    SPLIT_MAX_ROWS rows elsewhere (the hi/lo split); False means: round them to bf16, the
    release's precision, for prefill-size matmuls on an accelerator.
    """
    if _resolve_backend(backend) == "xla" and jax.default_backend() == "cpu":
        return True
    return num_rows <= SPLIT_MAX_ROWS


def split_bf16(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 x -> bf16 (hi, lo) with hi + lo = x to 2^-16 relative (hi = bf16(x), lo =
    bf16(x - hi); x - hi is exact in float32)."""
    x = x.astype(jnp.float32)
    hi = x.astype(jnp.bfloat16)
    return hi, (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)


def _xla_split(x: jax.Array) -> bool:
    """True when the XLA path multiplies a float32 x as hi + lo (off the CPU, where float32
    dots would run at a fraction of the bf16 rate or convert the int8 weight to float32)."""
    return x.dtype == jnp.float32 and jax.default_backend() != "cpu"


# ---------------------------------------------------------------------------------------
# Tiling plan for the mixture of experts
# ---------------------------------------------------------------------------------------


class MoEPlan(NamedTuple):
    """Where each (token, slot) row goes once rows are grouped by expert and padded.

    A flat row r = token * k + slot. Padded rows are grouped by expert in expert order,
    each expert's group padded to a multiple of block_m; tile t holds padded rows
    [t * block_m, (t + 1) * block_m), all of one expert. Only arrays live here (static
    sizes come from shapes), so a plan can cross jit and shard_map boundaries.
    """

    row_pos: jax.Array  # int32 [M * k]: padded position of flat row r (inverse permutation)
    row_token: jax.Array  # int32 [M_pad]: token feeding each padded row; M for pad rows
    tile_expert: jax.Array  # int32 [T]: expert of each tile; -1 for tiles past the used ones
    num_tiles: jax.Array  # int32 []: tiles in use; tiles [num_tiles, T) hold only pad rows

    @property
    def block_m(self) -> int:
        return self.row_token.shape[0] // self.tile_expert.shape[0]

    @property
    def num_padded_rows(self) -> int:
        return self.row_token.shape[0]


def max_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the tiles needed for `num_rows` rows over `num_experts` experts.

    sum_e ceil(c_e / bm) <= (R + nz * (bm - 1)) / bm, with nz <= min(E, R) non-empty experts.
    """
    nonempty = min(num_experts, num_rows)
    return max(1, (num_rows + nonempty * (block_m - 1)) // block_m)


def default_block_m(num_rows: int) -> int:
    """Rows per tile for `num_rows` = tokens * k routed rows: 16 for decode, 64 for prefill.

    Small tiles waste fewer pad rows when each expert gets a handful of rows (decode);
    larger tiles re-read each expert's weights fewer times when experts get hundreds.
    """
    if num_rows <= 256:
        return 16
    if num_rows <= 1024:
        return 32
    return 64


# Plans for up to this many (token, slot) rows are computed by pairwise comparison ([R, R]
# and [M_pad, R] masks): on a GPU about half the kernels of cumulative sums and a scatter.
_COMPARING_PLAN_MAX_ROWS = 256


def make_plan(expert_idx: jax.Array, num_experts: int, block_m: int, pads: bool = False) -> MoEPlan:
    """Group the rows of `expert_idx` int32 [M, k] by expert, padded per expert to block_m.

    Values of expert_idx must lie in [0, num_experts). Rows of one expert keep token order.
    pads=True also takes num_experts, "no expert" (a pad token's rows): such a row gets no
    place in any tile, and combine(..., pads=True) gives it zeros.
    """
    if expert_idx.ndim != 2:
        raise ValueError(
            f"make_plan: expert_idx must be [tokens, k], found shape {tuple(expert_idx.shape)}."
        )
    if block_m < 1 or num_experts < 1:
        raise ValueError(f"make_plan: need block_m >= 1 and num_experts >= 1, got {block_m}, {num_experts}.")
    m, k = expert_idx.shape
    rows = m * k
    n_tiles = max_tiles(rows, num_experts, block_m)
    flat = expert_idx.reshape(rows).astype(jnp.int32)  # [R]
    experts = jnp.arange(num_experts, dtype=jnp.int32)
    onehot = flat[:, None] == experts[None, :]  # [R, E]
    tiles = (jnp.sum(onehot, axis=0, dtype=jnp.int32) + block_m - 1) // block_m  # [E] tiles per expert
    r = jnp.arange(rows, dtype=jnp.int32)
    p = jnp.arange(n_tiles * block_m, dtype=jnp.int32)
    # rank: a row's place among the rows of its expert; tile_begin: an expert's first tile.
    small = rows <= _COMPARING_PLAN_MAX_ROWS
    if small:  # pairwise comparisons: a few fused reductions, no scan (decode)
        rank = jnp.sum((flat[:, None] == flat[None, :]) & (r[None, :] < r[:, None]), axis=1, dtype=jnp.int32)
        tile_begin = jnp.sum(jnp.where(experts[None, :] < experts[:, None], tiles[None, :], 0), axis=1)
    else:  # cumulative counts: linear in the rows (prefill)
        hot = onehot.astype(jnp.int32)
        rank = jnp.sum((jnp.cumsum(hot, axis=0) - 1) * hot, axis=1)
        tile_begin = jnp.cumsum(tiles) - tiles
    tile_end = tile_begin + tiles  # [E]
    row_pos = (jnp.sum(jnp.where(onehot, tile_begin[None, :], 0), axis=1) * block_m + rank).astype(jnp.int32)  # [R]
    if pads:
        row_pos = jnp.where(flat < num_experts, row_pos, n_tiles * block_m)  # no expert: past every tile
    if small:  # the inverse permutation by comparison: no scatter
        hit = row_pos[None, :] == p[:, None]  # [M_pad, R]
        row_token = m + jnp.sum(jnp.where(hit, r[None, :] // k - m, 0), axis=1, dtype=jnp.int32)
    else:
        row_token = jnp.full((n_tiles * block_m,), m, jnp.int32).at[row_pos].set(r // k, mode="drop" if pads else None)

    t = jnp.arange(n_tiles, dtype=jnp.int32)
    num_tiles = jnp.sum(tiles).astype(jnp.int32)
    tile_expert = jnp.sum((tile_end[None, :] <= t[:, None]).astype(jnp.int32), axis=1)  # [T]
    tile_expert = jnp.where(t < num_tiles, tile_expert, -1).astype(jnp.int32)
    return MoEPlan(row_pos, row_token, tile_expert, num_tiles)


# Decode sizes: the router's softmax, the top-k and the plan in one kernel (on a GPU, XLA
# makes eight kernels of them, and each costs the host a graph node to update and launch at
# every step; BENCHMARKS.md, "Session 7"). Up to this many tokens, a power of two.
ROUTE_MAX_TOKENS = 32


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def route_tiles(num_tokens: int, k: int, num_experts: int, block_m: int) -> int:
    """Tiles of route()'s plan: max_tiles rounded up to a power of two (a Triton block's
    length); the tiles past the used ones are pad tiles, as in any plan."""
    return _next_pow2(max_tiles(num_tokens * k, num_experts, block_m))


def _route_kernel(logits_ref, gates_ref, experts_ref, row_pos_ref, row_token_ref, tile_expert_ref,
                  num_tiles_ref, *, k: int, bm: int):
    """One program. logits [P, M, E] float32 (P partial sums, added first) -> gates,
    experts, row_pos [k, M] (row j: each token's j-th choice), row_token [T * bm],
    tile_expert [T], num_tiles [1]; make_plan's arrays for flat rows r = t * k + j,
    computed by comparisons (M, E and T powers of two)."""
    _, m, e = logits_ref.shape
    n_tiles = tile_expert_ref.shape[0]
    logits = jnp.sum(logits_ref[...], axis=0)  # [M, E]
    col = lax.broadcasted_iota(jnp.int32, (m, e), 1)
    tok = lax.broadcasted_iota(jnp.int32, (m, m), 0)  # [M, M]: this row's token t
    other = lax.broadcasted_iota(jnp.int32, (m, m), 1)  # the compared token t'
    expert_ids = lax.broadcasted_iota(jnp.int32, (e, e), 1)
    expert_rows = lax.broadcasted_iota(jnp.int32, (e, e), 0)
    # Softmax over the experts, float32 as the Router's; choices by logit (the same order as
    # by probability), ties to the lower index as lax.top_k.
    top = jnp.max(logits, axis=1, keepdims=True)
    p = jnp.exp(logits - top)
    p = p / jnp.sum(p, axis=1, keepdims=True)
    left = logits
    choices = []
    for j in range(k):
        best = jnp.max(left, axis=1, keepdims=True)
        idx = jnp.min(jnp.where(left == best, col, e), axis=1)  # [M]
        hit = col == idx[:, None]
        gates_ref[j, :] = jnp.sum(jnp.where(hit, p, 0.0), axis=1)
        experts_ref[j, :] = idx
        choices.append(idx)
        left = jnp.where(hit, -jnp.inf, left)
    # Rows per expert -> tiles per expert -> each expert's first tile (exclusive prefix sum).
    counts = sum(jnp.sum((c[:, None] == col).astype(jnp.int32), axis=0) for c in choices)  # [E]
    tiles = (counts + bm - 1) // bm
    begin = jnp.sum(jnp.where(expert_rows < expert_ids, tiles[:, None], 0), axis=0)  # [E]
    # A row's rank among its expert's rows: rows r' = t' k + j' before r = t k + j.
    slots = lax.broadcasted_iota(jnp.int32, (n_tiles * bm, m), 0)  # [M_pad, M]: padded row p
    token_of = lax.broadcasted_iota(jnp.int32, (n_tiles * bm, m), 1)
    row_token = jnp.zeros((n_tiles * bm,), jnp.int32)
    for j, cj in enumerate(choices):
        rank = jnp.zeros((m,), jnp.int32)
        for jj, cjj in enumerate(choices):
            before = (other < tok) | ((other == tok) & (jj < j))
            rank += jnp.sum(((cj[:, None] == cjj[None, :]) & before).astype(jnp.int32), axis=1)
        pos = jnp.sum(jnp.where(col == cj[:, None], begin[None, :], 0), axis=1) * bm + rank  # [M]
        row_pos_ref[j, :] = pos
        row_token += jnp.sum(jnp.where(slots == pos[None, :], token_of - m, 0), axis=1)
    row_token_ref[...] = row_token + m  # m: a pad row
    total = jnp.sum(tiles)
    t = lax.broadcasted_iota(jnp.int32, (n_tiles, e), 0)
    tile_end = (begin + tiles)[None, :]
    tile_expert = jnp.sum((tile_end <= t).astype(jnp.int32), axis=1)  # [T]
    tile_expert_ref[...] = jnp.where(lax.broadcasted_iota(jnp.int32, (n_tiles,), 0) < total, tile_expert, -1)
    num_tiles_ref[...] = jnp.full((1,), total, jnp.int32)


def route_fuses(num_tokens: int, num_experts: int, block_m: int, backend: str = "auto") -> bool:
    """Whether route() runs as one kernel here: a Pallas backend, and powers of two with
    at most ROUTE_MAX_TOKENS tokens (decode sizes)."""
    pow2 = all(n == _next_pow2(n) for n in (num_tokens, num_experts, block_m))
    return uses_pallas(backend) and pow2 and num_tokens <= ROUTE_MAX_TOKENS


def route(logits: jax.Array, k: int, block_m: int, backend: str = "auto") -> tuple[jax.Array, jax.Array, MoEPlan]:
    """Router logits [M, E] float32, or [P, M, E] partial sums of them (residual_norm's) ->
    (gates [M, k] float32: the top-k softmax probabilities, not renormalised; experts [M, k]
    int32; the plan of make_plan(experts, E, block_m), with route_tiles tiles), in one
    kernel where uses_pallas(backend) and M is a power of two up to ROUTE_MAX_TOKENS; else
    softmax, lax.top_k and make_plan in plain JAX."""
    if logits.ndim not in (2, 3):
        raise ValueError(f"route: logits must be [tokens, experts] or [parts, tokens, experts], found shape "
                         f"{tuple(logits.shape)}.")
    parts = logits.astype(jnp.float32).reshape(-1, *logits.shape[-2:])  # [P, M, E]
    m, e = parts.shape[1:]
    if k < 1 or k > e:
        raise ValueError(f"route: need 1 <= k <= experts ({e}), got k={k}.")
    if not route_fuses(m, e, block_m, backend):
        gates, experts = lax.top_k(jax.nn.softmax(jnp.sum(parts, axis=0), axis=-1), k)
        experts = experts.astype(jnp.int32)
        return gates, experts, make_plan(experts, e, block_m)
    interpret = _resolve_backend(backend) == "interpret"
    gates, experts, row_pos, row_token, tile_expert, num_tiles = _route_call(
        parts, k=k, block_m=block_m, n_tiles=route_tiles(m, k, e, block_m), interpret=interpret)
    plan = MoEPlan(row_pos.T.reshape(m * k), row_token, tile_expert, num_tiles.reshape(()))
    return gates.T, experts.T, plan


# Jitted, as every kernel call here: a model's 64 identical calls are traced and lowered once.
@functools.partial(jax.jit, static_argnames=("k", "block_m", "n_tiles", "interpret"))
def _route_call(logits: jax.Array, *, k: int, block_m: int, n_tiles: int, interpret: bool) -> tuple:
    """The route kernel: [P, M, E] float32 -> gates, experts, row_pos [k, M]; row_token, tile_expert, num_tiles."""
    m = logits.shape[1]
    i32 = jnp.int32
    shapes = (jax.ShapeDtypeStruct((k, m), jnp.float32), jax.ShapeDtypeStruct((k, m), i32),
              jax.ShapeDtypeStruct((k, m), i32), jax.ShapeDtypeStruct((n_tiles * block_m,), i32),
              jax.ShapeDtypeStruct((n_tiles,), i32), jax.ShapeDtypeStruct((1,), i32))
    return pl.pallas_call(
        functools.partial(_route_kernel, k=k, bm=block_m), out_shape=shapes,
        interpret=interpret, name="moe_route", **_compiler_params(4, 1, interpret),
    )(logits)


def dispatch(x: jax.Array, plan: MoEPlan) -> jax.Array:
    """Rows of x [M, D] in plan order -> [M_pad, D]; pad rows are zero."""
    if x.ndim != 2:
        raise ValueError(f"dispatch: x must be [tokens, D], found shape {tuple(x.shape)}.")
    return jnp.take(x, plan.row_token, axis=0, mode="fill", fill_value=0)


def combine(ys: jax.Array, gates: jax.Array, plan: MoEPlan, out_dtype=None, pads: bool = False) -> jax.Array:
    """out[t] = sum_j gates[t, j] * ys[row of (t, j)]: [M_pad, D], [M, k] -> [M, D].

    Gates are used as given (Grok-1 does not renormalise the top-k probabilities); the sum
    is taken in float32. The result has out_dtype; None: bf16, or float32 when ys is float32.
    pads: the plan was made with pads=True; a row without an expert reads zeros.
    """
    m, k = gates.shape
    if m * k != plan.row_pos.shape[0]:
        raise ValueError(
            f"combine: gates {tuple(gates.shape)} do not match the plan's {plan.row_pos.shape[0]} rows."
        )
    fill = dict(mode="fill", fill_value=0) if pads else {}  # a row past the tiles reads zeros
    rows = jnp.take(ys, plan.row_pos, axis=0, **fill).reshape(m, k, ys.shape[-1]).astype(jnp.float32)
    if out_dtype is None:
        out_dtype = jnp.float32 if ys.dtype == jnp.float32 else jnp.bfloat16
    return jnp.sum(gates.astype(jnp.float32)[..., None] * rows, axis=1).astype(out_dtype)


# ---------------------------------------------------------------------------------------
# Kernel configuration
# ---------------------------------------------------------------------------------------


class KernelConfig(NamedTuple):
    """Tiling of one Pallas matmul kernel; sizes are upper bounds (powers of two).

    block_n / block_k: output columns per program and rows of K per loop step (each is cut
    down to the largest power of two dividing the dimension / scale block).
    split_k: programs that share one output tile, each summing a slice of K (float32
    partial results summed afterwards); puts more programs in flight for decode.
    dequant: int8 -> bf16 conversion: "cast" (plain convert), "bits" (float32 exponent
    trick in plain ops), "asm" (the same trick in PTX, 4 values per instruction group).
    """

    block_n: int = 128
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    dequant: str = "cast"


# Tilings measured on an H200 (2026-11-30, jax 0.11.2; BENCHMARKS.md). Keys: (op, phase,
# transposed). With the checkpoint's [K, N] layout the decode kernels peaked at 65-68% of the
# copy bandwidth whatever the tiling (35 gated, 40 down, 30 dense tilings per shape swept;
# the PTX int8 conversion gained 2%): the int8 tile has to be re-read byte by byte into the
# MMA's operand layout. Stored [N, K] the same kernels read 99% (gated, block_n 64, block_k
# 256) and 88% (down, split-K 4). Dense decode projections are latency-bound: many K slices
# keep the SMs busy. Prefill tilings are the H100's (2026-11-28). split_k=0: pick by size.
_TUNED = {
    ("gated", "decode", False): KernelConfig(block_n=128, block_k=64, num_warps=4, num_stages=4, dequant="asm"),
    ("gated", "decode", True): KernelConfig(block_n=64, block_k=256, num_warps=4, num_stages=3, dequant="cast"),
    ("down", "decode", False): KernelConfig(block_n=128, block_k=128, split_k=0, num_warps=4, num_stages=3),
    ("down", "decode", True): KernelConfig(block_n=128, block_k=128, split_k=0, num_warps=4, num_stages=3),
    ("dense", "decode", False): KernelConfig(block_n=128, block_k=256, split_k=0, num_warps=4, num_stages=4),
    ("dense", "decode", True): KernelConfig(block_n=128, block_k=128, split_k=0, num_warps=4, num_stages=3),
}
for _op in ("gated", "down", "dense"):
    for _layout in (False, True):
        _TUNED[(_op, "prefill", _layout)] = KernelConfig(block_n=128, block_k=64, split_k=1, num_warps=4, num_stages=3)
# Smallest K slice per program when split_k is picked by size: the MoE's long K walks keep
# 1024 rows, the small dense projections go down to 256.
_MIN_SPLIT_ROWS = {"gated": 1024, "down": 1024, "dense": 256}
_DENSE_PALLAS_MAX_ROWS = 8  # int8_matmul "auto": Pallas below this many rows, XLA from it on
_NUM_SMS = 132  # H100/H200; only used to choose split_k when it is left at 0 (auto).


def default_config(op: str, block_m: int, n_tiles: int, k: int, n: int, transposed: bool = False) -> KernelConfig:
    """A tuned config for op ("gated", "down" or "dense") at this size and weight layout;
    split_k=0 in the table means 'pick by size': enough programs for two per SM, K slices
    of at least _MIN_SPLIT_ROWS[op] rows. The gated decode kernel halves its column blocks
    (down to 32) while it has fewer programs than SMs."""
    phase = "decode" if block_m <= 32 else "prefill"
    cfg = tuned = _TUNED[(op, phase, transposed)]
    if op == "gated" and phase == "decode":
        # The gelu needs whole sums (no split-K), so when fewer programs than SMs would run,
        # narrower column blocks are what fills the SMs. One device's share of 8 at batch 1
        # (2 tiles, 128 programs of 64 columns) took 30.7 us per layer, and 28.8 with 32
        # columns. The share of 4 (256 programs) was slower with 32 (52.2 against 51.4 us),
        # so only idle SMs narrow them (1 x H200, BENCHMARKS.md session 10). A narrower tile
        # keeps one more stage of loads in flight per halving: 28.5 -> 28.0 us (session 12).
        while n_tiles * (n // cfg.block_n) < _NUM_SMS and cfg.block_n > 32 and n % (cfg.block_n // 2) == 0:
            cfg = cfg._replace(block_n=cfg.block_n // 2, num_stages=cfg.num_stages + 1)
    if cfg.split_k == 0:
        cfg = cfg._replace(split_k=_auto_split(op, n_tiles * max(1, n // cfg.block_n), k))
    if op == "dense" and phase == "decode":
        # The K slices stop at _MIN_SPLIT_ROWS, so a small projection can still leave SMs idle:
        # one device's share of 8 ran q/k/v [6144 -> 1024] as 8 column blocks x 16 slices and
        # the output projection [768 -> 6144] as 48 x 2 (128 and 96 programs on 132 SMs).
        # With 64 columns (256 and 192 programs) they took 4.9 and 4.5 us against 5.3 and
        # 5.1 (1 x H200, BENCHMARKS.md session 12); one GPU and the shares of 2 and 4 keep
        # their tilings.
        while (n_tiles * (n // cfg.block_n) * cfg.split_k < _NUM_SMS and cfg.block_n > 32
               and n % (cfg.block_n // 2) == 0):
            cfg = cfg._replace(block_n=cfg.block_n // 2)
            if tuned.split_k == 0:  # more column blocks may need fewer K slices
                cfg = cfg._replace(split_k=_auto_split(op, n_tiles * (n // cfg.block_n), k))
    return cfg


def _auto_split(op: str, programs: int, k: int) -> int:
    """K slices per output tile: double them while fewer than two programs per SM would run
    and each slice keeps at least _MIN_SPLIT_ROWS[op] rows of K."""
    split, rows = 1, _MIN_SPLIT_ROWS[op]
    while programs * split < 2 * _NUM_SMS and k // (split * 2) >= rows and k % (split * 2) == 0:
        split *= 2
    return split


# ---------------------------------------------------------------------------------------
# Pallas kernel (Triton backend): one tile of block_m rows x block_n columns per program
# ---------------------------------------------------------------------------------------

# int8 x4 (one 32-bit register) -> bf16 x4 (two registers) without the slow int->float
# converter: put each biased byte u = v + 128 in the mantissa of 2^23 (bits 0x4B0000uu),
# subtract 2^23 + 128 in float32 (exact), keep the top 16 bits (exact: |v| <= 128).
_S8_TO_BF16_PTX = """{
.reg .b32 a, m, r0, r1, r2, r3;
xor.b32 a, $2, 0x80808080;
mov.b32 m, 0x4B000000;
prmt.b32 r0, a, m, 0x7540;
prmt.b32 r1, a, m, 0x7541;
prmt.b32 r2, a, m, 0x7542;
prmt.b32 r3, a, m, 0x7543;
sub.f32 r0, r0, 0f4B000080;
sub.f32 r1, r1, 0f4B000080;
sub.f32 r2, r2, 0f4B000080;
sub.f32 r3, r3, 0f4B000080;
prmt.b32 $0, r0, r1, 0x7632;
prmt.b32 $1, r2, r3, 0x7632;
}"""


def _dequant(w: jax.Array, mode: str) -> jax.Array:
    """int8 tile -> bf16 tile of the same integer values (scales come later)."""
    if w.dtype != jnp.int8 or mode == "cast":
        return w.astype(jnp.bfloat16)
    if mode == "bits":
        u = (w.astype(jnp.int32) + 128) | 0x4B000000  # float32 bits of 2^23 + v + 128
        return (lax.bitcast_convert_type(u, jnp.float32) - 8388736.0).astype(jnp.bfloat16)
    if mode == "asm":
        [out] = plgpu.elementwise_inline_asm(
            _S8_TO_BF16_PTX, args=[w], constraints="=r,=r,r", pack=4,
            result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, jnp.bfloat16)])
        return out
    raise ValueError(f"dequant mode {mode!r} not in {DEQUANT_MODES}")


def _gelu_tanh(a: jax.Array) -> jax.Array:
    return 0.5 * a * (1.0 + jnp.tanh(0.7978845608028654 * (a + 0.044715 * a * a * a)))


def _moe_kernel(tile_expert_ref, x_ref, *refs, n_mats, bm, bn, bk, k_dim, nb, split, dequant,
                gated, transposed, col_blocks=None, hi_lo=False, num_rows=None, one_token=False):
    """One program: rows of tile i, columns block j, K slice s; loops over K in bk steps.

    x_ref: [M_pad, K] bf16, or float32 with hi_lo (each x chunk is split into bf16 hi + lo
    and both are multiplied by the same int8 tile: the weights are read once).
    refs: (w, scales) per matrix ([E, K, N] int8, or [E, N, K] when transposed; [E, nb, N]
    bf16), then the output block.
    K is walked in segments that never cross a scale block; each segment's float32 sum is
    multiplied by its block's scales and added to the result. Tiles past the used ones
    (tile_expert < 0) skip all loads and write zeros.
    col_blocks (not gated): the matrices sit side by side in the output, matrix t owning
    col_blocks[t] column blocks; each program reads only the matrix of its own columns.
    num_rows: x and the output (then the whole array, [M, N] or [split, M, N]) hold only
    this many rows, fewer than the tiles': the rows past them are masked off on load and on
    store, so nobody pads x or slices the result (a decode step's dense projections).
    one_token: tile i is the token's i-th expert and holds just its row (moe_one_token).
    Gated, every tile reads x [1, K] and writes row i of [T, N]; else tile i reads row i of
    x [T, K] and writes its K slice s, times the gate gates[i] (a ref after the matrices),
    to row 0 of part i * split + s of [T * split, 1, N].
    """
    mats = [(refs[2 * t], refs[2 * t + 1]) for t in range(n_mats)]
    gate_ref = refs[2 * n_mats] if one_token and not gated else None
    o_ref = refs[-1]
    i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e = tile_expert_ref[i]
    e_safe = jnp.maximum(e, 0)
    rows = pl.ds(pl.multiple_of(i * bm, bm), bm)
    real = None if num_rows is None else (i * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)) < num_rows
    if one_token:  # one real row per tile, the first of its block
        rows = pl.ds(0 if gated else i, bm)
        real = lax.broadcasted_iota(jnp.int32, (bm, 1), 0) < 1

    def store(value):
        """This program's [bm, bn] result into its place in the output."""
        if real is None:
            o_ref[...] = value.astype(o_ref.dtype)
            return
        cols = pl.ds(pl.multiple_of(j * bn, bn), bn)
        if one_token and gated:
            target = o_ref.at[pl.ds(i, bm), cols]
        elif one_token:
            target = o_ref.at[i * split + s, pl.ds(0, bm), cols]
            value = value * gate_ref[i]
        else:
            target = o_ref.at[rows, cols] if split == 1 else o_ref.at[s, rows, cols]
        plgpu.store(target, value.astype(o_ref.dtype), mask=real)

    kb = k_dim // nb  # rows per scale block
    ks = k_dim // split  # rows per K slice
    seg = math.gcd(kb, ks)  # segment: inside one slice and one scale block
    n_seg, n_chunk = ks // seg, seg // bk
    k_base = s * ks

    def accumulate(mats, j):
        """The float32 sums of x's tile times columns block j of each matrix in mats."""
        cols = pl.ds(pl.multiple_of(j * bn, bn), bn)
        zeros = tuple(jnp.zeros((bm, bn), jnp.float32) for _ in mats)

        def chunk(c, part, seg_start):
            k0 = pl.multiple_of(seg_start + c * bk, bk)
            if real is None:
                x = x_ref[rows, pl.ds(k0, bk)]  # [bm, bk] bf16 (float32 with hi_lo)
            else:
                x = plgpu.load(x_ref.at[rows, pl.ds(k0, bk)], mask=real, other=0)
            xs = split_bf16(x) if hi_lo else (x,)
            out = []
            for (w_ref, _), p in zip(mats, part):
                if transposed:
                    w = _dequant(w_ref[e_safe, cols, pl.ds(k0, bk)], dequant).T  # [bk, bn] view of [bn, bk]
                else:
                    w = _dequant(w_ref[e_safe, pl.ds(k0, bk), cols], dequant)  # [bk, bn] bf16
                for xp in xs:
                    p = p + jnp.dot(xp, w, preferred_element_type=jnp.float32)
                out.append(p)
            return tuple(out)

        def scaled(part, seg_start):
            b = seg_start // kb
            return tuple(p * sc_ref[e_safe, b, cols].astype(jnp.float32)[None, :]
                         for (_, sc_ref), p in zip(mats, part))

        # Trip counts are n * valid, not jnp.where(valid, n, 0): the Triton lowering of a select
        # between two literals builds an i1 select and truncates the count.
        valid = (e >= 0).astype(jnp.int32)
        if n_seg == 1:
            trips = n_chunk * valid
            part = lax.fori_loop(0, trips, lambda c, p: chunk(c, p, k_base), zeros)
            return scaled(part, k_base)

        def segment(g, acc):
            seg_start = k_base + g * seg
            part = lax.fori_loop(0, n_chunk, lambda c, p: chunk(c, p, seg_start), zeros)
            return tuple(a + p for a, p in zip(acc, scaled(part, seg_start)))

        return lax.fori_loop(0, n_seg * valid, segment, zeros)

    if col_blocks is None:
        acc = accumulate(mats, j)
        store(_gelu_tanh(acc[0]) * acc[1] if gated else acc[0])
        return
    begin = 0
    for mat, blocks in zip(mats, col_blocks):  # one branch runs: the matrix of block j
        @pl.when((j >= begin) & (j < begin + blocks))
        def _(mat=mat, begin=begin):
            store(accumulate([mat], j - begin)[0])
        begin += blocks


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap that divides n."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def _check_weight(name: str, weight: jax.Array, scales: jax.Array, expert_dim: bool,
                  transposed: bool = False) -> tuple[int, int]:
    """(K, N) of a weight [..., K, N] ([..., N, K] when transposed) with scales [..., nb, N]."""
    want = 3 if expert_dim else 2
    layout = "N, K" if transposed else "K, N"
    if weight.ndim != want or scales.ndim != want:
        raise ValueError(
            f"{name}: expected weight [{'E, ' if expert_dim else ''}{layout}] and scales "
            f"[{'E, ' if expert_dim else ''}nb, N], found {tuple(weight.shape)} and {tuple(scales.shape)}."
        )
    n, k = weight.shape[-2:] if transposed else weight.shape[-2:][::-1]
    nb = scales.shape[-2]
    if scales.shape[-1] != n or weight.shape[:-2] != scales.shape[:-2] or k % nb:
        raise ValueError(
            f"{name}: scales {tuple(scales.shape)} do not fit weight {tuple(weight.shape)} ([..., {layout}]): "
            f"need scales [..., nb, N] with nb dividing K={k} (rows [b*K/nb, (b+1)*K/nb) use block b)."
        )
    return k, n


def _pallas_tiling(xs_rows: int, n_tiles: int, k_dim: int, n_dim: int, nb: int,
                   cfg: KernelConfig, interpret: bool, max_elements: int = 0
                   ) -> tuple[int, int, int, int]:
    """(bm, bn, bk, split) for the Pallas kernel, or ValueError if these shapes can't tile."""
    bm = xs_rows // n_tiles
    split = max(1, cfg.split_k)
    while split > 1 and k_dim % split:
        split //= 2
    seg = math.gcd(k_dim // nb, k_dim // split)
    bk = _pow2_divisor(seg, cfg.block_k)
    bn = _pow2_divisor(n_dim, cfg.block_n)
    minimum = 1 if interpret else 16  # Triton's dot needs every side >= 16
    if max_elements >= 2**31:
        raise ValueError(
            f"Pallas int8 matmul indexes with int32 offsets; an operand has {max_elements} "
            f"elements (>= 2^31). Split the weight (e.g. shard it) or use backend='xla'."
        )
    if bm & (bm - 1) or min(bm, bn, bk) < minimum:
        raise ValueError(
            f"Pallas int8 matmul cannot tile rows-per-tile={bm} (a power of two >= {minimum}), "
            f"N={n_dim} (needs a power-of-two divisor >= {minimum}, found {bn}) or scale-block "
            f"segment K={seg} (power-of-two divisor found {bk}); use backend='xla' or pad."
        )
    return bm, bn, bk, split


def _fits_pallas(backend: str, xs_rows: int, n_tiles: int, k_dim: int, n_dim: int, nb: int,
                 cfg: KernelConfig, interpret: bool, max_elements: int) -> bool:
    """True if the Pallas kernel can tile these shapes; False lets "auto" fall back to XLA,
    any other backend gets the ValueError that says why."""
    try:
        _pallas_tiling(xs_rows, n_tiles, k_dim, n_dim, nb, cfg, interpret, max_elements)
        return True
    except ValueError:
        if backend != "auto":
            raise
        return False


# Jitted so that identical kernel calls (the same layer, 64 times) are traced and lowered
# once: a model's lowering then grows with its distinct kernels, not with its depth.
@functools.partial(jax.jit, static_argnames=("gated", "cfg", "interpret", "out_dtype", "name", "transposed",
                                             "side_by_side", "block_m", "partial_sums", "one_token"))
def _pallas_matmul(xs: jax.Array, mats: Sequence[tuple[jax.Array, jax.Array]],
                   tile_expert: jax.Array, *, gated: bool, cfg: KernelConfig, interpret: bool,
                   out_dtype, name: Optional[str] = None, transposed: bool = False,
                   side_by_side: bool = False, block_m: Optional[int] = None,
                   partial_sums: bool = False, one_token: bool = False,
                   gates: Optional[jax.Array] = None) -> jax.Array:
    """xs [M_pad, K] times per-tile expert matrices -> [M_pad, N] (gated: gelu(a) * b).

    A float32 xs is used unrounded (split into bf16 hi + lo in the kernel); other dtypes
    are cast to bf16. side_by_side: the matrices' products are concatenated along N
    ([M_pad, N_1 + N_2 + ...]), one launch for what would be one per matrix (q, k and v).
    block_m: rows per tile, where xs holds fewer rows M than the tiles (M_pad = tiles *
    block_m): the kernel masks the rest off, and the result has xs's M rows.
    partial_sums (not gated): the float32 sums of the K slices, [S, M_pad, N], are returned
    as they are, for the next kernel to add.
    one_token: the tiles are one token's experts (tile_expert; _moe_kernel's one_token),
    with block_m: gated, xs [1, K] -> [T, N]; else xs [T, K] and gates [T] float32 -> the
    gate-weighted float32 sums [T * S, 1, N] of each tile's K slices.
    """
    num_rows, k_dim = xs.shape
    m_pad = tile_expert.shape[0] * block_m if block_m else num_rows
    masked = num_rows < m_pad
    w0, s0 = mats[0]
    widths = [w.shape[1] if transposed else w.shape[2] for w, _ in mats]
    nb = s0.shape[-2]
    for w, s in mats[1:]:
        same = w.shape[:-2] == w0.shape[:-2] and (w.shape == w0.shape or side_by_side)
        if not same or s.shape[-2] != nb:
            # The matrices share the K walk; give them one scale layout.
            raise ValueError(f"fused weights differ: {w0.shape}/{s0.shape} vs {w.shape}/{s.shape}")
    n_dim = sum(widths) if side_by_side else widths[0]
    n_tiles = tile_expert.shape[0]
    if gated:
        cfg = cfg._replace(split_k=1)  # the gelu needs whole sums
    bm, bn, bk, split = _pallas_tiling(m_pad, n_tiles, k_dim, math.gcd(*widths), nb, cfg, interpret)
    dequant = cfg.dequant
    if interpret and dequant == "asm":
        dequant = "bits"  # same arithmetic, no PTX on the CPU
    hi_lo = xs.dtype == jnp.float32

    kernel = functools.partial(
        _moe_kernel, n_mats=len(mats), bm=bm, bn=bn, bk=bk, k_dim=k_dim, nb=nb, split=split,
        dequant=dequant, gated=gated, transposed=transposed, hi_lo=hi_lo,
        col_blocks=tuple(n // bn for n in widths) if side_by_side else None,
        num_rows=num_rows if masked else None, one_token=one_token)
    if one_token:
        out_shape = (jax.ShapeDtypeStruct((n_tiles, n_dim), out_dtype) if gated
                     else jax.ShapeDtypeStruct((n_tiles * split, 1, n_dim), jnp.float32))
        out_spec = _WHOLE_ARRAY
    elif split == 1:
        out_shape = jax.ShapeDtypeStruct((num_rows, n_dim), out_dtype)
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((split, num_rows, n_dim), jnp.float32)
        out_spec = pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j))
    if masked:
        out_spec = _WHOLE_ARRAY  # the kernel places its block and masks the rows past num_rows
    params = _compiler_params(cfg.num_warps, cfg.num_stages, interpret)
    flat = [a for pair in mats for a in pair]
    if one_token and not gated:
        flat.append(gates.astype(jnp.float32))
    out = pl.pallas_call(
        kernel,
        grid=(n_tiles, n_dim // bn, split),
        in_specs=[_WHOLE_ARRAY] * (2 + len(flat)),
        out_specs=out_spec,
        out_shape=out_shape,
        interpret=interpret,
        name=name or ("int8_gated_matmul" if gated else "int8_grouped_matmul"),
        **params,
    )(tile_expert.astype(jnp.int32), xs if hi_lo else xs.astype(jnp.bfloat16), *flat)
    if one_token:
        return out
    if partial_sums:
        return out if split > 1 else out[None].astype(jnp.float32)
    if split > 1:
        out = jnp.sum(out, axis=0).astype(out_dtype)
    return out


# ---------------------------------------------------------------------------------------
# Plain-XLA fallback
# ---------------------------------------------------------------------------------------


def _block_scaled_dot(x: jax.Array, w: jax.Array, s: jax.Array, transposed: bool = False) -> jax.Array:
    """x [m, K] @ (w [K, N] int8, or [N, K] when transposed, with scales [nb, N]) -> float32
    [m, N], no dequantized copy.

    One dot per scale block (batched), int8 converted inside the dot's operand, the block
    results scaled and summed. A float32 x is used unrounded: float32 math on the CPU, the
    hi/lo split (2m bf16 rows against the same weight) elsewhere.
    """
    m, k = x.shape
    nb, n = s.shape
    split = _xla_split(x)
    if split:
        x = jnp.concatenate(split_bf16(x), axis=0)  # [2m, K]: hi rows, then lo rows
    compute = jnp.float32 if x.dtype == jnp.float32 else jnp.bfloat16  # float32 in, float32 math
    xb = x.astype(compute).reshape(x.shape[0], nb, k // nb)
    if transposed:
        wb = w.reshape(n, nb, k // nb).astype(compute)
        y = jnp.einsum("mbk,nbk->bmn", xb, wb, preferred_element_type=jnp.float32)  # [nb, m, N]
    else:
        wb = w.reshape(nb, k // nb, n).astype(compute)
        y = jnp.einsum("mbk,bkn->bmn", xb, wb, preferred_element_type=jnp.float32)
    if split:
        y = y[:, :m] + y[:, m:]
    return jnp.sum(y * s.astype(jnp.float32)[:, None, :], axis=0)


def _xla_grouped(xs: jax.Array, mats: Sequence[tuple[jax.Array, jax.Array]], plan: MoEPlan, *,
                 gated: bool, out_dtype, transposed: bool = False) -> jax.Array:
    """Loop over the used tiles; each reads only its own expert's weights."""
    n_tiles = plan.tile_expert.shape[0]
    bm = plan.block_m
    n_dim = mats[0][1].shape[-1]
    xt = xs.reshape(n_tiles, bm, xs.shape[-1])

    def body(t, out):
        e = jnp.maximum(plan.tile_expert[t], 0)
        x = xt[t]  # [bm, K]
        ys = [_block_scaled_dot(x, w[e], s[e], transposed) for w, s in mats]
        y = _gelu_tanh(ys[0]) * ys[1] if gated else ys[0]
        return out.at[t].set(y.astype(out_dtype))

    out = jnp.zeros((n_tiles, bm, n_dim), out_dtype)
    out = lax.fori_loop(0, plan.num_tiles, body, out)
    return out.reshape(n_tiles * bm, n_dim)


# ---------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------


_AUTO_BACKEND: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("kernels_auto_backend", default=None)


@contextlib.contextmanager
def auto_backend(backend: str):
    """Within this block (while tracing), "auto" means `backend`: e.g. "interpret" runs a
    whole model's Pallas paths on a CPU, as tests do."""
    if backend not in BACKENDS[1:]:
        raise ValueError(f"auto_backend: backend must be one of {BACKENDS[1:]}, got {backend!r}.")
    token = _AUTO_BACKEND.set(backend)
    try:
        yield
    finally:
        _AUTO_BACKEND.reset(token)


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend == "auto":
        return _AUTO_BACKEND.get() or ("pallas" if jax.default_backend() == "gpu" else "xla")
    return backend


def uses_pallas(backend: str = "auto") -> bool:
    """True if `backend` resolves to a Pallas kernel here (on a GPU, or interpreted)."""
    return _resolve_backend(backend) != "xla"


def _grouped(xs, mats, plan, *, gated, backend, config, out_dtype, name, transposed):
    for t, (w, s) in enumerate(mats):
        k_dim, n_dim = _check_weight(f"{name} matrix {t}", w, s, expert_dim=True, transposed=transposed)
        if k_dim != xs.shape[-1]:
            raise ValueError(f"{name}: xs {tuple(xs.shape)} does not match weight {tuple(w.shape)} (K).")
    if xs.ndim != 2 or xs.shape[0] != plan.num_padded_rows:
        raise ValueError(
            f"{name}: xs must be [M_pad={plan.num_padded_rows}, K] from dispatch(), found {tuple(xs.shape)}."
        )
    resolved = _resolve_backend(backend)
    if resolved != "xla":
        w0, s0 = mats[0]
        cfg = config or default_config("gated" if gated else "down", plan.block_m, plan.tile_expert.shape[0],
                                       k_dim, n_dim, transposed)
        if gated:
            cfg = cfg._replace(split_k=1)  # the gelu needs whole sums
        interpret = resolved == "interpret"
        biggest = max(w0.size, xs.size, xs.shape[0] * n_dim * max(1, cfg.split_k))
        if _fits_pallas(backend, xs.shape[0], plan.tile_expert.shape[0], k_dim, n_dim, s0.shape[-2], cfg,
                        interpret, biggest):
            return _pallas_matmul(xs, mats, plan.tile_expert, gated=gated, cfg=cfg,
                                  interpret=interpret, out_dtype=out_dtype, transposed=transposed)
    return _xla_grouped(xs, mats, plan, gated=gated, out_dtype=out_dtype, transposed=transposed)


def grouped_matmul(xs: jax.Array, weight: jax.Array, scales: jax.Array, plan: MoEPlan, *,
                   backend: str = "auto", config: Optional[KernelConfig] = None,
                   out_dtype=jnp.bfloat16, transposed: bool = False) -> jax.Array:
    """Per-tile expert matmul: xs [M_pad, K] x weight [E, K, N] int8 (scales [E, nb, N]);
    weight [E, N, K] when transposed.

    Each tile of plan.block_m rows is multiplied by its expert's matrix, float32
    accumulation, scales applied per K block; pad tiles give zeros and read no weights.
    Returns [M_pad, N] in out_dtype (bf16 by default). xs: bf16, or float32 used unrounded
    (see the module docstring).
    """
    return _grouped(xs, [(weight, scales)], plan, gated=False, backend=backend, config=config,
                    out_dtype=out_dtype, name="grouped_matmul", transposed=transposed)


def grouped_matmul_gated(xs: jax.Array, w: jax.Array, w_scales: jax.Array, v: jax.Array,
                         v_scales: jax.Array, plan: MoEPlan, *, backend: str = "auto",
                         config: Optional[KernelConfig] = None, out_dtype=jnp.bfloat16,
                         transposed: bool = False) -> jax.Array:
    """Fused expert input layer: gelu_tanh(xs @ W) * (xs @ V) -> [M_pad, F], reading xs once.

    W, V int8 [E, K, F] ([E, F, K] when transposed) with scales [E, nb, F]; both products
    are summed in float32 and scaled before the tanh-approximated gelu. xs: bf16, or
    float32 used unrounded (see the module docstring).
    """
    return _grouped(xs, [(w, w_scales), (v, v_scales)], plan, gated=True, backend=backend,
                    config=config, out_dtype=out_dtype, name="grouped_matmul_gated", transposed=transposed)


def int8_matmul(x: jax.Array, weight: jax.Array, scales: jax.Array, *, backend: str = "auto",
                config: Optional[KernelConfig] = None, out_dtype=jnp.bfloat16,
                transposed: bool = False) -> jax.Array:
    """Dense x [..., K] @ weight [K, N] int8 ([N, K] when transposed) with block scales
    [nb, N] -> [..., N].

    Leading dimensions of x are kept. The int8 weight is converted tile by tile inside the
    matmul; each scale block's float32 partial result is scaled and summed. x: bf16, or
    float32 used unrounded (see the module docstring).

    backend="auto" on GPU takes the Pallas kernel for fewer than 8 rows and XLA's fused
    int8 dot otherwise: for a [6144, 6144] weight on an H100, Pallas took 26.5 us at M=1
    against XLA's 121 us, while XLA was faster at M=8 (19.8 vs 26.6 us) and M=32 (25.7 vs
    30.7 us).
    """
    [y] = int8_matmuls(x, [(weight, scales)], backend=backend, config=config, out_dtype=out_dtype,
                       transposed=transposed)
    return y


def int8_matmuls(x: jax.Array, weights: Sequence[tuple[jax.Array, jax.Array]], *, backend: str = "auto",
                 config: Optional[KernelConfig] = None, out_dtype=jnp.bfloat16,
                 transposed: bool = False, partial_sums: bool = False, joined: bool = False) -> list[jax.Array]:
    """x [..., K] times several int8 weights (weight, scales) as in int8_matmul -> one
    [..., N_t] per weight.

    On the Pallas path they run as one kernel launch (attention's q, k and v: one launch
    and one split-K sum instead of three of each); they must share K and the number of
    scale blocks. partial_sums: return float32 [S, ..., N_t], the products of S slices of K
    whose sum is the result (S = 1 off the Pallas path), so that the kernel that takes them
    adds them (kernels.residual_norm) and no kernel of its own does. joined: one result, the
    products side by side [..., N_1 + N_2 + ...], as the kernel writes them (no slices).
    """
    *lead, k_dim = x.shape
    widths = []
    for t, (weight, scales) in enumerate(weights):
        k_w, n_t = _check_weight(f"int8_matmul weight {t}", weight, scales, expert_dim=False, transposed=transposed)
        if k_dim != k_w:
            raise ValueError(f"int8_matmul: x {tuple(x.shape)} does not match weight {t} {tuple(weight.shape)} (K).")
        widths.append(n_t)
    m = math.prod(lead)
    x2 = x.reshape(m, k_dim)
    if partial_sums:
        out_dtype = jnp.float32
    resolved = _resolve_backend(backend)
    if backend == "auto" and m >= _DENSE_PALLAS_MAX_ROWS:
        resolved = "xla"
    nbs = {s.shape[0] for _, s in weights}
    if resolved != "xla" and m > 0 and (len(nbs) == 1 or backend != "auto"):
        bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 512 else 128
        n_tiles = -(-m // bm)
        cfg = config or default_config("dense", bm, n_tiles, k_dim, sum(widths), transposed)
        interpret = resolved == "interpret"
        biggest = max(max(w.size for w, _ in weights), n_tiles * bm * max(k_dim, sum(widths) * max(1, cfg.split_k)))
        if _fits_pallas(backend, n_tiles * bm, n_tiles, k_dim, math.gcd(*widths), weights[0][1].shape[0], cfg,
                        interpret, biggest):
            # x goes in unpadded and the kernel masks the rows past m: no pad before it and
            # no slice of pad rows after it (two kernels of a decode step fewer per call).
            # Builds without Triton's masked loads get the rows padded.
            xp, block_m = x2, bm
            if plgpu is None:  # pragma: no cover
                xp, block_m = jnp.pad(x2, ((0, n_tiles * bm - m), (0, 0))), None
            y = _pallas_matmul(xp, [(w[None], s[None]) for w, s in weights], jnp.zeros((n_tiles,), jnp.int32),
                               gated=False, cfg=cfg, interpret=interpret, out_dtype=out_dtype,
                               name="int8_dense_matmul", transposed=transposed, side_by_side=True,
                               block_m=block_m, partial_sums=partial_sums)
            ends = list(itertools.accumulate(widths))
            if joined:
                y = y[..., :m, :]  # no-op but where the rows were padded
                return [y.reshape(-1, *lead, ends[-1]) if partial_sums else y.reshape(*lead, ends[-1])]
            if partial_sums:
                return [y[:, :m, e - n:e].reshape(-1, *lead, n) for e, n in zip(ends, widths)]
            return [y[:m, e - n:e].reshape(*lead, n) for e, n in zip(ends, widths)]
    ys = [_block_scaled_dot(x2, w, s, transposed).astype(out_dtype).reshape(*lead, n)
          for (w, s), n in zip(weights, widths)]
    if joined:
        ys = [jnp.concatenate(ys, axis=-1)]
    return [y[None] for y in ys] if partial_sums else ys


def sparse_moe(x: jax.Array, expert_idx: jax.Array, gates: jax.Array,
               linear: tuple[jax.Array, jax.Array], linear_v: tuple[jax.Array, jax.Array],
               linear_1: tuple[jax.Array, jax.Array], *, backend: str = "auto",
               block_m: Optional[int] = None,
               configs: Optional[tuple[Optional[KernelConfig], Optional[KernelConfig]]] = None,
               transposed: bool = False) -> jax.Array:
    """One Grok-1 MoE layer on x [M, D] with routing expert_idx/gates [M, k] -> [M, D] bf16.

    Each of linear, linear_v ([E, D, F]) and linear_1 ([E, F, D]) is (int8 weight, scales);
    with transposed=True the int8 weights are stored [E, F, D] and [E, D, F].
    """
    num_experts = linear[0].shape[0]
    plan = make_plan(expert_idx, num_experts, block_m or default_block_m(expert_idx.size))
    gated_cfg, down_cfg = configs or (None, None)
    xs = dispatch(x, plan)  # [M_pad, D]
    h = grouped_matmul_gated(xs, *linear, *linear_v, plan, backend=backend, config=gated_cfg, transposed=transposed)
    ys = grouped_matmul(h, *linear_1, plan, backend=backend, config=down_cfg, transposed=transposed)  # [M_pad, D]
    return combine(ys, gates, plan)


def moe_one_token(x: jax.Array, gates: jax.Array, experts: jax.Array, linear: tuple[jax.Array, jax.Array],
                  linear_v: tuple[jax.Array, jax.Array], linear_1: tuple[jax.Array, jax.Array], *,
                  backend: str = "auto", transposed: bool = False,
                  configs: Optional[tuple[Optional[KernelConfig], Optional[KernelConfig]]] = None) -> jax.Array:
    """One token's mixture of experts without a plan (a decode step at batch 1).

    x [1, D] (bf16, or float32 used unrounded), gates [k] and experts int32 [k] (its
    choices), linear / linear_v [E, D, F] and linear_1 [E, F, D] as (int8 weight, scales)
    ([E, N, K] when transposed) -> float32 [S, 1, D], partial sums whose sum is
        sum_j gates[j] * (gelu_tanh(x W_j) * (x V_j)) W1_j,   W_j: expert experts[j]'s,
    the hidden rows in x's dtype, as sparse_moe's. On a Pallas backend two kernels whose
    tile j is expert j: the gated one reads x's row for every tile (no dispatch), and each
    program of the output one weights its K slice of one expert by that expert's gate,
    leaving S = k x split_k sums for the next kernel to add (kernels.residual_norm; no
    combine). Elsewhere make_plan, dispatch and combine in plain XLA (S = 1).
    """
    if x.ndim != 2 or x.shape[0] != 1 or experts.ndim != 1 or gates.shape != experts.shape:
        raise ValueError(f"moe_one_token: x {tuple(x.shape)}, gates {tuple(gates.shape)}, experts "
                         f"{tuple(experts.shape)}; need x [1, D] and gates, experts [k].")
    (wi, si), (wv, sv), (wo, so) = linear, linear_v, linear_1
    d_in, f = _check_weight("moe_one_token linear", wi, si, expert_dim=True, transposed=transposed)
    _check_weight("moe_one_token linear_v", wv, sv, expert_dim=True, transposed=transposed)
    f_out, d_out = _check_weight("moe_one_token linear_1", wo, so, expert_dim=True, transposed=transposed)
    if d_in != x.shape[1] or f_out != f or wv.shape != wi.shape:
        raise ValueError(f"moe_one_token: x {tuple(x.shape)}, linear {tuple(wi.shape)}, linear_v "
                         f"{tuple(wv.shape)} and linear_1 {tuple(wo.shape)} do not chain (D and F).")
    k, bm = experts.shape[0], default_block_m(experts.shape[0])
    experts, gates = experts.astype(jnp.int32), gates.astype(jnp.float32)
    h_dtype = jnp.float32 if x.dtype == jnp.float32 else jnp.bfloat16
    resolved = _resolve_backend(backend)
    if resolved != "xla":
        interpret = resolved == "interpret"
        gated_cfg, down_cfg = configs or (None, None)
        gated_cfg = (gated_cfg or default_config("gated", bm, k, d_in, f, transposed))._replace(split_k=1)
        down_cfg = down_cfg or default_config("down", bm, k, f, d_out, transposed)
        fits = (_fits_pallas(backend, k * bm, k, d_in, f, si.shape[-2], gated_cfg, interpret, wi.size)
                and _fits_pallas(backend, k * bm, k, f, d_out, so.shape[-2], down_cfg, interpret,
                                 max(wo.size, k * d_out * max(1, down_cfg.split_k))))
        if fits:
            common = dict(interpret=interpret, transposed=transposed, block_m=bm, one_token=True)
            h = _pallas_matmul(x, [(wi, si), (wv, sv)], experts, gated=True, cfg=gated_cfg, out_dtype=h_dtype,
                               **common)  # [k, F]
            return _pallas_matmul(h, [(wo, so)], experts, gated=False, cfg=down_cfg, out_dtype=jnp.float32,
                                  gates=gates, **common)  # [k * split, 1, D]
    plan = make_plan(experts[None], wi.shape[0], bm)
    xs = dispatch(x, plan)  # [M_pad, D]
    h = _xla_grouped(xs, [(wi, si), (wv, sv)], plan, gated=True, out_dtype=h_dtype, transposed=transposed)
    y = _xla_grouped(h, [(wo, so)], plan, gated=False, out_dtype=jnp.float32, transposed=transposed)
    return combine(y, gates[None], plan, out_dtype=jnp.float32)[None]


# ---------------------------------------------------------------------------------------
# Decode attention: one query token per sequence against its KV cache
# ---------------------------------------------------------------------------------------

_ATTN_BLOCK = 64  # cache positions per loop step
_ATTN_ROWS = 16  # query heads per KV head, padded: Triton's dot needs every side >= 16


def _decode_attention_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, l_ref, *, bs, splits, scale, cap):
    """One program: sequence b, KV head g, split s of the sequence's used keys.

    The keys [0, length) are cut into `splits` runs of whole blocks; this program walks its
    run and leaves sum_s p_s v_s and sum_s p_s with p = exp(logit - cap). The capped logits
    never exceed cap, so the softmax needs no running maximum (exp(-2 cap) stays a normal
    float32 for cap <= 40), and the splits merge by plain sums.
    """
    b, g, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = len_ref[b]
    per = (length + splits * bs - 1) // (splits * bs) * bs  # keys per split, whole blocks
    start = s * per
    end = jnp.minimum(length, start + per)
    trips = jnp.maximum(end - start + bs - 1, 0) // bs
    q_hi, q_lo = split_bf16(q_ref[...])  # [R, K]

    def block(i, carry):
        l, acc = carry
        k0 = pl.multiple_of(start + i * bs, bs)
        keys = k_ref[b, pl.ds(k0, bs), g, :]  # [bs, K] bf16
        values = v_ref[b, pl.ds(k0, bs), g, :]
        logits = (jnp.dot(q_hi, keys.T, preferred_element_type=jnp.float32)
                  + jnp.dot(q_lo, keys.T, preferred_element_type=jnp.float32)) * scale  # [R, bs]
        valid = (k0 + jnp.arange(bs)) < end  # [bs]
        p = jnp.where(valid[None, :], jnp.exp(cap * jnp.tanh(logits / cap) - cap), 0.0)
        p_hi, p_lo = split_bf16(p)
        pv = (jnp.dot(p_hi, values, preferred_element_type=jnp.float32)
              + jnp.dot(p_lo, values, preferred_element_type=jnp.float32))  # [R, K]
        return l + jnp.sum(p, axis=1), acc + pv

    l, acc = lax.fori_loop(0, trips, block, (jnp.zeros((q_hi.shape[0],), jnp.float32),
                                             jnp.zeros(q_hi.shape, jnp.float32)))
    o_ref[...] = acc
    l_ref[...] = l


def rope_frequencies(key_size: int, base: float = 10000.0) -> np.ndarray:
    """RoPE's inverse frequencies 1 / base^(2i / K), i < K/2: float32 [K/2], made on the host
    (constants: traced, their `pow` was a kernel of its own in every decode step, 0.9 us on
    an H200, BENCHMARKS.md session 11)."""
    return (1.0 / base ** (np.arange(0, key_size, 2, dtype=np.float64) / key_size)).astype(np.float32)


def rotate_half(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotate-half RoPE in float32: x [..., K], angles [..., K/2] (broadcast against x's
    leading axes) -> [x1 cos - x2 sin, x2 cos + x1 sin] with x1, x2 x's halves."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_rows(heads_per_group: int, backend: str = "auto") -> int:
    """Query rows per KV head that decode_attention's kernel takes: the heads padded to 16
    (Triton's dot needs every side >= 16) on a GPU, as they are interpreted."""
    return heads_per_group if _resolve_backend(backend) == "interpret" else max(heads_per_group, _ATTN_ROWS)


def write_at_steps(cache: jax.Array, new: jax.Array, step: jax.Array) -> jax.Array:
    """cache [B, S, G, K] with new [B, T, G, K] written at positions [step[b], step[b] + T) of
    each row b (as dynamic_update_slice: a start past S - T is moved back to S - T), in the
    cache's dtype: the cache write of the XLA paths (the model's attention, decode_qkv's)."""
    new = new.astype(cache.dtype)
    if cache.shape[0] == 1:
        # One row: a plain in-place update. Batched, the update is a scatter, and a GPU runs
        # it as four kernels (a bounds test, a read of the old row and a select per write;
        # BENCHMARKS.md session 9).
        return lax.dynamic_update_slice_in_dim(cache, new, step[0], axis=1)
    write = jax.vmap(lambda c, n, s: lax.dynamic_update_slice_in_dim(c, n, s, axis=0))
    return write(cache, new, step)


def decode_qkv(parts: jax.Array, keys: jax.Array, values: jax.Array, step: jax.Array, *, q_heads: int,
               base: float = 10000.0, backend: str = "auto") -> tuple[jax.Array, jax.Array, jax.Array]:
    """A decode step's q, k and v from their projection's partial sums: added, rotated (RoPE)
    and the new key and value written into the cache.

    parts [S, B, (H + 2G) K] float32: S partial sums of q | k | v side by side
    (int8_matmuls(partial_sums=True, joined=True)); keys, values [B, L, G, K], the cache;
    step [B] int32, each row's position. Returns
      q [B, G, R, K] float32: query head g * H/G + r in row r of group g, rotated at
        position step, the rows past H/G zero (R = attention_rows(H/G); decode_attention
        with heads=H/G takes it as it is);
      keys, values: the cache with the rotated key and the value, in the cache's dtype, at
        position min(step, L - 1) (dynamic_update_slice's clamp).
    On a Pallas backend one kernel of B x G programs that writes one position of the cache
    in place (the cache is aliased to its output): it replaces the split-K sum, the slices,
    q's RoPE and pad and the two cache updates (five XLA kernels per layer). Elsewhere
    plain XLA.
    """
    n_parts, bsz, width = parts.shape
    _, length, groups, k_dim = keys.shape
    if (values.shape != keys.shape or step.shape != (bsz,) or keys.shape[0] != bsz
            or width != (q_heads + 2 * groups) * k_dim or q_heads % groups or k_dim % 2):
        raise ValueError(f"decode_qkv: parts {tuple(parts.shape)}, keys {tuple(keys.shape)}, values "
                         f"{tuple(values.shape)}, step {tuple(step.shape)}, q_heads={q_heads}; need parts "
                         "[S, B, (H + 2G) K], keys = values [B, L, G, K] with an even K, step [B] and H a "
                         "multiple of G.")
    hg = q_heads // groups
    rows = attention_rows(hg, backend)
    freq = rope_frequencies(k_dim, base)
    parts = parts.astype(jnp.float32).reshape(n_parts, bsz, q_heads + 2 * groups, k_dim)
    step = step.astype(jnp.int32)
    resolved = _resolve_backend(backend)
    if resolved == "xla":
        total = jnp.sum(parts, axis=0)  # [B, H + 2G, K]
        angles = step.astype(jnp.float32)[:, None, None] * freq  # [B, 1, K/2]
        q = rotate_half(total[:, :q_heads], angles).reshape(bsz, groups, hg, k_dim)
        key = rotate_half(total[:, q_heads:q_heads + groups], angles)  # [B, G, K]
        return (jnp.pad(q, ((0, 0), (0, 0), (0, rows - hg), (0, 0))), write_at_steps(keys, key[:, None], step),
                write_at_steps(values, total[:, None, q_heads + groups:], step))
    return _decode_qkv_call(step, parts.reshape(n_parts * bsz, q_heads + 2 * groups, k_dim), jnp.asarray(freq),
                            keys, values, heads=q_heads, rows=rows,
                            interpret=resolved == "interpret")


def _decode_qkv_kernel(step_ref, parts_ref, freq_ref, _keys_in, _values_in, q_ref, k_ref, v_ref, *,
                       heads: int, rows: int):
    """One program: row b, KV head g. parts [S * B, H + 2G, K] (part s of row b at s * B + b);
    writes q's group g [R, K] and position step[b] of the cache's head g (the cache arrives
    aliased to k_ref, v_ref)."""
    b, g = pl.program_id(0), pl.program_id(1)
    bsz, groups, half = k_ref.shape[0], k_ref.shape[2], freq_ref.shape[0]
    n_parts = parts_ref.shape[0] // bsz
    hg = heads // groups
    pos = step_ref[b]
    slot = jnp.clip(pos, 0, k_ref.shape[1] - 1)
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    q_rows, q_ok = pl.ds(g * hg, rows), lax.broadcasted_iota(jnp.int32, (rows, half), 0) < hg

    def summed(index, mask=None):  # the S partial sums of one block, added in order
        masked = {} if mask is None else dict(mask=mask, other=0.0)
        out = plgpu.load(parts_ref.at[(b,) + index], **masked)
        for s in range(1, n_parts):
            out = out + plgpu.load(parts_ref.at[(s * bsz + b,) + index], **masked)
        return out

    # Every load first: q's two halves (its group's heads), the key's, the value.
    q1, q2 = summed((q_rows, lo), q_ok), summed((q_rows, hi), q_ok)
    k1, k2 = summed((heads + g, lo)), summed((heads + g, hi))
    v = summed((heads + groups + g, pl.ds(0, 2 * half)))
    angles = pos.astype(jnp.float32) * freq_ref[...]  # [K/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    plgpu.store(q_ref.at[b, g, pl.ds(0, rows), lo], q1 * cos[None, :] - q2 * sin[None, :])
    plgpu.store(q_ref.at[b, g, pl.ds(0, rows), hi], q2 * cos[None, :] + q1 * sin[None, :])
    plgpu.store(k_ref.at[b, slot, g, lo], (k1 * cos - k2 * sin).astype(k_ref.dtype))
    plgpu.store(k_ref.at[b, slot, g, hi], (k2 * cos + k1 * sin).astype(k_ref.dtype))
    plgpu.store(v_ref.at[b, slot, g, pl.ds(0, 2 * half)], v.astype(v_ref.dtype))


@functools.partial(jax.jit, static_argnames=("heads", "rows", "interpret"))
def _decode_qkv_call(step, parts, freq, keys, values, *, heads, rows, interpret):
    """The decode_qkv kernel: (q [B, G, R, K] float32, keys, values), the cache in place."""
    bsz, _, groups, k_dim = keys.shape
    kernel = functools.partial(_decode_qkv_kernel, heads=heads, rows=rows)
    return pl.pallas_call(
        kernel, grid=(bsz, groups), in_specs=[_WHOLE_ARRAY] * 5, out_specs=[_WHOLE_ARRAY] * 3,
        out_shape=[jax.ShapeDtypeStruct((bsz, groups, rows, k_dim), jnp.float32),
                   jax.ShapeDtypeStruct(keys.shape, keys.dtype), jax.ShapeDtypeStruct(values.shape, values.dtype)],
        input_output_aliases={3: 1, 4: 2}, interpret=interpret, name="decode_qkv",
        **_compiler_params(4, 1, interpret),
    )(step, parts, freq, keys, values)


def decode_attention(q: jax.Array, keys: jax.Array, values: jax.Array, lengths: jax.Array, *,
                     scale: float, cap: float, backend: str = "auto", splits: Optional[int] = None,
                     heads: Optional[int] = None) -> jax.Array:
    """Attention of one query token per sequence over the first lengths[b] cache positions.

    q [B, G, Hg, K] (query heads grouped by their KV head; float32 or bf16), keys/values
    [B, S, G, K] (the bf16 cache), lengths int32 [B] -> [B, G, Hg, K] float32.
    Logits = cap * tanh(scale * q.k / cap) (0 < cap <= 40), a float32 softmax over the
    visible keys, the weighted sum in float32 (q and the probabilities enter the MMAs as
    bf16 hi/lo pairs, so only the cache is bf16). Reads only the used keys: the cost follows
    the tokens in the cache, not its capacity. A row with no visible key gives zeros.
    heads: q's rows are already padded (decode_qkv's q, zero past `heads`): only the first
    `heads` of each group are returned, [B, G, heads, K].

    Pallas only ("pallas", "interpret", or "auto" where it resolves to one of them): the
    model uses its own XLA attention elsewhere.
    """
    resolved = _resolve_backend(backend)
    if resolved == "xla":
        raise ValueError("decode_attention is a Pallas kernel; on this backend use the model's XLA attention "
                         "(or backend='interpret').")
    bsz, seq, groups, k_dim = keys.shape
    hq = q.shape[2]
    hg = heads or hq
    if q.shape != (bsz, groups, hq, k_dim) or hg > hq or values.shape != keys.shape or lengths.shape != (bsz,):
        raise ValueError(f"decode_attention: q {tuple(q.shape)}, keys {tuple(keys.shape)}, values "
                         f"{tuple(values.shape)}, lengths {tuple(lengths.shape)}; need q [B, G, Hg, K], "
                         "keys = values [B, S, G, K], lengths [B].")
    if not 0 < cap <= 40:
        raise ValueError(f"decode_attention: cap={cap}; the kernel offsets its softmax by the cap, which "
                         "needs 0 < cap <= 40 (exp(-2 cap) must stay a normal float32).")
    interpret = resolved == "interpret"
    bs = _pow2_divisor(seq, _ATTN_BLOCK)
    if not interpret and (bs < 16 or k_dim & (k_dim - 1) or k_dim < 16 or hq > _ATTN_ROWS):
        raise ValueError(f"decode_attention: cannot tile cache length {seq} (needs a multiple of 16), "
                         f"key size {k_dim} (a power of two >= 16) or {hq} query heads per KV head "
                         f"(at most {_ATTN_ROWS}).")
    if splits is None:  # about two programs per SM, no split shorter than a block at full cache
        splits = max(1, min(seq // bs, -(-2 * _NUM_SMS // (bsz * groups))))
    rows = attention_rows(hq, backend)
    qp = jnp.pad(q, ((0, 0), (0, 0), (0, rows - hq), (0, 0)))  # [B, G, R, K]; as it is from decode_qkv
    return _decode_attention_call(qp, keys, values, lengths.astype(jnp.int32), scale=float(scale),
                                  cap=float(cap), bs=bs, splits=splits, interpret=interpret)[:, :, :hg]


@functools.partial(jax.jit, static_argnames=("scale", "cap", "bs", "splits", "interpret"))
def _decode_attention_call(q, keys, values, lengths, *, scale, cap, bs, splits, interpret):
    """The pallas_call and the sum of its splits: [B, G, R, K] float32."""
    bsz, groups, rows, k_dim = q.shape
    kernel = functools.partial(_decode_attention_kernel, bs=bs, splits=splits, scale=scale, cap=cap)
    params = _compiler_params(4, 2, interpret)
    acc, l = pl.pallas_call(
        kernel,
        grid=(bsz, groups, splits),
        in_specs=[_WHOLE_ARRAY, pl.BlockSpec((None, None, rows, k_dim), lambda b, g, s: (b, g, 0, 0)),
                  _WHOLE_ARRAY, _WHOLE_ARRAY],
        out_specs=[pl.BlockSpec((None, None, None, rows, k_dim), lambda b, g, s: (b, g, s, 0, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda b, g, s: (b, g, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((bsz, groups, splits, rows, k_dim), jnp.float32),
                   jax.ShapeDtypeStruct((bsz, groups, splits, rows), jnp.float32)],
        interpret=interpret,
        name="decode_attention",
        **params,
    )(lengths, q, keys, values)
    total = jnp.sum(l, axis=2)  # [B, G, R]
    return jnp.sum(acc, axis=2) / jnp.where(total > 0, total, 1.0)[..., None]


# ---------------------------------------------------------------------------------------
# Decode junctions: a block's output into the residual stream, and the next block's norm
# ---------------------------------------------------------------------------------------

# Up to this many rows (tokens) a junction is one Pallas kernel. From 2 rows on, XLA's own
# reduction kernels were faster than a program per row (1 x H200, BENCHMARKS.md session 9).
JUNCTION_MAX_ROWS = 1
# Programs per row: each computes the whole row's norms (the row is 24 KB at Grok-1's width)
# and writes its 1/JUNCTION_SLICES of the outputs and of the router's logits; warps each. A
# power of two: the route kernel takes the logits' slices as one Triton block. One device's
# share of 8 on an H200 (session 13), the two junctions alone: 8 slices of 8 warps 2.44 +
# 1.64 us; 4 to 48 slices of 4 to 16 warps 2.31-4.19 + 1.64-2.08 us; 2 warps 2.7-49 us.
JUNCTION_SLICES = 8
JUNCTION_WARPS = 8


def junction_fuses(num_rows: int, backend: str = "auto") -> bool:
    """Whether residual_norm runs as one kernel for `num_rows` rows here (a Pallas backend
    and at most JUNCTION_MAX_ROWS rows: a decode step at batch 1)."""
    return uses_pallas(backend) and num_rows <= JUNCTION_MAX_ROWS


def _rms(x: jax.Array, count: int, eps: float) -> jax.Array:
    """rsqrt(mean(x^2) + eps) over the last axis of x, whose pad entries are zero."""
    return lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) / count + eps)


def residual_norm(h: jax.Array, parts: jax.Array, scale_1: jax.Array, scale_2: Optional[jax.Array] = None,
                  router: Optional[jax.Array] = None, *, eps: float = 1e-5, y_dtype=jnp.float32,
                  backend: str = "auto") -> tuple[jax.Array, Optional[jax.Array], Optional[jax.Array]]:
    """A block's output into the residual stream, then the next norm, in one kernel.

    h [M, D] float32 (the residual stream), parts [S, M, D] float32 (the block's output as S
    partial sums, e.g. int8_matmuls(partial_sums=True)), scales [D] ->
      h' = h + rms_norm(sum_s parts[s], scale_1)     [M, D] float32;
      y = rms_norm(h', scale_2)                      [M, D] in y_dtype, with scale_2;
      logits [P, M, E] float32, partial sums of y @ router (y float32, unrounded), with
      router [D, E] (kernels.route adds them);
    with rms_norm(x, s) = x * rsqrt(mean(x^2) + eps) * s in float32. Returns (h', y or None,
    logits or None).

    Where uses_pallas(backend): one kernel of M x P programs (P = JUNCTION_SLICES where it
    divides D); each sums the partials and takes both norms' statistics over the whole row,
    then writes its slice of h' and y and its slice's share of the logits. There it replaces
    the partials' sum, two reductions, the add and the router's dot (four to six XLA kernels
    of a decode step). Elsewhere plain JAX (P = 1).
    """
    m, d = h.shape
    if parts.ndim != 3 or parts.shape[1:] != (m, d) or scale_1.shape != (d,):
        raise ValueError(f"residual_norm: h {tuple(h.shape)}, parts {tuple(parts.shape)}, scale_1 "
                         f"{tuple(scale_1.shape)}; need h [M, D], parts [S, M, D], scales [D].")
    if (scale_2 is not None and scale_2.shape != (d,)) or (router is not None and (router.ndim != 2 or
                                                                                  router.shape[0] != d)):
        raise ValueError(f"residual_norm: scale_2 {None if scale_2 is None else tuple(scale_2.shape)}, router "
                         f"{None if router is None else tuple(router.shape)}; need [D={d}] and [D={d}, E].")
    if router is not None and scale_2 is None:
        raise ValueError("residual_norm: the router's logits are taken from y; give scale_2.")
    f32 = jnp.float32
    h, parts, scale_1 = h.astype(f32), parts.astype(f32), scale_1.astype(f32)
    scale_2 = None if scale_2 is None else scale_2.astype(f32)
    router = None if router is None else router.astype(f32)
    resolved = _resolve_backend(backend)
    if resolved == "xla":
        x = jnp.sum(parts, axis=0)
        h_new = h + x * _rms(x, d, eps) * scale_1
        if scale_2 is None:
            return h_new, None, None
        y = h_new * _rms(h_new, d, eps) * scale_2
        logits = None if router is None else jnp.dot(y, router, precision=lax.Precision.HIGHEST)[None]
        return h_new, y.astype(y_dtype), logits
    slices = JUNCTION_SLICES if d % JUNCTION_SLICES == 0 and JUNCTION_SLICES == _next_pow2(JUNCTION_SLICES) else 1
    return _residual_norm_call(h, parts, scale_1, scale_2, router, eps=float(eps), y_dtype=jnp.dtype(y_dtype),
                               slices=slices, warps=JUNCTION_WARPS, interpret=resolved == "interpret")


def _residual_norm_kernel(h_ref, parts_ref, s1_ref, *refs, d: int, slices: int, eps: float,
                          has_y: bool, has_router: bool):
    """One program: row r, slice p of D. refs: [scale_2], [router], h', [y], [logits]."""
    refs = list(refs)
    s2_ref = refs.pop(0) if has_y else None
    router_ref = refs.pop(0) if has_router else None
    h_out, y_out, logits_out = refs.pop(0), refs.pop(0) if has_y else None, refs.pop(0) if has_router else None
    r, p = pl.program_id(0), pl.program_id(1)
    m = h_ref.shape[0]
    n_parts = parts_ref.shape[0] // m  # parts [S * M, D]: part s of row r is row s * M + r

    def load(ref, cols, mask):
        return plgpu.load(ref.at[cols] if len(ref.shape) == 1 else ref.at[r, cols], mask=mask, other=0.0)

    def block_sum(cols, mask):  # the partial sums added, in one order wherever they are read
        x = plgpu.load(parts_ref.at[r, cols], mask=mask, other=0.0)
        for s in range(1, n_parts):
            x = x + plgpu.load(parts_ref.at[s * m + r, cols], mask=mask, other=0.0)
        return x

    # Every load first, so that all are in flight before the first reduction waits: the whole
    # row (both norms' statistics) and this program's slice (its outputs).
    full = _next_pow2(d)
    row, row_ok = pl.ds(0, full), lax.broadcasted_iota(jnp.int32, (full,), 0) < d
    x_row, h_row, s1_row = block_sum(row, row_ok), load(h_ref, row, row_ok), load(s1_ref, row, row_ok)
    width = d // slices
    block = _next_pow2(width)
    cols, ok = pl.ds(p * width, block), lax.broadcasted_iota(jnp.int32, (block,), 0) < width
    x, h, s1 = block_sum(cols, ok), load(h_ref, cols, ok), load(s1_ref, cols, ok)
    s2 = load(s2_ref, cols, ok) if has_y else None
    if has_router:
        e = router_ref.shape[1]
        e_block = _next_pow2(e)
        both = ok[:, None] & (lax.broadcasted_iota(jnp.int32, (block, e_block), 1) < e)
        w = plgpu.load(router_ref.at[cols, pl.ds(0, e_block)], mask=both, other=0.0)  # [block, E]

    inv_1 = _rms(x_row, d, eps)
    inv_2 = _rms(h_row + x_row * inv_1 * s1_row, d, eps)
    h_new = h + x * inv_1 * s1  # the slice, by the same arithmetic as the row
    plgpu.store(h_out.at[r, cols], h_new, mask=ok)
    if not has_y:
        return
    y = h_new * inv_2 * s2
    plgpu.store(y_out.at[r, cols], y.astype(y_out.dtype), mask=ok)
    if has_router:
        logits = jnp.sum(y[:, None] * w, axis=0)  # [E]
        plgpu.store(logits_out.at[p, r, pl.ds(0, e_block)], logits,
                    mask=lax.broadcasted_iota(jnp.int32, (e_block,), 0) < e)


# Jitted, as every kernel call here: a model's 64 identical calls are traced and lowered once.
@functools.partial(jax.jit, static_argnames=("eps", "y_dtype", "slices", "warps", "interpret"))
def _residual_norm_call(h, parts, scale_1, scale_2, router, *, eps, y_dtype, slices, warps, interpret):
    """The junction kernel: residual_norm's outputs, on a grid of rows x slices."""
    m, d = h.shape
    has_y, has_router = scale_2 is not None, router is not None
    shapes = [jax.ShapeDtypeStruct((m, d), jnp.float32)]
    if has_y:
        shapes.append(jax.ShapeDtypeStruct((m, d), y_dtype))
    if has_router:
        shapes.append(jax.ShapeDtypeStruct((slices, m, router.shape[1]), jnp.float32))
    inputs = [a for a in (h, parts.reshape(-1, d), scale_1, scale_2, router) if a is not None]
    kernel = functools.partial(_residual_norm_kernel, d=d, slices=slices, eps=eps, has_y=has_y,
                               has_router=has_router)
    out = pl.pallas_call(
        kernel, grid=(m, slices), in_specs=[_WHOLE_ARRAY] * len(inputs), out_specs=[_WHOLE_ARRAY] * len(shapes),
        out_shape=shapes, interpret=interpret, name="residual_norm", **_compiler_params(warps, 1, interpret),
    )(*inputs)
    return out[0], out[1] if has_y else None, out[-1] if has_router else None
