"""bench.py: the roofline arithmetic against SPEC-derived byte counts, and a tiny smoke run."""

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
    assert "decode fast batch 2: lower" in bench.format_startup(res)


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
