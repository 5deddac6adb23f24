"""bf16 precision of the forward pass against the float64 reference (issue 12).

Shared by tests/test_precision.py (the targets) and `bench.py precision` (the study):

    recipe_config(name, moe_impl)      the issue's "2 layers" / "12 layers" model shapes
    recipe_params(name, seed)          random weights by the issue's recipe (not release files)
    padded_tokens(vocab, seed)         the 2 x 16 right-padded batch
    p90_rel_err(got, want, valid)      90th percentile over valid positions of relative L2
    model_trace(config, params, tok)   the model's intermediate values, by reference.trace names
    compare_traces(...)                per-op, per-layer error of the model against float64
    ablation(...)                      what each bf16 rounding point of the reference costs

Recipe (issue 12): D 256, key size 16, 16 q / 8 kv heads, 8 experts top-2, widening 8
(F 1368), vocab 1024. Norm scales 2.0 + 0.1 N(0,1) and embedding std 0.008 ("2 layers"),
1.0 + 0.1 N(0,1) and 0.02 ("12 layers"). Router and other weights N(0,1) / sqrt(fan-in); the
projections int8 with bf16 absmax/127 scales: 8 row blocks for the attention output and the
experts' second matrix, one scale per column elsewhere.
"""

from __future__ import annotations

import contextlib
import functools
import dataclasses
from typing import Any, Iterator
from unittest import mock

import haiku as hk
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import bench
import kernels
import model
from tests import reference

RECIPES = {
    # name: (layers, norm scale mean, embedding std)
    "2 layers": (2, 2.0, 0.008),
    "12 layers": (12, 1.0, 0.02),
}
BATCH, WIDTH = 2, 16
LENGTHS = (16, 11)  # real tokens per row of the padded batch; the rest is pad (id 0)


def recipe_config(name: str, moe_impl: str = "fast", sequence_len: int = 64) -> model.LanguageModelConfig:
    """The issue's model shapes with Grok-1's multipliers; attention scale 1/sqrt(key size)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {sorted(RECIPES)}")
    return model.tiny_config(
        vocab_size=1024, sequence_len=sequence_len, emb_size=256, key_size=16, num_q_heads=16,
        num_kv_heads=8, num_layers=RECIPES[name][0], widening_factor=8, attn_output_multiplier=0.25,
        moe_impl=moe_impl)


def quantize(w: np.ndarray, blocks: int) -> model.QuantizedWeight8bit:
    """int8 weight with bf16 absmax/127 scales over `blocks` row blocks of w [..., n_in, n_out]."""
    *lead, n_in, n_out = w.shape
    wb = w.reshape(*lead, blocks, n_in // blocks, n_out)
    scales = (np.abs(wb).max(axis=-2) / 127.0).astype(ml_dtypes.bfloat16)  # [..., nb, n_out]
    s = np.maximum(scales.astype(np.float32), np.finfo(np.float32).tiny)[..., None, :]
    q = np.clip(np.rint(wb / s), -127, 127).astype(np.int8).reshape(w.shape)
    return model.QuantizedWeight8bit(q, scales)


def recipe_params(name: str, seed: int = 0) -> dict:
    """Numpy parameters in the released layout (float32 leaves, int8 + bf16 scales)."""
    config = recipe_config(name)
    _, norm_mean, emb_std = RECIPES[name]
    rng = np.random.default_rng(seed)
    shapes = model.param_shapes(config)
    out: dict = {}
    for module in sorted(shapes):
        for pname, leaf in sorted(shapes[module].items()):
            if isinstance(leaf, model.QuantizedWeight8bit):
                shape = leaf.weight.shape
                w = rng.standard_normal(shape, np.float32) / np.float32(np.sqrt(shape[-2]))  # fan-in: the input dim
                value: Any = quantize(w, leaf.scales.shape[-2])
            elif module.endswith("in_out_embed"):
                value = (rng.standard_normal(leaf.shape) * emb_std).astype(np.float32)
            elif "rms_norm" in module:
                value = (norm_mean + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
            elif module.endswith("router"):
                value = (rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[0])).astype(np.float32)
            else:
                raise ValueError(f"recipe_params: no recipe for {module}/{pname}")
            out.setdefault(module, {})[pname] = value
    return out


def float64_params(params: dict) -> dict:
    """The same tree with 8-bit weights dequantized once (reference.dequantize, float64):
    reference.forward then skips dequantizing every layer on every call."""
    out: dict = {}
    for module, leaves in params.items():
        out[module] = {}
        for pname, leaf in leaves.items():
            if isinstance(leaf, model.QuantizedWeight8bit):
                leaf = reference.dequantize(leaf.weight, leaf.scales)
            out[module][pname] = leaf
    return out


def to_device(params: dict) -> dict:
    return jax.tree_util.tree_map(jnp.asarray, params)


def padded_tokens(vocab: int = 1024, seed: int = 1) -> np.ndarray:
    """[2, 16] int32: random ids in [3, vocab) (no pad, BOS or EOS), right-padded by LENGTHS."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((BATCH, WIDTH), np.int32)
    for row, n in enumerate(LENGTHS):
        tokens[row, :n] = rng.integers(3, vocab, n)
    return tokens


def per_position_rel(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Relative L2 error of each position: [..., X] arrays -> [...]."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    den = np.linalg.norm(want, axis=-1)
    return np.linalg.norm(got - want, axis=-1) / np.where(den > 0, den, 1.0)


def p90_rel_err(got: np.ndarray, want: np.ndarray, valid: np.ndarray | None = None) -> float:
    """90th percentile over positions (where `valid`) of the relative L2 error of [..., V]."""
    err = per_position_rel(got, want)
    if valid is not None:
        err = err[valid]
    return float(np.percentile(err, 90))


# ---------------------------------------------------------------------------------------
# The model's intermediate values (interceptors and wrappers; model.py is unchanged)
# ---------------------------------------------------------------------------------------

_RMS_NAMES = {"rms_norm": "norm_attn_in", "rms_norm_1": "norm_attn_out", "rms_norm_2": "norm_moe_in",
              "rms_norm_3": "norm_moe_out"}


@contextlib.contextmanager
def _recording(store: dict) -> Iterator[None]:
    """Record into `store` (reference.trace names) while a model is traced.

    Module calls are caught with hk.intercept_methods; the free functions called inside
    them (RoPE, softmax, the MoE's final combination) are wrapped for the duration.
    """
    stack: list[str] = []  # module names of the calls in progress, innermost last

    def layer_prefix() -> str:
        for name in reversed(stack):
            part = [p for p in name.split("/") if p.startswith("decoder_layer_")]
            if part:
                return "layer_" + part[-1][len("decoder_layer_"):] + "/"
        return ""

    def inside(kind: str) -> bool:
        return any(n.split("/")[-1] == kind for n in stack)

    def put(name: str, value: Any) -> None:
        key = layer_prefix() + name
        if key not in store:
            store[key] = value

    def interceptor(method, args, kwargs, context):
        if context.method_name != "__call__":  # __init__ runs before module_name exists
            return method(*args, **kwargs)
        name = context.module.module_name
        short = name.split("/")[-1]
        stack.append(name)
        try:
            out = method(*args, **kwargs)
        finally:
            stack.pop()
        mod = context.module
        if isinstance(mod, model.RMSNorm):
            if short in _RMS_NAMES and layer_prefix():
                stack.append(name)
                put(_RMS_NAMES[short], out)
                if short == "rms_norm_2":
                    put("residual_mid", args[0])
                stack.pop()
            elif short == "rms_norm":
                store["final_norm"] = out
        elif isinstance(mod, model.DecoderLayer):
            stack.append(name)
            put("residual", out[0])
            stack.pop()
            if short == "decoder_layer_0":
                store["embed"] = args[0]
        elif isinstance(mod, model.MultiHeadAttention):
            stack.append(name)
            put("attn_out", out[0])
            stack.pop()
        elif isinstance(mod, model.Linear) and inside("multi_head_attention") and short == "linear":
            stack.append(name)
            put("attn_sum", args[0])
            stack.pop()
        elif isinstance(mod, model.Router):
            stack.append(name)
            put("experts", out[1])
            stack.pop()
        elif isinstance(mod, model.MoELayer):
            stack.append(name)
            put("moe_out", out)
            stack.pop()
        return out

    real_rope, real_softmax, real_combine = model.rotary_embedding, jax.nn.softmax, kernels.combine
    real_einsum, real_linears = jnp.einsum, model.linears

    def linears(x, projections):  # q, k and v come out of one call
        outs = real_linears(x, projections)
        for p, out in zip(projections, outs):
            short = p.module_name.split("/")[-1]
            if short in ("query", "key", "value"):
                put({"query": "q", "key": "k", "value": "v"}[short], out)
        return outs

    def rope(x, positions, *a, **k):
        out = real_rope(x, positions, *a, **k)
        put("k_rope" if layer_prefix() + "q_rope" in store else "q_rope", out)
        return out

    def softmax(x, *a, **k):
        out = real_softmax(x, *a, **k)
        if inside("router"):
            put("router_probs", out)
        elif inside("multi_head_attention"):
            put("probs", out)
        return out

    def combine(ys, gates, plan, *a, **k):  # fast MoE: rows of each (token, slot), [M, k, D]
        m, n = gates.shape
        put("expert_out", jnp.take(ys, plan.row_pos, axis=0).reshape(m, n, ys.shape[-1]))
        return real_combine(ys, gates, plan, *a, **k)

    def einsum(spec, *operands, **k):  # reference MoE: all experts' outputs [N, E, D]
        out = real_einsum(spec, *operands, **k)
        if inside("moe") and spec == "nef,efd->ned":
            put("all_expert_out", out)
        return out

    with hk.intercept_methods(interceptor), \
            mock.patch.object(model, "rotary_embedding", rope), \
            mock.patch.object(jax.nn, "softmax", softmax), \
            mock.patch.object(kernels, "combine", combine), \
            mock.patch.object(jnp, "einsum", einsum), \
            mock.patch.object(model, "linears", linears):
        yield


def model_trace(config: model.LanguageModelConfig, params: dict, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """The model's prefill intermediates (no cache), float64 numpy, named as reference.trace.

    Values the model does not expose under a name are left out. Layout differences are
    undone: expert outputs become [B, T, k, D] in the router's order, probs
    [B, G, H/G, T, S].
    """
    b, t = tokens.shape

    def fn(tokens):
        store: dict = {}
        with _recording(store):
            out = config.make()(tokens)
        store["logits"] = out.logits
        return store

    store = jax.jit(hk.without_apply_rng(hk.transform(fn)).apply)(params, jnp.asarray(tokens))
    out = {}
    for key, value in store.items():
        floating = jnp.issubdtype(value.dtype, jnp.floating)
        out[key] = np.asarray(value.astype(jnp.float32)).astype(np.float64) if floating else np.asarray(value)
    for key in [k for k in out if k.endswith("/all_expert_out")]:  # [N, E, D] -> chosen [N, k, D]
        experts = out[key.replace("all_expert_out", "experts")].reshape(b * t, -1)
        out[key.replace("all_expert_out", "expert_out")] = np.take_along_axis(out.pop(key), experts[:, :, None], axis=1)
    for key in [k for k in out if k.endswith(("/expert_out", "/experts"))]:
        out[key] = out[key].reshape(b, t, *out[key].shape[-1 if key.endswith("experts") else -2:])
    return out


def routed_forward(config: model.LanguageModelConfig):
    """(params, tokens, memory) -> (logits [B, T, V], memory, experts [L, B, T, k]): bench's
    forward that also returns each layer's expert choice (the memory passed in is donated)."""
    forward = bench.routed_forward(config)
    k = config.model.num_selected_experts

    def fn(params, tokens, memory):
        out, experts = forward(params, tokens, memory, None)
        # Where the route kernel chose (on a GPU), the router's logits: the choice is their top k.
        experts = [e if e.dtype == jnp.int32 else jax.lax.top_k(e, k)[1] for e in experts]
        return out.logits, out.model_state, jnp.stack(experts)

    return fn


@functools.lru_cache(maxsize=None)
def recipe_forward(name: str, impl: str):
    """routed_forward of a recipe's config, built once: its jit compiles each shape once
    for all the seeds."""
    return routed_forward(recipe_config(name, impl))


def prefill_and_decode(config: model.LanguageModelConfig, params: dict, tokens: np.ndarray, forward=None):
    """The model's logits for `tokens` [B, T], two ways, each with its expert choices:

    prefill: one call through an empty KV cache; decode: one token at a time through it
    (teacher forcing). Returns {"prefill": (logits, experts), "decode": (logits, experts)},
    logits [B, T, V] float64, experts [L, B, T, k].
    """
    forward = forward or routed_forward(config)
    b, t = tokens.shape
    logits, _, experts = forward(params, jnp.asarray(tokens), model.init_memory(config, b, t))
    out = {"prefill": (np.asarray(logits, np.float64), np.asarray(experts))}
    memory, steps, choices = model.init_memory(config, b, t), [], []
    for i in range(t):
        logits, memory, experts = forward(params, jnp.asarray(tokens[:, i:i + 1]), memory)
        steps.append(np.asarray(logits[:, 0], np.float64))
        choices.append(np.asarray(experts[:, :, 0]))
    out["decode"] = (np.stack(steps, axis=1), np.stack(choices, axis=2))
    return out


def routing_flips(experts: np.ndarray, reference_experts: np.ndarray, valid: np.ndarray) -> int:
    """Valid (layer, position) pairs whose set of chosen experts differs: [L, B, T, k] each."""
    differ = np.any(np.sort(experts, -1) != np.sort(reference_experts, -1), axis=-1)  # [L, B, T]
    return int(differ[:, valid].sum())


OPS = ("embed", "norm_attn_in", "q", "k", "v", "q_rope", "k_rope", "probs", "attn_sum", "attn_out",
       "norm_attn_out", "residual_mid", "norm_moe_in", "router_probs", "expert_out", "moe_out",
       "norm_moe_out", "residual", "final_norm", "logits")


def _by_position(name: str, value: np.ndarray, b: int, t: int) -> np.ndarray:
    """[B, T, X] layout of a traced value (probs are [B, G, H/G, T, S])."""
    if name.endswith("probs") and value.ndim == 5:
        value = np.moveaxis(value, 3, 1)
    return value.reshape(b, t, -1)


def compare_traces(got: dict, want: dict, valid: np.ndarray, num_layers: int) -> dict[str, list[float]]:
    """{op: [p90 relative error over valid positions, per layer]} (global ops: one entry).

    Expert outputs are compared only at (token, slot) pairs where model and reference chose
    the same expert.
    """
    b, t = valid.shape
    table: dict[str, list[float]] = {}
    for op in OPS:
        keys = [op] if op in ("embed", "final_norm", "logits") else [f"layer_{i}/{op}" for i in range(num_layers)]
        row = []
        for key in keys:
            if key not in got or key not in want:
                row.append(float("nan"))
                continue
            if op == "expert_out":
                same = got[key.replace("expert_out", "experts")] == want[key.replace("expert_out", "experts")]
                same &= valid[..., None]
                err = per_position_rel(got[key], want[key])[same]
                row.append(float(np.percentile(err, 90)) if err.size else float("nan"))
                continue
            err = per_position_rel(_by_position(op, got[key], b, t), _by_position(op, want[key], b, t))
            row.append(float(np.percentile(err[valid], 90)))
        table[op] = row
    return table


# ---------------------------------------------------------------------------------------
# What each rounding costs, in the reference's bf16 emulation
# ---------------------------------------------------------------------------------------


# Where this model rounds to bf16 (model.activation_dtype): on the CPU only what the KV
# cache stores, in both MoE modes; on an accelerator at decode sizes (up to
# kernels.SPLIT_MAX_ROWS rows) also the unembedding's bf16 table; at prefill sizes there,
# the matmul inputs (norms before attention, MoE and unembedding; q; the attention
# weighted sum; the experts' hidden layer), the attention probabilities and the experts'
# outputs too, as the release does, and in the reference mode the experts' input matmuls
# and gelu and the bf16 dequantization (the release's algorithm).
_PREFILL_POINTS = ("cache", "unembed", "norm_in", "q", "probs", "attn_sum", "expert_hidden", "expert_out")
MODEL_POINTS = {
    "CPU, both MoE modes": ("cache",),
    "accelerator, decode sizes, both modes": ("cache", "unembed"),
    "accelerator, prefill sizes, fast MoE": _PREFILL_POINTS,
    "accelerator, prefill sizes, reference MoE": _PREFILL_POINTS + ("expert_in", "dequant"),
    "before this change (fast MoE)": ("unembed", "norm_in", "q", "kv", "probs", "attn_sum", "expert_hidden",
                                      "expert_out"),
}


def ablation(params: dict, cfg: Any, tokens: np.ndarray,
             points: tuple[str, ...] = reference.ROUNDING_POINTS) -> dict[str, dict[str, float]]:
    """p90 logits error vs float64 of the reference rounding at: each point alone ("only"),
    with the KV cache's rounding ("with the cache": what the point adds to the floor a bf16
    cache sets), every point of bf16=True but that one ("all but"), plus "all" (bf16=True),
    "all + dequant" (the release's bf16 dequantization too) and this model's sets
    (MODEL_POINTS). Every run keeps float64's expert choices, so that the numbers are the
    arithmetic's cost, not routing flips."""
    valid = tokens != cfg.pad_token
    tr = reference.trace(params, cfg, tokens)
    want = tr["logits"]
    experts = np.stack([tr[f"layer_{i}/experts"] for i in range(cfg.model.num_layers)])
    err = lambda bf16: p90_rel_err(reference.forward(params, cfg, tokens, bf16=bf16, experts=experts)[0],
                                   want, valid)
    every = tuple(p for p in reference.ROUNDING_POINTS if p != "dequant")
    out = {"all": {"only": err(True)}, "all + dequant": {"only": err(reference.ROUNDING_POINTS)}}
    for where, model_points in MODEL_POINTS.items():
        out[f"this model: {where}"] = {"only": err(model_points)}
    for point in points:
        out[point] = {"only": err((point,)), "with the cache": err(tuple({point, "cache"})),
                      "all but": err(tuple(p for p in every if p != point)) if point in every else float("nan")}
    return out


# ---------------------------------------------------------------------------------------
# The whole measurement of one model
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Recipe:
    """One random model of a recipe and its float64 answers."""

    name: str
    seed: int
    params: dict  # as generated: float32 leaves, int8 + bf16 scales (numpy)
    exact: dict  # the same with 8-bit weights dequantized in float64 (for the reference)
    tokens: np.ndarray  # [2, 16]
    valid: np.ndarray  # [2, 16] bool
    want: np.ndarray  # float64 logits [2, 16, V]
    experts: np.ndarray  # float64 routing [L, 2, 16, k]


def make_recipe(name: str, seed: int = 0) -> Recipe:
    params = recipe_params(name, seed)
    exact = float64_params(params)
    tokens = padded_tokens(seed=seed + 1)
    cfg = recipe_config(name)
    tr = reference.trace(exact, cfg, tokens)
    experts = np.stack([tr[f"layer_{i}/experts"] for i in range(cfg.model.num_layers)])
    return Recipe(name, seed, params, exact, tokens, tokens != cfg.pad_token, tr["logits"], experts)


def measure(r: Recipe, impl: str, device_params: dict | None = None) -> dict[str, dict[str, float]]:
    """{"prefill" | "decode": {"p90": issue 12's metric, "p90_same_routing": the same
    against float64 run with the model's own expert choices, "flips": routing flips}}."""
    config = recipe_config(r.name, impl)
    params = to_device(r.params) if device_params is None else device_params
    out = {}
    for kind, (logits, experts) in prefill_and_decode(config, params, r.tokens, recipe_forward(r.name, impl)).items():
        same_routing, _ = reference.forward(r.exact, config, r.tokens, experts=experts)
        out[kind] = {"p90": p90_rel_err(logits, r.want, r.valid),
                     "p90_same_routing": p90_rel_err(logits, same_routing, r.valid),
                     "flips": routing_flips(experts, r.experts, r.valid)}
    return out
