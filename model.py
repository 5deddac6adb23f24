"""Grok-1 in JAX/Haiku: an 8-expert top-2 mixture-of-experts Transformer with int8 weights.

Reads top to bottom in the order data flows: quantized weights, configs, sharding helpers,
the building blocks (norm, linear, rotary embedding, attention, MoE), the decoder layer,
the Transformer, the language model, and finally the parameter tree: its abstract shapes,
its shardings and random values for tests, demos and benchmarks.

Shapes: B batch, T tokens, S cache length, D width, H query heads, G kv heads, K key size,
E experts, F expert hidden size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, NamedTuple, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import kernels




# ---------------------------------------------------------------------------------------
# Quantized weights
# ---------------------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class QuantizedWeight8bit:
    """An int8 weight with bfloat16 scales, as stored in the released checkpoint.

    weight: int8 [..., n_in, n_out]. scales: bf16 [..., n_blocks, n_out]. The input
    dimension is split into n_blocks equal contiguous blocks; rows
    [b * n_in / n_blocks, (b + 1) * n_in / n_blocks) use scales[..., b, :].
    """

    weight: Any
    scales: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    @property
    def num_blocks(self) -> int:
        return int(self.scales.shape[-2])

    def tree_flatten(self):
        return (self.weight, self.scales), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


# The released pickles name the class `model.QuantizedWeight8bit`; keep that exact name.
QuantizedWeight8bit.__module__ = "model"


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class TransposedWeight8bit(QuantizedWeight8bit):
    """A QuantizedWeight8bit whose int8 matrix is stored transposed, for inference.

    weight: int8 [..., n_out, n_in] (n_in contiguous); scales as in QuantizedWeight8bit,
    [..., n_blocks, n_out]. The tensor cores take a matmul's right-hand operand in this
    layout, and the int8 kernels read it at close to the copy bandwidth (the checkpoint's
    [n_in, n_out] at about two thirds of it; BENCHMARKS.md). prepare_for_inference makes
    it; `shape` is the logical [..., n_in, n_out]. Never saved: checkpoints keep the
    released layout.
    """

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, n_out, n_in = self.weight.shape
        return (*lead, n_in, n_out)


TransposedWeight8bit.__module__ = "model"


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class SplitTable:
    """A float32 table held as two bf16 tables: hi = bf16(t), lo = bf16(t - hi), so that
    hi + lo = t to 2^-16 relative. The embedding table for inference
    (prepare_for_inference): the lookup reads hi + lo (the float32 rows, as the checkpoint
    stores them, for the float32 residual stream), the output projection reads hi alone
    (the release's bf16 table). The same bytes as the float32 table; never saved.
    """

    hi: Any
    lo: Any

    # Array-like where code reads the table as a whole (its shape, size and placement, or
    # np.asarray of it): the float32 table it stands for.
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.hi.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def dtype(self) -> Any:
        return np.dtype(np.float32)

    @property
    def sharding(self) -> Any:
        return self.hi.sharding

    def astype(self, dtype: Any) -> jax.Array:
        return (jnp.asarray(self.hi, jnp.float32) + jnp.asarray(self.lo, jnp.float32)).astype(dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.asarray(self.hi).astype(np.float32) + np.asarray(self.lo).astype(np.float32)
        return out if dtype is None else out.astype(dtype)

    def tree_flatten(self):
        return (self.hi, self.lo), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


def is_transposed(w: Any) -> bool:
    return isinstance(w, TransposedWeight8bit)


def dequantize(w: QuantizedWeight8bit, dtype: Any = jnp.bfloat16) -> jax.Array:
    """Return weight * scales by the block rule: one scale row per contiguous input block.

    This is the release's algorithm (a full dequantized copy); the `fast` paths never call
    it on whole matrices. It depends only on shapes, never on the mesh.
    """
    weight, scales = w.weight, w.scales
    if is_transposed(w):
        weight = jnp.swapaxes(weight, -1, -2)
    *lead, n_in, n_out = weight.shape
    nb = scales.shape[-2]
    if n_in % nb:
        raise ValueError(
            f"int8 weight of shape {tuple(weight.shape)} has {nb} scale blocks, which do not "
            f"divide its input dimension {n_in}."
        )
    blocks = weight.reshape(*lead, nb, n_in // nb, n_out).astype(dtype)  # [..., nb, n/nb, N]
    out = blocks * scales.astype(dtype)[..., :, None, :]
    return out.reshape(*lead, n_in, n_out)


# ---------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------

MOE_IMPLS = ("fast", "reference")


def ffn_size(emb_size: int, widening_factor: float) -> int:
    """The expert hidden size: int(widening * D) * 2 // 3, rounded up to a multiple of 8."""
    f = int(widening_factor * emb_size) * 2 // 3
    return f + (-f) % 8


@dataclasses.dataclass
class TransformerConfig:
    """The decoder stack. Field names and defaults follow the release."""

    emb_size: int
    key_size: int
    num_q_heads: int
    num_kv_heads: int
    num_layers: int
    vocab_size: int = 128 * 1024
    widening_factor: float = 4.0
    attn_output_multiplier: float = 1.0
    name: Optional[str] = None
    num_experts: int = -1
    capacity_factor: float = 1.0
    num_selected_experts: int = 1
    init_scale: float = 1.0
    shard_activations: bool = False
    data_axis: str | tuple[str, ...] = "data"
    model_axis: str | tuple[str, ...] = "model"
    # Added: "fast" computes only the selected experts with int8 kernels; "reference" is
    # the release's algorithm (dequantize everything, run all experts on every token).
    moe_impl: str = "fast"
    # Added: the dtype of matmul inputs and of the KV cache (synced from
    # LanguageModelConfig.fprop_dtype by its initialize()); the residual stream is float32.
    fprop_dtype: Any = jnp.bfloat16

    def __post_init__(self):
        self.validate()

    @property
    def ffn_size(self) -> int:
        return ffn_size(self.emb_size, self.widening_factor)

    def validate(self) -> None:
        """Raise ValueError naming the field for configs that cannot work."""
        for field in ("emb_size", "key_size", "num_q_heads", "num_kv_heads", "num_layers"):
            if getattr(self, field) < 1:
                raise ValueError(f"TransformerConfig.{field} must be >= 1, got {getattr(self, field)}.")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"num_q_heads={self.num_q_heads} is not divisible by num_kv_heads="
                f"{self.num_kv_heads}: grouped-query attention needs whole groups."
            )
        if self.key_size % 2:
            raise ValueError(f"key_size={self.key_size} is odd: rotary embeddings rotate halves.")
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl={self.moe_impl!r}; expected one of {MOE_IMPLS}.")

    def validate_moe(self) -> None:
        if self.num_experts < 1:
            raise ValueError(
                f"num_experts={self.num_experts}: Grok-1 is a mixture of experts; set "
                "num_experts >= 1 (8 for the real model)."
            )
        if not 1 <= self.num_selected_experts <= self.num_experts:
            raise ValueError(
                f"num_selected_experts={self.num_selected_experts} must be between 1 and "
                f"num_experts={self.num_experts}."
            )

    def partition_rules(self) -> tuple[tuple[str, P], ...]:
        """(regex on 'module_path/param', PartitionSpec) pairs; the first match wins."""
        d, m = self.data_axis, self.model_axis
        return (
            (r"multi_head_attention/(query|key|value)/w$", P(d, m)),
            (r"multi_head_attention/linear/w$", P(m, d)),
            (r"moe/(linear|linear_v)/w$", P(None, d, m)),
            (r"moe/linear_1/w$", P(None, m, d)),
            (r"router/w$", P(d)),
            (r"rms_norm(_\d+)?/scale$", P()),
        )

    def get_memory_sharding(self) -> "Memory":
        """PartitionSpecs of the KV cache: batch over data, kv heads over model."""
        kv = KVMemory(
            k=P(self.data_axis, None, self.model_axis),
            v=P(self.data_axis, None, self.model_axis),
            step=P(self.data_axis),
        )
        return Memory(layers=[kv] * self.num_layers)

    def make(self, mesh: Optional[Mesh] = None) -> "Transformer":
        self.validate()
        self.validate_moe()
        return Transformer(self, mesh=mesh, name="transformer")


@dataclasses.dataclass
class LanguageModelConfig:
    """The language model around the Transformer. Field names and defaults follow the release."""

    model: Optional[TransformerConfig]
    vocab_size: int
    pad_token: int
    eos_token: int
    sequence_len: int
    model_size: int = 0
    embedding_init_scale: float = 1.0
    embedding_multiplier_scale: float = 1.0
    output_multiplier_scale: float = 1.0
    name: Optional[str] = None
    fprop_dtype: Any = jnp.bfloat16
    model_type: Optional[str] = None
    init_scale_override: Optional[float] = None
    shard_embeddings: bool = True

    def initialize(self) -> "LanguageModelConfig":
        """Sync the Transformer's fields with this config and validate. Returns self."""
        if self.model is None:
            raise ValueError("LanguageModelConfig.model is None; give it a TransformerConfig.")
        self.model.vocab_size = self.vocab_size
        self.model.fprop_dtype = self.fprop_dtype
        self.model_size = self.model.emb_size
        self.model.validate()
        self.model.validate_moe()
        if not 0 <= self.pad_token < self.vocab_size or not 0 <= self.eos_token < self.vocab_size:
            raise ValueError(
                f"pad_token={self.pad_token} and eos_token={self.eos_token} must lie in "
                f"[0, vocab_size={self.vocab_size})."
            )
        return self

    def partition_rules(self) -> tuple[tuple[str, P], ...]:
        d, m = self.model.data_axis, self.model.model_axis
        embed = P(None, (d, m)) if self.shard_embeddings else P()
        return ((r"in_out_embed/embeddings$", embed),) + self.model.partition_rules()

    def make(self, mesh: Optional[Mesh] = None) -> "LanguageModel":
        """Build the Haiku module. Call inside hk.transform: lm(tokens, memory, length)."""
        self.initialize()
        return LanguageModel(self, model=self.model.make(mesh=mesh), mesh=mesh)


def grok_1_config(**overrides: Any) -> LanguageModelConfig:
    """The released Grok-1 configuration (SPEC section 1). Overrides go to TransformerConfig."""
    model = dict(
        emb_size=48 * 128,
        widening_factor=8,
        key_size=128,
        num_q_heads=48,
        num_kv_heads=8,
        num_layers=64,
        attn_output_multiplier=0.08838834764831845,
        shard_activations=True,
        num_experts=8,
        num_selected_experts=2,
        data_axis="data",
        model_axis="model",
    )
    model.update(overrides)
    return LanguageModelConfig(
        vocab_size=128 * 1024,
        pad_token=0,
        eos_token=2,
        sequence_len=8192,
        embedding_init_scale=1.0,
        output_multiplier_scale=0.5773502691896257,
        embedding_multiplier_scale=78.38367176906169,
        model=TransformerConfig(**model),
    ).initialize()


def tiny_config(vocab_size: int = 512, sequence_len: int = 256, **overrides: Any) -> LanguageModelConfig:
    """Grok-1 at toy size: the same structure (8 experts top-2, GQA 2:1, int8) and multipliers."""
    model = dict(
        emb_size=64,
        widening_factor=2,  # ffn 88
        key_size=16,
        num_q_heads=4,
        num_kv_heads=2,
        num_layers=2,
        attn_output_multiplier=0.25,  # 1/sqrt(key_size), as in the real model
    )
    model.update(overrides)
    config = grok_1_config(**model)
    return dataclasses.replace(config, vocab_size=vocab_size, sequence_len=sequence_len).initialize()


# ---------------------------------------------------------------------------------------
# Sharding helpers
# ---------------------------------------------------------------------------------------


def _axis_size(mesh: Mesh, axis: Any) -> int:
    if axis is None:
        return 1
    names = axis if isinstance(axis, tuple) else (axis,)
    return int(np.prod([mesh.shape[a] for a in names]))


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drop the mesh axes of `spec` that do not divide their dimension (replicate it there).

    Used for activations, caches and scales, whose sizes (a batch of 1, a scale block
    dimension of 1) legitimately do not split over every mesh.
    """
    entries = list(spec) + [None] * (len(shape) - len(spec))
    return P(*[a if n % _axis_size(mesh, a) == 0 else None for a, n in zip(entries, shape)])


def constrain(x: jax.Array, mesh: Optional[Mesh], spec: P) -> jax.Array:
    """with_sharding_constraint when a mesh is given; a no-op without one."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, fit_spec(spec, x.shape, mesh)))


def spec_for(path: str, rules: Sequence[tuple[str, P]]) -> P:
    """The PartitionSpec of the first rule whose regex matches 'module_path/param'."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            return spec
    return P()


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------


class RMSNorm(hk.Module):
    """x * rsqrt(mean(x^2) + eps) * scale, computed in float32; the scale is used as is.

    The output has `dtype` (None: the input's): the compute dtype where it feeds a matmul,
    float32 where it is added to the float32 residual stream.
    """

    def __init__(self, eps: float = 1e-5, name: Optional[str] = None, dtype: Any = None):
        super().__init__(name=name)
        self.eps = eps
        self.dtype = dtype

    def weight(self, size: int) -> jax.Array:
        """The scale [size] (parameter `scale`)."""
        return hk.get_parameter("scale", [size], jnp.float32, init=hk.initializers.Constant(1.0))

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.weight(x.shape[-1])
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(jnp.float32)).astype(self.dtype or x.dtype)


def matmul(x: jax.Array, w: Any, impl: str = "fast", backend: str = "auto", out_dtype: Any = None) -> jax.Array:
    """x [..., n_in] @ w [n_in, n_out] -> [..., n_out] in out_dtype (None: x's), for float
    or int8 weights; float32 accumulation either way.

    Leading dimensions are kept (release defect 1 flattened them away). With int8 weights,
    `reference` dequantizes the whole matrix first, as the release does; `fast` multiplies
    per scale block and scales the block results, so no dequantized copy is made
    (`backend` picks the kernel; see kernels.py).
    """
    out_dtype = out_dtype or x.dtype
    if isinstance(w, QuantizedWeight8bit):
        if impl == "reference":
            return jnp.dot(x, dequantize(w, x.dtype), preferred_element_type=jnp.float32).astype(out_dtype)
        return kernels.int8_matmul(x, w.weight, w.scales, backend=backend, out_dtype=out_dtype,
                                   transposed=is_transposed(w))
    return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(out_dtype)


class Linear(hk.Module):
    """A bias-free projection whose weight `w` may be float or QuantizedWeight8bit.

    `spec` is the weight's PartitionSpec (input axis, output axis). Under a mesh of several
    devices the fast int8 path runs per device inside a shard_map (see sharded_matmul);
    otherwise the partitioner splits plain XLA ops. out_dtype: the result's dtype (None: the
    input's); float32 keeps the matmul's float32 sums unrounded for what follows in float32
    (RoPE, the residual stream's norms).
    """

    def __init__(self, output_size: int, impl: str, mesh: Optional[Mesh], spec: P, name: str,
                 out_dtype: Any = None):
        super().__init__(name=name)
        self.output_size = output_size
        self.impl = impl
        self.mesh = mesh
        self.spec = spec
        self.out_dtype = out_dtype

    def weight(self, input_size: int) -> Any:
        """This projection's parameter `w` [input_size, output_size]."""
        return hk.get_parameter("w", [input_size, self.output_size], jnp.float32, init=jnp.zeros)

    def __call__(self, x: jax.Array) -> jax.Array:
        [y] = linears(x, [self])
        return y

    def partial_sums(self, x: jax.Array) -> jax.Array:
        """x's product as float32 partial sums [S, ..., output_size] whose sum is __call__'s
        result before rounding: on the fast int8 path on one device the kernel's S slices of
        the input dimension, left for the next kernel to add (kernels.residual_norm); else S = 1."""
        w = self.weight(x.shape[-1])
        if self.impl != "fast" or not isinstance(w, QuantizedWeight8bit):
            return matmul(x, w, self.impl, "auto", jnp.float32)[None]
        if self.mesh is not None and self.mesh.size > 1:  # the psum adds the devices' sums first
            return sharded_matmul(x, [w], self.mesh, self.spec, jnp.float32)[0][None]
        [parts] = kernels.int8_matmuls(x, [(w.weight, w.scales)], transposed=is_transposed(w), partial_sums=True)
        return parts


def linears(x: jax.Array, projections: Sequence[Linear]) -> list[jax.Array]:
    """x through several Linears that share their input, settings and weight layout.

    On the fast int8 path they run as one kernel launch per device (attention's q, k and v:
    one launch where there were three, each with its split-K sum); otherwise one by one.
    """
    first = projections[0]
    settings = {(p.impl, p.mesh, tuple(p.spec), p.out_dtype) for p in projections}
    if len(settings) > 1:
        raise ValueError(f"linears: {[p.module_name for p in projections]} differ in impl, mesh, spec or "
                         "out_dtype; call them one by one.")
    ws = [p.weight(x.shape[-1]) for p in projections]
    fused = (first.impl == "fast" and all(isinstance(w, QuantizedWeight8bit) for w in ws)
             and len({is_transposed(w) for w in ws}) == 1)
    if fused and first.mesh is not None and first.mesh.size > 1:
        return sharded_matmul(x, ws, first.mesh, first.spec, first.out_dtype)
    if fused:  # int8_matmuls runs them one by one where they cannot share a launch
        return kernels.int8_matmuls(x, [(w.weight, w.scales) for w in ws], out_dtype=first.out_dtype or x.dtype,
                                    transposed=is_transposed(ws[0]))
    return [matmul(x, w, first.impl, "auto", first.out_dtype) for w in ws]


def shardable_scales(w: Any, mesh: Mesh, in_axis: Any) -> Any:
    """Give row-blocked scales as many blocks as input shards, so each shard holds whole blocks.

    Repeating a block's scale row over its sub-blocks changes no value (same rows, same scale).
    """
    if not isinstance(w, QuantizedWeight8bit):
        return w
    nb, shards = w.scales.shape[-2], _axis_size(mesh, in_axis)
    if nb > 1 and nb % shards:
        w = dataclasses.replace(w, scales=jnp.repeat(w.scales, shards // math.gcd(nb, shards), axis=-2))
    return w


def weight_in_specs(w: Any, spec: P, mesh: Mesh) -> Any:
    """shard_map in_specs for a weight leaf of logical layout `spec` (a QuantizedWeight8bit
    gets one per field; a transposed int8 matrix has its last two axes swapped)."""
    if isinstance(w, QuantizedWeight8bit):
        weight_spec = transposed_spec(spec, w.weight.ndim) if is_transposed(w) else spec
        return type(w)(weight_spec, fit_spec(spec, w.scales.shape, mesh))
    return spec


def sharded_matmul(x: jax.Array, ws: Sequence[QuantizedWeight8bit], mesh: Mesh, spec: P,
                   out_dtype: Any = None) -> list[jax.Array]:
    """x [..., n_in] @ each w [n_in, n_out_t] of ws, all split (in_axis, out_axis) = spec
    over the mesh -> one [..., n_out_t] per weight.

    Each device multiplies its own int8 shards with the int8 kernel (Pallas on a GPU, no
    dequantized copy; several weights in one launch) and partial sums over in_axis are added
    with one psum (in float32). x arrives whole along the batch dimensions; the results, in
    out_dtype (None: x's), are split over out_axis on their last dimension.
    """
    in_axis, out_axis = spec
    lead = [None] * (x.ndim - 1)
    ws = [shardable_scales(w, mesh, in_axis) for w in ws]
    reduce = _axis_size(mesh, in_axis) > 1
    out_dtype = out_dtype or x.dtype

    def body(x, ws):
        ys = kernels.int8_matmuls(x, [(w.weight, w.scales) for w in ws], backend="auto",
                                  transposed=is_transposed(ws[0]), out_dtype=jnp.float32 if reduce else out_dtype)
        return [jax.lax.psum(y, in_axis).astype(out_dtype) for y in ys] if reduce else ys

    return jax.shard_map(
        body, mesh=mesh, in_specs=(P(*lead, in_axis), [weight_in_specs(w, spec, mesh) for w in ws]),
        out_specs=[P(*lead, out_axis)] * len(ws), check_vma=False,
    )(x, ws)


def float32_sums_on_cpu(*operands: jax.Array) -> tuple[jax.Array, ...]:
    """Operands of a batched bf16 einsum, so that its sums are float32 on every backend.

    GPUs sum bf16 products in float32. The CPU backend of jax 0.11 sums a batched bf16 dot
    in bf16 (2e-2 relative error over 1368 terms, against 1.7e-3), so there the operands
    go in as float32: bf16 products are exact in float32, and the sum is then float32 too.
    """
    if jax.default_backend() != "cpu":
        return operands
    return tuple(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x for x in operands)


def activation_dtype(cfg: TransformerConfig, rows: int) -> Any:
    """The dtype of an activation that feeds a matmul of `rows` rows (tokens; routed rows in
    the MoE): float32 where the matmuls use it unrounded at no measurable cost
    (kernels.float32_inputs: always on the CPU; up to kernels.SPLIT_MAX_ROWS rows on an
    accelerator, where weight reads bound the time), else cfg.fprop_dtype (bf16: the
    release's precision, for prefill-size matmuls on an accelerator)."""
    if jnp.dtype(cfg.fprop_dtype) == jnp.float32 or kernels.float32_inputs(rows):
        return jnp.float32
    return cfg.fprop_dtype


def einsum_f32(spec: str, a: jax.Array, b: jax.Array, split_axis: int) -> jax.Array:
    """einsum(spec, a, b) -> float32, with float32 sums and a float32 `a` used unrounded.

    On the CPU both operands go in as float32. Elsewhere a float32 `a` against a bf16 `b`
    (a KV cache, the bf16 embedding table) is split into bf16 hi + lo (kernels.split_bf16)
    stacked along a's axis `split_axis` (one the output keeps): one bf16 einsum reads b
    once, and the two halves of its output are added. Other operands are multiplied as
    they are.
    """
    f32 = jnp.float32
    if jax.default_backend() == "cpu":
        return jnp.einsum(spec, a.astype(f32), b.astype(f32), preferred_element_type=f32)
    if a.dtype == f32 and b.dtype != f32:
        inputs, out = spec.split("->")
        out_axis = out.index(inputs.split(",")[0][split_axis])
        n = a.shape[split_axis]
        y = jnp.einsum(spec, jnp.concatenate(kernels.split_bf16(a), axis=split_axis), b.astype(jnp.bfloat16),
                       preferred_element_type=f32)
        return jax.lax.slice_in_dim(y, 0, n, axis=out_axis) + jax.lax.slice_in_dim(y, n, 2 * n, axis=out_axis)
    return jnp.einsum(spec, a, b.astype(a.dtype), preferred_element_type=f32)


def rotary_embedding(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotate-half RoPE over the whole head. x [B, T, N, K], positions [B, T] -> [B, T, N, K]."""
    angles = positions.astype(jnp.float32)[:, :, None] * kernels.rope_frequencies(x.shape[-1], base)  # [B, T, K/2]
    return kernels.rotate_half(x, angles[:, :, None, :]).astype(x.dtype)


# ---------------------------------------------------------------------------------------
# Attention with a KV cache
# ---------------------------------------------------------------------------------------


class KVMemory(NamedTuple):
    """One layer's cache. k, v [B, S, G, K]; step [B]: tokens already written per sequence
    (the same in every layer; the model reads layer 0's)."""

    k: Optional[jax.Array]
    v: Optional[jax.Array]
    step: Optional[jax.Array]


class Memory(NamedTuple):
    """The whole model's cache: one KVMemory per layer."""

    layers: list[KVMemory]


def init_layer_memories(
    batch_size: int, sequence_len: int, num_kv_heads: int, key_size: int, num_layers: int,
    dtype: Any = jnp.bfloat16,
) -> Memory:
    """An empty cache of `sequence_len` positions per sequence, all steps at 0."""

    def layer() -> KVMemory:
        shape = (batch_size, sequence_len, num_kv_heads, key_size)
        return KVMemory(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch_size,), jnp.int32))

    return Memory(layers=[layer() for _ in range(num_layers)])


def attention_mask(input_mask: jax.Array, step: jax.Array, cache_len: int) -> jax.Array:
    """Which keys each query sees. input_mask [B, T] (False = pad), step [B] -> [B, T, S].

    Query t of a sequence sits at position step + t. It sees key position s when s <= step + t
    (causal) and s is not a pad token of this call. Keys written by earlier calls (s < step)
    are real tokens.
    """
    t = input_mask.shape[1]
    q_pos = step[:, None] + jnp.arange(t)  # [B, T]
    k_pos = jnp.arange(cache_len)  # [S]
    causal = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, T, S]
    offset = k_pos[None, :] - step[:, None]  # [B, S]: index of key s in this call's tokens
    in_call = (offset >= 0) & (offset < t)
    key_is_real = jnp.take_along_axis(input_mask, jnp.clip(offset, 0, t - 1), axis=1)
    key_visible = jnp.where(in_call, key_is_real, offset < 0)  # [B, S]
    return causal & key_visible[:, None, :]


ATTN_LOGIT_CAP = 30.0  # attention logits are capped by 30 tanh(x / 30) (SPEC)
PREFIX_BUCKET_MIN = 512  # the smallest cache prefix a decode step reads
# Reading only a prefix of the cache costs a conditional per layer (XLA waits on the host
# for the branch: about 40 us per layer at batch 1 on an H200) and copies of the slices; a
# cache below this many bytes per device (K and V of one layer) is cheaper to read whole:
# at 4.2 TB/s, 128 MiB take 32 us. (Grok-1, 8192 positions: batch >= 4 on one device.)
PREFIX_MIN_CACHE_BYTES = 128 * 2**20


def prefix_buckets(cache_len: int) -> list[int]:
    """Cache prefixes attention may read, doubling from PREFIX_BUCKET_MIN up to cache_len.

    A step reads the smallest that holds every sequence's tokens, so its cost follows the
    tokens in the cache (at most twice them), not the cache's capacity.
    """
    sizes, n = [], PREFIX_BUCKET_MIN
    while n < cache_len:
        sizes.append(n)
        n *= 2
    return sizes + [cache_len]


class MultiHeadAttention(hk.Module):
    """Grouped-query attention with RoPE, a capped float32 softmax and a per-sequence cache."""

    def __init__(self, config: TransformerConfig, mesh: Optional[Mesh], name: str = "multi_head_attention"):
        super().__init__(name=name)
        self.config = config
        self.mesh = mesh

    def __call__(
        self, x: jax.Array, input_mask: jax.Array, memory: Optional[KVMemory], output_parts: bool = False,
    ) -> tuple[jax.Array, Optional[KVMemory]]:
        """x [B, T, D] -> ([B, T, D] float32, the updated cache); output_parts: the output
        projection's partial sums [S, B, T, D] instead (Linear.partial_sums)."""
        cfg = self.config
        b, t, _ = x.shape
        h, g, k = cfg.num_q_heads, cfg.num_kv_heads, cfg.key_size
        impl = cfg.moe_impl
        data, model = cfg.data_axis, cfg.model_axis

        # Projections leave their float32 sums for RoPE. k and v are rounded once, after it, as
        # the KV cache stores them; q stays float32 (_attend decides).
        f32 = jnp.float32
        qkv_spec, out_spec = P(data, model), P(model, data)  # the release's weight layouts
        projections = [Linear(n, impl, self.mesh, qkv_spec, name=name, out_dtype=f32)
                       for name, n in (("query", h * k), ("key", g * k), ("value", g * k))]
        linear = Linear(cfg.emb_size, impl, self.mesh, out_spec, name="linear", out_dtype=f32)
        ws = [p.weight(x.shape[-1]) for p in projections]
        if memory is not None and t == 1 and self._decodes_in_kernels(ws):
            out, new_memory = self._decode_in_kernels(x, memory, input_mask, ws)
            out = out.reshape(b, t, h * k)
            return (linear.partial_sums(out) if output_parts else linear(out)), new_memory
        q, key, value = linears(x, projections)
        q = q.reshape(b, t, h, k)  # [B, T, H, K]
        key, value = key.reshape(b, t, g, k), value.reshape(b, t, g, k)  # [B, T, G, K]

        step = jnp.zeros((b,), jnp.int32) if memory is None else memory.step  # [B]
        positions = step[:, None] + jnp.arange(t)  # [B, T]
        q = rotary_embedding(q, positions)  # float32
        key = rotary_embedding(key, positions).astype(cfg.fprop_dtype)  # as the KV cache stores it
        value = value.astype(cfg.fprop_dtype)
        q = q.reshape(b, t, g, h // g, k)  # query head i uses kv head i // (H / G)

        if memory is None:
            out, new_memory = self._attend(q, key, value, input_mask, step), None
        else:
            keys = kernels.write_at_steps(memory.k, key, step)  # [B, S, G, K]
            values = kernels.write_at_steps(memory.v, value, step)
            keys = constrain(keys, self.mesh, P(data, None, model))
            values = constrain(values, self.mesh, P(data, None, model))
            new_memory = KVMemory(k=keys, v=values, step=step)  # the step is advanced by the caller
            if t == 1 and impl == "fast" and kernels.uses_pallas():
                # Decode: one kernel reads each row's own keys, [0, step] (step itself only if
                # this token is real), so the cost follows the tokens, not the capacity.
                lengths = step + input_mask[:, 0].astype(jnp.int32)  # [B]
                out = self._decode_attention(q.reshape(b, g, h // g, k), keys, values, lengths)
            else:
                # A large cache: read only the used prefix, the smallest bucket that holds every
                # row's keys. A small one is read whole (see PREFIX_MIN_CACHE_BYTES).
                buckets = prefix_buckets(keys.shape[1])
                if self._cache_bytes_per_device(keys) < PREFIX_MIN_CACHE_BYTES:
                    buckets = buckets[-1:]
                used = jnp.max(step) + t
                branch = jnp.sum(jnp.asarray(buckets[:-1], jnp.int32) < used)
                attend = [functools.partial(self._attend_prefix, n) for n in buckets]
                out = jax.lax.switch(branch, attend, q, keys, values, input_mask, step)  # one branch: a call
        out = constrain(out.reshape(b, t, h * k), self.mesh, P(data, None, model))
        # float32 out: it goes through rms_norm_1 into the float32 residual stream.
        return (linear.partial_sums(out) if output_parts else linear(out)), new_memory

    def _decodes_in_kernels(self, ws: Sequence[Any]) -> bool:
        """Whether a decode step's attention runs as _decode_in_kernels: the fast mode on a
        Pallas backend, int8 q, k and v (ws) of one layout, and per device whole rows of x and
        whole KV heads (a data axis of 1, a model axis that divides the KV heads)."""
        cfg, mesh = self.config, self.mesh
        if (cfg.moe_impl != "fast" or not kernels.uses_pallas()
                or not all(isinstance(w, QuantizedWeight8bit) for w in ws) or len({is_transposed(w) for w in ws}) > 1):
            return False
        if mesh is None or mesh.size == 1:
            return True
        return _axis_size(mesh, cfg.data_axis) == 1 and cfg.num_kv_heads % _axis_size(mesh, cfg.model_axis) == 0

    def _decode_in_kernels(self, x: jax.Array, memory: KVMemory, input_mask: jax.Array,
                           ws: Sequence[Any]) -> tuple[jax.Array, KVMemory]:
        """A decode step's attention in three kernels per device: q, k and v in one int8 launch
        whose partial sums kernels.decode_qkv adds, rotates and writes into the cache (in
        place), then kernels.decode_attention over each row's own keys, [0, step] (step itself
        only if this token is real), so the cost follows the tokens, not the capacity.
        x [B, 1, D], ws the int8 q, k and v weights -> ([B, 1, G, H/G, K] as _attend's dtype,
        the updated cache)."""
        cfg, mesh = self.config, self.mesh
        b, _, d = x.shape
        h, g = cfg.num_q_heads, cfg.num_kv_heads
        lengths = memory.step + input_mask[:, 0].astype(jnp.int32)  # [B]

        def attend(x, ws, keys, values, step, lengths):  # per device: its KV heads, their query heads
            local_h = h * keys.shape[2] // g
            [parts] = kernels.int8_matmuls(x.reshape(x.shape[0], d), [(w.weight, w.scales) for w in ws],
                                           transposed=is_transposed(ws[0]), partial_sums=True, joined=True)
            q, keys, values = kernels.decode_qkv(parts, keys, values, step, q_heads=local_h)  # [S, B, (H+2G)K] in
            out = kernels.decode_attention(q, keys, values, lengths, scale=cfg.attn_output_multiplier,
                                           cap=ATTN_LOGIT_CAP, heads=local_h // keys.shape[2])
            return out, keys, values

        if mesh is not None and mesh.size > 1:
            data, model = cfg.data_axis, cfg.model_axis
            cache_spec = fit_spec(P(data, None, model), memory.k.shape, mesh)
            rows = fit_spec(P(data), (b,), mesh)
            attend = jax.shard_map(
                attend, mesh=mesh, check_vma=False,
                in_specs=(rows, [weight_in_specs(w, P(data, model), mesh) for w in ws], cache_spec, cache_spec,
                          rows, rows),
                out_specs=(fit_spec(P(data, model), (b, g), mesh), cache_spec, cache_spec))
        out, keys, values = attend(x, ws, memory.k, memory.v, memory.step, lengths)  # out [B, G, H/G, K]
        # float32 where _attend keeps it (decode sizes): the output projection takes it unrounded.
        out = out[:, None].astype(activation_dtype(cfg, b))
        return out, KVMemory(k=keys, v=values, step=memory.step)

    def _decode_attention(self, q: jax.Array, keys: jax.Array, values: jax.Array, lengths: jax.Array) -> jax.Array:
        """kernels.decode_attention per device: q [B, G, H/G, K] float32, the cache [B, S, G, K],
        lengths [B] -> [B, 1, G, H/G, K] (dtype as _attend's); KV heads split over the model axis."""
        cfg = self.config
        attend = functools.partial(kernels.decode_attention, scale=cfg.attn_output_multiplier, cap=ATTN_LOGIT_CAP)
        if self.mesh is not None and self.mesh.size > 1:
            d, m = cfg.data_axis, cfg.model_axis
            q_spec = fit_spec(P(d, m), q.shape, self.mesh)
            cache_spec = fit_spec(P(d, None, m), keys.shape, self.mesh)
            attend = jax.shard_map(attend, mesh=self.mesh, in_specs=(q_spec, cache_spec, cache_spec,
                                                                      fit_spec(P(d), lengths.shape, self.mesh)),
                                   out_specs=q_spec, check_vma=False)
        # float32 where _attend keeps it (decode sizes): the output projection takes it unrounded.
        return attend(q, keys, values, lengths)[:, None].astype(activation_dtype(cfg, q.shape[0]))

    def _cache_bytes_per_device(self, keys: jax.Array) -> float:
        """Bytes of this layer's K and V cache on one device ([B, S, G, K], split over data
        and model where they divide B and G)."""
        shards = 1
        if self.mesh is not None:
            spec = fit_spec(P(self.config.data_axis, None, self.config.model_axis), keys.shape, self.mesh)
            shards = math.prod(_axis_size(self.mesh, a) for a in spec)
        return 2 * keys.size * keys.dtype.itemsize / shards

    def _attend_prefix(self, n: int, q, keys, values, input_mask, step) -> jax.Array:
        return self._attend(q, keys[:, :n], values[:, :n], input_mask, step)

    def _attend(self, q: jax.Array, keys: jax.Array, values: jax.Array, input_mask: jax.Array,
                step: jax.Array) -> jax.Array:
        """q [B, T, G, H/G, K] (float32) against keys/values [B, S, G, K] (the cache's
        dtype) -> [B, T, G, H/G, K].

        Logits in float32, scaled, capped by 30 tanh(x / 30), masked, float32 softmax, the
        weighted sum of values with float32 sums. Where activations stay float32
        (activation_dtype of B*T rows: the CPU, decode sizes) q, the probabilities and the
        output are never rounded (einsum_f32); at prefill sizes on an accelerator q and the
        probabilities are rounded to the compute dtype, as the release does, and so is the
        output (the input of the output projection).
        """
        cfg = self.config
        dtype = activation_dtype(cfg, q.shape[0] * q.shape[1])
        q = q.astype(dtype)
        mask = attention_mask(input_mask, step, keys.shape[1])  # [B, T, S]
        logits = einsum_f32("btgqk,bsgk->bgqts", q, keys, split_axis=3)
        logits = logits * cfg.attn_output_multiplier
        logits = ATTN_LOGIT_CAP * jnp.tanh(logits / ATTN_LOGIT_CAP)
        logits = jnp.where(mask[:, None, None, :, :], logits, -1e30)
        probs = jax.nn.softmax(logits, axis=-1).astype(dtype)  # [B, G, H/G, T, S]
        return einsum_f32("bgqts,bsgk->btgqk", probs, values, split_axis=2).astype(dtype)


# ---------------------------------------------------------------------------------------
# Mixture of experts
# ---------------------------------------------------------------------------------------


class Router(hk.Module):
    """Float32 softmax router. Returns the top-k raw probabilities (not renormalised)."""

    def __init__(self, num_experts: int, num_selected: int, name: str = "router"):
        super().__init__(name=name)
        self.num_experts = num_experts
        self.num_selected = num_selected

    def weight(self, size: int) -> jax.Array:
        """The router's matrix [size, E] (parameter `w`)."""
        return hk.get_parameter("w", [size, self.num_experts], jnp.float32, init=jnp.zeros)

    def logits(self, x: jax.Array) -> jax.Array:
        """x [..., D] -> float32 router logits [..., E]."""
        return jnp.dot(x.astype(jnp.float32), self.weight(x.shape[-1]).astype(jnp.float32))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        probs = jax.nn.softmax(self.logits(x), axis=-1)
        gates, experts = jax.lax.top_k(probs, self.num_selected)  # [..., k] each
        return gates, experts.astype(jnp.int32)


class ExpertWeight(hk.Module):
    """Holds one stacked expert weight `w` [E, n_in, n_out] (float or QuantizedWeight8bit)."""

    def __init__(self, shape: Sequence[int], name: str):
        super().__init__(name=name)
        self.shape = list(shape)

    def __call__(self) -> Any:
        return hk.get_parameter("w", self.shape, jnp.float32, init=jnp.zeros)


def moe_reference(x, gates, experts, w_in, w_v, w_out, num_experts: int) -> jax.Array:
    """The release's algorithm: dequantize all weights, run every expert on every token.

    x [N, D], gates/experts [N, k] -> [N, D] float32 (the gated sum, unrounded). Unselected
    experts get weight 0.
    """
    deq = lambda w: dequantize(w, x.dtype) if isinstance(w, QuantizedWeight8bit) else w.astype(x.dtype)
    weights = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32) * gates[..., None], axis=-2)  # [N, E]
    a = jnp.einsum("nd,edf->nef", x, deq(w_in))
    b = jnp.einsum("nd,edf->nef", x, deq(w_v))
    h = jax.nn.gelu(a) * b  # [N, E, F]
    y = jnp.einsum("nef,efd->ned", *float32_sums_on_cpu(h, deq(w_out))).astype(x.dtype)  # [N, E, D]
    return jnp.einsum("ned,ne->nd", y.astype(jnp.float32), weights)  # float32: to rms_norm_3


def _unpack(w: Any) -> tuple[jax.Array, jax.Array]:
    """(int8 weight, scales) of a quantized weight; a float weight gets unit scales."""
    if isinstance(w, QuantizedWeight8bit):
        return w.weight, w.scales
    return w, jnp.ones((*w.shape[:-2], 1, w.shape[-1]), jnp.bfloat16)


def _layouts_agree(*ws: Any) -> bool:
    """True if the expert weights are all transposed (False if none is); mixed is an error."""
    flags = {is_transposed(w) for w in ws}
    if len(flags) > 1:
        raise ValueError("moe_fast: the expert weights mix the checkpoint's and the transposed int8 "
                         "layout; prepare all of them with model.prepare_for_inference.")
    return flags.pop()


def moe_fast(x, gates, experts, w_in, w_v, w_out, num_experts: int, backend: str = "auto",
             data_axis: Any = None, model_axis: Any = None, pads: bool = False,
             plan: Optional[kernels.MoEPlan] = None, partial_sums: bool = False) -> jax.Array:
    """Only the selected experts, int8 weights dequantized inside the matmuls.

    x [N, D] (D may be this device's shard), gates/experts [N, k] -> [N, D] float32 (the
    gated sum in float32, unrounded; the expert rows themselves are x.dtype). Inside a
    shard_map the expert weights are local shards: the input projections' partial sums are
    reduced over `data_axis`, the output projection's over `model_axis`. pads: `experts`
    may hold num_experts, "no expert" (kernels.make_plan); those rows cost nothing and
    give zeros. plan: the experts' plan if made already (kernels.route), else made here.
    partial_sums: [S, N, D] float32 whose sum is the result, for the next kernel to add.

    One token (a decode step at batch 1) on a Pallas backend takes kernels.moe_one_token:
    no plan, dispatch or combine.
    """
    if x.shape[0] == 1 and data_axis is None and not pads and kernels.uses_pallas(backend):
        parts = kernels.moe_one_token(x, gates[0], experts[0], _unpack(w_in), _unpack(w_v), _unpack(w_out),
                                      backend=backend, transposed=_layouts_agree(w_in, w_v, w_out))  # [S, 1, D]
        if model_axis is not None:  # the all-reduce carries one row
            parts = jax.lax.psum(jnp.sum(parts, axis=0), model_axis)[None]
        return parts if partial_sums else jnp.sum(parts, axis=0)
    out = _moe_planned(x, gates, experts, w_in, w_v, w_out, num_experts, backend, data_axis, model_axis,
                       pads, plan)
    return out[None] if partial_sums else out


def _moe_planned(x, gates, experts, w_in, w_v, w_out, num_experts, backend, data_axis, model_axis, pads,
                 plan) -> jax.Array:
    """moe_fast through a plan: rows grouped by expert and padded to whole tiles -> [N, D]."""
    if plan is None:
        plan = kernels.make_plan(experts, num_experts, kernels.default_block_m(experts.size), pads)
    xs = kernels.dispatch(x, plan)  # [M_pad, D]
    (wi, si), (wv, sv), (wo, so) = _unpack(w_in), _unpack(w_v), _unpack(w_out)
    transposed = _layouts_agree(w_in, w_v, w_out)
    grouped = functools.partial(kernels.grouped_matmul, plan=plan, backend=backend, transposed=transposed)
    if data_axis is None:
        h = kernels.grouped_matmul_gated(xs, wi, si, wv, sv, plan, backend=backend, out_dtype=x.dtype,
                                         transposed=transposed)  # [M_pad, F]
    else:  # the contraction over D is split over the data axis: sum before the gelu
        a = grouped(xs, wi, si, out_dtype=jnp.float32)
        b = grouped(xs, wv, sv, out_dtype=jnp.float32)
        a, b = jax.lax.psum((a, b), data_axis)
        h = (jax.nn.gelu(a.astype(x.dtype)) * b.astype(x.dtype))
    if model_axis is None:
        y = grouped(h, wo, so, out_dtype=x.dtype)  # [M_pad, D]
        return kernels.combine(y, gates, plan, out_dtype=jnp.float32, pads=pads)
    # Combine the float32 partial sums first, then add them over the model axis: the
    # all-reduce carries [N, D], not the padded [M_pad, D] (16x fewer bytes at batch 1).
    y = grouped(h, wo, so, out_dtype=jnp.float32)
    return jax.lax.psum(kernels.combine(y, gates, plan, out_dtype=jnp.float32, pads=pads), model_axis)


class MoELayer(hk.Module):
    """Top-k gated mixture of tanh-gelu experts: sum_k gate_k * W_1(gelu(x W) * (x W_v))."""

    def __init__(self, config: TransformerConfig, router: Router, mesh: Optional[Mesh], name: str = "moe"):
        super().__init__(name=name)
        self.config = config
        self.router = router
        self.mesh = mesh

    def __call__(self, x: jax.Array, input_mask: Optional[jax.Array] = None,
                 logits: Optional[jax.Array] = None, output_parts: bool = False) -> jax.Array:
        """x [B, T, D] (float32: the router sees it unrounded), input_mask [B, T] (False: a pad
        position) -> [B, T, D] float32. In a prefill (T > 1) pad positions go to no expert
        and get zeros: nothing reads them (attention masks their keys), and the fast path
        then spends no work on a prompt's padding to its bucket. A decode step (T = 1) keeps
        its program as measured on several GPUs (an empty slot's row is computed and unused);
        at decode sizes on a GPU the router's softmax, top-k and the experts' plan are one
        kernel (kernels.route). logits: the router's logits made already, [P, B*T, E] partial
        sums (kernels.residual_norm's; the fast mode of a decode step), x then the experts'
        input as they take it. output_parts: [S, B, T, D] float32 partial sums of the output
        instead (moe_fast's), for kernels.residual_norm to add."""
        cfg = self.config
        b, t, d = x.shape
        e, f, k = cfg.num_experts, cfg.ffn_size, cfg.num_selected_experts
        pads = input_mask is not None and t > 1
        fused = (cfg.moe_impl == "fast" and not pads
                 and kernels.route_fuses(b * t, e, kernels.default_block_m(b * t * k)))
        if logits is not None:
            if cfg.moe_impl != "fast" or pads:
                raise ValueError("MoELayer: router logits made elsewhere are for the fast mode's decode steps.")
            routing: tuple = (logits,)
        elif fused:
            routing = (self.router.logits(x).reshape(b * t, e),)  # [N, E]
        else:
            gates, experts = self.router(x)  # [B, T, k]
            if pads:
                experts = jnp.where(input_mask[..., None], experts, e)  # e: no expert
                gates = jnp.where(input_mask[..., None], gates, 0.0)
            routing = (gates.reshape(b * t, k), experts.reshape(b * t, k))
        x = x.astype(activation_dtype(cfg, b * t * k))  # the experts' matmul input
        w_in = ExpertWeight([e, d, f], name="linear")()
        w_v = ExpertWeight([e, d, f], name="linear_v")()
        w_out = ExpertWeight([e, f, d], name="linear_1")()
        xf = x.reshape(b * t, d)

        if cfg.moe_impl == "reference":
            out = moe_reference(xf, *routing, w_in, w_v, w_out, e)[None]
        elif self.mesh is None or self.mesh.size == 1:
            gates, experts, plan = _gates_experts_plan(routing, k)
            out = moe_fast(xf, gates, experts, w_in, w_v, w_out, e, pads=pads, plan=plan, partial_sums=True)
        else:
            out = self._sharded_fast(xf, routing, w_in, w_v, w_out, pads)
        out = out.reshape(-1, b, t, d)  # [S, B, T, D]
        return out if output_parts else jnp.sum(out, axis=0)

    def _sharded_fast(self, x, routing: tuple, w_in, w_v, w_out, pads: bool) -> jax.Array:
        """The fast path per device: tokens replicated, experts' D over data and F over model.
        routing (replicated): (logits,) or (gates, experts), as _gates_experts_plan takes it.
        Returns moe_fast's partial sums [S, N, D]."""
        cfg, mesh = self.config, self.mesh
        d, m = cfg.data_axis, cfg.model_axis
        spec_in, spec_out = P(None, d, m), P(None, m, d)

        w_in, w_v = shardable_scales(w_in, mesh, d), shardable_scales(w_v, mesh, d)
        w_out = shardable_scales(w_out, mesh, m)
        wspec = functools.partial(weight_in_specs, mesh=mesh)

        def body(x, w_in, w_v, w_out, *routing):
            gates, experts, plan = _gates_experts_plan(routing, cfg.num_selected_experts)
            return moe_fast(x, gates, experts, w_in, w_v, w_out, cfg.num_experts, backend="auto",
                            data_axis=d if _axis_size(mesh, d) > 1 else None,
                            model_axis=m if _axis_size(mesh, m) > 1 else None, pads=pads, plan=plan,
                            partial_sums=True)

        return jax.shard_map(
            body, mesh=mesh,
            in_specs=(P(None, d), wspec(w_in, spec_in), wspec(w_v, spec_in), wspec(w_out, spec_out))
            + (P(),) * len(routing),
            out_specs=P(None, None, d), check_vma=False,
        )(x, w_in, w_v, w_out, *routing)


def _gates_experts_plan(routing: tuple, k: int) -> tuple:
    """(gates, experts, plan) for moe_fast: from (logits [N, E] or [P, N, E] partial sums,)
    through kernels.route (one kernel), or (gates, experts) [N, k] as they are, the plan left
    to moe_fast."""
    if len(routing) == 1:
        (logits,) = routing
        return kernels.route(logits, k, kernels.default_block_m(logits.shape[-2] * k))
    gates, experts = routing
    return gates, experts, None


# ---------------------------------------------------------------------------------------
# Decoder layer, Transformer, language model
# ---------------------------------------------------------------------------------------


def activation_spec(cfg: TransformerConfig) -> P:
    """The layout of the residual stream h [B, T, D] between blocks.

    The release splits D over the model axis (shard_activations), which costs a gather
    before and a scatter after every projection. The fast path keeps h whole on each model
    shard instead: its projections run per device in shard_maps that take whole rows, so a
    layer needs just two all-reduces (attention output, MoE output).
    """
    if cfg.moe_impl == "fast":
        return P(cfg.data_axis)
    return P(cfg.data_axis, None, cfg.model_axis) if cfg.shard_activations else P()


class DecoderLayer(hk.Module):
    """h += norm_1(attn(norm(h))); h += norm_3(moe(norm_2(h))).

    h, the residual stream, is float32: the blocks' outputs are added unrounded. The matmul
    inputs (the outputs of rms_norm and rms_norm_2) are float32 too where the matmuls take
    them so (activation_dtype), else cast to cfg.fprop_dtype.

    In the fast mode's decode steps of one row on a GPU (kernels.junction_fuses) each block's
    output joins the residual stream in one kernel (kernels.residual_norm) that also takes
    the next norm: rms_norm_1, the add and rms_norm_2 with the router's logits after
    attention; rms_norm_3, the add and the next layer's rms_norm after the MoE.
    """

    def __init__(self, config: TransformerConfig, mesh: Optional[Mesh], layer_index: int):
        super().__init__(name=f"decoder_layer_{layer_index}")
        self.config = config
        self.mesh = mesh

    @staticmethod
    def input_norm(transformer: str, layer_index: int) -> RMSNorm:
        """Layer `layer_index`'s input norm (`rms_norm`) of the Transformer module named
        `transformer`, by its full name: the layer before applies it in its second junction."""
        return RMSNorm(name=hk.experimental.force_name(f"{transformer}/decoder_layer_{layer_index}/rms_norm"))

    def __call__(
        self, h: jax.Array, input_mask: jax.Array, memory: Optional[KVMemory], x: Optional[jax.Array] = None,
        next_norm: Optional[RMSNorm] = None,
    ) -> tuple[jax.Array, Optional[KVMemory], Optional[jax.Array]]:
        """h [B, T, D] -> (h after the layer, the updated cache, the next layer's input or None).

        x: this layer's input, rms_norm(h), where the layer before made it; next_norm: the
        next layer's rms_norm (input_norm), for the second junction to apply where it fuses.
        """
        cfg, mesh = self.config, self.mesh
        f32 = jnp.float32
        h = h.astype(f32)
        b, t, d = h.shape
        if x is None:
            x = RMSNorm(name="rms_norm", dtype=activation_dtype(cfg, b * t))(h)
        attention = MultiHeadAttention(cfg, mesh)
        norm_1, norm_2 = RMSNorm(name="rms_norm_1", dtype=f32), RMSNorm(name="rms_norm_2", dtype=f32)
        norm_3 = RMSNorm(name="rms_norm_3", dtype=f32)
        router = Router(cfg.num_experts, cfg.num_selected_experts, name="router")
        moe = MoELayer(cfg, router, mesh)
        if not (cfg.moe_impl == "fast" and kernels.junction_fuses(b * t)):
            attn, new_memory = attention(x, input_mask, memory)
            h = h + norm_1(attn)
            h = h + norm_3(moe(norm_2(h), input_mask))
            return constrain(h, mesh, activation_spec(cfg)), new_memory, None
        parts, new_memory = attention(x, input_mask, memory, output_parts=True)  # [S, B, T, D]
        h, x, logits = self._junction(h, parts, norm_1, norm_2, router,
                                      activation_dtype(cfg, b * t * cfg.num_selected_experts))
        out = moe(x, input_mask, logits=logits, output_parts=True)  # [S, B, T, D]
        if next_norm is None:
            return constrain(h + norm_3(jnp.sum(out, axis=0)), mesh, activation_spec(cfg)), new_memory, None
        h, x, _ = self._junction(h, out, norm_3, next_norm, None, activation_dtype(cfg, b * t))
        return constrain(h, mesh, activation_spec(cfg)), new_memory, x

    def _junction(self, h: jax.Array, parts: jax.Array, norm: RMSNorm, next_norm: RMSNorm,
                  router: Optional[Router], x_dtype: Any) -> tuple[jax.Array, jax.Array, Optional[jax.Array]]:
        """kernels.residual_norm per device: h [B, T, D] float32 and a block's output as
        partial sums [S, B, T, D] -> (h + norm(sum of parts) [B, T, D], next_norm of that in
        x_dtype [B, T, D], with a router its logits from that as partial sums [P, B*T, E])."""
        b, t, d = h.shape
        if norm.eps != next_norm.eps:
            raise ValueError(f"DecoderLayer: {norm.module_name} and {next_norm.module_name} differ in eps "
                             f"({norm.eps}, {next_norm.eps}); one junction kernel takes one.")
        weights = [norm.weight(d), next_norm.weight(d)] + ([router.weight(d)] if router is not None else [])

        def junction(h, parts, *weights):
            h, x, logits = kernels.residual_norm(h, parts, *weights, eps=norm.eps, y_dtype=x_dtype)
            return (h, x) if logits is None else (h, x, logits)

        if self.mesh is not None and self.mesh.size > 1:  # rows split over data, as h; the rest replicated
            rows = fit_spec(P(self.config.data_axis), (b * t,), self.mesh)
            parts_rows = P(None, *rows)
            junction = jax.shard_map(junction, mesh=self.mesh, in_specs=(rows, parts_rows) + (P(),) * len(weights),
                                     out_specs=(rows, rows, parts_rows)[:len(weights)], check_vma=False)
        h_new, x, *logits = junction(h.reshape(b * t, d), parts.reshape(parts.shape[0], b * t, d), *weights)
        return h_new.reshape(b, t, d), x.reshape(b, t, d), logits[0] if logits else None


class TransformerOutput(NamedTuple):
    embeddings: jax.Array  # [B, T, D]
    memory: Optional[Memory]


class Transformer(hk.Module):
    """The stack of decoder layers."""

    def __init__(self, config: TransformerConfig, mesh: Optional[Mesh] = None, name: str = "transformer"):
        super().__init__(name=name)
        self.config = config
        self.mesh = mesh

    def __call__(
        self, h: jax.Array, input_mask: jax.Array, memory: Optional[Memory] = None,
        advance: Optional[jax.Array] = None,
    ) -> TransformerOutput:
        """h [B, T, D], input_mask [B, T]. `advance` [B]: how far each cache step moves (T)."""
        cfg = self.config
        if memory is not None and len(memory.layers) != cfg.num_layers:
            raise ValueError(f"memory has {len(memory.layers)} layers; the model has {cfg.num_layers}.")
        # Every layer's cache holds the same tokens, so the layers share layer 0's step: the
        # positions, RoPE phases and attention lengths are computed once per call, not once
        # per layer (each a kernel on a GPU), and the steps advance in one go.
        step = None if memory is None else memory.layers[0].step  # [B]
        new_layers, x = [], None
        for i in range(cfg.num_layers):
            layer_memory = None if memory is None else memory.layers[i]._replace(step=step)
            next_norm = DecoderLayer.input_norm(self.module_name, i + 1) if i + 1 < cfg.num_layers else None
            # x: the next layer's input where this layer's second junction made it.
            h, new_memory, x = DecoderLayer(cfg, self.mesh, i)(h, input_mask, layer_memory, x, next_norm)
            new_layers.append(new_memory)
        if memory is None:
            return TransformerOutput(h, None)
        new_step = step + advance
        return TransformerOutput(h, Memory(layers=[m._replace(step=new_step) for m in new_layers]))

    def init_memory(self, batch_size: int, sequence_len: int, dtype: Any = jnp.bfloat16) -> Memory:
        cfg = self.config
        return init_layer_memories(batch_size, sequence_len, cfg.num_kv_heads, cfg.key_size, cfg.num_layers, dtype)


class LanguageModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] float32 ([B, 1, V] when `length` is given)
    model_state: Optional[Memory]


class InOutEmbed(hk.Module):
    """The tied embedding table `embeddings` [V, D] (float32)."""

    def __init__(self, vocab_size: int, embed_dim: int, name: str = "in_out_embed"):
        super().__init__(name=name)
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim

    @property
    def table(self) -> Any:
        """The float32 table, a bf16 one, or a SplitTable (prepare_for_inference)."""
        return hk.get_parameter("embeddings", [self.vocab_size, self.embed_dim], jnp.float32, init=jnp.zeros)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, T] -> the table's rows [B, T, D], float32 (a SplitTable's hi + lo)."""
        table = self.table
        if isinstance(table, SplitTable):
            rows = lambda t: jnp.take(t, tokens, axis=0).astype(jnp.float32)
            return rows(table.hi) + rows(table.lo)
        return jnp.take(table, tokens, axis=0).astype(jnp.float32)

    def decode(self, h: jax.Array, dtype: Any) -> jax.Array:
        """h [B, T, D] -> logits [B, T, V] float32 (einsum_f32: float32 sums, a float32 h
        used unrounded). The table is used in `dtype` (the release's bf16) on an
        accelerator, as stored on the CPU."""
        table = self.table
        if isinstance(table, SplitTable):
            table = table.hi
        if jax.default_backend() != "cpu":
            table = table.astype(dtype)
        return einsum_f32("btd,vd->btv", h, table, split_axis=1)


class LanguageModel(hk.Module):
    """Embedding, Transformer, final norm and tied output projection."""

    def __init__(self, config: LanguageModelConfig, model: Transformer, mesh: Optional[Mesh] = None,
                 name: str = "language_model"):
        super().__init__(name=name)
        self.config = config
        self.model = model
        self.mesh = mesh

    def __call__(
        self, tokens: jax.Array, memory: Optional[Memory] = None, *, length: Optional[jax.Array] = None,
    ) -> LanguageModelOutput:
        """tokens [B, T] int.

        memory: the KV cache (see init_memory); each sequence continues at its own step.
        length [B]: the number of real tokens per row in this call. When given, only the
        logits at position length - 1 are returned ([B, 1, V]) and each cache step advances
        by length (so right padding is never written into a sequence's history).
        Without it, logits for all positions and steps advance by T.
        """
        cfg = self.config
        b, t = tokens.shape
        data = cfg.model.data_axis
        input_mask = tokens > cfg.pad_token  # [B, T]
        embed = InOutEmbed(cfg.vocab_size, cfg.model.emb_size)
        # The residual stream is float32 from the start: the table's float32 rows (hi + lo
        # after prepare_for_inference) times the multiplier, unrounded.
        h = embed(tokens) * jnp.float32(cfg.embedding_multiplier_scale)
        h = constrain(h, self.mesh, activation_spec(cfg.model))

        advance = jnp.full((b,), t, jnp.int32) if length is None else length.astype(jnp.int32)
        out = self.model(h, input_mask, memory=memory, advance=advance)
        h = RMSNorm(name="rms_norm", dtype=jnp.float32)(out.embeddings)  # the unembedding's input

        if length is not None:  # only the last real token of each row: [B, 1, D]
            last = jnp.maximum(length.astype(jnp.int32) - 1, 0)
            h = jnp.take_along_axis(h, last[:, None, None], axis=1)
        h = h.astype(activation_dtype(cfg.model, h.shape[0] * h.shape[1]))
        logits = embed.decode(h, cfg.fprop_dtype) * cfg.output_multiplier_scale
        return LanguageModelOutput(logits=constrain(logits, self.mesh, P(data)), model_state=out.memory)

    def init_memory(self, batch_size: int, seq_len: int, dtype: Any = jnp.bfloat16) -> Memory:
        """An empty KV cache for `batch_size` sequences of up to `seq_len` tokens."""
        return self.model.init_memory(batch_size, seq_len, dtype)


# ---------------------------------------------------------------------------------------
# The parameter tree: abstract shapes, shardings, random values
# ---------------------------------------------------------------------------------------

# Module paths of int8 weights; "row" weights have one scale row per input block.
_QUANTIZED = re.compile(r"(multi_head_attention/(query|key|value|linear)|moe/(linear|linear_v|linear_1))$")
_ROW_BLOCKED = re.compile(r"(multi_head_attention/linear|moe/linear_1)$")
RELEASE_SCALE_BLOCKS = 8  # the released checkpoint was quantized on an 8-way model axis


def with_moe_impl(config: LanguageModelConfig, impl: str) -> LanguageModelConfig:
    """A copy of `config` whose Transformer uses MoE implementation `impl` (MOE_IMPLS)."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, moe_impl=impl))


def param_shapes(config: LanguageModelConfig, scale_blocks: int = RELEASE_SCALE_BLOCKS) -> dict:
    """The parameter tree as jax.ShapeDtypeStruct leaves, built abstractly (no allocation).

    Matmul weights are QuantizedWeight8bit(int8 [..., n_in, n_out], bf16 [..., nb, n_out]):
    nb = 1 for column weights, `scale_blocks` for row weights (SPEC section 3).
    """
    config = with_moe_impl(config, "reference").initialize()
    init = hk.transform(lambda tokens: config.make()(tokens)).init
    floats = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    tree: dict = {}
    for module, params in floats.items():
        tree[module] = {}
        for name, leaf in params.items():
            if name == "w" and _QUANTIZED.search(module):
                *lead, n_in, n_out = leaf.shape
                nb = scale_blocks if _ROW_BLOCKED.search(module) else 1
                if n_in % nb:
                    raise ValueError(f"{module}/w: input dimension {n_in} is not divisible by {nb} scale blocks.")
                tree[module][name] = QuantizedWeight8bit(
                    jax.ShapeDtypeStruct(leaf.shape, jnp.int8),
                    jax.ShapeDtypeStruct((*lead, nb, n_out), jnp.bfloat16),
                )
            else:
                tree[module][name] = jax.ShapeDtypeStruct(leaf.shape, jnp.float32)
    return tree


def _check_divisible(path: str, shape: Sequence[int], spec: P, mesh: Mesh) -> None:
    for dim, (n, axis) in enumerate(zip(shape, spec)):
        size = _axis_size(mesh, axis)
        if n % size:
            raise ValueError(
                f"{path}: dimension {dim} has size {n}, which mesh axis {axis!r} (size {size}) "
                f"does not divide. Use a mesh whose {axis!r} axis divides {n} "
                f"(mesh now {dict(mesh.shape)})."
            )


def param_shardings(config: LanguageModelConfig, mesh: Mesh, shapes: Optional[dict] = None) -> dict:
    """NamedShardings for every leaf, from config.partition_rules().

    Weights must split evenly over their mesh axes (a clear error otherwise); scales and
    other small arrays are replicated along dimensions that do not split.
    """
    shapes = param_shapes(config) if shapes is None else shapes
    rules = config.partition_rules()
    out: dict = {}
    for module, params in shapes.items():
        out[module] = {}
        for name, leaf in params.items():
            path = f"{module}/{name}"
            spec = spec_for(path, rules)
            if isinstance(leaf, QuantizedWeight8bit):
                _check_divisible(path, leaf.weight.shape, spec, mesh)
                out[module][name] = QuantizedWeight8bit(
                    NamedSharding(mesh, spec), NamedSharding(mesh, fit_spec(spec, leaf.scales.shape, mesh))
                )
            else:
                _check_divisible(path, leaf.shape, spec, mesh)
                out[module][name] = NamedSharding(mesh, spec)
    return out


def _leaf_kind(path: str) -> str:
    for kind in ("in_out_embed/embeddings", "rms_norm", "router/w"):
        if kind in path:
            return kind
    return "weight"


def _random_leaf(kind: str, key: Any, shape: tuple, emb_mult: float, emb_size: int, xp: Any) -> Any:
    """One random leaf. `xp` draws numbers: a numpy Generator (host) or _JaxDraws (device)."""
    if kind == "in_out_embed/embeddings":  # unit RMS after the multiplier, like block outputs
        return xp.normal(key, shape) / emb_mult
    if kind == "rms_norm":
        return xp.uniform(key, shape, 0.5, 1.5)
    if kind == "router/w":
        return xp.normal(key, shape) / np.sqrt(emb_size)
    *lead, n_in, n_out = shape[0]
    weight = xp.int8(key, shape[0])
    # Uniform int8 has std ~73.6: aim for an effective weight std of 1/sqrt(n_in).
    scales = xp.uniform(key + 1, shape[1], 0.5, 1.5) / (73.6 * np.sqrt(n_in))
    return QuantizedWeight8bit(weight, xp.bf16(scales))


class _NumpyDraws:
    """Host random numbers (fast to start: nothing to compile). key: an int stream id."""

    def __init__(self, seed: int):
        self.seed = seed

    def _rng(self, key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, key])

    def normal(self, key, shape):
        return self._rng(key).standard_normal(shape, np.float32)

    def uniform(self, key, shape, lo, hi):
        return self._rng(key).uniform(lo, hi, shape).astype(np.float32)

    def int8(self, key, shape):
        return self._rng(key).integers(-128, 128, shape, np.int8)

    def bf16(self, x):
        return x.astype(jnp.bfloat16)


class _JaxDraws:
    """Device random numbers: each leaf is generated where it lives, already sharded."""

    def __init__(self, seed: int):
        self.root = jax.random.key(seed)

    def _key(self, key: int) -> jax.Array:
        return jax.random.fold_in(self.root, key)

    def normal(self, key, shape):
        return jax.random.normal(self._key(key), shape, jnp.float32)

    def uniform(self, key, shape, lo, hi):
        return jax.random.uniform(self._key(key), shape, jnp.float32, lo, hi)

    def int8(self, key, shape):
        if shape[-1] % 4:
            return jax.lax.bitcast_convert_type(jax.random.bits(self._key(key), shape, jnp.uint8), jnp.int8)
        # Whole uint32 words, 4 int8 each. Drawn as uint8, XLA kept ~16 bytes of temporaries per
        # weight byte (12.9 GB per device for one Grok-1 MoE weight on a 1x2 mesh, CPU); this
        # needs 3. The values still depend on the seed only (threefry is partitionable).
        words = jax.random.bits(self._key(key), (*shape[:-1], shape[-1] // 4), jnp.uint32)
        return jax.lax.bitcast_convert_type(words, jnp.int8).reshape(shape)

    def bf16(self, x):
        return x.astype(jnp.bfloat16)


def init_random_params(
    config: LanguageModelConfig, seed: int = 0, mesh: Optional[Mesh] = None,
    scale_blocks: int = RELEASE_SCALE_BLOCKS, on_device: bool = False,
) -> dict:
    """A valid random parameter tree in the released layout (int8 + bf16 block scales).

    By default the numbers are drawn on the host with numpy (instant for small models)
    and then placed, sharded when a mesh is given. With on_device=True each leaf is drawn
    on the devices where it lives, already sharded: use this at Grok-1 width, where host
    memory and transfers would dominate. Either way the values depend on the seed only,
    not on the mesh (the two modes draw different numbers).
    """
    shapes = param_shapes(config, scale_blocks)
    shardings = param_shardings(config, mesh, shapes) if mesh is not None else None
    emb_mult, emb_size = config.embedding_multiplier_scale, config.model.emb_size
    out: dict = {}
    for index, (module, name) in enumerate((m, n) for m in sorted(shapes) for n in sorted(shapes[m])):
        leaf, path = shapes[module][name], f"{module}/{name}"
        shape = (leaf.weight.shape, leaf.scales.shape) if isinstance(leaf, QuantizedWeight8bit) else leaf.shape
        sharding = None if shardings is None else shardings[module][name]
        kind, key = _leaf_kind(path), 2 * index  # two streams per leaf: weight and scales
        if on_device:
            if isinstance(sharding, QuantizedWeight8bit):  # hashable for the compile cache
                sharding = (sharding.weight, sharding.scales)
            value = _device_leaf(kind, shape, emb_mult, emb_size, seed, sharding)(key)
        else:
            value = _random_leaf(kind, key, shape, emb_mult, emb_size, _NumpyDraws(seed))
            value = jax.device_put(value, sharding) if sharding is not None else jax.tree_util.tree_map(jnp.asarray, value)
        out.setdefault(module, {})[name] = value
    return out


@functools.lru_cache(maxsize=None)
def _device_leaf(kind: str, shape: tuple, emb_mult: float, emb_size: int, seed: int, sharding: Any):
    """A compiled generator per distinct leaf: 64 layers share a dozen programs."""
    if isinstance(sharding, tuple):
        sharding = QuantizedWeight8bit(*sharding)
    return jax.jit(lambda key: _random_leaf(kind, key, shape, emb_mult, emb_size, _JaxDraws(seed)),
                   out_shardings=sharding)


def memory_shardings(config: LanguageModelConfig, mesh: Mesh, batch_size: int, seq_len: int) -> Memory:
    """NamedShardings of a KV cache of this size (axes that do not divide are replicated)."""
    cfg = config.model
    spec = cfg.get_memory_sharding().layers[0]
    kv_shape = (batch_size, seq_len, cfg.num_kv_heads, cfg.key_size)
    layer = KVMemory(
        k=NamedSharding(mesh, fit_spec(spec.k, kv_shape, mesh)),
        v=NamedSharding(mesh, fit_spec(spec.v, kv_shape, mesh)),
        step=NamedSharding(mesh, fit_spec(spec.step, (batch_size,), mesh)),
    )
    return Memory(layers=[layer] * cfg.num_layers)


def init_memory(config: LanguageModelConfig, batch_size: int, seq_len: int, mesh: Optional[Mesh] = None) -> Memory:
    """An empty KV cache, created on the devices (sharded when a mesh is given), outside Haiku."""
    cfg = config.model
    shardings = None if mesh is None else memory_shardings(config, mesh, batch_size, seq_len).layers[0]
    kv_shape = (batch_size, seq_len, cfg.num_kv_heads, cfg.key_size)

    def zeros(shape, dtype, sharding):
        return jnp.zeros(shape, dtype, device=sharding)

    def layer() -> KVMemory:
        return KVMemory(
            k=zeros(kv_shape, config.fprop_dtype, shardings and shardings.k),
            v=zeros(kv_shape, config.fprop_dtype, shardings and shardings.v),
            step=zeros((batch_size,), jnp.int32, shardings and shardings.step),
        )

    return Memory(layers=[layer() for _ in range(cfg.num_layers)])


def prepare_for_inference(params: dict, config: LanguageModelConfig, consume: bool = False) -> dict:
    """The parameter tree in the layouts inference reads fastest.

    - The embedding table as a SplitTable of two fprop_dtype (bf16) tables, hi + lo, made
      once instead of a cast every step: the output projection reads hi, the table cast to
      bf16 as the release uses it (2 bytes per entry, not 4 read and 2 written every step:
      3.2 GB for Grok-1), and the lookup reads hi + lo, the float32 rows unrounded to
      2^-16 (rows rounded to bf16 cost 1.7e-2 of p90 logits error on issue 12's 2-layer
      model, BENCHMARKS.md "Precision"). The same memory as the float32 table (a bf16
      table alone would take half); a float32 fprop_dtype keeps the table as it is.
    - In the fast mode, every int8 matrix transposed (TransposedWeight8bit, n_in contiguous),
      the layout the int8 kernels read at close to the copy bandwidth. Same bytes, same values.

    consume=True frees each array of `params` as soon as its replacement exists, so the
    conversion needs one leaf of extra memory instead of a second copy of the model; the
    tree passed in is unusable afterwards. Save checkpoints from the original tree, never
    from the result (save refuses transposed weights).
    """
    transpose = config.model.moe_impl == "fast"
    out: dict = {}
    for module, leaves in params.items():
        out[module] = dict(leaves)
        for name, leaf in leaves.items():
            if module.endswith("in_out_embed") and name == "embeddings":
                if isinstance(leaf, SplitTable) or jnp.dtype(config.fprop_dtype) == jnp.float32:
                    continue
                old = leaf
                new = _split_table(jnp.asarray(leaf), config.fprop_dtype)
                out[module][name] = new
            elif transpose and isinstance(leaf, QuantizedWeight8bit) and not is_transposed(leaf):
                old, new = leaf.weight, _transposed(leaf.weight)
                out[module][name] = TransposedWeight8bit(new, leaf.scales)
            else:
                continue
            if consume and isinstance(old, jax.Array) and old is not new:
                jax.block_until_ready(new)
                old.delete()
    return out


@functools.partial(jax.jit, static_argnums=1)
def _split_table(table: jax.Array, dtype: Any) -> SplitTable:
    """table (float32) -> SplitTable(hi, lo) in `dtype`, each sharded as the table."""
    t = table.astype(jnp.float32)
    hi = t.astype(dtype)
    return SplitTable(hi, (t - hi.astype(jnp.float32)).astype(dtype))


def _transposed(a: Any) -> jax.Array:
    """a [..., m, n] -> [..., n, m], on the devices that hold a, each shard transposed in place."""
    a = jnp.asarray(a)
    return _swap_last_axes(_transposed_sharding(a.sharding, a.ndim))(a)


def _transposed_sharding(sharding: Any, ndim: int) -> Any:
    """The sharding of an array's transpose: a NamedSharding's last two axes swapped."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    return NamedSharding(sharding.mesh, transposed_spec(sharding.spec, ndim))


def transposed_spec(spec: P, ndim: int) -> P:
    """The PartitionSpec of the transpose (last two axes swapped) of an ndim array split by spec."""
    entries = list(spec) + [None] * (ndim - len(spec))
    entries[-2], entries[-1] = entries[-1], entries[-2]
    return P(*entries)


def inference_param_shapes(config: LanguageModelConfig, mesh: Mesh) -> dict:
    """prepare_for_inference's tree as sharded jax.ShapeDtypeStructs, allocating nothing:
    for lowering and compiling the runner's steps ahead of time."""
    shapes = param_shapes(config)
    shardings = param_shardings(config, mesh, shapes)
    transpose = config.model.moe_impl == "fast"

    def leaf(a: Any, s: Any, dtype: Any = None) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=s)

    out: dict = {}
    for module, leaves in shapes.items():
        out[module] = {}
        for name, a in leaves.items():
            s = shardings[module][name]
            if module.endswith("in_out_embed") and name == "embeddings":
                if jnp.dtype(config.fprop_dtype) == jnp.float32:
                    out[module][name] = leaf(a, s)
                else:
                    out[module][name] = SplitTable(leaf(a, s, config.fprop_dtype), leaf(a, s, config.fprop_dtype))
            elif isinstance(a, QuantizedWeight8bit) and transpose:
                *lead, n_in, n_out = a.weight.shape
                out[module][name] = TransposedWeight8bit(
                    jax.ShapeDtypeStruct((*lead, n_out, n_in), a.weight.dtype,
                                         sharding=_transposed_sharding(s.weight, a.weight.ndim)),
                    leaf(a.scales, s.scales))
            elif isinstance(a, QuantizedWeight8bit):
                out[module][name] = QuantizedWeight8bit(leaf(a.weight, s.weight), leaf(a.scales, s.scales))
            else:
                out[module][name] = leaf(a, s)
    return out


@functools.lru_cache(maxsize=None)
def _swap_last_axes(sharding: Any):
    """A compiled transpose per output sharding: 64 layers share a handful of programs."""
    return jax.jit(lambda a: jnp.swapaxes(a, -1, -2), out_shardings=sharding)


def make_apply(config: LanguageModelConfig, mesh: Optional[Mesh] = None):
    """The pure `apply(params, tokens, memory=None, length=None) -> LanguageModelOutput`,
    not jitted: for callers that build it into their own jitted step (runners.py)."""

    def fn(tokens, memory=None, length=None):
        return config.make(mesh=mesh)(tokens, memory, length=length)

    return hk.without_apply_rng(hk.transform(fn)).apply


def make_forward(config: LanguageModelConfig, mesh: Optional[Mesh] = None, donate_memory: bool = False):
    """A jitted `forward(params, tokens, memory=None, length=None) -> LanguageModelOutput`.

    With donate_memory, the cache passed in is donated and updated in place (do not use
    it after the call); otherwise every call writes a new copy of the whole cache.
    (keep_unused: the steps of layers 1.. are written, never read; dropped from the
    program, their donation would be lost and the new steps would be fresh buffers.)
    """
    return jax.jit(make_apply(config, mesh), donate_argnums=(2,) if donate_memory else (),
                   keep_unused=donate_memory)
