"""planner.py: sizes against SPEC.md's parameter table and sharding rules, computed here
independently (not through model.py), mesh choices, refusals and the command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

import kernels
import model
import planner

# ---------------------------------------------------------------------------------------
# SPEC section 3's table and section 5's partitioning, written out by hand
# ---------------------------------------------------------------------------------------

L, V, D, F, E, G, K, H = 64, 131072, 6144, 32768, 8, 8, 128, 48

# (name, shape, stored as, scales shape or None, PartitionSpec of the weight as axis names)
SPEC_LAYER = [
    ("query", (6144, 6144), "int8", (1, 6144), ("data", "model")),
    ("key", (6144, 1024), "int8", (1, 1024), ("data", "model")),
    ("value", (6144, 1024), "int8", (1, 1024), ("data", "model")),
    ("attn_linear", (6144, 6144), "int8", (8, 6144), ("model", "data")),
    ("moe_linear", (8, 6144, 32768), "int8", (8, 1, 32768), (None, "data", "model")),
    ("moe_linear_v", (8, 6144, 32768), "int8", (8, 1, 32768), (None, "data", "model")),
    ("moe_linear_1", (8, 32768, 6144), "int8", (8, 8, 6144), (None, "model", "data")),
    ("router", (6144, 8), "float32", None, ("data",)),
    ("rms_norm", (6144,), "float32", None, ()),
    ("rms_norm_1", (6144,), "float32", None, ()),
    ("rms_norm_2", (6144,), "float32", None, ()),
    ("rms_norm_3", (6144,), "float32", None, ()),
]
SPEC_GLOBAL = [
    ("embeddings", (131072, 6144), "float32", None, (None, ("data", "model"))),
    ("final_norm", (6144,), "float32", None, ()),
]


def spec_shard(shape, spec, axes, uneven_ok):
    """Elements per device: each named dimension split by its axes' product; dimensions the
    split does not divide are replicated (allowed for scales only)."""
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    n = 1
    for size, entry in zip(shape, spec):
        names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        ways = math.prod(axes[a] for a in names)
        if size % ways:
            assert uneven_ok, f"{shape} {spec}"
            ways = 1
        n *= size // ways
    return n


def expected_bytes(data=1, model=1):
    """(int8 weight, scale, float32) bytes per device from the SPEC tables."""
    axes = {"data": data, "model": model}
    int8 = scales = f32 = 0
    for rows, count in ((SPEC_LAYER, L), (SPEC_GLOBAL, 1)):
        for _, shape, kind, sshape, spec in rows:
            if kind == "int8":
                int8 += count * spec_shard(shape, spec, axes, False)
                scales += count * 2 * spec_shard(sshape, spec, axes, True)
            else:
                f32 += count * 4 * spec_shard(shape, spec, axes, False)
    return int8, scales, f32


@pytest.fixture(scope="module")
def grok():
    return model.grok_1_config()


@pytest.fixture(scope="module")
def grok_shapes(grok):
    return model.param_shapes(grok)


# ---------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------


def test_weight_bytes_equal_spec_table_sum(grok):
    int8, scales, f32 = expected_bytes()
    # The table itself: 315,684,820,992 parameters (SPEC section 1), ~318 GB on disk.
    n_params = L * sum(math.prod(r[1]) for r in SPEC_LAYER) + sum(math.prod(r[1]) for r in SPEC_GLOBAL)
    assert n_params == 315_684_820_992
    p = planner.plan(grok, 1, None, mesh_shape=(1, 1), suggest=False)
    assert p.bytes["int8_weights"] == int8 == 314_874_789_888
    assert p.bytes["scales"] == scales
    assert p.bytes["float32"] == f32
    assert p.bytes["params_total"] == int8 + scales + f32
    assert p.num_params == n_params
    # Disk: the payload plus a small pickle header per file, 770 files (SPEC section 4).
    assert planner.param_table(grok).num_files == 2 + 64 * 12
    assert int8 + scales + f32 <= p.bytes["disk"] <= int8 + scales + f32 + 770 * 4096
    assert 318.0 < p.disk_gb < 318.5


@pytest.mark.parametrize("mesh", [(1, 2), (1, 8), (2, 8), (4, 8), (2, 4)])
def test_sharded_weight_bytes_follow_spec_rules(grok, mesh):
    int8, scales, f32 = expected_bytes(*mesh)
    got = planner.static_bytes(grok, *mesh)
    assert (got["int8_weights"], got["scales"], got["float32"]) == (int8, scales, f32)
    # Every int8 weight splits evenly over all devices.
    assert int8 * mesh[0] * mesh[1] == expected_bytes()[0]


@pytest.mark.parametrize("mesh,batch,context", [((1, 8), 1, 8192), ((2, 4), 4, 1000),
                                                 ((2, 8), 3, 8192), ((1, 1), 5, 77)])
def test_kv_cache_bytes_follow_formula(grok, mesh, batch, context):
    data, model_ = mesh
    full = 2 * L * batch * context * G * K * 2  # k and v, bf16
    b_split = data if batch % data == 0 else 1  # batch over data where it divides
    expected = full // (b_split * model_)  # kv heads (8) over model
    assert planner.kv_cache_bytes(grok, data, model_, batch, context) == expected
    p = planner.plan(grok, data * model_, None, batch, context, mesh_shape=mesh, suggest=False)
    assert p.bytes["kv_cache"] == expected
    if batch % data:
        assert any("replicated" in n for n in p.notes)


def test_real_model_on_8x80gb(grok):
    """The verdict follows the computed totals; check the totals term by term."""
    p = planner.plan(grok, 8, 80.0, batch_size=1, context_len=8192, moe_impl="fast")
    assert p.mesh == (1, 8)
    int8, scales, f32 = expected_bytes(1, 8)
    kv = 2 * L * 8192 * G * K * 2 // 8
    assert (p.bytes["int8_weights"], p.bytes["scales"], p.bytes["float32"], p.bytes["kv_cache"]) == (
        int8, scales, f32, kv)
    # Prefill of one 8192-token request: the attention term of the docstring formula
    # (1 float32 + 1 bf16 copy of [1, 48, 8192, 8192] over 8 head shards, plus the mask).
    assert p.prefill_terms_gb["attention"] * planner.GB == pytest.approx(
        48 * 8192 * 8192 * (4 + 2) / 8 + 8192 * 8192, rel=1e-9)
    # The prefill holds a second, one-request cache (the runner's prefill cache).
    assert p.prefill_terms_gb["prefill_cache"] * planner.GB == pytest.approx(kv, rel=1e-9)
    # Stages: attention and MoE temporaries never coexist; prefill peaks at the largest
    # stage, decode keeps the head's table copy alive across the layers.
    pre = {k: v * planner.GB for k, v in p.prefill_terms_gb.items()}
    dec = {k: v * planner.GB for k, v in p.decode_terms_gb.items()}
    attn = lambda t: t["residual"] + t["qkv"] + t["attention"] + t["cache_update"]  # noqa: E731
    moe = lambda t: t["residual"] + t["moe"]  # noqa: E731
    head = lambda t: t["head"] + t["sampling"]  # noqa: E731
    assert p.bytes["prefill_workspace"] == pytest.approx(
        max(attn(pre), moe(pre), head(pre)) + pre["prefill_cache"] + pre["slot_state"], rel=1e-9)
    assert p.bytes["decode_workspace"] == pytest.approx(
        max(attn(dec), moe(dec)) + head(dec) + dec["slot_state"], rel=1e-9)
    # The updated layer's k and v: whole on every device (measured; see planner).
    assert dec["cache_update"] == pytest.approx(2 * 8192 * G * K * 2, rel=1e-9)
    # The head's bf16 copy of the embedding table: [V, D / 8].
    assert dec["head"] >= V * D * 2 / 8
    base = int8 + scales + f32 + kv + int(planner.RUNTIME_OVERHEAD_GB * planner.GB)
    assert p.bytes["prefill_total"] == base + p.bytes["prefill_workspace"]
    assert p.bytes["decode_total"] == base + p.bytes["decode_workspace"]
    assert p.bytes["total"] == max(p.bytes["prefill_total"], p.bytes["decode_total"])
    assert p.fits == (p.bytes["total"] <= 80 * 10**9)
    # Weights alone are 39.4 GB per device; the workspace estimate is several GB, not tens.
    assert 39.3 < p.int8_weights_gb < 39.4
    assert 0 < p.prefill_workspace_gb < 20 and 0 < p.decode_workspace_gb < 5


def test_reference_mode_adds_dequantized_experts(grok):
    fast = planner.plan(grok, 8, 80.0, 1, 8192, moe_impl="fast", suggest=False)
    ref = planner.plan(grok, 8, 80.0, 1, 8192, moe_impl="reference", suggest=False)
    # One layer's expert weights over 8 shards, dequantized to the activations' dtype: on an
    # accelerator float32 up to kernels.SPLIT_MAX_ROWS routed rows (model.activation_dtype),
    # else bf16 (prefill sizes; and decode while SPLIT_MAX_ROWS is 0).
    decode_bytes = 4 if 1 * 2 <= kernels.SPLIT_MAX_ROWS else 2
    deq = 3 * E * D * F * decode_bytes / 8 / planner.GB
    assert ref.decode_terms_gb["dequantized_experts"] == pytest.approx(deq)
    assert ref.prefill_terms_gb["dequantized_experts"] == pytest.approx(3 * E * D * F * 2 / 8 / planner.GB)
    # The MoE stage now dominates a decode step's layer: the difference is about `deq`.
    assert fast.decode_workspace_gb + 0.9 * deq < ref.decode_workspace_gb < fast.decode_workspace_gb + 1.1 * deq


def test_suggestions_are_consistent(grok):
    p = planner.plan(grok, 8, 80.0, 1, 8192)
    # The smallest device count: it fits there, and no smaller count with a layout fits.
    assert p.min_devices is not None
    assert planner.plan(grok, p.min_devices, 80.0, 1, 8192, suggest=False).fits
    for n in range(1, p.min_devices):
        if planner.valid_meshes(grok, n):
            assert not planner.plan(grok, n, 80.0, 1, 8192, suggest=False).fits
    # The largest batch fits on these devices and one more does not.
    fits = lambda b, s: planner.plan(grok, 8, 80.0, b, s, mesh_shape=p.mesh, suggest=False).fits  # noqa: E731
    assert fits(p.max_batch, 8192) and not fits(p.max_batch + 1, 8192)
    assert p.max_context == 8192  # the model's whole context fits
    # Too little memory: nothing fits, and the suggestions say so.
    small = planner.plan(grok, 8, 40.0, 1, 8192)
    assert not small.fits and small.max_batch == 0 and small.max_context == 0
    assert small.min_devices > 8


# ---------------------------------------------------------------------------------------
# Mesh layouts
# ---------------------------------------------------------------------------------------


def spec_layout_ok(data, model_):
    """SPEC rules: every weight dimension an axis splits is divisible; kv heads over model."""
    axes = {"data": data, "model": model_}
    try:
        for rows in (SPEC_LAYER, SPEC_GLOBAL):
            for _, shape, _, _, spec in rows:
                spec_shard(shape, spec, axes, False)
    except AssertionError:
        return False
    return G % model_ == 0


@pytest.mark.parametrize("n,expected", [(1, (1, 1)), (2, (1, 2)), (4, (1, 4)), (8, (1, 8)), (16, (2, 8))])
def test_choose_mesh_grok(grok, grok_shapes, n, expected):
    mesh = planner.choose_mesh(grok, n)
    assert mesh == expected and mesh[0] * mesh[1] == n
    assert spec_layout_ok(*mesh)
    if n <= len(jax.devices()):  # the model's own sharding code accepts it too
        devices = np.array(jax.devices()[:n]).reshape(mesh)
        m = Mesh(devices, ("data", "model"), axis_types=(AxisType.Auto,) * 2)
        model.param_shardings(grok, m, grok_shapes)


def test_choose_mesh_with_memory(grok):
    assert planner.choose_mesh(grok, 8, 80.0, batch_size=1, context_len=8192) == (1, 8)
    with pytest.raises(planner.PlanError, match=r"Smallest device count that fits: \d+"):
        planner.choose_mesh(grok, 4, 80.0, batch_size=1, context_len=8192)


def test_three_devices_refused_with_message():
    tiny = model.tiny_config()  # D = 64, 2 kv heads: no layout of 3 devices splits it
    with pytest.raises(planner.PlanError, match=r"3 devices.*Use 1, 2, 4, 8 or 16 devices"):
        planner.choose_mesh(tiny, 3)
    with pytest.raises(planner.PlanError, match="Use 1, 2, 4"):
        planner.plan(tiny, 3, 16.0)


def test_three_devices_grok(grok):
    """Grok-1's width 6144 = 3 x 2048, so (data=3, model=1) splits every weight evenly:
    a valid layout (test_data_axis_of_three_runs shows such a mesh computes the same
    logits). On 80 GB cards it cannot fit, and the error says what would."""
    assert planner.choose_mesh(grok, 3) == (3, 1) and spec_layout_ok(3, 1)
    with pytest.raises(planner.PlanError) as err:
        planner.choose_mesh(grok, 3, 80.0, 1, 8192)
    msg = str(err.value)
    assert "per device on 3 devices" in msg and "Smallest device count that fits" in msg
    assert "int8 weights" in msg  # the planner's table comes with it


def test_power_of_two_policy(grok, monkeypatch):
    monkeypatch.setattr(planner, "REQUIRE_POWER_OF_TWO_AXES", True)
    with pytest.raises(planner.PlanError, match=r"Use 1, 2, 4, 8 or 16 devices"):
        planner.choose_mesh(grok, 3)
    assert planner.choose_mesh(grok, 16) == (2, 8)


def test_explicit_bad_mesh_refused(grok):
    with pytest.raises(planner.PlanError, match=r"num_kv_heads=8.*\(data=2, model=8\)"):
        planner.plan(grok, 16, 80.0, mesh_shape=(1, 16))
    with pytest.raises(planner.PlanError, match=r"model axis \(3\).*\(data=3, model=1\)"):
        planner.validate_mesh(grok, (1, 3))
    with pytest.raises(planner.PlanError, match="has 4 devices, but 8"):
        planner.plan(grok, 8, 80.0, mesh_shape=(1, 4))
    assert planner.validate_mesh(grok, (2, 4)) == (2, 4)


def test_data_axis_of_three_runs():
    """A (data=3, model=1) mesh that the planner accepts really runs the fast path: its
    logits match the float64 reference (tests/reference.py) like a single device's do."""
    import reference

    cfg = model.tiny_config(emb_size=96, num_layers=1)  # 96 = 3 x 32
    assert planner.choose_mesh(cfg, 3) == (3, 1)
    mesh = Mesh(np.array(jax.devices()[:3]).reshape(3, 1), ("data", "model"),
                axis_types=(AxisType.Auto,) * 2)
    params = model.init_random_params(cfg, 0, mesh=mesh)
    for module in params:  # a sharper router: bf16 rounding rarely flips an expert choice
        if module.endswith("router"):
            params[module]["w"] = params[module]["w"] * 6.0
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 8)).astype(np.int32)
    got = np.asarray(model.make_forward(cfg, mesh)(params, tokens).logits, np.float64)
    want, _ = reference.forward(jax.device_get(params), cfg, tokens, bf16=True)
    per_pos = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)  # [B, T]
    # SPEC's testing note: a rare expert flip may move one position; all others agree.
    assert np.mean(per_pos < 2e-2) >= 0.8 and np.median(per_pos) < 1e-2, per_pos


# ---------------------------------------------------------------------------------------
# Refusing up front, output, command line
# ---------------------------------------------------------------------------------------


def test_refuse_full_model_on_cpu(grok, monkeypatch):
    monkeypatch.setattr(planner, "host_ram_bytes", lambda: 64 * 10**9)
    with pytest.raises(planner.PlanError, match="Refusing to load.*host RAM") as err:
        planner.refuse_if_cannot_fit(grok, jax.devices(), batch=1, context=8192)
    assert "TOTAL (peak)" in str(err.value)
    p = planner.refuse_if_cannot_fit(model.tiny_config(), jax.devices(), batch=2)
    assert p.fits and p.mesh == (4, 2)  # tiny: 2 kv heads, so model <= 2
    assert not planner.refuse_if_cannot_fit(grok, jax.devices(), 1, 8192, strict=False).fits


def test_format_and_json(grok):
    p = planner.plan(grok, 8, 80.0, 1, 8192)
    text = planner.format_plan(p)
    for word in ("int8 weights", "KV cache", "prefill workspace", "TOTAL (peak)", "host RAM",
                 "Smallest device count"):
        assert word in text
    assert ("FITS in 80" in text) == p.fits
    js = json.loads(json.dumps(planner.plan_to_json(p)))
    assert js["mesh"] == {"data": 1, "model": 8}
    assert js["bytes"]["int8_weights"] == expected_bytes(1, 8)[0]
    assert js["fits"] == p.fits and js["total_gb"] == pytest.approx(p.total_gb, abs=1e-4)


def test_cli(capsys):
    assert planner.main(["--devices", "8", "--device-memory-gb", "80", "--tiny"]) == 0
    out = capsys.readouterr().out
    assert "int8 weights" in out and "FITS" in out
    assert planner.main(["--devices", "8", "--device-memory-gb", "80", "--json", "--batch", "2"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["batch_size"] == 2 and js["num_devices"] == 8 and js["fits"] is True
    assert planner.main(["--devices", "4", "--device-memory-gb", "80"]) == 1  # does not fit
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert planner.main(["--devices", "3", "--device-memory-gb", "80", "--tiny"]) == 2
    assert "Use 1, 2, 4" in capsys.readouterr().out


def test_add_plan_arguments_keeps_existing_options(capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=7)  # a runner's own options
    parser.add_argument("--mesh", type=lambda s: tuple(int(x) for x in s.split("x")), default=None)
    planner.add_plan_arguments(parser)
    args = parser.parse_args(["--plan", "--devices", "2", "--device-memory-gb", "16", "--tiny",
                              "--mesh", "2x1"])
    assert args.plan and args.batch == 7 and args.devices == 2 and args.mesh == (2, 1)
    assert planner.run_plan(args) == 0
    assert "mesh (data=2, model=1)" in capsys.readouterr().out


def test_script_runs_directly():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(repo, "planner.py"), "--tiny", "--devices", "2",
                          "--device-memory-gb", "4", "--json"], capture_output=True, text=True,
                         cwd=repo, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["mesh"] == {"data": 1, "model": 2}
