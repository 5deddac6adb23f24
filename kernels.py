"""Fast int8 kernels for Grok-1 inference: the sparse mixture of experts and int8 linears.

Works on raw arrays only (no Haiku, no model.py): an int8 weight [..., K, N] with bf16
block scales [..., nb, N], where rows [b*K/nb, (b+1)*K/nb) of the weight use
scales[..., b, :] (SPEC section 3). With transposed=True the int8 weight is stored
[..., N, K] instead (K contiguous; the scales keep their layout): the layout the tensor
cores take their right-hand operand in, which the Pallas kernels read at close to the copy
bandwidth on an H200 (the checkpoint's [K, N] reaches about 65%; BENCHMARKS.md). Weights are never dequantized in memory: each kernel
converts int8 tiles to bf16 in registers, accumulates x @ w in float32 per scale block and
multiplies the block's partial result by that block's scales.

The MoE runs in four steps, each a function below, in data-flow order:

    plan = make_plan(expert_idx, E, block_m)      # sort (token, slot) rows by expert
    xs = dispatch(x, plan)                        # [M, D] -> [M_pad, D], grouped by expert
    h = grouped_matmul_gated(xs, W, Ws, V, Vs, plan)   # gelu(xs @ W) * (xs @ V): [M_pad, F]
    ys = grouped_matmul(h, W1, W1s, plan)         # [M_pad, D]
    out = combine(ys, gates, plan)                # sum_k gate * row: [M, D]

Rows are padded per expert to a multiple of `block_m`; each tile of `block_m` rows belongs to
one expert, and tiles of experts nobody chose do not exist, so weights of unchosen experts
are never read (decode at batch 1 reads 2 of 8 experts).

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
`float32_inputs` says so (decode sizes, where weight reads bound the time, and the CPU).

Everything here is jit- and shard_map-friendly: it sees local shapes only, and K may be a
shard of the full input dimension as long as each shard holds whole scale blocks.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Sequence

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


BACKENDS = ("auto", "pallas", "interpret", "xla")
DEQUANT_MODES = ("cast", "bits", "asm")


# ---------------------------------------------------------------------------------------
# Float32 activations: the hi/lo split
# ---------------------------------------------------------------------------------------

# Up to this many rows (tokens, or routed rows tokens * k in the MoE) an int8 matmul takes
# a float32 x as two bf16 parts. At decode the weight reads bound the time and the second
# MMA hides behind them; at prefill sizes the matmuls are compute-bound, so callers round
# x to bf16 there (float32_inputs).
SPLIT_MAX_ROWS = 64


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


def make_plan(expert_idx: jax.Array, num_experts: int, block_m: int) -> MoEPlan:
    """Group the rows of `expert_idx` int32 [M, k] by expert, padded per expert to block_m.

    Values of expert_idx must lie in [0, num_experts). Rows of one expert keep token order.
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

    # Rank of each row among the rows of its expert, by a cumulative count (no sort needed).
    onehot = (flat[:, None] == jnp.arange(num_experts, dtype=jnp.int32)[None, :]).astype(jnp.int32)  # [R, E]
    counts = jnp.sum(onehot, axis=0)  # [E]
    rank = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)  # [R]

    tiles = (counts + block_m - 1) // block_m  # [E] tiles per expert
    tile_end = jnp.cumsum(tiles)  # [E], inclusive
    tile_begin = tile_end - tiles
    row_pos = (jnp.take(tile_begin, flat) * block_m + rank).astype(jnp.int32)  # [R]

    row_token = jnp.full((n_tiles * block_m,), m, jnp.int32)
    row_token = row_token.at[row_pos].set(jnp.arange(rows, dtype=jnp.int32) // k)

    t = jnp.arange(n_tiles, dtype=jnp.int32)
    tile_expert = jnp.sum((tile_end[None, :] <= t[:, None]).astype(jnp.int32), axis=1)  # [T]
    num_tiles = tile_end[-1].astype(jnp.int32)
    tile_expert = jnp.where(t < num_tiles, tile_expert, -1).astype(jnp.int32)
    return MoEPlan(row_pos, row_token, tile_expert, num_tiles)


def dispatch(x: jax.Array, plan: MoEPlan) -> jax.Array:
    """Rows of x [M, D] in plan order -> [M_pad, D]; pad rows are zero."""
    if x.ndim != 2:
        raise ValueError(f"dispatch: x must be [tokens, D], found shape {tuple(x.shape)}.")
    return jnp.take(x, plan.row_token, axis=0, mode="fill", fill_value=0)


def combine(ys: jax.Array, gates: jax.Array, plan: MoEPlan, out_dtype=None) -> jax.Array:
    """out[t] = sum_j gates[t, j] * ys[row of (t, j)]: [M_pad, D], [M, k] -> [M, D].

    Gates are used as given (Grok-1 does not renormalise the top-k probabilities); the sum
    is taken in float32. The result has out_dtype; None: bf16, or float32 when ys is float32.
    """
    m, k = gates.shape
    if m * k != plan.row_pos.shape[0]:
        raise ValueError(
            f"combine: gates {tuple(gates.shape)} do not match the plan's {plan.row_pos.shape[0]} rows."
        )
    rows = jnp.take(ys, plan.row_pos, axis=0).reshape(m, k, ys.shape[-1]).astype(jnp.float32)
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
    of at least _MIN_SPLIT_ROWS[op] rows."""
    phase = "decode" if block_m <= 32 else "prefill"
    cfg = _TUNED[(op, phase, transposed)]
    if cfg.split_k == 0:
        programs = n_tiles * max(1, n // cfg.block_n)
        split, rows = 1, _MIN_SPLIT_ROWS[op]
        while programs * split < 2 * _NUM_SMS and k // (split * 2) >= rows and k % (split * 2) == 0:
            split *= 2
        cfg = cfg._replace(split_k=split)
    return cfg


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
                gated, transposed, hi_lo=False):
    """One program: rows of tile i, columns block j, K slice s; loops over K in bk steps.

    x_ref: [M_pad, K] bf16, or float32 with hi_lo (each x chunk is split into bf16 hi + lo
    and both are multiplied by the same int8 tile: the weights are read once).
    refs: (w, scales) per matrix ([E, K, N] int8, or [E, N, K] when transposed; [E, nb, N]
    bf16), then the output block.
    K is walked in segments that never cross a scale block; each segment's float32 sum is
    multiplied by its block's scales and added to the result. Tiles past the used ones
    (tile_expert < 0) skip all loads and write zeros.
    """
    mats = [(refs[2 * t], refs[2 * t + 1]) for t in range(n_mats)]
    o_ref = refs[2 * n_mats]
    i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e = tile_expert_ref[i]
    e_safe = jnp.maximum(e, 0)
    rows = pl.ds(pl.multiple_of(i * bm, bm), bm)
    cols = pl.ds(pl.multiple_of(j * bn, bn), bn)

    kb = k_dim // nb  # rows per scale block
    ks = k_dim // split  # rows per K slice
    seg = math.gcd(kb, ks)  # segment: inside one slice and one scale block
    n_seg, n_chunk = ks // seg, seg // bk
    k_base = s * ks
    zeros = tuple(jnp.zeros((bm, bn), jnp.float32) for _ in range(n_mats))

    def chunk(c, part, seg_start):
        k0 = pl.multiple_of(seg_start + c * bk, bk)
        x = x_ref[rows, pl.ds(k0, bk)]  # [bm, bk] bf16 (float32 with hi_lo)
        if hi_lo:
            x_hi = x.astype(jnp.bfloat16)
            xs = (x_hi, (x - x_hi.astype(jnp.float32)).astype(jnp.bfloat16))
        else:
            xs = (x,)
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
        acc = scaled(part, k_base)
    else:
        def segment(g, acc):
            seg_start = k_base + g * seg
            part = lax.fori_loop(0, n_chunk, lambda c, p: chunk(c, p, seg_start), zeros)
            return tuple(a + p for a, p in zip(acc, scaled(part, seg_start)))

        acc = lax.fori_loop(0, n_seg * valid, segment, zeros)

    if gated:
        out = _gelu_tanh(acc[0]) * acc[1]
    else:
        out = acc[0]
    o_ref[...] = out.astype(o_ref.dtype)


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
@functools.partial(jax.jit, static_argnames=("gated", "cfg", "interpret", "out_dtype", "name", "transposed"))
def _pallas_matmul(xs: jax.Array, mats: Sequence[tuple[jax.Array, jax.Array]],
                   tile_expert: jax.Array, *, gated: bool, cfg: KernelConfig, interpret: bool,
                   out_dtype, name: Optional[str] = None, transposed: bool = False) -> jax.Array:
    """xs [M_pad, K] times per-tile expert matrices -> [M_pad, N] (gated: gelu(a) * b).

    A float32 xs is used unrounded (split into bf16 hi + lo in the kernel); other dtypes
    are cast to bf16."""
    m_pad, k_dim = xs.shape
    w0, s0 = mats[0]
    n_dim = w0.shape[1] if transposed else w0.shape[2]
    nb = s0.shape[-2]
    for w, s in mats[1:]:
        if w.shape != w0.shape or s.shape[-2] != nb:
            # Both gated matrices share the K walk; give them one scale layout.
            raise ValueError(f"gated weights differ: {w0.shape}/{s0.shape} vs {w.shape}/{s.shape}")
    n_tiles = tile_expert.shape[0]
    if gated:
        cfg = cfg._replace(split_k=1)  # the gelu needs whole sums
    bm, bn, bk, split = _pallas_tiling(m_pad, n_tiles, k_dim, n_dim, nb, cfg, interpret)
    dequant = cfg.dequant
    if interpret and dequant == "asm":
        dequant = "bits"  # same arithmetic, no PTX on the CPU
    hi_lo = xs.dtype == jnp.float32

    kernel = functools.partial(
        _moe_kernel, n_mats=len(mats), bm=bm, bn=bn, bk=bk, k_dim=k_dim, nb=nb, split=split,
        dequant=dequant, gated=gated, transposed=transposed, hi_lo=hi_lo)
    if split == 1:
        out_shape = jax.ShapeDtypeStruct((m_pad, n_dim), out_dtype)
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((split, m_pad, n_dim), jnp.float32)
        out_spec = pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j))
    params = {}
    if _TritonParams is not None and not interpret:
        params = dict(compiler_params=_TritonParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    flat = [a for pair in mats for a in pair]
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


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    return backend


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
    k_w, n_dim = _check_weight("int8_matmul", weight, scales, expert_dim=False, transposed=transposed)
    *lead, k_dim = x.shape
    if k_dim != k_w:
        raise ValueError(f"int8_matmul: x {tuple(x.shape)} does not match weight {tuple(weight.shape)} (K).")
    m = math.prod(lead)
    x2 = x.reshape(m, k_dim)
    resolved = _resolve_backend(backend)
    if backend == "auto" and m >= _DENSE_PALLAS_MAX_ROWS:
        resolved = "xla"
    if resolved != "xla" and m > 0:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 512 else 128
        n_tiles = -(-m // bm)
        xp = jnp.pad(x2 if x2.dtype == jnp.float32 else x2.astype(jnp.bfloat16), ((0, n_tiles * bm - m), (0, 0)))
        cfg = config or default_config("dense", bm, n_tiles, k_dim, n_dim, transposed)
        interpret = resolved == "interpret"
        biggest = max(weight.size, n_tiles * bm * max(k_dim, n_dim * max(1, cfg.split_k)))
        if _fits_pallas(backend, n_tiles * bm, n_tiles, k_dim, n_dim, scales.shape[0], cfg,
                        interpret, biggest):
            y = _pallas_matmul(xp, [(weight[None], scales[None])], jnp.zeros((n_tiles,), jnp.int32),
                               gated=False, cfg=cfg, interpret=interpret, out_dtype=out_dtype,
                               name="int8_dense_matmul", transposed=transposed)
            return y[:m].reshape(*lead, n_dim)
    y = _block_scaled_dot(x2, weight, scales, transposed).astype(out_dtype)
    return y.reshape(*lead, n_dim)


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
