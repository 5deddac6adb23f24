"""Independent float64 numpy reference of the Grok-1 forward pass.

Written from /work/shared/SPEC.md (sections 1-3) only, never from model.py, so that the
tests can check model.py against something that shares none of its code.

Public API:
    dequantize(weight, scales)              -> float64 weight (8-bit block rule, SPEC sec 3)
    init_cache(cfg, batch, seq_len)         -> empty Cache
    forward(params, cfg, tokens, cache, bf16, experts) -> (logits [B, T, V] float64, new Cache)
    trace(params, cfg, tokens, ...)         -> every intermediate value, by name
    ROUNDING_POINTS                         -> the names `bf16` may list (precision studies)
    router_probs(params, cfg, tokens, ...)  -> router softmax per layer [L, B, T, E]
    top_k_margin(params, cfg, tokens, ...)  -> p_k - p_(k+1) per layer [L, B, T]
    apply_rope(x, positions)                -> rotary embedding, rotate-half style

`params` is the Haiku-layout dict {module_path: {param_name: leaf}}; a leaf is an array
(numpy, jax, float32 or ml_dtypes bfloat16) or any object with `.weight` (int8) and
`.scales` (bfloat16) attributes, which is dequantized. `cfg` is duck-typed: it needs
vocab_size, pad_token, embedding_multiplier_scale, output_multiplier_scale and
cfg.model.{emb_size, key_size, num_q_heads, num_kv_heads, num_layers, num_experts,
num_selected_experts, attn_output_multiplier}.

By default everything is float64. With bf16=True, values are rounded to bfloat16 at the
points where the real model stores bf16 activations (listed in `forward`); arithmetic in
between stays float64. That mode mimics storage rounding for tolerance studies; it is not a
bit-exact emulation of XLA's bf16 kernels. `bf16` may also be a collection of names from
ROUNDING_POINTS, to round at those points only (the precision study's ablations).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_dtypes
import numpy as np

# Constants fixed by SPEC section 1.
RMS_EPS = 1e-5
ROPE_BASE = 10000.0
ATTN_LOGIT_CAP = 30.0
MASK_VALUE = -1e30


# ---------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------


def dequantize(weight: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Dequantizes an 8-bit weight with the block rule of SPEC section 3, in float64.

    weight: [..., n_in, n_out] (int8). scales: [..., nb, n_out] (bfloat16), nb dividing
    n_in. Rows [b * n_in / nb, (b + 1) * n_in / nb) of the weight use scales[..., b, :];
    nb == 1 is the per-column case.
    """
    w = np.asarray(weight)
    s = np.asarray(scales).astype(np.float64)
    if w.ndim < 2 or s.ndim != w.ndim:
        raise ValueError(
            f"dequantize: weight {w.shape} and scales {s.shape} must both be [..., n_in, n_out]"
            " with the same rank"
        )
    n_in, nb = w.shape[-2], s.shape[-2]
    if s.shape[:-2] != w.shape[:-2] or s.shape[-1] != w.shape[-1]:
        raise ValueError(
            f"dequantize: scales {s.shape} do not match weight {w.shape}; expected "
            f"{w.shape[:-2] + (nb, w.shape[-1])}"
        )
    if nb == 0 or n_in % nb:
        raise ValueError(
            f"dequantize: {nb} scale blocks do not divide the input dimension {n_in} "
            f"(weight {w.shape}, scales {s.shape})"
        )
    s_rows = np.repeat(s, n_in // nb, axis=-2)  # [..., n_in, n_out]
    return w.astype(np.float64) * s_rows


def _leaf_to_f64(leaf: Any, where: str) -> np.ndarray:
    """Float64 copy of one parameter leaf (dequantizing 8-bit weights)."""
    if hasattr(leaf, "weight") and hasattr(leaf, "scales"):
        try:
            return dequantize(leaf.weight, leaf.scales)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    # np.asarray keeps ml_dtypes bfloat16 as is; astype then widens exactly (float64 leaves,
    # e.g. weights dequantized once by the caller, are used without a copy: never modified).
    return np.asarray(leaf).astype(np.float64, copy=False)


def _param(params: dict, module: str, name: str, shape: tuple) -> np.ndarray:
    """Fetches params[module][name] as float64 and checks its shape."""
    where = f"params[{module!r}][{name!r}]"
    if module not in params or name not in params[module]:
        raise KeyError(f"reference: missing parameter {where}")
    x = _leaf_to_f64(params[module][name], where)
    if x.shape != tuple(shape):
        raise ValueError(f"reference: {where} has shape {x.shape}, expected {tuple(shape)}")
    return x


def _layer_params(params: dict, cfg, i: int, bf16: Any = False) -> dict:
    """All float64 parameters of decoder layer i, keyed by short names.

    With the "dequant" rounding point (see ROUNDING_POINTS), the dequantized 8-bit weights
    are rounded to bf16, as the release's bf16 dequantization does.
    """
    m = cfg.model
    D, H, G, K, E = m.emb_size, m.num_q_heads, m.num_kv_heads, m.key_size, m.num_experts
    pre = f"transformer/decoder_layer_{i}"
    mha = f"{pre}/multi_head_attention"
    # The ffn size F is not a cfg field the reference relies on: read it off moe/linear.
    lin = params.get(f"{pre}/moe/linear", {}).get("w")
    if lin is None:
        raise KeyError(f"reference: missing parameter params['{pre}/moe/linear']['w']")
    F = np.shape(getattr(lin, "weight", lin))[-1]
    p = {
        "wq": _param(params, f"{mha}/query", "w", (D, H * K)),
        "wk": _param(params, f"{mha}/key", "w", (D, G * K)),
        "wv": _param(params, f"{mha}/value", "w", (D, G * K)),
        "wo": _param(params, f"{mha}/linear", "w", (H * K, D)),
        "router": _param(params, f"{pre}/router", "w", (D, E)),
        "w_in": _param(params, f"{pre}/moe/linear", "w", (E, D, F)),
        "w_v": _param(params, f"{pre}/moe/linear_v", "w", (E, D, F)),
        "w_out": _param(params, f"{pre}/moe/linear_1", "w", (E, F, D)),
    }
    round_weight = _rounder(bf16, "dequant")
    for name in ("wq", "wk", "wv", "wo", "w_in", "w_v", "w_out"):
        p[name] = round_weight(p[name])
    for norm in ("rms_norm", "rms_norm_1", "rms_norm_2", "rms_norm_3"):
        p[norm] = _param(params, f"{pre}/{norm}", "scale", (D,))
    return p


# ---------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Cache:
    """Reference KV cache: per layer k, v [B, S, G, K] float64, and step [B] per sequence."""

    k: list[np.ndarray]
    v: list[np.ndarray]
    step: np.ndarray  # [B] int64: positions already written, per sequence


def init_cache(cfg, batch: int, seq_len: int) -> Cache:
    """Empty cache of seq_len positions for `batch` sequences (all steps 0)."""
    m = cfg.model
    shape = (batch, seq_len, m.num_kv_heads, m.key_size)
    return Cache(
        k=[np.zeros(shape) for _ in range(m.num_layers)],
        v=[np.zeros(shape) for _ in range(m.num_layers)],
        step=np.zeros((batch,), np.int64),
    )


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------


def to_bf16(x: np.ndarray) -> np.ndarray:
    """Rounds to bfloat16 (round-to-nearest-even) and returns float64."""
    return np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float64)


# The storage points where bf16=True rounds (see `forward`). bf16 may also be a collection
# of these names, to round at those points only (a precision study's ablations).
ROUNDING_POINTS = (
    "embed",        # the input embedding: bf16 table rows, and their product with the multiplier
    "unembed",      # the bf16 table in the output projection
    "norm_in",      # RMSNorm outputs that feed matmuls: before attention, MoE, unembedding
    "norm_out",     # RMSNorm outputs added to the residual: after attention and after the MoE
    "residual",     # the residual stream after each add
    "q",            # the q projection and q after RoPE
    "kv",           # the k and v projections and k after RoPE (what the KV cache stores)
    "cache",        # k after RoPE and v, rounded once: only what a bf16 KV cache stores
    "probs",        # attention probabilities
    "attn_sum",     # the attention weighted sum (input of the output projection)
    "attn_out",     # the attention output projection
    "expert_in",    # each expert's two input matmul outputs and gelu
    "expert_hidden",  # gelu(x W) * (x V), the input of the expert's output matmul
    "expert_out",   # each expert's output
    "moe_out",      # the MoE output (gated sum of the chosen experts)
    "logits",       # logits before and after the output multiplier
    "dequant",      # dequantized weights int8 * scale (off under bf16=True: SPEC's rule
                    # is the exact product; the release's bf16 dequantization rounds it)
)


def _rounder(bf16: Any, point: str):
    """to_bf16 when bf16 is True (all points but "dequant") or names `point`; else identity."""
    if point not in ROUNDING_POINTS:
        raise ValueError(f"reference: unknown rounding point {point!r}; expected one of {ROUNDING_POINTS}")
    if isinstance(bf16, (bool, np.bool_)):
        on = bool(bf16) and point != "dequant"
    else:
        unknown = set(bf16) - set(ROUNDING_POINTS)
        if unknown:
            raise ValueError(f"reference: unknown rounding points {sorted(unknown)}; expected names from {ROUNDING_POINTS}")
        on = point in bf16
    return to_bf16 if on else (lambda x: x)


def rms_norm(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """x * 1/sqrt(mean(x^2) + eps) * scale over the last axis (scale used as is)."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + RMS_EPS) * scale


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (jax.nn.gelu's default)."""
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return z / np.sum(z, axis=axis, keepdims=True)


def apply_rope(x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Rotary embedding, rotate-half style, over all K dims of each head.

    x: [B, T, N, K]; positions: [B, T]. Phase for frequency j < K/2 is
    position / 10000^(2j/K); the K/2 phases are tiled twice to K.
    """
    K = x.shape[-1]
    inv_freq = 1.0 / ROPE_BASE ** (2.0 * np.arange(K // 2) / K)  # [K/2]
    phase = np.asarray(positions, np.float64)[..., None] * inv_freq  # [B, T, K/2]
    phase = np.concatenate([phase, phase], axis=-1)[:, :, None, :]  # [B, T, 1, K]
    x1, x2 = x[..., : K // 2], x[..., K // 2 :]
    rotated = np.concatenate([-x2, x1], axis=-1)  # rotate_half
    return x * np.cos(phase) + rotated * np.sin(phase)


def attention(
    x: np.ndarray,
    p: dict,
    cfg,
    positions: np.ndarray,
    mask: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    step: np.ndarray,
    bf16: Any = False,
    trace: dict | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grouped-query attention of one layer, writing this call's k/v into the cache.

    x: [B, T, D] (already normed); positions: [B, T]; mask: [B, T, S] bool (True = visible);
    k_cache, v_cache: [B, S, G, K] (not modified); step: [B]. A `trace` dict receives the
    intermediate values (q, k, v, q_rope, k_rope, probs, attn_sum).
    Returns (output [B, T, D], new k_cache, new v_cache).
    """
    m = cfg.model
    B, T, _ = x.shape
    H, G, K = m.num_q_heads, m.num_kv_heads, m.key_size
    rd = lambda point, x: _rounder(bf16, point)(x)

    q = rd("q", x @ p["wq"]).reshape(B, T, H, K)
    k = rd("kv", x @ p["wk"]).reshape(B, T, G, K)
    v = rd("kv", x @ p["wv"]).reshape(B, T, G, K)
    if trace is not None:
        trace.update(q=q, k=k, v=v)
    q = rd("q", apply_rope(q, positions))
    k = rd("cache", rd("kv", apply_rope(k, positions)))
    v = rd("cache", v)

    # Each sequence writes at its own step.
    k_cache, v_cache = k_cache.copy(), v_cache.copy()
    for b in range(B):
        k_cache[b, step[b] : step[b] + T] = k[b]
        v_cache[b, step[b] : step[b] + T] = v[b]

    # Query head h = g * (H/G) + r uses kv head g = h // (H/G).
    qg = q.reshape(B, T, G, H // G, K)
    logits = np.einsum("btgrk,bsgk->bgrts", qg, k_cache) * m.attn_output_multiplier
    logits = ATTN_LOGIT_CAP * np.tanh(logits / ATTN_LOGIT_CAP)
    logits = np.where(mask[:, None, None, :, :], logits, MASK_VALUE)  # [B, G, H/G, T, S]
    probs = rd("probs", softmax(logits, axis=-1))
    out = np.einsum("bgrts,bsgk->btgrk", probs, v_cache).reshape(B, T, H * K)
    out = rd("attn_sum", out)
    if trace is not None:
        trace.update(q_rope=q, k_rope=k, probs=probs, attn_sum=out)
    return rd("attn_out", out @ p["wo"]), k_cache, v_cache


def moe(
    x: np.ndarray, p: dict, cfg, bf16: Any = False, trace: dict | None = None,
    experts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k mixture of experts on x [B, T, D]; returns (output [B, T, D], router probs).

    Router: softmax(x @ router_w) over experts in float64. The k most probable experts are
    used with their raw probabilities as gates (not renormalised). Ties go to the lower
    expert index. Expert e: (gelu_tanh(x @ W[e]) * (x @ V[e])) @ W1[e]. A `trace` dict
    receives the chosen experts [B, T, k] and their outputs expert_out [B, T, k, D].
    `experts` [B, T, k] (distinct per position) overrides the choice, e.g. with another
    implementation's, to compare arithmetic apart from routing flips; the gates are still
    this router's probabilities of those experts.
    """
    m = cfg.model
    E, k = m.num_experts, m.num_selected_experts
    rd = lambda point, x: _rounder(bf16, point)(x)

    probs = softmax(x @ p["router"], axis=-1)  # [B, T, E]
    top = np.argsort(-probs, axis=-1, kind="stable")[..., :k]  # [B, T, k]
    if experts is not None:
        experts = np.asarray(experts)
        if experts.shape != top.shape or experts.min() < 0 or experts.max() >= E:
            raise ValueError(f"reference.moe: experts {experts.shape} must be {top.shape} ids in [0, {E})")
        top = experts

    out = np.zeros_like(x)
    expert_out = np.zeros(top.shape + x.shape[-1:])  # [B, T, k, D]
    for e in range(E):
        chosen = np.any(top == e, axis=-1)  # [B, T]
        if not chosen.any():
            continue
        xe = x[chosen]  # [N, D]
        a = rd("expert_in", gelu_tanh(rd("expert_in", xe @ p["w_in"][e])))
        hidden = rd("expert_hidden", a * rd("expert_in", xe @ p["w_v"][e]))  # [N, F]
        ye = rd("expert_out", hidden @ p["w_out"][e])  # [N, D]
        out[chosen] += probs[..., e][chosen][:, None] * ye
        expert_out[top == e] = ye  # each chosen (token, slot) once: rows in the same order
    if trace is not None:
        trace.update(experts=top, expert_out=expert_out)
    return rd("moe_out", out), probs


# ---------------------------------------------------------------------------------------
# Forward pass
# ---------------------------------------------------------------------------------------


def _run(params: dict, cfg, tokens, cache: Cache | None, bf16: Any, trace: dict | None = None,
         experts: np.ndarray | None = None):
    """Forward pass; returns (logits, new cache, router probs per layer).

    `trace`, if given, receives every intermediate value (see `trace`). `experts`
    [L, B, T, k], if given, forces each layer's expert choice (see `moe`)."""
    m = cfg.model
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"reference.forward: tokens must be [B, T], got shape {tokens.shape}")
    B, T = tokens.shape
    V, D, L = cfg.vocab_size, m.emb_size, m.num_layers
    if m.num_q_heads % m.num_kv_heads:
        raise ValueError(
            f"reference: num_q_heads {m.num_q_heads} not a multiple of num_kv_heads "
            f"{m.num_kv_heads}"
        )
    if cache is None:
        cache = init_cache(cfg, B, T)
    step = np.asarray(cache.step, np.int64)
    S = cache.k[0].shape[1]
    if step.shape != (B,) or cache.k[0].shape[0] != B or len(cache.k) != L:
        raise ValueError(
            f"reference.forward: cache (batch {cache.k[0].shape[0]}, {len(cache.k)} layers, "
            f"step {step.shape}) does not match tokens {tokens.shape} / {L} layers"
        )
    if np.any(step + T > S):
        raise ValueError(f"reference.forward: steps {step} + T={T} overflow cache size {S}")
    rd = lambda point, x: _rounder(bf16, point)(x)

    # Positions and the [B, T, S] visibility mask.
    positions = step[:, None] + np.arange(T)[None, :]  # [B, T]
    key_pos = np.arange(S)
    causal = key_pos[None, None, :] <= positions[:, :, None]  # [B, T, S]
    key_is_pad = np.zeros((B, S), bool)  # only keys written by this call can be pads
    for b in range(B):
        key_is_pad[b, step[b] : step[b] + T] = tokens[b] == cfg.pad_token
    mask = causal & ~key_is_pad[:, None, :]

    # Embedding: bf16 table rows times the embedding multiplier.
    emb = _param(params, "language_model/in_out_embed", "embeddings", (V, D))  # [V, D]
    h = rd("embed", rd("embed", emb[tokens]) * cfg.embedding_multiplier_scale)  # [B, T, D]
    emb = rd("unembed", emb)
    record = (lambda name, value: trace.__setitem__(name, value)) if trace is not None else (lambda *a: None)
    record("embed", h)

    new_k, new_v, all_probs = [], [], []
    for i in range(L):
        p = _layer_params(params, cfg, i, bf16)
        layer: dict | None = {} if trace is not None else None
        x = rd("norm_in", rms_norm(h, p["rms_norm"]))
        a, k_i, v_i = attention(x, p, cfg, positions, mask, cache.k[i], cache.v[i], step, bf16, layer)
        a_normed = rd("norm_out", rms_norm(a, p["rms_norm_1"]))
        h = rd("residual", h + a_normed)
        x_moe = rd("norm_in", rms_norm(h, p["rms_norm_2"]))
        h_mid = h
        mo, probs = moe(x_moe, p, cfg, bf16, layer, None if experts is None else experts[i])
        mo_normed = rd("norm_out", rms_norm(mo, p["rms_norm_3"]))
        h = rd("residual", h + mo_normed)
        if trace is not None:
            layer.update(norm_attn_in=x, attn_out=a, norm_attn_out=a_normed, residual_mid=h_mid,
                         norm_moe_in=x_moe, router_probs=probs, moe_out=mo, norm_moe_out=mo_normed,
                         residual=h)
            trace.update({f"layer_{i}/{name}": value for name, value in layer.items()})
        new_k.append(k_i)
        new_v.append(v_i)
        all_probs.append(probs)

    final = _param(params, "language_model/rms_norm", "scale", (D,))
    h = rd("norm_in", rms_norm(h, final))
    logits = rd("logits", rd("logits", h @ emb.T) * cfg.output_multiplier_scale)  # [B, T, V], tied weights
    record("final_norm", h)
    record("logits", logits)
    new_cache = Cache(k=new_k, v=new_v, step=step + T)
    return logits, new_cache, np.stack(all_probs)


def forward(
    params: dict, cfg, tokens: np.ndarray, cache: Cache | None = None, bf16: Any = False,
    experts: np.ndarray | None = None,
) -> tuple[np.ndarray, Cache]:
    """Grok-1 forward pass in float64. Returns (logits [B, T, V], new cache).

    Without a cache, a fresh one of T positions (step 0) is used: causal + padding masks.
    With a cache, this call's k/v are written at positions step..step+T-1 of each sequence,
    RoPE positions are step + t, key s is visible to query t when s <= step + t, and keys
    written by this call are masked where the token is pad_token (keys from earlier calls
    at positions < step stay visible). The returned cache has step + T; the input cache is
    not modified.

    bf16=True rounds to bfloat16 at: the bf16 embedding table and its scaled output, every
    RMSNorm output, the residual stream after each add, q/k/v projections and after RoPE
    (k after RoPE and v: what the KV cache stores),
    attention probabilities, the attention weighted sum and output projection, each
    expert's matmul outputs, gelu * value product and output, the MoE output, and the
    logits (before and after the output multiplier). Dequantized weights are not rounded.
    A collection of ROUNDING_POINTS names rounds at those points only ("dequant" rounds
    the dequantized weights, as the release's bf16 dequantization does).

    experts [L, B, T, k]: each layer's chosen experts per position, instead of this
    router's top-k (to measure another implementation's arithmetic apart from routing).
    """
    logits, new_cache, _ = _run(params, cfg, tokens, cache, bf16, None, experts)
    return logits, new_cache


def trace(
    params: dict, cfg, tokens: np.ndarray, cache: Cache | None = None, bf16: Any = False,
    experts: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Every intermediate value of a forward pass, float64, by name.

    "embed", "final_norm", "logits" [B, T, ...]; per layer i, "layer_{i}/NAME" for NAME in
    q, k, v (projections [B, T, N, K]), q_rope, k_rope, probs [B, G, H/G, T, S], attn_sum
    [B, T, H*K], attn_out, norm_attn_in, norm_attn_out, residual_mid (after the attention
    add), norm_moe_in, router_probs [B, T, E], experts [B, T, k] (chosen, most probable
    first), expert_out [B, T, k, D], moe_out, norm_moe_out, residual [B, T, D].
    """
    out: dict[str, np.ndarray] = {}
    _run(params, cfg, tokens, cache, bf16, out, experts)
    return out


def router_probs(
    params: dict, cfg, tokens: np.ndarray, cache: Cache | None = None, bf16: Any = False
) -> np.ndarray:
    """Router softmax probabilities of every layer, [L, B, T, E] float64."""
    return _run(params, cfg, tokens, cache, bf16)[2]


def top_k_margin(
    params: dict, cfg, tokens: np.ndarray, cache: Cache | None = None, bf16: Any = False
) -> np.ndarray:
    """Gap between the k-th and (k+1)-th largest router probability, [L, B, T].

    Small values mark positions where expert choice is near a tie and a rounding
    difference may flip it (SPEC "Testing note"). +inf when k == num_experts.
    """
    probs = router_probs(params, cfg, tokens, cache, bf16)
    k = cfg.model.num_selected_experts
    if k >= probs.shape[-1]:
        return np.full(probs.shape[:-1], np.inf)
    desc = -np.sort(-probs, axis=-1)
    return desc[..., k - 1] - desc[..., k]
