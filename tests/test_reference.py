"""Self-checks of the float64 reference (tests/reference.py), independent of model.py.

Each check compares the reference with a hand computation, an explicit loop, or a
property the model must have (RoPE relativity, cache == full forward, pad keys invisible).
"""

import math
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest

from tests import reference as ref

# Tiny shapes: D width, H query heads, G kv heads, K key size, F ffn, V vocab.
D, H, G, K, F, V, L = 32, 4, 2, 8, 48, 64, 2


class QW:
    """Stand-in for model.QuantizedWeight8bit: int8 weight and bf16 scales."""

    def __init__(self, weight, scales):
        self.weight, self.scales = weight, scales


def make_cfg(num_experts: int = 4, num_layers: int = L) -> SimpleNamespace:
    model = SimpleNamespace(
        emb_size=D, key_size=K, num_q_heads=H, num_kv_heads=G, num_layers=num_layers,
        num_experts=num_experts, num_selected_experts=2,
        attn_output_multiplier=1.0 / math.sqrt(K),
    )
    return SimpleNamespace(
        vocab_size=V, pad_token=0, embedding_multiplier_scale=78.38367176906169,
        output_multiplier_scale=0.5773502691896257, model=model,
    )


def _quantized(rng, shape, blocks: int) -> QW:
    """int8 weight of `shape` [..., n_in, n_out] with `blocks` scale rows per matrix."""
    n_in = shape[-2]
    weight = rng.integers(-127, 128, size=shape, dtype=np.int8)
    scale_shape = shape[:-2] + (blocks, shape[-1])
    # int8 values have std ~73; aim for unit-variance outputs with per-block variation.
    scales = rng.uniform(0.5, 1.5, size=scale_shape) / (73.0 * math.sqrt(n_in))
    return QW(weight, scales.astype(ml_dtypes.bfloat16))


def make_params(cfg, seed: int = 0) -> dict:
    """Random Haiku-layout params: 8-block scales for attention linear and moe linear_1."""
    rng = np.random.default_rng(seed)
    E = cfg.model.num_experts
    f32 = lambda a: np.asarray(a, np.float32)
    params = {
        "language_model/in_out_embed": {"embeddings": f32(rng.normal(0, 1, (V, D)))},
        "language_model/rms_norm": {"scale": f32(rng.uniform(0.5, 1.5, D))},
    }
    for i in range(cfg.model.num_layers):
        pre = f"transformer/decoder_layer_{i}"
        mha = f"{pre}/multi_head_attention"
        params[f"{mha}/query"] = {"w": _quantized(rng, (D, H * K), 1)}
        params[f"{mha}/key"] = {"w": _quantized(rng, (D, G * K), 1)}
        params[f"{mha}/value"] = {"w": _quantized(rng, (D, G * K), 1)}
        params[f"{mha}/linear"] = {"w": _quantized(rng, (H * K, D), 8)}
        params[f"{pre}/moe/linear"] = {"w": _quantized(rng, (E, D, F), 1)}
        params[f"{pre}/moe/linear_v"] = {"w": _quantized(rng, (E, D, F), 1)}
        params[f"{pre}/moe/linear_1"] = {"w": _quantized(rng, (E, F, D), 8)}
        params[f"{pre}/router"] = {"w": f32(rng.normal(0, 1 / math.sqrt(D), (D, E)))}
        for norm in ("rms_norm", "rms_norm_1", "rms_norm_2", "rms_norm_3"):
            params[f"{pre}/{norm}"] = {"scale": f32(rng.uniform(0.5, 1.5, D))}
    return params


def random_tokens(rng, B, T):
    return rng.integers(1, V, size=(B, T))  # no pad tokens


# --- dequantize ----------------------------------------------------------------------


@pytest.mark.parametrize("shape,blocks", [((32, 16), 1), ((32, 16), 8), ((3, 48, 8), 8),
                                          ((3, 48, 8), 1), ((16, 4), 4)])
def test_dequantize_matches_block_loop(shape, blocks):
    rng = np.random.default_rng(1)
    q = _quantized(rng, shape, blocks)
    got = ref.dequantize(q.weight, q.scales)
    assert got.dtype == np.float64 and got.shape == shape
    want = np.zeros(shape)
    rows = shape[-2] // blocks
    for idx in np.ndindex(*shape[:-2]):
        for r in range(shape[-2]):
            for c in range(shape[-1]):
                s = float(q.scales[idx + (r // rows, c)])
                want[idx + (r, c)] = int(q.weight[idx + (r, c)]) * s
    np.testing.assert_array_equal(got, want)


def test_dequantize_rejects_bad_blocks():
    w = np.ones((30, 4), np.int8)
    with pytest.raises(ValueError, match="divide"):
        ref.dequantize(w, np.ones((8, 4), ml_dtypes.bfloat16))
    with pytest.raises(ValueError, match="do not match"):
        ref.dequantize(w, np.ones((1, 5), ml_dtypes.bfloat16))


# --- RoPE -----------------------------------------------------------------------------


def test_rope_explicit_pair_rotation_and_norm():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 5, 3, K))
    pos = rng.integers(0, 5000, size=(2, 5))
    out = ref.apply_rope(x, pos)
    # Norm of each head vector preserved.
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=1e-12)
    # Pair (j, j + K/2) rotated by angle pos / 10000^(2j/K).
    for b, t, n in np.ndindex(2, 5, 3):
        for j in range(K // 2):
            ang = pos[b, t] / 10000 ** (2 * j / K)
            a, c = x[b, t, n, j], x[b, t, n, j + K // 2]
            assert abs(out[b, t, n, j] - (a * math.cos(ang) - c * math.sin(ang))) < 1e-12
            assert abs(out[b, t, n, j + K // 2] - (c * math.cos(ang) + a * math.sin(ang))) < 1e-12
    # Position 0 is the identity.
    np.testing.assert_array_equal(ref.apply_rope(x, np.zeros((2, 5))), x)


def test_rope_dot_product_depends_on_relative_position_only():
    rng = np.random.default_rng(3)
    q, k = rng.normal(size=(1, 1, 1, K)), rng.normal(size=(1, 1, 1, K))
    rope = lambda v, p: ref.apply_rope(v, np.array([[p]]))[0, 0, 0]
    base = rope(q, 7) @ rope(k, 3)
    for shift in (1, 10, 123, 4000):
        assert abs(rope(q, 7 + shift) @ rope(k, 3 + shift) - base) < 1e-10
    # ... and does depend on the relative position.
    assert abs(rope(q, 8) @ rope(k, 3) - base) > 1e-3


# --- attention and MoE against explicit loops / hand values ---------------------------


def test_attention_matches_per_head_loop():
    cfg = make_cfg()
    params = make_params(cfg, seed=4)
    p = ref._layer_params(params, cfg, 0)
    rng = np.random.default_rng(4)
    B, T = 2, 5
    x = rng.normal(size=(B, T, D))
    pos = np.tile(np.arange(T), (B, 1))
    mask = np.tril(np.ones((T, T), bool))[None].repeat(B, 0)
    mask[1, :, 2] = False  # key 2 of sequence 1 hidden (as for a pad token)
    mask[1, 2, 2] = mask[1, 2, 0] = True  # ... except for query 2, which still sees keys 0..2
    zeros = np.zeros((B, T, G, K))
    out, kc, vc = ref.attention(x, p, cfg, pos, mask, zeros, zeros, np.zeros(B, np.int64))

    q = ref.apply_rope((x @ p["wq"]).reshape(B, T, H, K), pos)
    k = ref.apply_rope((x @ p["wk"]).reshape(B, T, G, K), pos)
    v = (x @ p["wv"]).reshape(B, T, G, K)
    np.testing.assert_allclose(kc, k, atol=1e-12)
    np.testing.assert_allclose(vc, v, atol=1e-12)
    heads = np.zeros((B, T, H, K))
    for b, t, h in np.ndindex(B, T, H):
        g = h // (H // G)
        vis = [s for s in range(T) if mask[b, t, s]]
        scores = np.array([q[b, t, h] @ k[b, s, g] / math.sqrt(K) for s in vis])
        scores = 30 * np.tanh(scores / 30)
        w = np.exp(scores - scores.max())
        w /= w.sum()
        heads[b, t, h] = sum(wi * v[b, s, g] for wi, s in zip(w, vis))
    np.testing.assert_allclose(out, heads.reshape(B, T, H * K) @ p["wo"], atol=1e-12)


def _moe_case(probs):
    """Hand MoE (E=4, D=4, F=1): router probabilities `probs` for x = e_0, expert e
    output = gelu(1) * (e + 1) * unit vector e_e."""
    E = len(probs)
    cfg = make_cfg(num_experts=E)
    router = np.zeros((4, E))
    router[0] = np.log(probs)
    w_in = np.zeros((E, 4, 1))
    w_in[:, 0, 0] = 1.0
    w_v = np.zeros((E, 4, 1))
    w_v[:, 0, 0] = np.arange(1, E + 1)
    w_out = np.zeros((E, 1, 4))
    for e in range(E):
        w_out[e, 0, e] = 1.0
    p = {"router": router, "w_in": w_in, "w_v": w_v, "w_out": w_out}
    x = np.zeros((1, 1, 4))
    x[0, 0, 0] = 1.0
    return ref.moe(x, p, cfg)


def test_moe_gates_are_raw_probabilities_not_renormalised():
    g1 = 0.8411919906082768  # 0.5 * (1 + tanh(sqrt(2/pi) * 1.044715)), gelu_tanh(1)
    assert abs(ref.gelu_tanh(np.array(1.0)) - g1) < 1e-15
    probs = [0.1, 0.4, 0.2, 0.3]  # top-2 are experts 1 and 3
    out, got_probs = _moe_case(probs)
    np.testing.assert_allclose(got_probs[0, 0], probs, rtol=1e-12)
    want = np.array([0.0, 0.4 * g1 * 2, 0.0, 0.3 * g1 * 4])
    np.testing.assert_allclose(out[0, 0], want, rtol=1e-12, atol=1e-15)
    renormalised = np.array([0.0, 0.4 / 0.7 * g1 * 2, 0.0, 0.3 / 0.7 * g1 * 4])
    assert np.abs(out[0, 0] - renormalised).max() > 0.4


def test_moe_matches_dense_loop_on_random_layer():
    cfg = make_cfg(num_experts=8)
    p = ref._layer_params(make_params(cfg, seed=5), cfg, 1)
    x = np.random.default_rng(5).normal(size=(2, 6, D))
    out, probs = ref.moe(x, p, cfg)
    for b, t in np.ndindex(2, 6):
        logits = x[b, t] @ p["router"]
        pr = np.exp(logits - logits.max())
        pr /= pr.sum()
        top2 = sorted(range(8), key=lambda e: -pr[e])[:2]
        want = sum(pr[e] * ((ref.gelu_tanh(x[b, t] @ p["w_in"][e]) * (x[b, t] @ p["w_v"][e]))
                            @ p["w_out"][e]) for e in top2)
        np.testing.assert_allclose(out[b, t], want, atol=1e-12)


# --- full forward: cache, causality, padding ------------------------------------------


def test_prefill_then_decode_equals_full_forward():
    cfg = make_cfg()
    params = make_params(cfg, seed=6)
    rng = np.random.default_rng(6)
    tokens = random_tokens(rng, 2, 7)
    tokens[0, 6] = 0  # a pad in the last chunk: masked both ways
    full, full_cache = ref.forward(params, cfg, tokens)
    assert full.shape == (2, 7, V) and full.dtype == np.float64
    np.testing.assert_array_equal(full_cache.step, [7, 7])

    cache = ref.init_cache(cfg, 2, 10)
    parts = []
    for lo, hi in [(0, 3), (3, 4), (4, 5), (5, 7)]:
        logits, new_cache = ref.forward(params, cfg, tokens[:, lo:hi], cache)
        assert np.all(cache.step == lo)  # input cache untouched
        cache = new_cache
        parts.append(logits)
    np.testing.assert_array_equal(cache.step, [7, 7])
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=0, atol=1e-10)
    for i in range(L):
        np.testing.assert_allclose(cache.k[i][:, :7], full_cache.k[i], atol=1e-12)
        np.testing.assert_allclose(cache.v[i][:, :7], full_cache.v[i], atol=1e-12)
        assert not cache.k[i][:, 7:].any()


def test_per_sequence_steps_in_one_batch():
    cfg = make_cfg()
    params = make_params(cfg, seed=7)
    rng = np.random.default_rng(7)
    a, b = random_tokens(rng, 1, 6), random_tokens(rng, 1, 6)
    full_a, _ = ref.forward(params, cfg, a)
    full_b, _ = ref.forward(params, cfg, b)
    _, ca = ref.forward(params, cfg, a[:, :3], ref.init_cache(cfg, 1, 8))
    _, cb = ref.forward(params, cfg, b[:, :5], ref.init_cache(cfg, 1, 8))
    merged = ref.Cache(
        k=[np.concatenate([x, y]) for x, y in zip(ca.k, cb.k)],
        v=[np.concatenate([x, y]) for x, y in zip(ca.v, cb.v)],
        step=np.array([3, 5]),
    )
    logits, out_cache = ref.forward(params, cfg, np.array([[a[0, 3]], [b[0, 5]]]), merged)
    np.testing.assert_array_equal(out_cache.step, [4, 6])
    np.testing.assert_allclose(logits[0, 0], full_a[0, 3], atol=1e-10)
    np.testing.assert_allclose(logits[1, 0], full_b[0, 5], atol=1e-10)


def test_causal_future_tokens_do_not_change_past_logits():
    cfg = make_cfg()
    params = make_params(cfg, seed=8)
    tokens = random_tokens(np.random.default_rng(8), 1, 6)
    changed = tokens.copy()
    changed[0, 4] = 1 + (tokens[0, 4] % (V - 1))
    x, _ = ref.forward(params, cfg, tokens)
    y, _ = ref.forward(params, cfg, changed)
    # Not bit-equal: the MoE gathers a different token set per expert, so BLAS may sum
    # in another order (1-ulp differences).
    np.testing.assert_allclose(x[:, :4], y[:, :4], rtol=0, atol=1e-12)
    assert np.abs(x[:, 4:] - y[:, 4:]).max() > 1e-3


def test_left_padding_is_invisible():
    cfg = make_cfg()
    params = make_params(cfg, seed=9)
    tokens = random_tokens(np.random.default_rng(9), 1, 5)
    plain, _ = ref.forward(params, cfg, tokens)
    padded, _ = ref.forward(params, cfg, np.concatenate([np.zeros((1, 3), int), tokens], 1))
    # Pads are masked as keys and RoPE is relative, so the shift by 3 changes nothing.
    np.testing.assert_allclose(padded[:, 3:], plain, rtol=0, atol=1e-10)


def test_pad_key_content_does_not_reach_other_positions():
    cfg = make_cfg()
    params = make_params(cfg, seed=10)
    tokens = random_tokens(np.random.default_rng(10), 2, 6)
    tokens[0, 1] = tokens[0, 4] = tokens[1, 2] = 0
    before, _ = ref.forward(params, cfg, tokens)
    # Changing the pad embedding row changes pad positions' stream but must not leak into
    # others (logit column 0 itself changes through the tied embedding, so it is skipped).
    bumped = dict(params)
    emb = params["language_model/in_out_embed"]["embeddings"].copy()
    emb[0] = np.random.default_rng(11).normal(size=D)
    bumped["language_model/in_out_embed"] = {"embeddings": emb}
    after, _ = ref.forward(bumped, cfg, tokens)
    real = tokens != 0
    np.testing.assert_allclose(before[real][:, 1:], after[real][:, 1:], rtol=0, atol=1e-12)
    assert np.abs(before[~real][:, 1:] - after[~real][:, 1:]).max() > 1e-3


def test_bfloat16_leaves_and_rounding_mode():
    cfg = make_cfg()
    params = make_params(cfg, seed=12)
    tokens = random_tokens(np.random.default_rng(12), 2, 6)
    # A bf16 leaf is widened exactly.
    as_bf16 = dict(params)
    emb = params["language_model/in_out_embed"]["embeddings"].astype(ml_dtypes.bfloat16)
    as_bf16["language_model/in_out_embed"] = {"embeddings": emb}
    widened = dict(params)
    widened["language_model/in_out_embed"] = {"embeddings": emb.astype(np.float64)}
    np.testing.assert_array_equal(ref.forward(as_bf16, cfg, tokens)[0],
                                  ref.forward(widened, cfg, tokens)[0])
    # bf16 mode: logits are bf16 values, close to but not equal to float64.
    exact, _ = ref.forward(params, cfg, tokens)
    rounded, cache = ref.forward(params, cfg, tokens, bf16=True)
    np.testing.assert_array_equal(ref.to_bf16(rounded), rounded)
    np.testing.assert_array_equal(ref.to_bf16(cache.k[0]), cache.k[0])
    err = np.abs(rounded - exact) / np.abs(exact).max(axis=-1, keepdims=True)
    assert 0 < np.median(err) < 2e-2


def test_top_k_margin():
    cfg = make_cfg(num_experts=4)
    params = make_params(cfg, seed=13)
    tokens = random_tokens(np.random.default_rng(13), 2, 5)
    probs = ref.router_probs(params, cfg, tokens)
    assert probs.shape == (L, 2, 5, 4)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-12)
    margin = ref.top_k_margin(params, cfg, tokens)
    srt = np.sort(probs, axis=-1)
    np.testing.assert_allclose(margin, srt[..., -2] - srt[..., -3], atol=1e-15)
    assert margin.min() >= 0 and margin.max() > 1e-3
    # A zero pre-MoE norm scale makes the router input 0: all experts tie exactly.
    tied = dict(params)
    tied["transformer/decoder_layer_0/rms_norm_2"] = {"scale": np.zeros(D, np.float32)}
    np.testing.assert_array_equal(ref.top_k_margin(tied, cfg, tokens)[0], 0.0)


def test_rounding_points_subset_and_dequant():
    cfg = make_cfg()
    params = make_params(cfg, seed=14)
    tokens = random_tokens(np.random.default_rng(14), 2, 5)
    exact, _ = ref.forward(params, cfg, tokens)
    exact_trace = ref.trace(params, cfg, tokens)
    np.testing.assert_array_equal(ref.forward(params, cfg, tokens, bf16=())[0], exact)
    every = tuple(p for p in ref.ROUNDING_POINTS if p != "dequant")
    np.testing.assert_array_equal(ref.forward(params, cfg, tokens, bf16=every)[0],
                                  ref.forward(params, cfg, tokens, bf16=True)[0])
    # One point alone: only the logits rounded, so they are bf16 values near float64.
    only_logits, _ = ref.forward(params, cfg, tokens, bf16=("logits",))
    np.testing.assert_array_equal(ref.to_bf16(only_logits), only_logits)
    err = np.abs(only_logits - exact)
    assert err.max() > 0 and np.all(err <= 2**-7 * np.abs(exact) + 1e-12)  # two roundings of 2^-8
    # "dequant" rounds the dequantized weights (off under bf16=True, as SPEC's rule is exact).
    p = ref._layer_params(params, cfg, 0, ("dequant",))
    q = params["transformer/decoder_layer_0/multi_head_attention/query"]["w"]
    np.testing.assert_array_equal(p["wq"], ref.to_bf16(ref.dequantize(q.weight, q.scales)))
    assert not np.array_equal(ref._layer_params(params, cfg, 0, True)["wq"], p["wq"])
    # "cache" rounds what a bf16 KV cache stores, k after RoPE and v, once each; "kv" also
    # rounds the k projection before RoPE.
    tr_cache, tr_kv = ref.trace(params, cfg, tokens, bf16=("cache",)), ref.trace(params, cfg, tokens, bf16=("kv",))
    k_exact = ref.apply_rope(exact_trace["layer_0/k"], np.arange(5)[None].repeat(2, 0))
    np.testing.assert_array_equal(tr_cache["layer_0/k_rope"], ref.to_bf16(k_exact))
    np.testing.assert_array_equal(tr_cache["layer_0/q_rope"], exact_trace["layer_0/q_rope"])
    assert not np.array_equal(tr_kv["layer_0/k_rope"], tr_cache["layer_0/k_rope"])
    with pytest.raises(ValueError, match="unknown rounding point"):
        ref.forward(params, cfg, tokens, bf16=("residual", "nope"))


def test_forced_experts_use_this_routers_gates():
    cfg = make_cfg(num_experts=8)
    params = make_params(cfg, seed=15)
    tokens = random_tokens(np.random.default_rng(15), 2, 6)
    tr = ref.trace(params, cfg, tokens)
    own = np.stack([tr[f"layer_{i}/experts"] for i in range(L)])  # [L, B, T, k]
    np.testing.assert_array_equal(ref.forward(params, cfg, tokens, experts=own)[0], tr["logits"])
    # Layer 1, position (1, 3): the 3rd most probable expert instead of the 2nd.
    probs = tr["layer_1/router_probs"][1, 3]
    third = int(np.argsort(-probs, kind="stable")[2])
    forced = own.copy()
    forced[1, 1, 3, 1] = third
    got = ref.trace(params, cfg, tokens, experts=forced)
    p = ref._layer_params(params, cfg, 1)
    x = got["layer_1/norm_moe_in"][1, 3]
    expert = lambda e: (ref.gelu_tanh(x @ p["w_in"][e]) * (x @ p["w_v"][e])) @ p["w_out"][e]
    want = sum(probs[e] * expert(e) for e in (own[1, 1, 3, 0], third))
    np.testing.assert_allclose(got["layer_1/moe_out"][1, 3], want, rtol=1e-12, atol=1e-14)
    # Only that position and the later ones of its row change.
    diff = np.abs(got["logits"] - tr["logits"]).max(axis=-1)
    assert diff[1, 3] > 1e-3 and diff[0].max() < 1e-12 and diff[1, :3].max() < 1e-12  # BLAS order
    with pytest.raises(ValueError, match="experts"):
        ref.forward(params, cfg, tokens, experts=own[:, :, :, :1])
