"""Will it fit? A memory planner and automatic mesh layout for Grok-1 inference.

Everything here is computed from shapes (model.param_shapes, built abstractly with
eval_shape) and from config.partition_rules(): no weights, no devices, no allocation. The
devices of a plan need not exist.

Reads top to bottom in data-flow order: units and constants -> the parameter table (one
row per distinct leaf shape, with its PartitionSpec) -> mesh validity and the automatic
layout -> bytes per device (weights, KV cache, workspace) -> the Plan and its suggestions
-> text and JSON output -> the check the runner makes before loading -> the command line.

    python planner.py --devices 8 --device-memory-gb 80 [--batch 1] [--context 8192] [--json]

Units: GB means 10^9 bytes throughout (the checkpoint's "318 GB" is 318e9 bytes). A card
sold as "80 GB" (H100) has about 85.5e9 bytes, and one sold as "141 GB" (H200) about
150.7e9; the planner takes the number you give it as is, so those labels err on the safe
side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from typing import Any, NoReturn, Optional, Sequence

import model as model_lib
from kernels import SPLIT_MAX_ROWS

GB = 10**9

# ---------------------------------------------------------------------------------------
# Constants of the estimate (each is one named assumption; see workspace_bytes)
# ---------------------------------------------------------------------------------------

# Memory a GPU process needs outside JAX's allocator: the CUDA context, cuBLAS/cuDNN
# handles, NCCL communicator buffers, and allocator fragmentation. Counted once per device
# when planning against a card's physical memory. When the limit comes from JAX itself
# (memory_stats()['bytes_limit'], which already excludes the context), it is not added.
RUNTIME_OVERHEAD_GB = 1.0
# On CPU, the Python process, jax and XLA themselves (shared by all host "devices").
CPU_PROCESS_OVERHEAD_GB = 2.0
# Residual-stream-sized bf16 tensors alive at once inside a layer (h and its normed copy).
RESIDUAL_COPIES = 2
# float32 copies of the attention logits [B, H, T, S] alive at once (XLA fuses the cap,
# mask and softmax around one float32 buffer); the bf16 probabilities come on top.
ATTN_F32_COPIES = 1
# float32 [B, V] buffers of the sampler (logits / temperature, sorted, cumulative sum, mask).
SAMPLING_COPIES = 4
# The checkpoint loader keeps at most this fraction of the checkpoint in host buffers at a
# time (checkpoint.load_tensors' default max_inflight_bytes), at least its largest file.
LOADER_INFLIGHT_FRACTION = 0.1
# Host memory of the loading process itself (Python, jax, tokenizer) besides its buffers.
HOST_BASE_GB = 2.0
# Bytes a pickle adds around the array data of one tensor file (class and dtype names).
PICKLE_OVERHEAD_BYTES = 512
# The released checkpoint's row-blocked scales have 8 blocks (model.RELEASE_SCALE_BLOCKS).
SCALE_BLOCKS = model_lib.RELEASE_SCALE_BLOCKS
# Layout policy: when True, mesh axes must be powers of two. Off by default: the partition
# rules alone decide, and Grok-1's width 6144 = 3 x 2048 admits a data axis of 3 (checked
# on CPU by tests/test_planner.py; not yet run on GPUs).
REQUIRE_POWER_OF_TWO_AXES = False
# Upper bounds of the suggestion searches.
MAX_DEVICES_SEARCH = 4096
MAX_BATCH_SEARCH = 1 << 20
# Ranges the command line accepts (add_plan_arguments): far beyond any real run, small
# enough that every number stays exact and finite.
MAX_DEVICE_MEMORY_GB = 1e6  # a petabyte per device
MAX_BATCH = MAX_BATCH_SEARCH
MAX_CONTEXT = 1 << 24
MAX_LAYERS = 256  # Grok-1 has 64


class PlanError(ValueError):
    """A layout or run that cannot work; the message says why and what would."""


# ---------------------------------------------------------------------------------------
# The parameter table: distinct leaves with their counts and PartitionSpecs
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LeafGroup:
    """Leaves that share a shape, dtype, role and PartitionSpec (e.g. 64 layers' `query`).

    role: "int8" (a quantized weight's int8 part), "scales" (its bf16 scales) or "float32"
    (embedding table, norms, router). spec: the PartitionSpec entries (one per dimension,
    each None, an axis name or a tuple of names), padded to the rank.
    """

    role: str
    shape: tuple[int, ...]
    itemsize: int
    spec: tuple[Any, ...]
    count: int
    example: str  # one parameter path, for messages


@dataclasses.dataclass(frozen=True)
class ParamTable:
    groups: tuple[LeafGroup, ...]
    num_files: int  # one checkpoint file per leaf (a quantized weight is one leaf)
    largest_file_bytes: int
    num_params: int


def _pad_spec(spec: Any, rank: int) -> tuple[Any, ...]:
    entries = tuple(spec)
    return entries + (None,) * (rank - len(entries))


_TABLES: dict[str, ParamTable] = {}


def param_table(config: Any) -> ParamTable:
    """The config's parameters grouped by (role, shape, spec); cached per config."""
    key = repr(dataclasses.replace(config, model=dataclasses.replace(config.model, moe_impl="fast")))
    if key not in _TABLES:
        _TABLES[key] = _build_param_table(config)
    return _TABLES[key]


def _build_param_table(config: Any) -> ParamTable:
    shapes = model_lib.param_shapes(config, SCALE_BLOCKS)
    rules = config.partition_rules()
    counts: dict[tuple, int] = {}
    examples: dict[tuple, str] = {}
    num_files, largest, num_params = 0, 0, 0
    for module in shapes:
        for name, leaf in shapes[module].items():
            path = f"{module}/{name}"
            spec = model_lib.spec_for(path, rules)
            if isinstance(leaf, model_lib.QuantizedWeight8bit):
                parts = [("int8", leaf.weight), ("scales", leaf.scales)]
            else:
                parts = [("float32", leaf)]
            file_bytes = 0
            for role, arr in parts:
                shape = tuple(int(n) for n in arr.shape)
                key = (role, shape, arr.dtype.itemsize, _pad_spec(spec, len(shape)))
                counts[key] = counts.get(key, 0) + 1
                examples.setdefault(key, path)
                file_bytes += math.prod(shape) * arr.dtype.itemsize
            num_params += math.prod(parts[0][1].shape)
            num_files += 1
            largest = max(largest, file_bytes)
    groups = tuple(LeafGroup(k[0], k[1], k[2], k[3], c, examples[k]) for k, c in counts.items())
    return ParamTable(groups, num_files, largest, num_params)


# ---------------------------------------------------------------------------------------
# Mesh axes, validity and the automatic layout
# ---------------------------------------------------------------------------------------


def _axis_sizes(config: Any, data: int, model: int) -> dict[str, int]:
    """Mesh axis name -> size. A config axis given as a tuple of names gets its size on the
    first name (the others are 1)."""
    sizes: dict[str, int] = {}
    for axis, size in ((config.model.data_axis, data), (config.model.model_axis, model)):
        names = axis if isinstance(axis, tuple) else (axis,)
        for i, name in enumerate(names):
            sizes[name] = size if i == 0 else 1
    return sizes


def _ways(entry: Any, sizes: dict[str, int]) -> int:
    """How many ways a PartitionSpec entry splits its dimension."""
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(sizes[n] for n in names)


def _shard_elems(shape: Sequence[int], spec: Sequence[Any], sizes: dict[str, int],
                 replicate_uneven: bool) -> int:
    """Elements of one device's shard. Dimensions that an axis does not divide are
    replicated when replicate_uneven (scales, caches: model.fit_spec), else an error."""
    total = 1
    for n, entry in zip(shape, spec):
        ways = _ways(entry, sizes)
        if n % ways:
            if not replicate_uneven:
                raise PlanError(f"dimension {n} is not divisible by {ways}")
            ways = 1
        total *= n // ways
    return total


def mesh_problems(config: Any, data: int, model: int) -> list[str]:
    """Why a (data, model) mesh cannot hold this config; empty when it can.

    Every weight dimension an axis shards (config.partition_rules()) must be divisible by
    that axis (or product of axes), and the model axis must divide num_kv_heads: it splits
    the attention heads and the KV cache, and grouped query heads must stay with their kv
    head. Scales and caches are replicated where they do not divide, as model.fit_spec does.
    """
    if data < 1 or model < 1:
        return [f"mesh axes must be >= 1, got (data={data}, model={model})"]
    problems = []
    if REQUIRE_POWER_OF_TWO_AXES and (data & (data - 1) or model & (model - 1)):
        problems.append(f"mesh axes must be powers of two (planner.REQUIRE_POWER_OF_TWO_AXES), "
                        f"got (data={data}, model={model})")
    g = config.model.num_kv_heads
    if g % model:
        problems.append(f"the model axis ({model}) does not divide num_kv_heads={g}")
    sizes = _axis_sizes(config, data, model)
    for grp in param_table(config).groups:
        if grp.role == "scales":
            continue
        for dim, (n, entry) in enumerate(zip(grp.shape, grp.spec)):
            ways = _ways(entry, sizes)
            if n % ways:
                problems.append(
                    f"{grp.example} {list(grp.shape)}: dimension {dim} ({n}) is split over "
                    f"{entry!r} ({ways} ways), which does not divide it")
    return problems


def _divisors(n: int) -> list[int]:
    """The divisors of n >= 1, ascending; O(sqrt n) from the divisor pairs (k, n // k)."""
    small, large = [], []
    k = 1
    while k * k <= n:
        if n % k == 0:
            small.append(k)
            if k * k != n:
                large.append(n // k)
        k += 1
    return small + large[::-1]


def _data_modulus(config: Any, model: int) -> Optional[int]:
    """For a model axis of `model`: D such that a data axis d is valid exactly when d divides
    D (0: any d), or None when no data axis makes `model` valid.

    Derived from mesh_problems' rule: a dimension n split over the model axis alone needs
    model | n; one split over the data axis (times the model axis when both name it) needs
    d * model | n, i.e. d | n // model. Scales are replicated where they do not divide.
    """
    cfg = config.model
    if cfg.num_kv_heads % model:
        return None
    first = lambda axis: axis[0] if isinstance(axis, tuple) else axis  # noqa: E731
    data_name, model_name = first(cfg.data_axis), first(cfg.model_axis)
    modulus = 0
    for grp in param_table(config).groups:
        if grp.role == "scales":
            continue
        for n, entry in zip(grp.shape, grp.spec):
            names = entry if isinstance(entry, tuple) else (entry,)
            ways = model if model_name in names else 1
            if n % ways:
                return None
            if data_name in names:
                modulus = math.gcd(modulus, n // ways)
    return modulus


def valid_meshes(config: Any, num_devices: int) -> list[tuple[int, int]]:
    """Valid (data, model) layouts of num_devices devices, most model-parallel first.

    Fast for any count: the model axis must divide num_kv_heads, so only those few
    divisors are tried (each checked in full by mesh_problems).
    """
    if num_devices < 1:
        return []
    out = []
    for m in reversed(_divisors(math.gcd(num_devices, config.model.num_kv_heads))):
        d, modulus = num_devices // m, _data_modulus(config, m)
        if modulus is None or (modulus and modulus % d):
            continue
        if not mesh_problems(config, d, m):
            out.append((d, m))
    return out


def valid_device_counts(config: Any, up_to: int) -> list[int]:
    """Device counts in [1, up_to] that have at least one valid layout.

    Built from each model axis's data modulus (_data_modulus), so the cost does not grow
    with up_to unless the data axis splits nothing (then every multiple counts).
    """
    counts: set[int] = set()
    for m in _divisors(config.model.num_kv_heads):
        modulus = _data_modulus(config, m)
        if modulus is None or m > up_to:
            continue
        datas = _divisors(modulus) if modulus else range(1, up_to // m + 1)
        counts.update(d * m for d in datas if d * m <= up_to)
    return sorted(n for n in counts if valid_meshes(config, n))


def _list_words(items: Sequence[Any]) -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _no_layout_error(config: Any, num_devices: int) -> PlanError:
    counts = valid_device_counts(config, max(16, 2 * num_devices))
    if len(counts) > 12:  # the ones nearest the count asked for
        counts = sorted(sorted(counts, key=lambda c: (abs(c - num_devices), c))[:12])
    why = "; ".join(mesh_problems(config, num_devices, 1)[:2])
    return PlanError(
        f"{num_devices} devices: no (data, model) layout can hold this model (for example "
        f"(data={num_devices}, model=1): {why}). Use {_list_words(counts)} devices.")


def validate_mesh(config: Any, mesh_shape: Sequence[int], num_devices: Optional[int] = None) -> tuple[int, int]:
    """Check an explicit (data, model) mesh; raise PlanError saying why and what works."""
    if len(mesh_shape) != 2:
        raise PlanError(f"mesh shape must be (data, model), got {tuple(mesh_shape)}")
    data, model = (int(x) for x in mesh_shape)
    n = data * model if num_devices is None else num_devices
    if data * model != n:
        raise PlanError(f"mesh (data={data}, model={model}) has {data * model} devices, "
                        f"but {n} devices were given.")
    problems = mesh_problems(config, data, model)
    if problems:
        options = valid_meshes(config, n)
        what = (f"valid layouts of {n} devices: " + _list_words([f"(data={d}, model={m})" for d, m in options])
                if options else str(_no_layout_error(config, n)))
        raise PlanError(f"mesh (data={data}, model={model}) cannot hold this model: "
                        + "; ".join(problems[:3]) + f". {what}.")
    return data, model


# ---------------------------------------------------------------------------------------
# Bytes per device
# ---------------------------------------------------------------------------------------


def static_bytes(config: Any, data: int, model: int) -> dict[str, int]:
    """Per-device bytes of the parameters: int8 weights, bf16 scales, float32 tensors."""
    sizes = _axis_sizes(config, data, model)
    out = {"int8_weights": 0, "scales": 0, "float32": 0}
    for grp in param_table(config).groups:
        elems = _shard_elems(grp.shape, grp.spec, sizes, replicate_uneven=grp.role == "scales")
        out[grp.role if grp.role != "int8" else "int8_weights"] += grp.count * elems * grp.itemsize
    return out


def kv_cache_bytes(config: Any, data: int, model: int, batch: int, context: int) -> int:
    """Per-device KV cache: 2 (k, v) x layers x B x S x kv_heads x key_size x 2 bytes (bf16),
    batch split over data and kv heads over model where they divide (model.memory_shardings)."""
    cfg = config.model
    b = batch // data if batch % data == 0 else batch
    g = cfg.num_kv_heads // model if cfg.num_kv_heads % model == 0 else cfg.num_kv_heads
    return 2 * cfg.num_layers * b * context * g * cfg.key_size * 2


def _moe_rows(num_rows: int, num_experts: int) -> int:
    """Padded rows of the grouped MoE (kernels.make_plan): rows per expert padded to block_m."""
    from kernels import default_block_m, max_tiles

    bm = default_block_m(num_rows)
    return max_tiles(num_rows, num_experts, bm) * bm


# Which terms of workspace_terms are alive together (see workspace_bytes).
ATTENTION_STAGE = ("residual", "qkv", "attention", "cache_update", "dequantized_attention")
MOE_STAGE = ("residual", "moe", "dequantized_experts")
HEAD_STAGE = ("head", "sampling")


def workspace_terms(config: Any, data: int, model: int, batch: int, tokens: int, cache_len: int,
                    moe_impl: str, phase: str) -> dict[str, int]:
    """Per-device bytes of the temporaries of one forward call, term by term.

    One call runs `tokens` new tokens (T) for `batch` sequences (B) against a cache of
    `cache_len` positions (S). Layers run one after another, so only one layer's
    temporaries are alive at a time. bf16 = 2 bytes, float32 = 4. A split "/x" applies
    only where the mesh axis divides the dimension (otherwise it is replicated). With
    d = data axis, m = model axis, D width, H query / G kv heads, K key size, E experts,
    k selected, F expert size, V vocabulary, N = B*T tokens, M = N*k rows padded per
    expert to the kernel tile (kernels.make_plan). Activations "a" bytes: 4 (float32) where
    the model keeps them so on an accelerator (model.activation_dtype: N rows, or N*k in
    the MoE, up to kernels.SPLIT_MAX_ROWS: decode sizes), else 2 (bf16):

    - residual:   RESIDUAL_COPIES x [B, T, D] float32 / (d on B; m on D only in the
                  reference mode with shard_activations: the fast mode keeps the residual
                  stream whole on each model shard, model.activation_spec)
    - qkv:        q, k, v and the attention output, [B, T, (2H + 2G) K] a / (d, m on heads)
    - attention:  logits [B, H, T, S]: ATTN_F32_COPIES x float32 + bf16 probabilities,
                  / (d on B, m on heads); with float32 activations the probabilities are
                  float32, and the hi/lo split (model.einsum_f32) adds a float32 copy of
                  the logits (two halves summed) and the bf16 hi + lo of the probabilities
                  (assumed, not measured: 12 bytes per entry more); the mask [B, T, S] bool / d
    - cache_update: the layer's k and v as rewritten with this call's keys, 2 x [B, S, G, K]
                  bf16, whole on every device: XLA writes the updated layer into a new
                  buffer, and the partitioner does not split that write over the model
                  axis (measured on 1 and 4 H100s); not split over data either (assumed)
    - fast MoE:   tokens are replicated over the model axis inside the MoE: x [N, D] and
                  the dispatched rows [M, D] a / d, the gated hidden [M, F] a / m
                  (plus two float32 [M, F] / m partial sums when d > 1), the expert
                  outputs [M, D] (float32 when m > 1, plus its all-reduced copy) / d and the
                  float32 combine [N, D] / d
    - reference MoE (the release's algorithm): dequantized_experts, one layer's expert
                  weights 3 x E x D x F a / (d m) (dequantized to the activations' dtype);
                  moe, the all-expert intermediates a, b, h [N, E, F] a / m (plus two
                  float32 partial sums when d > 1) and the expert outputs [N, E, D] a +
                  float32 / d; and dequantized_attention, one attention matrix, D x H K a
                  / (d m)
    - head:       the embedding table cast to bf16, [V, D] / (d m); the float32 logits of
                  the last position [B, V] and their partial sums; the float32 embedding
                  gather [B, T, D] / (d m)
    - sampling:   SAMPLING_COPIES x [B, V] float32 (the runner's sampler)
    - slot_state: the runner's per-slot state kept on the devices, the token mask [B, V]
                  bool and six [B] words (runners.SlotState); alive throughout
    - prefill_cache (phase "prefill" only): the runner prefills a request into a cache of
                  its own (its pad bucket, here T) and then copies it into the batch cache
                  (SPEC section 6), so a second cache of B x T is alive during prefill.
    The batch cache itself is donated to each step (runners.make_step_functions), so it is
    not copied as a whole.
    """
    cfg = config.model
    d_, h_, g_, k_ = cfg.emb_size, cfg.num_q_heads, cfg.num_kv_heads, cfg.key_size
    e_, top, f_, v_ = cfg.num_experts, cfg.num_selected_experts, cfg.ffn_size, config.vocab_size
    b, t, s = batch, tokens, cache_len

    def split(n: int, ways: int) -> int:  # the divisor applied to a dimension of size n
        return ways if ways > 1 and n % ways == 0 else 1

    bd = split(b, data)
    hm = split(g_, model)
    dm, dd, fm, ddm = split(d_, model), split(d_, data), split(f_, model), split(d_, data * model)

    n = b * t
    a_dense = 4 if n <= SPLIT_MAX_ROWS else 2  # activations' bytes (model.activation_dtype)
    a_moe = 4 if n * top <= SPLIT_MAX_ROWS else 2
    out: dict[str, int] = {}
    residual_dm = dm if moe_impl == "reference" and cfg.shard_activations else 1
    out["residual"] = RESIDUAL_COPIES * b * t * d_ * 4 // (bd * residual_dm)
    out["qkv"] = b * t * (2 * h_ + 2 * g_) * k_ * a_dense // (bd * hm)
    attn_bytes = 4 * ATTN_F32_COPIES + (2 if a_dense == 2 else 16)
    out["attention"] = (b * h_ * t * s * attn_bytes // (bd * hm)) + b * t * s // bd
    out["cache_update"] = 2 * b * s * g_ * k_ * 2

    if moe_impl == "fast":
        rows = _moe_rows(n * top, e_)
        moe = n * d_ * a_moe // dd + rows * d_ * a_moe // dd + rows * f_ * a_moe // fm
        if data > 1:
            moe += 2 * rows * f_ * 4 // fm
        moe += rows * d_ * (8 if model > 1 else 2) // dd
        moe += n * d_ * 4 // dd
        out["moe"] = moe
    elif moe_impl == "reference":
        out["dequantized_experts"] = 3 * e_ * d_ * f_ * a_moe // (dd * fm)
        moe = 3 * n * e_ * f_ * a_moe // fm
        if data > 1:
            moe += 2 * n * e_ * f_ * 4 // fm
        moe += n * e_ * d_ * (a_moe + 4) // dd
        out["moe"] = moe
        out["dequantized_attention"] = d_ * h_ * k_ * a_dense // (dd * hm)
    else:
        raise PlanError(f"moe_impl={moe_impl!r}; expected one of {model_lib.MOE_IMPLS}")

    out["head"] = v_ * d_ * 2 // ddm + 2 * b * v_ * 4 // bd + n * d_ * 4 // ddm
    out["sampling"] = SAMPLING_COPIES * b * v_ * 4
    out["slot_state"] = b * v_ + 6 * b * 4
    if phase == "prefill":
        out["prefill_cache"] = kv_cache_bytes(config, data, model, b, t)
    elif phase != "decode":
        raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    return out


def workspace_bytes(terms: dict[str, int], phase: str) -> int:
    """The peak of a call's temporaries from its workspace_terms.

    A layer's attention temporaries and its MoE temporaries are never alive together, so a
    layer needs the larger of the two stages. In prefill, XLA makes the head's bf16 copy
    of the embedding table after the layers: the peak is the largest of the three stages.
    In decode it keeps that copy alive across the layers: the head stage adds to the
    layers'. The slot state and the prefill cache live through the whole call. (Both rules are what
    compiled programs showed on an H100: see bench.py measure_peak; their memory_analysis and the
    measured peak agreed.)
    """
    stage = lambda names: sum(terms.get(k, 0) for k in names)  # noqa: E731
    layers = max(stage(ATTENTION_STAGE), stage(MOE_STAGE))
    always = terms.get("slot_state", 0) + terms.get("prefill_cache", 0)
    if phase == "prefill":
        return max(layers, stage(HEAD_STAGE)) + always
    return layers + stage(HEAD_STAGE) + always


# ---------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """Per-device memory of one run, in GB (10^9 bytes); `bytes` has the exact integers."""

    config_name: str
    num_devices: int
    mesh: tuple[int, int]  # (data, model)
    device_memory_gb: Optional[float]
    batch_size: int
    context_len: int
    moe_impl: str
    prefill_batch: int
    prefill_len: int
    # per device
    int8_weights_gb: float
    scales_gb: float
    float32_gb: float
    kv_cache_gb: float
    prefill_workspace_gb: float
    decode_workspace_gb: float
    runtime_overhead_gb: float
    prefill_total_gb: float
    decode_total_gb: float
    total_gb: float  # max of the two phases, overhead included
    fits: Optional[bool]  # None when no device memory was given
    # whole model / host
    num_params: int
    params_total_gb: float  # all parameters, unsharded
    disk_gb: float
    host_ram_gb: float
    # suggestions (None: not searched or nothing fits)
    min_devices: Optional[int] = None
    min_devices_mesh: Optional[tuple[int, int]] = None
    max_batch: Optional[int] = None
    max_context: Optional[int] = None
    prefill_terms_gb: dict = dataclasses.field(default_factory=dict)
    decode_terms_gb: dict = dataclasses.field(default_factory=dict)
    bytes: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)


def _config_name(config: Any) -> str:
    cfg = config.model
    ref = model_lib.grok_1_config()
    if dataclasses.replace(cfg, moe_impl=ref.model.moe_impl) == ref.model and config.vocab_size == ref.vocab_size:
        return "grok-1"
    tiny = model_lib.tiny_config()
    if dataclasses.replace(cfg, moe_impl=tiny.model.moe_impl) == tiny.model and config.vocab_size == tiny.vocab_size:
        return "tiny"
    return (f"custom (D={cfg.emb_size}, layers={cfg.num_layers}, heads={cfg.num_q_heads}/"
            f"{cfg.num_kv_heads}, experts={cfg.num_experts}, vocab={config.vocab_size})")


class _Sizer:
    """Per-device totals for one config, mesh and moe_impl; cheap to call many times."""

    def __init__(self, config: Any, mesh: tuple[int, int], moe_impl: str, runtime_overhead: int,
                 prefill_batch: int, prefill_len: Optional[int]):
        self.config, self.mesh, self.moe_impl = config, mesh, moe_impl
        self.static = static_bytes(config, *mesh)
        self.runtime_overhead = runtime_overhead
        self.prefill_batch, self.prefill_len = prefill_batch, prefill_len

    def phases(self, batch: int, context: int) -> dict[str, Any]:
        pb = min(self.prefill_batch, batch)
        pl = context if self.prefill_len is None else min(self.prefill_len, context)
        kv = kv_cache_bytes(self.config, *self.mesh, batch, context)
        pre = workspace_terms(self.config, *self.mesh, pb, pl, pl, self.moe_impl, "prefill")
        dec = workspace_terms(self.config, *self.mesh, batch, 1, context, self.moe_impl, "decode")
        base = sum(self.static.values()) + kv + self.runtime_overhead
        pre_ws, dec_ws = workspace_bytes(pre, "prefill"), workspace_bytes(dec, "decode")
        return dict(kv=kv, prefill=pre, decode=dec, prefill_batch=pb, prefill_len=pl,
                    prefill_ws=pre_ws, decode_ws=dec_ws,
                    prefill_total=base + pre_ws, decode_total=base + dec_ws)

    def total(self, batch: int, context: int) -> int:
        p = self.phases(batch, context)
        return max(p["prefill_total"], p["decode_total"])


def _checkpoint_sizes(config: Any) -> tuple[int, int, int]:
    """(all parameter bytes, disk bytes, host RAM bytes for loading)."""
    table = param_table(config)
    params = sum(g.count * math.prod(g.shape) * g.itemsize for g in table.groups)
    disk = params + table.num_files * PICKLE_OVERHEAD_BYTES
    inflight = min(disk, max(int(LOADER_INFLIGHT_FRACTION * disk), table.largest_file_bytes))
    return params, disk, inflight + int(HOST_BASE_GB * GB)


def _pick_mesh(config: Any, num_devices: int, capacity: Optional[int], batch: int, context: int,
               moe_impl: str, overhead: int, prefill_batch: int, prefill_len: Optional[int]
               ) -> tuple[Optional[tuple[int, int]], list[tuple[int, int]]]:
    """(the first valid layout that fits, or None; all valid layouts in preference order)."""
    options = valid_meshes(config, num_devices)
    for mesh in options:
        if capacity is None or _Sizer(config, mesh, moe_impl, overhead, prefill_batch,
                                      prefill_len).total(batch, context) <= capacity:
            return mesh, options
    return None, options


def _search_max(fits, lo: int, hi: int) -> Optional[int]:
    """Largest x in [lo, hi] with fits(x), assuming fits is monotone decreasing; None if none."""
    if not fits(lo):
        return None
    step = 1
    while lo + step <= hi and fits(lo + step):
        lo, step = lo + step, step * 2
    hi = min(hi, lo + step - 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def plan(config: Any, num_devices: int, device_memory_gb: Optional[float], batch_size: int = 1,
         context_len: Optional[int] = None, mesh_shape: Optional[Sequence[int]] = None,
         moe_impl: Optional[str] = None, *, prefill_batch: int = 1, prefill_len: Optional[int] = None,
         runtime_overhead_gb: float = RUNTIME_OVERHEAD_GB, suggest: bool = True) -> Plan:
    """Per-device memory of running `config` on `num_devices` devices of `device_memory_gb`.

    mesh_shape: an explicit (data, model) layout (validated), else the first valid layout,
    most model-parallel first, that fits (or the most model-parallel one if none fits).
    context_len: the KV cache length (default config.sequence_len). prefill_batch /
    prefill_len: the prefill call to size (default one request at a time, as the runner
    prefills, of a prompt filling the whole context). device_memory_gb None: sizes only,
    no verdict. suggest: also search the smallest device count and the largest batch and
    context that fit. Raises PlanError when no layout of these devices is valid.
    """
    config = config.initialize()
    moe_impl = moe_impl or config.model.moe_impl
    if moe_impl not in model_lib.MOE_IMPLS:
        raise PlanError(f"moe_impl={moe_impl!r}; expected one of {model_lib.MOE_IMPLS}")
    context = config.sequence_len if context_len is None else int(context_len)
    if num_devices < 1 or batch_size < 1 or context < 1 or prefill_batch < 1:
        raise PlanError(f"devices ({num_devices}), batch ({batch_size}), context ({context}) and "
                        f"prefill batch ({prefill_batch}) must all be >= 1")
    if device_memory_gb is not None and not (math.isfinite(device_memory_gb)
                                             and 0 < device_memory_gb <= MAX_DEVICE_MEMORY_GB):
        raise PlanError(f"device memory {device_memory_gb!r} GB: must be a finite number > 0 and "
                        f"<= {MAX_DEVICE_MEMORY_GB:g}")
    capacity = None if device_memory_gb is None else int(device_memory_gb * GB)
    overhead = int(runtime_overhead_gb * GB)
    sizer_args = (moe_impl, overhead, prefill_batch, prefill_len)

    if mesh_shape is not None:
        mesh = validate_mesh(config, mesh_shape, num_devices)
    else:
        mesh, options = _pick_mesh(config, num_devices, capacity, batch_size, context, *sizer_args)
        if not options:
            raise _no_layout_error(config, num_devices)
        mesh = mesh or options[0]

    sizer = _Sizer(config, mesh, *sizer_args)
    ph = sizer.phases(batch_size, context)
    total = max(ph["prefill_total"], ph["decode_total"])
    params, disk, host_ram = _checkpoint_sizes(config)
    gb = lambda x: x / GB
    exact = dict(sizer.static, kv_cache=ph["kv"], runtime_overhead=overhead,
                 prefill_workspace=ph["prefill_ws"], decode_workspace=ph["decode_ws"],
                 prefill_total=ph["prefill_total"], decode_total=ph["decode_total"], total=total,
                 params_total=params, disk=disk, host_ram=host_ram)
    result = Plan(
        config_name=_config_name(config), num_devices=num_devices, mesh=tuple(mesh),
        device_memory_gb=device_memory_gb, batch_size=batch_size, context_len=context,
        moe_impl=moe_impl, prefill_batch=ph["prefill_batch"], prefill_len=ph["prefill_len"],
        int8_weights_gb=gb(sizer.static["int8_weights"]), scales_gb=gb(sizer.static["scales"]),
        float32_gb=gb(sizer.static["float32"]), kv_cache_gb=gb(ph["kv"]),
        prefill_workspace_gb=gb(exact["prefill_workspace"]), decode_workspace_gb=gb(exact["decode_workspace"]),
        runtime_overhead_gb=gb(overhead), prefill_total_gb=gb(ph["prefill_total"]),
        decode_total_gb=gb(ph["decode_total"]), total_gb=gb(total),
        fits=None if capacity is None else total <= capacity,
        num_params=param_table(config).num_params, params_total_gb=gb(params), disk_gb=gb(disk),
        host_ram_gb=gb(host_ram),
        prefill_terms_gb={k: gb(v) for k, v in ph["prefill"].items()},
        decode_terms_gb={k: gb(v) for k, v in ph["decode"].items()},
        bytes=exact,
    )
    _add_notes(result, config)
    if suggest and capacity is not None:
        _add_suggestions(result, config, capacity, sizer, sizer_args)
    return result


def _add_notes(p: Plan, config: Any) -> None:
    data, model = p.mesh
    if p.batch_size % data:
        p.notes.append(f"batch {p.batch_size} does not divide the data axis ({data}): the KV cache "
                       "and activations are replicated over it (the data axis still splits weights).")
    if p.device_memory_gb is not None:
        p.notes.append("GB = 10^9 bytes. On GPUs JAX may use only XLA_PYTHON_CLIENT_MEM_FRACTION of each "
                       "card (default 0.75); set it to 0.95 to use the memory planned here.")
    if p.context_len > config.sequence_len:
        p.notes.append(f"context {p.context_len} is longer than the model's sequence_len "
                       f"{config.sequence_len}.")


def _add_suggestions(p: Plan, config: Any, capacity: int, sizer: _Sizer, sizer_args: tuple) -> None:
    b, s = p.batch_size, p.context_len
    # Smallest device count that fits (any valid layout). Weights split over all devices
    # at best, so fewer than weights / capacity devices can never fit.
    weights = sum(g.count * math.prod(g.shape) * g.itemsize for g in param_table(config).groups
                  if g.role != "scales")
    # Per-device memory only shrinks with more devices, so if the largest power-of-two
    # count searched does not fit, no smaller count does: skip the search.
    big = 1 << int(math.log2(MAX_DEVICES_SEARCH))
    while big > 1 and not valid_meshes(config, big):
        big //= 2
    if _pick_mesh(config, big, capacity, b, s, *sizer_args)[0] is not None:
        for n in range(max(1, weights // max(capacity, 1)), MAX_DEVICES_SEARCH + 1):
            mesh, _ = _pick_mesh(config, n, capacity, b, s, *sizer_args)
            if mesh is not None:
                p.min_devices, p.min_devices_mesh = n, mesh
                break
    p.max_batch = _search_max(lambda x: sizer.total(x, s) <= capacity, 1, MAX_BATCH_SEARCH) or 0
    best = _search_max(lambda x: sizer.total(b, x) <= capacity, 1, config.sequence_len)
    if best is not None and best >= 256 and best < config.sequence_len:
        best -= best % 128  # a round number
    p.max_context = best or 0


def choose_mesh(config: Any, num_devices: int, device_memory_gb: Optional[float] = None,
                batch_size: int = 1, context_len: Optional[int] = None,
                moe_impl: Optional[str] = None) -> tuple[int, int]:
    """A valid (data, model) layout for num_devices devices; raises PlanError if none.

    Prefers model parallelism: the largest model axis that divides num_kv_heads and every
    dimension the model axis shards, then data for the rest. With device_memory_gb, the
    first valid layout in that order that fits per the planner; if none fits, the error
    gives the planner's numbers and the smallest device count that would fit.
    """
    config = config.initialize()
    moe_impl = moe_impl or config.model.moe_impl
    context = config.sequence_len if context_len is None else context_len
    capacity = None if device_memory_gb is None else int(device_memory_gb * GB)
    args = (moe_impl, int(RUNTIME_OVERHEAD_GB * GB), 1, None)
    mesh, options = _pick_mesh(config, num_devices, capacity, batch_size, context, *args)
    if not options:
        raise _no_layout_error(config, num_devices)
    if mesh is None:
        p = plan(config, num_devices, device_memory_gb, batch_size, context, moe_impl=moe_impl)
        raise PlanError(_does_not_fit_message(p))
    return mesh


def _does_not_fit_message(p: Plan) -> str:
    lines = [f"{p.config_name} needs {p.total_gb:.1f} GB per device on {p.num_devices} devices "
             f"(mesh data={p.mesh[0]}, model={p.mesh[1]}, batch {p.batch_size}, context "
             f"{p.context_len}), but each has {p.device_memory_gb:.1f} GB."]
    lines += _suggestion_lines(p)
    return " ".join(lines) + "\n" + format_plan(p)


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------


def _suggestion_lines(p: Plan) -> list[str]:
    out = []
    if p.min_devices is not None:
        out.append(f"Smallest device count that fits: {p.min_devices} (mesh data="
                   f"{p.min_devices_mesh[0]}, model={p.min_devices_mesh[1]}).")
    elif p.max_batch is not None:  # the searches ran
        out.append(f"No count up to {MAX_DEVICES_SEARCH} devices of this size fits.")
    if p.max_batch is not None:
        out.append(f"Largest batch at context {p.context_len} on these devices: {p.max_batch}."
                   if p.max_batch else f"No batch fits at context {p.context_len} on these devices.")
    if p.max_context is not None:
        out.append(f"Largest context at batch {p.batch_size} on these devices: {p.max_context}."
                   if p.max_context else f"No context fits at batch {p.batch_size} on these devices.")
    return out


def format_plan(p: Plan) -> str:
    """A readable per-device table in GB with the verdict and suggestions."""
    data, model = p.mesh
    head = (f"{p.config_name}: {p.num_devices} device(s), mesh (data={data}, model={model}), "
            f"batch {p.batch_size}, context {p.context_len}, moe_impl {p.moe_impl}")
    rows = [
        ("int8 weights", p.int8_weights_gb),
        ("scales (bf16)", p.scales_gb),
        ("float32 (embedding, norms, router)", p.float32_gb),
        ("KV cache (bf16)", p.kv_cache_gb),
        (f"prefill workspace ({p.prefill_batch} x {p.prefill_len} tokens)", p.prefill_workspace_gb),
        (f"decode workspace ({p.batch_size} x 1 token)", p.decode_workspace_gb),
        ("runtime overhead (CUDA context, NCCL...)", p.runtime_overhead_gb),
        ("total while prefilling", p.prefill_total_gb),
        ("total while decoding", p.decode_total_gb),
    ]
    width = max(len(r[0]) for r in rows) + 2
    lines = [head, f"{'per device':<{width}}{'GB':>9}"]
    lines += [f"  {name:<{width - 2}}{value:9.2f}" for name, value in rows]
    lines.append(f"  {'TOTAL (peak)':<{width - 2}}{p.total_gb:9.2f}")
    for phase, terms in (("prefill", p.prefill_terms_gb), ("decode", p.decode_terms_gb)):
        stage = lambda names: sum(terms.get(k, 0.0) for k in names)  # noqa: E731
        lines.append(f"  {phase} workspace by stage: attention {stage(ATTENTION_STAGE):.2f}, MoE "
                     f"{stage(MOE_STAGE):.2f}, head+sampling {stage(HEAD_STAGE):.2f}"
                     + (f", prefill cache {terms['prefill_cache']:.2f}" if "prefill_cache" in terms else ""))
    if p.fits is None:
        lines.append("verdict: no device memory given")
    else:
        used = 100.0 * p.total_gb / p.device_memory_gb if p.device_memory_gb else float("inf")
        word = "FITS" if p.fits else "DOES NOT FIT"
        lines.append(f"verdict: {word} in {p.device_memory_gb:g} GB per device ({used:.0f}% used)")
    lines.append(f"whole model: {p.num_params:,} parameters, {p.params_total_gb:.1f} GB; "
                 f"checkpoint on disk {p.disk_gb:.1f} GB; host RAM for loading about "
                 f"{p.host_ram_gb:.1f} GB")
    lines += _suggestion_lines(p)
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def plan_to_json(p: Plan) -> dict:
    """The plan as a JSON-serialisable dict (GB values rounded to 4 decimals, exact bytes)."""
    out = dataclasses.asdict(p)
    for key, value in list(out.items()):
        if isinstance(value, float) and key.endswith("_gb"):
            out[key] = round(value, 4)
        elif isinstance(value, dict) and key.endswith("_gb"):
            out[key] = {k: round(v, 4) for k, v in value.items()}
        elif isinstance(value, tuple):
            out[key] = list(value)
    out["mesh"] = {"data": p.mesh[0], "model": p.mesh[1]}
    return out


# ---------------------------------------------------------------------------------------
# The check the runner makes before loading
# ---------------------------------------------------------------------------------------


def host_ram_bytes() -> int:
    """Physical RAM of this host (os.sysconf)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory_bytes(devices: Sequence[Any]) -> tuple[int, str]:
    """(bytes usable on the smallest device, where the number came from).

    Accelerators: JAX's allocator limit, memory_stats()['bytes_limit'] (it reflects
    XLA_PYTHON_CLIENT_MEM_FRACTION). CPU devices share the host's RAM: RAM / devices.
    """
    limits = []
    for d in devices:
        stats = None
        if d.platform != "cpu":
            try:
                stats = d.memory_stats()
            except Exception:  # some backends do not implement it
                stats = None
        if stats and stats.get("bytes_limit"):
            limits.append(int(stats["bytes_limit"]))
    if limits and len(limits) == len(devices):
        return min(limits), "memory_stats()['bytes_limit']"
    return host_ram_bytes() // len(devices), f"host RAM / {len(devices)} devices"


def refuse_if_cannot_fit(config: Any, devices: Sequence[Any], batch: int, context: Optional[int] = None,
                         mesh_shape: Optional[Sequence[int]] = None, moe_impl: Optional[str] = None,
                         strict: bool = True) -> Plan:
    """Plan for the real devices and raise PlanError (with the table) if it cannot fit.

    Call before loading. The limit per device is device_memory_bytes(devices). On an
    accelerator the CUDA context lives outside JAX's limit, so no runtime overhead is added.
    On CPU all devices share the host's RAM: the process itself (CPU_PROCESS_OVERHEAD_GB)
    and the checkpoint loader's buffers come out of it too, and the message counts the
    whole host. Returns the Plan (its `mesh` is the layout to use when mesh_shape was not
    given). strict=False returns the plan of a run that does not fit instead of raising.
    """
    devices = list(devices)
    n = len(devices)
    limit, source = device_memory_bytes(devices)
    on_cpu = all(d.platform == "cpu" for d in devices)
    if on_cpu:
        _, _, host_ram = _checkpoint_sizes(config)
        loader = host_ram - HOST_BASE_GB * GB
        overhead = (CPU_PROCESS_OVERHEAD_GB * GB + loader) / n / GB
        p = plan(config, n, limit / GB, batch, context, mesh_shape, moe_impl,
                 runtime_overhead_gb=overhead, suggest=False)
        p.notes.append(f"CPU: the {n} devices share the host's RAM; the overhead row is each "
                       "device's share of the process and the checkpoint loader's buffers.")
    else:
        p = plan(config, n, limit / GB, batch, context, mesh_shape, moe_impl, runtime_overhead_gb=0.0)
    if p.fits or not strict:
        return p
    if on_cpu:
        ram = host_ram_bytes()
        raise PlanError(
            f"Refusing to load: {p.config_name} on CPU needs about {n * p.total_gb:.1f} GB of host RAM "
            f"(parameters {p.params_total_gb:.1f} GB, KV cache and workspace, loader buffers "
            f"{loader / GB:.1f} GB, the process {CPU_PROCESS_OVERHEAD_GB:g} GB), but this host has "
            f"{ram / GB:.1f} GB. Run it on GPUs (`python run.py --plan --devices 8 "
            f"--device-memory-gb 80` shows a layout), or use a smaller config (--tiny).\n"
            + format_plan(p))
    frac = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    why = (f"(limit from {source}; XLA_PYTHON_CLIENT_MEM_FRACTION={frac})." if frac else
           f"(limit from {source}; JAX takes 75% of each GPU by default: "
           "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 gives it more).")
    raise PlanError("Refusing to load: " + _does_not_fit_message(p).replace("\n", f" {why}\n", 1))


# ---------------------------------------------------------------------------------------
# Command line: python planner.py ... / python run.py --plan ...
# ---------------------------------------------------------------------------------------


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: 'PROG: error: MESSAGE (see PROG --help)', exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_in(low: int, high: Optional[int] = None) -> Any:
    """An argparse type: an integer in [low, high] (high None: no upper bound)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in {low} .. {high}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be an integer {bound}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its own messages
    return parse


def float_in(low: float, high: float) -> Any:
    """An argparse type: a finite number in (low, high]."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and low < value <= high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be a finite number > {low:g} "
                                             f"and <= {high:.10g}")
        return value

    parse.__name__ = "number"
    return parse


def add_plan_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the planner's options to a parser (options it already has are left alone).

    Every number is range-checked as it is parsed (argparse exits with status 2)."""
    have = set(parser._option_string_actions)  # argparse offers no public lookup

    def add(flag: str, **kwargs: Any) -> None:
        if flag not in have:
            parser.add_argument(flag, **kwargs)

    add("--plan", action="store_true", help="print the memory plan and exit (loads nothing)")
    add("--devices", type=int_in(1), default=None,
        help="device count to plan for, >= 1 (default: the devices present)")
    add("--device-memory-gb", type=float_in(0.0, MAX_DEVICE_MEMORY_GB), default=None,
        help="memory per device in GB (10^9 bytes), > 0; default: what the present devices report")
    add("--batch", type=int_in(1, MAX_BATCH), default=1, help="batch size (sequences decoded together)")
    add("--context", type=int_in(1, MAX_CONTEXT), default=None,
        help="KV cache length (default: the model's 8192)")
    add("--mesh", type=str, default=None, help="explicit layout DATAxMODEL, e.g. 1x8 (default: automatic)")
    add("--moe-impl", choices=model_lib.MOE_IMPLS, default=None, help="MoE algorithm (default fast)")
    add("--tiny", action="store_true", help="plan the tiny test config instead of Grok-1")
    add("--layers", type=int_in(1, MAX_LAYERS), default=None,
        help="override the number of layers (bench models)")
    add("--prefill-batch", type=int_in(1, MAX_BATCH), default=1, help="requests prefilled together (default 1)")
    add("--json", action="store_true", help="print the plan as JSON")
    return parser


def config_from_args(args: argparse.Namespace) -> Any:
    """The config the options name: Grok-1, or tiny with --tiny; --layers overrides depth."""
    overrides = {}
    if getattr(args, "layers", None) is not None:
        overrides["num_layers"] = args.layers
    if getattr(args, "moe_impl", None):
        overrides["moe_impl"] = args.moe_impl
    if getattr(args, "tiny", False):
        return model_lib.tiny_config(**overrides)
    return model_lib.grok_1_config(**overrides)


def _mesh_arg(value: Any) -> Optional[tuple[int, int]]:
    """--mesh as 'DATA,MODEL' / 'DATAxMODEL' text, or a (data, model) pair (run.py parses it)."""
    if not value:
        return None
    if isinstance(value, str):
        try:
            return tuple(int(x) for x in re.split(r"[,x]", value.lower()))
        except ValueError:
            raise PlanError(f"--mesh {value!r}: expected DATAxMODEL, e.g. 1x8") from None
    return tuple(int(x) for x in value)


def run_plan(args: argparse.Namespace, out: Any = None, config: Any = None) -> int:
    """Print the plan for parsed options (see add_plan_arguments); returns the exit status:
    0 fits (or no memory given), 1 does not fit, 2 invalid request. `config` overrides the
    one the options name (config_from_args)."""
    out = out or sys.stdout
    config = config if config is not None else config_from_args(args)
    try:
        devices, memory = args.devices, args.device_memory_gb
        if devices is None or memory is None:
            import jax

            present = jax.devices()
            devices = len(present) if devices is None else devices
            if memory is None:
                memory = device_memory_bytes(present)[0] / GB
        mesh = _mesh_arg(getattr(args, "mesh", None))
        p = plan(config, devices, memory, args.batch, args.context, mesh,
                 getattr(args, "moe_impl", None), prefill_batch=getattr(args, "prefill_batch", 1))
    except (PlanError, ValueError) as e:
        if getattr(args, "json", False):
            print(json.dumps({"error": str(e)}), file=out)
        else:
            print(f"error: {e}", file=out)
        return 2
    print(json.dumps(plan_to_json(p), indent=2) if args.json else format_plan(p), file=out)
    return 0 if p.fits in (True, None) else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = OneLineArgumentParser(description="Grok-1 memory planner: will it fit?")
    add_plan_arguments(parser)
    args = parser.parse_args(argv)  # measuring the plan on GPUs: `bench.py memory`
    return run_plan(args)


if __name__ == "__main__":
    sys.exit(main())
