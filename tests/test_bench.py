"""bench.py: the roofline arithmetic against SPEC-derived byte counts, and a tiny smoke run."""

import argparse
import os
import sys
import time

import numpy as np

import bench
import model


def test_decode_bytes_counts_what_a_step_must_read():
    config = model.tiny_config(num_layers=2)
    params = model.prepare_for_inference(model.init_random_params(config, 0), config)
    m = config.model
    d, f, e, v = m.emb_size, m.ffn_size, m.num_experts, config.vocab_size
    hk, gk = m.num_q_heads * m.key_size, m.num_kv_heads * m.key_size
    # Per layer: int8 q, k, v, o with bf16 scales (1 row, or 8 blocks for o), 4 norms, router.
    attention = d * hk + hk * 2 + 2 * (d * gk + gk * 2) + hk * d + 8 * d * 2
    per_layer = attention + 4 * d * 4 + d * e * 4
    # One expert: linear and linear_v [D, F] with 1 scale row, linear_1 [F, D] with 8.
    expert = 2 * (d * f + f * 2) + f * d + 8 * d * 2
    experts = [np.array([[0, 1]]), np.array([[2, 3], [2, 5]])]  # 2 experts, then 3
    batch, context = 2, 10
    kv = 2 * m.num_layers * batch * context * m.num_kv_heads * m.key_size * 2
    want = 2 * per_layer + (2 + 3) * expert + kv + d * 4 + v * d * 2  # final norm, bf16 table
    assert bench.decode_bytes(params, config, experts, batch, context) == want


def test_prefill_flops_are_the_top2_work():
    config = model.grok_1_config(num_layers=1)
    t = 1024
    d, f = 6144, 32768
    want = 2 * t * (2 * d * d + 2 * d * 1024) + 2 * t * 2 * 3 * d * f + 2 * 2 * 48 * 128 * t * t / 2
    assert bench.prefill_flops(config, t) == want


def test_model_bench_smoke(tmp_path):
    res = bench.bench_model(layers=1, batches=[2], context=8, prefill_len=8, modes=["fast", "reference"],
                            iters=1, tiny=True, json_path=str(tmp_path / "b.json"))
    assert {(r["kind"], r["mode"], r["batch"]) for r in res["rows"]} == {
        (kind, mode, b) for mode in ("fast", "reference") for kind, b in (("decode", 2), ("prefill", 1))}
    assert all(r["ms"] > 0 and np.isfinite(r["roofline_pct"]) for r in res["rows"])
    assert not any(res["nan"].values())
    assert max(res["fast_vs_reference_rel_l2"].values()) < 5e-2  # bf16 noise, one layer
    assert "fast" in bench.format_model_table(res)
    # Start-up split: weight creation, then lowering and compilation of each program.
    assert res["weights_s"] > 0 and all(r["lower_s"] > 0 and r["compile_s"] > 0 for r in res["rows"])
    # The host's part of a decode step (enqueueing it) is measured.
    assert all(0 < r["dispatch_ms"] for r in res["rows"] if r["kind"] == "decode")
    assert "decode fast batch 2: lower" in bench.format_startup(res)
    # The host that measured it is named (its speed is part of that enqueue time).
    assert res["host"]["cpus"] == os.cpu_count() and res["host"]["cpu"]
    assert json.loads((tmp_path / "b.json").read_text())["host"] == res["host"]



# ---------------------------------------------------------------------------------------
# bench.py project: the arithmetic against hand-computed numbers
# ---------------------------------------------------------------------------------------

import json  # noqa: E402

import pytest  # noqa: E402

# Grok-1 from SPEC section 1 and 3.
D, F, V, KV_HEADS, KEY = 6144, 32768, 131072, 8, 128
# One layer without experts: int8 q [D, 6144] + 1 scale row, k and v [D, 1024] + 1 row each,
# o [6144, D] + 8 scale rows (bf16), 4 float32 norms, the float32 router [D, 8].
GROK_LAYER = (D * 6144 + 6144 * 2) + 2 * (D * 1024 + 1024 * 2) + (6144 * D + 8 * D * 2) + 4 * D * 4 + D * 8 * 4
# One expert: linear and linear_v [D, F] + 1 scale row each, linear_1 [F, D] + 8 rows.
GROK_EXPERT = 2 * (D * F + F * 2) + F * D + 8 * D * 2
GROK_OUTSIDE = D * 4 + V * D * 2  # the final norm, the unembedding read as bf16


@pytest.mark.parametrize("mesh_shape", [None, (1, 2)])
def test_the_timed_step_writes_over_its_cache_and_outputs(mesh_shape):
    # bench.py model times the decode step as the runner runs it: returning only buffers it
    # was given (on a GPU a fresh output makes XLA update the step's CUDA graphs at every
    # call; see runners.DecodeStep). The logits and experts go over the call before's, and
    # every call is the first one's program (on a mesh too).
    import jax
    import jax.numpy as jnp

    import runners

    config = model.tiny_config(num_layers=2)
    mesh = None if mesh_shape is None else runners.make_mesh(mesh_shape, (1, 1))
    params = model.prepare_for_inference(model.init_random_params(config, 0, mesh, on_device=True), config)
    forward = bench.routed_forward(config, mesh, bench._cache_sharding(config, mesh, 2, 16))
    tokens, length = jnp.ones((2, 1), jnp.int32), jnp.ones((2,), jnp.int32)
    memory = bench.filled_memory(config, 2, 8, 16, mesh)
    into = bench.blank_outputs(forward, mesh, params, tokens, memory, length)
    assert [a.shape for a in jax.tree_util.tree_leaves(into)] == [(2, 1, config.vocab_size), (2, 1, 2), (2, 1, 2)]
    step = bench.in_place_step(forward, params, tokens, length, memory, into)
    pointers = lambda tree: [s.data.unsafe_buffer_pointer()  # noqa: E731
                             for a in jax.tree_util.tree_leaves(tree) for s in a.addressable_shards]
    given = pointers(step())
    for _ in range(2):
        logits, experts = step()
        assert pointers((logits, experts)) == given
    assert forward._cache_size() == 1


def test_the_timed_step_reports_the_route_kernels_choice_as_the_routers_logits():
    # Where kernels.route picks the experts inside the MoE (a GPU's decode step; here run
    # interpreted), Router.__call__ is not called: the step reports the logits it picked
    # from, and decode_bytes counts the experts their top k touch, as for the plain path.
    import jax.numpy as jnp

    import kernels

    config = model.tiny_config(num_layers=2)
    params = model.prepare_for_inference(model.init_random_params(config, 0, on_device=True), config)
    tokens, length = jnp.asarray([[5], [9]]), jnp.ones((2,), jnp.int32)
    _, plain = bench.routed_forward(config)(params, tokens, bench.filled_memory(config, 2, 8, 16), length)
    with kernels.auto_backend("interpret"):
        _, fused = bench.routed_forward(config)(params, tokens, bench.filled_memory(config, 2, 8, 16), length)
    k = config.model.num_selected_experts
    assert [e.dtype for e in plain] == [jnp.int32] * 2 and [e.shape for e in plain] == [(2, 1, k)] * 2
    assert [e.shape for e in fused] == [(2, 1, config.model.num_experts)] * 2
    for logits, experts in zip(fused, plain):
        top = np.argsort(-np.asarray(logits), axis=-1)[..., :k]
        np.testing.assert_array_equal(np.sort(top, -1), np.sort(np.asarray(experts), -1))
    assert bench.decode_bytes(params, config, fused, 2, 8) == bench.decode_bytes(params, config, plain, 2, 8)
    # At batch 1 the junction kernel makes the logits, as partial sums over slices of D.
    one = tokens[:1], length[:1]
    _, plain = bench.routed_forward(config)(params, one[0], bench.filled_memory(config, 1, 8, 16), one[1])
    with kernels.auto_backend("interpret"):
        _, joined = bench.routed_forward(config)(params, one[0], bench.filled_memory(config, 1, 8, 16), one[1])
    assert [sorted(e) for e in joined] == [["logit_parts"]] * 2
    for parts, experts in zip(joined, plain):
        top = np.argsort(-np.asarray(parts["logit_parts"]).sum(0), axis=-1)[..., :k]  # [1, k]
        np.testing.assert_array_equal(np.sort(top, -1), np.sort(np.asarray(experts).reshape(1, k), -1))
    assert bench.decode_bytes(params, config, joined, 1, 8) == bench.decode_bytes(params, config, plain, 1, 8)


def test_fit_fixed_variable_by_hand():
    # The 1 x H200 and 2 x H200 per-layer times: V = (0.59 - 0.45) / (1 - 1/2), F = 0.59 - V.
    fixed, variable = bench.fit_fixed_variable({1: 0.59, 2: 0.45})
    assert fixed == pytest.approx(0.31, abs=1e-12) and variable == pytest.approx(0.28, abs=1e-12)
    # Three points on t = 0.1 + 0.4 / n: least squares recovers them exactly.
    fixed, variable = bench.fit_fixed_variable({1: 0.5, 2: 0.3, 4: 0.2})
    assert fixed == pytest.approx(0.1, abs=1e-12) and variable == pytest.approx(0.4, abs=1e-12)
    with pytest.raises(ValueError, match="at least 2 device counts"):
        bench.fit_fixed_variable({1: 0.5})


def test_expected_experts_touched_by_hand():
    assert bench.expected_experts_touched(1) == pytest.approx(2.0)
    assert bench.expected_experts_touched(8) == pytest.approx(8 * (1 - 0.75**8))  # 7.199
    assert bench.expected_experts_touched(32) == pytest.approx(8 * (1 - 0.75**32))


def test_decode_step_bytes_of_grok_1():
    config = model.grok_1_config()
    kv = 2 * 1 * 1024 * KV_HEADS * KEY * 2  # k and v, batch 1, 1024 tokens, bf16
    layer, outside = bench.decode_step_bytes(config, batch=1, context=1024, experts_touched=2.0)
    assert layer == GROK_LAYER + 2 * GROK_EXPERT + kv == 1_301_102_592
    assert outside == GROK_OUTSIDE
    # A fractional expert count is the average of the byte counts around it.
    layer_frac, _ = bench.decode_step_bytes(config, batch=8, context=1024, experts_touched=7.5)
    assert layer_frac == pytest.approx(GROK_LAYER + 7.5 * GROK_EXPERT + 8 * kv)


def test_device_share_is_one_devices_part_of_a_1xn_mesh():
    full = model.grok_1_config(num_layers=2)
    share = bench.device_share(full, 8)
    m = share.model
    assert (m.num_q_heads, m.num_kv_heads, m.ffn_size, share.vocab_size) == (6, 1, 4096, 16384)
    assert (m.emb_size, m.key_size, m.num_experts, m.num_layers) == (6144, 128, 8, 2)
    # Per layer it reads 1/8 of the weights, less the norms and router every device holds.
    for n in (2, 8):
        per_layer = bench.decode_step_bytes(bench.device_share(full, n), 1, 1024, 2.0)[0]
        whole = bench.decode_step_bytes(full, 1, 1024, 2.0)[0]
        assert whole / n < per_layer < whole / n * 1.01
    with pytest.raises(ValueError, match="--share 3: needs n >= 1 dividing the 48 query and 8 KV heads"):
        bench.device_share(full, 3)
    with pytest.raises(ValueError, match="leave --mesh out"):
        bench.bench_model(layers=1, batches=[1], context=8, prefill_len=0, modes=["fast"], tiny=True,
                          mesh_shape=(1, 2), share=2)
    with pytest.raises(ValueError, match="leave --mesh out"):
        bench.profile_decode(1, 1, 8, (1, 2), 1, "unused", share=2)


def test_a_shares_weights_have_the_shapes_of_one_devices_shard():
    import jax

    import runners

    # A model whose heads and experts' width split 8 ways, each device holding whole scale blocks.
    full = model.tiny_config(num_q_heads=8, num_kv_heads=8, widening_factor=6)
    assert full.model.ffn_size == 256
    mesh = runners.make_mesh((1, 8), (1, 1))
    shapes = model.param_shapes(full)
    shardings = model.param_shardings(full, mesh, shapes)
    share = jax.tree.map(lambda a: a.shape, bench.bench_params(bench.device_share(full, 8), share=8))
    for module, leaves in shapes.items():
        for name, leaf in leaves.items():
            sharding = shardings[module][name]
            if isinstance(leaf, model.QuantizedWeight8bit):
                for part in ("weight", "scales"):
                    shard = getattr(sharding, part).shard_shape(getattr(leaf, part).shape)
                    assert getattr(share[module][name], part) == shard, (module, name, part)
            elif module == "language_model/in_out_embed":
                # Split by vocabulary in the share, by width on the mesh: the same bytes.
                assert np.prod(share[module][name]) == np.prod(sharding.shard_shape(leaf.shape))
            else:
                assert share[module][name] == sharding.shard_shape(leaf.shape), (module, name)
    assert share["transformer/decoder_layer_0/moe/linear_1"]["w"].scales[-2] == 1  # the release's 8 blocks, 1 each


def test_project_decode_by_hand():
    config = model.grok_1_config()
    bw = 4.8e12
    rows = bench.project_decode({1: bench.BatchInputs({1: 0.59, 2: 0.45})}, devices=8, layers=64,
                                bandwidth=bw, context=1024, config=config)
    (r,) = rows
    kv = 2 * 1024 * KV_HEADS * KEY * 2
    layer_bytes = GROK_LAYER + 2 * GROK_EXPERT + kv
    outside_ms = GROK_OUTSIDE / (8 * bw) * 1e3  # not measured: its roofline
    assert r["per_layer_ms"] == pytest.approx(0.31 + 0.28 / 8)
    assert r["layers_ms"] == pytest.approx(64 * 0.345)  # 22.08 ms, the "about 22 ms"
    assert r["layers_tokens_per_s"] == pytest.approx(1e3 / 22.08)  # 45.3
    assert r["step_ms"] == pytest.approx(22.08 + outside_ms)
    assert r["roofline_ms"] == pytest.approx((64 * layer_bytes + GROK_OUTSIDE) / (8 * bw) * 1e3)  # 2.210
    assert r["roofline_pct"] == pytest.approx(100 * r["roofline_ms"] / r["step_ms"])
    assert r["per_layer_roofline_ms"][1] == pytest.approx(layer_bytes / bw * 1e3)
    # A measured non-layer time replaces the roofline one; tokens/s scale with the batch.
    (r,) = bench.project_decode({8: bench.BatchInputs({1: 0.7, 2: 0.5})}, devices=8, layers=64, bandwidth=bw,
                                context=1024, config=config, non_layer_ms=1.5)
    assert r["step_ms"] == pytest.approx(64 * (0.3 + 0.4 / 8) + 1.5)
    assert r["tokens_per_s"] == pytest.approx(8 / (64 * 0.35 + 1.5) * 1e3)


def _model_json(path, layers, mesh, ms_by_batch, dispatch_ms=None, share=None):
    rows = [dict(kind="decode", mode="fast", batch=b, ms=ms) for b, ms in ms_by_batch.items()]
    if dispatch_ms is not None:  # the host's enqueue time of each step
        for r in rows:
            r["dispatch_ms"] = dispatch_ms
    rows.append(dict(kind="decode", mode="reference", batch=1, ms=99.0))
    result = dict(device="NVIDIA H200", layers=layers, context=1024, copy_bandwidth_GBps=4190.0, rows=rows,
                  host=dict(cpu="Test CPU", cpus=16))
    if mesh:
        result["mesh"] = mesh
    if share:
        result["share"] = share
    path.write_text(json.dumps(result))
    return str(path)


def test_project_from_model_json_files(tmp_path, capsys):
    # The table: layers 2 and 8 at batch 1, on 1 device and on a 1x2 mesh.
    files = [_model_json(tmp_path / "a.json", 2, None, {1: 1.66}),
             _model_json(tmp_path / "b.json", 8, None, {1: 5.20}),
             _model_json(tmp_path / "c.json", 2, {"data": 1, "model": 2}, {1: 1.72}),
             _model_json(tmp_path / "d.json", 8, {"data": 1, "model": 2}, {1: 4.43})]
    inputs, meta = bench.read_model_runs(files, "fast")
    per_layer = {1: (5.20 - 1.66) / 6, 2: (4.43 - 1.72) / 6}
    intercept = {1: 1.66 - 2 * per_layer[1], 2: 1.72 - 2 * per_layer[2]}
    assert inputs[1].per_layer_ms == pytest.approx(per_layer)
    assert inputs[1].non_layer_ms == pytest.approx(intercept)
    assert meta["context"] == [1024] and meta["copy_bandwidth_GBps"] == [4190]
    report = bench.main(["project", "--from-json", *files, "--bandwidth-gbs", "4190", "--json",
                         str(tmp_path / "p.json")])
    (r,) = report["rows"]
    v_o = (intercept[1] - intercept[2]) / (1 - 1 / 2)
    assert r["non_layer_ms"] == pytest.approx(intercept[1] - v_o + v_o / 8)
    out = capsys.readouterr().out
    assert "4190 GB/s" in out and "1024 tokens" in out and "batch 8, 32" in out  # the inputs are stated
    assert json.loads((tmp_path / "p.json").read_text())["rows"][0]["batch"] == 1


def test_project_from_one_devices_share_adds_the_collectives_of_1x2(tmp_path, capsys):
    # Shares of 2 and 8 (bench.py model --share): 0.25 and 0.1 ms per layer; a 1x2 layer is
    # 0.3 ms, so its collectives cost 0.05: 8 devices = 64 x (0.1 + 0.05) + the non-layer cost.
    def share_json(name, layers, n, ms):
        return _model_json(tmp_path / name, layers, None, {1: ms}, share=n)

    files = [_model_json(tmp_path / "a.json", 2, None, {1: 1.0}),
             _model_json(tmp_path / "b.json", 8, None, {1: 4.0}),
             _model_json(tmp_path / "c.json", 2, {"data": 1, "model": 2}, {1: 0.8}),
             _model_json(tmp_path / "d.json", 8, {"data": 1, "model": 2}, {1: 2.6}),
             share_json("e.json", 2, 2, 0.7), share_json("f.json", 8, 2, 2.2),
             share_json("g.json", 2, 8, 0.3), share_json("h.json", 8, 8, 0.9)]
    inputs, _ = bench.read_model_runs(files, "fast")
    assert inputs[1].share_layer_ms == pytest.approx({2: 0.25, 8: 0.1})
    alone, _ = bench.read_model_runs(files[4:], "fast")  # shares only: read, not "no decode rows"
    assert alone[1].share_layer_ms == pytest.approx({2: 0.25, 8: 0.1}) and not alone[1].per_layer_ms
    assert inputs[1].per_layer_ms == pytest.approx({1: 0.5, 2: 0.3})
    report = bench.main(["project", "--from-json", *files])
    (r,) = report["rows"]
    assert (r["share_local_ms"], r["share_collectives_ms"]) == (pytest.approx(0.1), pytest.approx(0.05))
    assert r["share_step_ms"] == pytest.approx(64 * 0.15 + r["non_layer_ms"])
    assert r["share_roofline_pct"] == pytest.approx(100 * r["roofline_ms"] / r["share_step_ms"])
    assert "0.100 ms local + 0.050 collectives" in capsys.readouterr().out
    # Without the 1x2 runs' share the collectives are unknown: the local work alone, said so.
    report = bench.main(["project", "--from-json", *files[:4], *files[6:]])
    (r,) = report["rows"]
    assert r["share_collectives_ms"] is None and r["share_step_ms"] == pytest.approx(64 * 0.1 + r["non_layer_ms"])
    assert "collectives not measured" in capsys.readouterr().out


def test_project_from_shares_alone_bounds_the_step_by_the_host(tmp_path, capsys):
    # One device's share of 8 alone: 0.3 ms at 2 layers and 0.9 at 8 (0.1 per layer, 0.1
    # outside); the host enqueued those steps in 0.3 and 1.02 ms (0.12 per layer, 0.06
    # outside), so at 64 layers the devices need 6.5 ms and the host 7.74: the host bounds it.
    def share_json(name, layers, ms, dispatch):
        return _model_json(tmp_path / name, layers, None, {1: ms}, dispatch_ms=dispatch, share=8)

    shares = [share_json("s2.json", 2, 0.3, 0.3), share_json("s8.json", 8, 0.9, 1.02)]
    report = bench.main(["project", "--from-json", *shares, "--bandwidth-gbs", "4000"])
    (r,) = report["rows"]
    assert report["shares_only"]
    assert (r["share_local_ms"], r["share_non_layer_ms"]) == (pytest.approx(0.1), pytest.approx(0.1))
    assert r["step_ms"] == pytest.approx(6.5) and "share_collectives_ms" not in r
    assert r["host_floor_ms"] == pytest.approx(0.06 + 64 * 0.12) and r["bounded_step_ms"] == pytest.approx(7.74)
    layer_bytes, other_bytes = bench.decode_step_bytes(model.grok_1_config(), 1, 1024, 2.0)
    assert r["roofline_ms"] == pytest.approx((64 * layer_bytes + other_bytes) / (8 * 4e12) * 1e3)
    assert r["bounded_roofline_pct"] == pytest.approx(100 * r["roofline_ms"] / 7.74)
    out = capsys.readouterr().out
    assert "from one device's share of a 1x8 mesh measured alone" in out and "a lower bound" in out
    assert "measured on one device's share of 8, batch 1" in out and "7.74 ms at 64 layers" in out
    # Beside runs on 1 device and 1x2, the share's host time does not bound the fitted step.
    files = [_model_json(tmp_path / "a.json", 2, None, {1: 1.0}), _model_json(tmp_path / "b.json", 8, None, {1: 4.0}),
             _model_json(tmp_path / "c.json", 2, {"data": 1, "model": 2}, {1: 0.8}),
             _model_json(tmp_path / "d.json", 8, {"data": 1, "model": 2}, {1: 2.6})]
    (r,) = bench.main(["project", "--from-json", *files, *shares])["rows"]
    assert "bounded_step_ms" not in r and r["share_local_ms"] == pytest.approx(0.1)


def test_project_states_the_hosts_enqueue_floor(tmp_path, capsys):
    # Enqueueing a step: 1.0 ms at 2 layers, 3.4 at 8 on one device -> 0.2 + 0.4 per layer,
    # so 25.8 ms at 64 layers; files without the field (older runs) give no such line.
    files = [_model_json(tmp_path / "a.json", 2, None, {1: 1.66}, dispatch_ms=1.0),
             _model_json(tmp_path / "b.json", 8, None, {1: 5.20}, dispatch_ms=3.4),
             _model_json(tmp_path / "c.json", 2, {"data": 1, "model": 2}, {1: 1.72}),
             _model_json(tmp_path / "d.json", 8, {"data": 1, "model": 2}, {1: 4.43})]
    report = bench.main(["project", "--from-json", *files, "--json", str(tmp_path / "p.json")])
    (host,) = report["files_meta"]["host_enqueue_ms"]
    assert (host["devices"], host["batch"]) == (1, 1)
    assert (host["outside_ms"], host["per_layer_ms"]) == (pytest.approx(0.2), pytest.approx(0.4))
    out = capsys.readouterr().out
    assert "25.80 ms at 64 layers" in out and "bounded by the host" in out
    assert "host floor measured on: Test CPU (16 CPUs)" in out
    assert json.loads((tmp_path / "p.json").read_text())["files_meta"]["host_enqueue_ms"] == [host]
    # The times project a 23.3 ms step on 8 devices; the floor is above it and sets the step.
    (r,) = json.loads((tmp_path / "p.json").read_text())["rows"]
    per_layer = {1: (5.20 - 1.66) / 6, 2: (4.43 - 1.72) / 6}
    fixed, variable = 2 * per_layer[2] - per_layer[1], 2 * (per_layer[1] - per_layer[2])
    assert r["per_layer_ms"] == pytest.approx(fixed + variable / 8) and r["step_ms"] < 25.8
    assert (r["host_floor_ms"], r["bounded_step_ms"]) == (pytest.approx(25.8), pytest.approx(25.8))
    assert r["bounded_tokens_per_s"] == pytest.approx(1e3 / 25.8)
    assert r["bounded_roofline_pct"] == pytest.approx(100 * r["roofline_ms"] / 25.8)


def test_project_takes_the_host_floor_from_other_runs_when_told(tmp_path, capsys):
    # The devices' fit from one set of runs, the host's floor from newer ones on one device
    # (0.1 + 0.05 per layer -> 3.3 ms at 64 layers, below the devices' step: not bounding).
    files = [_model_json(tmp_path / "a.json", 2, None, {1: 1.66}, dispatch_ms=1.0),
             _model_json(tmp_path / "b.json", 8, None, {1: 5.20}, dispatch_ms=3.4),
             _model_json(tmp_path / "c.json", 2, {"data": 1, "model": 2}, {1: 1.72}),
             _model_json(tmp_path / "d.json", 8, {"data": 1, "model": 2}, {1: 4.43})]
    newer = [_model_json(tmp_path / "e.json", 2, None, {1: 1.6}, dispatch_ms=0.2),
             _model_json(tmp_path / "f.json", 8, None, {1: 5.1}, dispatch_ms=0.5)]
    report = bench.main(["project", "--from-json", *files, "--host-json", *newer])
    out = capsys.readouterr().out
    assert f"host floor from 2 other bench.py model file(s): {newer[0]}, {newer[1]}" in out
    assert "3.30 ms at 64 layers" in out and "25.80 ms" not in out
    (r,) = report["rows"]
    assert r["host_floor_ms"] == pytest.approx(3.3) and r["bounded_step_ms"] == r["step_ms"]
    assert report["host_source"] == newer


def test_project_leaves_out_a_batch_measured_on_one_device_count(tmp_path, capsys):
    # Batch 8 ran on one GPU only (the 1x2 runs took batch 1): batch 1 is projected, 8 is named.
    files = [_model_json(tmp_path / "a.json", 2, None, {1: 1.66, 8: 2.8}),
             _model_json(tmp_path / "b.json", 8, None, {1: 5.20, 8: 9.8}),
             _model_json(tmp_path / "c.json", 2, {"data": 1, "model": 2}, {1: 1.72}),
             _model_json(tmp_path / "d.json", 8, {"data": 1, "model": 2}, {1: 4.43})]
    report = bench.main(["project", "--from-json", *files])
    assert [r["batch"] for r in report["rows"]] == [1]
    out = capsys.readouterr().out
    assert "batch 8: measured on 1 device(s) only, so no F + V/n: not projected" in out
    assert "not measured, not projected: batch 32" in out


def test_the_host_floor_bounds_a_step_only_when_above_it_and_comes_from_the_most_devices():
    rows = [dict(batch=1, step_ms=5.0, roofline_ms=2.5), dict(batch=8, step_ms=9.0, roofline_ms=4.5),
            dict(batch=32, step_ms=20.0, roofline_ms=10.0)]
    fits = [dict(devices=1, batch=1, outside_ms=0.0, per_layer_ms=0.2),   # 12.8 ms: not this one
            dict(devices=2, batch=1, outside_ms=0.6, per_layer_ms=0.1),   # 7.0 ms: the most devices
            dict(devices=2, batch=8, outside_ms=1.0, per_layer_ms=0.05)]  # 4.2 ms: below the step
    bench.bound_by_host(rows, fits, layers=64)
    one, eight, thirty_two = rows
    assert (one["host_floor_ms"], one["host_floor_devices"], one["bounded_step_ms"]) == (
        pytest.approx(7.0), 2, pytest.approx(7.0))
    assert one["bounded_tokens_per_s"] == pytest.approx(1e3 / 7.0)
    assert one["bounded_roofline_pct"] == pytest.approx(100 * 2.5 / 7.0)
    assert (eight["host_floor_ms"], eight["bounded_step_ms"]) == (pytest.approx(4.2), 9.0)
    assert eight["bounded_tokens_per_s"] == pytest.approx(8 / 9.0 * 1e3)
    assert "bounded_step_ms" not in thirty_two  # no host measurement at batch 32


@pytest.mark.parametrize("argv, message", [
    (["project"], "either with --measured"),
    (["project", "--measured", "1=1:0.5"], "at least 2 device counts"),
    (["project", "--measured", "1=0.5"], "expected BATCH=N:MS"),
    (["project", "--measured", "1=1:0.5,2:0.4", "--bandwidth-gbs", "0"], "must be > 0"),
    (["project", "--measured", "1=1:0.5,2:0.4", "--host-json", "x.json"], "--host-json goes with --from-json"),
])
def test_project_cli_misuse_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err



def test_depth_summary_medians_per_layer_cost_and_slope():
    def model_run(n, rep, ms):
        return {"kind": "model", "layers": n, "rep": rep, "code": 0,
                "rows": [{"kind": "decode", "batch": 1, "ms": ms}, {"kind": "prefill", "batch": 1, "ms": 99.0}]}

    runs = [model_run(8, 0, 4.0), model_run(8, 1, 5.0), model_run(8, 2, 4.4),
            model_run(48, 0, 24.0), model_run(48, 1, 30.0), model_run(48, 2, 25.0),
            {"kind": "model", "layers": 48, "rep": 3, "code": 1}]  # a failed run is left out
    s = bench.summarize_depth(runs, [8, 48])
    assert s[8]["decode_b1_ms"] == {"median": 4.4, "min": 4.0, "max": 5.0, "n": 3}
    assert s[48]["decode_b1_ms_per_layer"]["median"] == 25.0 / 48
    assert s[48]["decode_b1_ms_slope_per_layer"] == (25.0 - 4.4) / 40
    assert "0.521 ms/layer [0.500-0.625]" in bench.format_depth(s)


def test_depth_child_that_hangs_is_ended_with_its_stacks_in_the_log(tmp_path):
    """A hung run (session 4: the runner's first decode step on 2 GPUs) costs one point of
    `bench.py depth`, and its log says where it hung."""
    log = str(tmp_path / "child.log")
    hang = [sys.executable, "-c", "import time\ndef wait_forever():\n    time.sleep(600)\nwait_forever()"]
    start = time.perf_counter()
    assert bench._child(hang, log, timeout_s=2.0) == bench.CHILD_TIMED_OUT
    assert time.perf_counter() - start < 30
    text = open(log).read()
    assert "wait_forever" in text  # faulthandler's stack of the main thread
    assert "killed after 2 s" in text

    done = [sys.executable, "-c", "print('ok'); raise SystemExit(3)"]
    assert bench._child(done, log, timeout_s=30.0) == 3
    assert open(log).read().strip() == "ok"


def test_depth_skips_the_warm_start_after_a_failed_cold_one(tmp_path, monkeypatch):
    """A cold start that hangs or fails is not followed by a warm one (it has no programs
    to reuse, and a hang would cost a second timeout); the other depths still run."""
    calls = []

    def fake_child(cmd, log, timeout_s=None):
        layers = cmd[cmd.index("--layers") + 1]
        calls.append((layers, os.path.basename(log)))
        return bench.CHILD_TIMED_OUT if layers == "48" else 1

    monkeypatch.setattr(bench, "_child", fake_child)
    args = argparse.Namespace(layers="8,48", repeats=1, mesh="1x1", parts="startup", warm=True, steps=4,
                              batches="1", context=16, prefill=0, iters=1, cache_root=str(tmp_path / "cache"),
                              tiny=True, child_timeout=5.0, out=str(tmp_path / "out"), json=None)
    report = bench.depth_bench(args)
    assert calls == [("8", "startup-L8-r0-cold.log"), ("48", "startup-L48-r0-cold.log")]
    assert [r["code"] for r in report["runs"]] == [1, bench.CHILD_TIMED_OUT]


def test_serve_buckets_and_stream_interval_are_the_servers_unless_given():
    import run

    def ns(**kw):
        return argparse.Namespace(**{"tiny": False, "pad_sizes": None, **kw})

    assert bench.serve_pad_sizes(ns()) == run.SERVE_PAD_SIZES
    assert bench.serve_pad_sizes(ns(tiny=True)) == run.TINY_PAD_SIZES
    assert bench.serve_pad_sizes(ns(pad_sizes=[32, 128])) == (32, 128)
    import server

    assert bench.serve_stream_interval_ms(ns(stream_interval_ms=None)) == 1e3 * server.STREAM_INTERVAL_S
    assert bench.serve_stream_interval_ms(ns(stream_interval_ms=20.0)) == 20.0
    assert bench.serve_pipeline_depth(ns(pipeline_depth=None)) == server.PIPELINE_DEPTH
    assert bench.serve_pipeline_depth(ns(pipeline_depth=4)) == 4
    assert bench._pad_sizes("32, 128") == [32, 128]
    for bad in ("0", "", "a,2", "32,-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench._pad_sizes(bad)


def test_loader_bench_runs_the_chosen_methods_and_the_yardstick(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    directory = tmp_path / "ckpt"
    report = bench.main(["loader", "--dir", str(directory), "--size-gb", "0.01", "--repeats", "1",
                         "--methods", "loader_host,loader_devices,loader_devices_started"])
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["raw_read", "loader_host", "loader_devices", "loader_devices_started"]
    assert rows["loader_host"]["vs_release_host"] is None  # the release's method did not run
    assert list(report["onto_devices"]) == ["loader_devices", "loader_devices_started"]
    # Only the "started" pass makes its process's first transfer before the timed load.
    assert rows["loader_devices"]["transfer_startup_s"] == [None]
    assert rows["loader_devices_started"]["transfer_startup_s"][0] > 0
    assert report["best_host_method"] == "loader_host"
    assert report["host"] == bench.host_info()
    # The checkpoint written for the run is gone afterwards (no --keep).
    assert report["checkpoint"]["bytes"] > 0 and not directory.exists()
    with pytest.raises(SystemExit, match="unknown --methods nope"):
        bench.main(["loader", "--dir", str(directory), "--methods", "nope"])


def test_serving_threads_cpu_reads_each_threads_own_clock():
    import threading

    spin = threading.Event()

    def engine():
        end = time.thread_time() + 0.2
        while time.thread_time() < end:  # 0.2 s of this thread's own CPU
            pass
        spin.wait(10)

    worker = threading.Thread(target=engine, name="grok1-engine")
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while bench._serving_threads_cpu()["engine"] < 0.2 and time.monotonic() < deadline:
            time.sleep(0.01)
        before = time.thread_time()
        cpu = bench._serving_threads_cpu()
        assert 0.2 <= cpu["engine"] < 0.2 + 0.5  # that thread's own clock
        # The main thread (this one, here) by its own clock: the worker's 0.2 s are not in it.
        assert before <= cpu["event_loop"] <= time.thread_time()
    finally:
        spin.set()
        worker.join()
    assert bench._serving_threads_cpu()["engine"] == 0.0  # no engine thread: nothing served


def test_profile_sums_the_devices_kernels_and_the_hosts_enqueueing(tmp_path):
    steps = 3
    res = bench.profile_decode(layers=2, batch=1, context=8, mesh_shape=None, steps=steps,
                               trace_dir=str(tmp_path / "trace"), json_path=str(tmp_path / "p.json"), tiny=True)
    assert res["lines"] and all(r["us_per_step"] >= 0 for rows in res["lines"].values() for r in rows)
    host = res["host_events"]
    assert list(host) == list(bench.HOST_EVENTS)
    # Every traced step parses its arguments once on the host (jax's C++ dispatch).
    assert host["ParseArguments"]["per_step"] == 1 and host["ParseArguments"]["us_per_step"] > 0
    assert host["ParseArguments"]["us_per_layer"] == pytest.approx(host["ParseArguments"]["us_per_step"] / 2)
    assert host["cuGraphLaunch"]["per_step"] == 0  # no CUDA graphs on a CPU
    assert json.loads((tmp_path / "p.json").read_text())["host_events"] == host
    # The XLA ops are placed by the instruction each run came from: both layers' and the
    # rest of the step's are seen; the Python thread's events name none.
    placed = [r["in_layers"] for rows in res["lines"].values() for r in rows if r["in_layers"] is not None]
    assert 1.0 in placed and 0.0 in placed
    # The Python thread's line is named after the process (python, python3, ...); XLA's are tf_*.
    python_rows = [r for name, rows in res["lines"].items() if not name.startswith("tf_") for r in rows]
    assert python_rows and all(r["in_layers"] is None for r in python_rows)


def test_the_profile_places_kernels_by_their_hlo_instruction():
    text = """HloModule jit_apply_fn
  %loop_pad_fusion.7 = bf16[16,6144]{1,0} fusion(%a), kind=kLoop, calls=%c, metadata={op_name="jit(apply_fn)/language_model/transformer/decoder_layer_0/multi_head_attention/jit(_pad)/pad"}
  %loop_pad_fusion.9 = bf16[16,6144]{1,0} fusion(%b), kind=kLoop, calls=%d, metadata={op_name="jit(apply_fn)/language_model/transformer/decoder_layer_13/multi_head_attention/pad"}
  %gemm_fusion_dot.6 = f32[1,16384]{1,0} fusion(%e), kind=kCustom, metadata={op_name="jit(apply_fn)/language_model/dot_general"}
  ROOT %tuple.3 = (f32[1,16384]{1,0}) tuple(%gemm_fusion_dot.6)
"""
    assert bench._hlo_op_layers(text) == {"loop_pad_fusion.7": 0, "loop_pad_fusion.9": 13, "gemm_fusion_dot.6": None,
                                          "tuple.3": None}
    # On a GPU, inside a CUDA graph, each kernel's hlo_op names the graph; a fusion's kernel
    # carries the instruction's name with '_' for '.', a Pallas kernel its own name.
    ops = bench._hlo_op_layers(text)
    graph = [("hlo_op", "command_buffer_1"), ("hlo_module", "jit_apply_fn")]
    gpu = [("loop_pad_fusion_7", 500, graph), ("loop_pad_fusion_9", 1500, graph), ("loop_pad_fusion_9", 1500, graph),
           ("gemm_fusion_dot_6", 9000, graph), ("int8_gated_matmul", 30000, graph)]
    assert bench._place_runs(gpu, ops) == {"loop_pad_fusion_7": [1, 500, 1.0], "loop_pad_fusion_9": [2, 3000, 1.0],
                                           "gemm_fusion_dot_6": [1, 9000, 0.0], "int8_gated_matmul": [1, 30000, None]}
    # On a CPU each run's hlo_op is its instruction. One annotation for every kernel is not
    # trusted: nothing is placed.
    cpu = [("fusion", 10, [("hlo_op", "loop_pad_fusion.9")]), ("other", 5, [("hlo_op", "gemm_fusion_dot.6")])]
    assert bench._place_runs(cpu, ops) == {"fusion": [1, 10, 1.0], "other": [1, 5, 0.0]}
    one = [(f"k{i}", 1, [("hlo_op", "gemm_fusion_dot.6")]) for i in range(4)]
    assert all(v[2] is None for v in bench._place_runs(one, ops).values())
    # A 4-layer step: layer 0's pad carries another name than the other three's; the logits'
    # dot runs once. By instruction, both pads are in the layers; a kernel that runs once per
    # layer is in them whatever its instruction's source; a row the trace could not place
    # (in_layers None) that runs less often is outside.
    rows = [dict(name="loop_pad_fusion_7", per_step=1, us_per_layer=0.5, in_layers=1.0),
            dict(name="loop_pad_fusion_9", per_step=3, us_per_layer=1.5, in_layers=1.0),
            dict(name="gemm_fusion_dot_6", per_step=1, us_per_layer=12.0, in_layers=0.0),
            dict(name="int8_gated_matmul", per_step=4, us_per_layer=30.0, in_layers=None),
            dict(name="loop_add_fusion", per_step=1, us_per_layer=0.25, in_layers=None),
            dict(name="loop_select_fusion_3", per_step=4, us_per_layer=1.0, in_layers=0.0),  # a layer's, by count
            dict(name="all-reduce-start", per_step=1, us_per_layer=2.0, in_layers=0.0)]
    summary = bench.summarize_profile({"layers": 4, "lines": {"Stream #14(Compute)": rows}})
    assert summary == {"other": 3.0, "outside_layers": 12.25, "moe_gated": 30.0, "collective": 2.0}
    # A Pallas kernel JAX named apart in the last layer (residual_norm__1 three times,
    # residual_norm__2 once): together once per layer, so in the layers; a lone one, not.
    rows = [dict(name="residual_norm__1", per_step=3, us_per_layer=3.0, in_layers=None),
            dict(name="residual_norm__2", per_step=1, us_per_layer=1.0, in_layers=None),
            dict(name="moe_route__1", per_step=1, us_per_layer=0.5, in_layers=None)]
    summary = bench.summarize_profile({"layers": 4, "lines": {"Stream #14(Compute)": rows}})
    assert summary == {"other": 4.0, "outside_layers": 0.5}


def test_kernel_times_are_the_devices_where_it_can_be_traced():
    import jax
    import jax.numpy as jnp

    import kernel_bench

    fn = jax.jit(lambda x: x * 2)
    x = jnp.ones(8)
    # No GPU here: the trace holds no device stream, so there is no device time.
    assert bench.device_seconds(fn, (x,), 3) is None
    try:
        kernel_bench.device_seconds = None
        wall = kernel_bench.timeit(fn, x, min_time=0.001, reps=2)
        assert wall["timed_by"] == "wall" and wall["median_s"] == wall["wall_median_s"] > 0
        assert wall["device_s"] is None
        calls = []
        kernel_bench.device_seconds = lambda f, args, n: calls.append((f, args, n)) or 2.5e-5
        dev = kernel_bench.timeit(fn, x, min_time=0.001, reps=2)
        assert dev["timed_by"] == "device" and dev["median_s"] == dev["device_s"] == 2.5e-5
        assert calls == [(fn, (x,), dev["n"])]  # as many calls as a wall-clock round queues
        kernel_bench.device_seconds = bench.device_seconds  # on a CPU: None, so the wall clock
        assert kernel_bench.timeit(fn, x, min_time=0.001, reps=2)["timed_by"] == "wall"
    finally:
        kernel_bench.device_seconds = None
