"""Model benchmark: decode and prefill at Grok-1 width, fast against reference, vs roofline.

Everything is measured in one run on whatever devices exist: the copy bandwidth and bf16
matmul rate (the two ceilings), then decode steps at several batch sizes with a filled KV
cache, and a prefill, for each MoE mode. Weights are random int8 generated on the device.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from typing import Any, Callable

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import model


def timed(fn: Callable[[], Any], warmup: int = 2, iters: int = 10) -> float:
    """Median wall seconds of fn() (which must return arrays), after warm-up."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- the two ceilings --------------------------------------------------------------------


def copy_bandwidth(gbytes: float = 2.0) -> float:
    """Bytes/s of a device-to-device float32 elementwise pass (bytes read + bytes written)."""
    n = int(gbytes * 1e9 / 4)
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    f = jax.jit(lambda a: a * 2.0)
    seconds = timed(lambda: f(x), iters=20)
    return 2 * x.nbytes / seconds


def matmul_rate(n: int = 8192) -> float:
    """FLOP/s of an n x n x n bf16 matrix product on random data."""
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: x @ y)
    return 2 * n**3 / timed(lambda: f(a, b), iters=20)


# --- the model -----------------------------------------------------------------------------


def routed_forward(config: model.LanguageModelConfig):
    """Like model.make_forward (cache donated), but also returns every layer's expert choice."""

    def fn(tokens, memory, length):
        experts = []

        def record(method, args, kwargs, context):
            out = method(*args, **kwargs)
            if isinstance(context.module, model.Router) and context.method_name == "__call__":
                experts.append(out[1])
            return out

        with hk.intercept_methods(record):
            out = config.make()(tokens, memory, length=length)
        return out, experts

    return jax.jit(hk.without_apply_rng(hk.transform(fn)).apply, donate_argnums=(2,))


def filled_memory(config: model.LanguageModelConfig, batch: int, context: int, cache_len: int) -> model.Memory:
    """A cache holding `context` random keys/values per sequence (step = context)."""
    cfg = config.model

    def make():
        shape = (batch, cache_len, cfg.num_kv_heads, cfg.key_size)
        layers = []
        for i in range(cfg.num_layers):
            k = jax.random.normal(jax.random.key(100 + i), shape, config.fprop_dtype)
            layers.append(model.KVMemory(k, k * 0.5, jnp.full((batch,), context, jnp.int32)))
        return model.Memory(layers)

    return jax.jit(make)()


def weight_bytes(leaf: Any) -> int:
    if isinstance(leaf, model.QuantizedWeight8bit):
        return leaf.weight.nbytes + leaf.scales.nbytes
    return leaf.nbytes


def decode_bytes(params: dict, config: model.LanguageModelConfig, experts: list, batch: int, context: int) -> int:
    """Bytes a decode step must read: attention weights, the experts the routing touched,
    the KV cache of the context, the router, norms and the (bf16-read) unembedding."""
    total = 0
    for module, leaves in params.items():
        for name, leaf in leaves.items():
            if "/moe/" in module:
                continue
            if module.endswith("in_out_embed"):
                total += leaf.size * 2  # read as bf16 for the logits
            else:
                total += weight_bytes(leaf)
    for layer, chosen in enumerate(experts):
        touched = len(np.unique(np.asarray(chosen)))
        for part in ("linear", "linear_v", "linear_1"):
            w = params[f"transformer/decoder_layer_{layer}/moe/{part}"]["w"]
            total += weight_bytes(w) * touched // config.model.num_experts
    cfg = config.model
    total += 2 * cfg.num_layers * batch * context * cfg.num_kv_heads * cfg.key_size * 2
    return total


def prefill_flops(config: model.LanguageModelConfig, tokens: int) -> float:
    """FLOPs of the top-k work of a prefill: projections, k experts, causal attention."""
    cfg = config.model
    d, hk_, gk = cfg.emb_size, cfg.num_q_heads * cfg.key_size, cfg.num_kv_heads * cfg.key_size
    proj = 2 * tokens * (d * hk_ * 2 + d * gk * 2)
    experts = 2 * tokens * cfg.num_selected_experts * 3 * d * cfg.ffn_size
    attention = 2 * 2 * cfg.num_q_heads * cfg.key_size * tokens * tokens / 2
    return cfg.num_layers * (proj + experts + attention)


def bench_model(layers: int, batches: list[int], context: int, prefill_len: int, modes: list[str],
                iters: int = 10, tiny: bool = False, json_path: str | None = None) -> dict:
    """Decode and prefill timings for each mode, with roofline fractions.

    tiny=True swaps in the tiny config and small ceilings: a smoke test for any laptop.
    """
    results: dict = {"device": str(jax.devices()[0].device_kind), "num_devices": jax.device_count(),
                     "layers": layers, "context": context, "prefill_len": prefill_len}
    bw = copy_bandwidth(0.1 if tiny else 2.0)
    flops = matmul_rate(512 if tiny else 8192)
    results.update(copy_bandwidth_GBps=bw / 1e9, matmul_TFLOPs=flops / 1e12)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s", flush=True)

    base = model.tiny_config(num_layers=layers) if tiny else model.grok_1_config(num_layers=layers)
    params = model.prepare_for_inference(model.init_random_params(base, seed=0, on_device=True), base)
    jax.block_until_ready(params)
    cache_len = -(-(context + 64) // 128) * 128  # room for the timed steps
    rows, logits = [], {}
    for mode in modes:
        config = dataclasses.replace(base, model=dataclasses.replace(base.model, moe_impl=mode))
        forward = routed_forward(config)
        for batch in batches:
            tokens = jax.random.randint(jax.random.key(batch), (batch, 1), 4, config.vocab_size)
            length = jnp.ones((batch,), jnp.int32)
            state = {"memory": filled_memory(config, batch, context, cache_len)}

            def step():
                out, experts = forward(params, tokens, state["memory"], length)
                state["memory"] = out.model_state  # the context grows by one token a step
                return out.logits, experts

            seconds = timed(step, iters=iters)
            out_logits, experts = step()
            logits[(mode, batch)] = np.asarray(out_logits, np.float32)
            need = decode_bytes(params, config, experts, batch, context)
            row = dict(kind="decode", mode=mode, batch=batch, ms=seconds * 1e3, tokens_per_s=batch / seconds,
                       roofline_ms=need / bw * 1e3, roofline_pct=100 * need / bw / seconds)
            rows.append(row)
            print(row, flush=True)
            save(json_path, results, rows)
            del state

        forward = model.make_forward(config, donate_memory=True)
        tokens = jax.random.randint(jax.random.key(7), (1, prefill_len), 4, config.vocab_size)
        length = jnp.full((1,), prefill_len, jnp.int32)
        holder = {}

        def prefill():
            holder["m"] = model.init_memory(config, 1, prefill_len)
            return forward(params, tokens, holder["m"], length).logits

        seconds = timed(prefill, iters=max(3, iters // 2))
        need = prefill_flops(config, prefill_len)
        row = dict(kind="prefill", mode=mode, batch=1, tokens=prefill_len, ms=seconds * 1e3,
                   tokens_per_s=prefill_len / seconds, roofline_ms=need / flops * 1e3,
                   roofline_pct=100 * need / flops / seconds)
        rows.append(row)
        print(row, flush=True)
        save(json_path, results, rows)

    if len(modes) > 1:  # the kernels checked against the release's algorithm, end to end
        for batch in batches:
            a, b = logits[(modes[0], batch)], logits[(modes[1], batch)]
            err = float(np.linalg.norm(a - b) / np.linalg.norm(b))
            results.setdefault("fast_vs_reference_rel_l2", {})[batch] = err
            results.setdefault("nan", {})[batch] = bool(np.isnan(a).any() or np.isnan(b).any())
    results["rows"] = rows
    return results


def save(path: str | None, results: dict, rows: list) -> None:
    """Write what has been measured so far (a run cut short still leaves its numbers)."""
    if path:
        with open(path, "w") as f:
            json.dump(dict(results, rows=rows), f, indent=1)


def compile_times(layers: int = 64, batch: int = 8, prefill_len: int = 1024, cache_len: int = 8192) -> dict:
    """Seconds to lower and compile prefill and decode of the full config, abstract shapes."""
    config = model.grok_1_config(num_layers=layers)
    shapes = model.param_shapes(config)
    forward = model.make_forward(config, donate_memory=True)
    out = {}
    for name, b, t in [("prefill", 1, prefill_len), ("decode", batch, 1)]:
        memory = jax.eval_shape(lambda: model.init_layer_memories(
            b, cache_len if name == "decode" else prefill_len, config.model.num_kv_heads,
            config.model.key_size, layers))
        tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
        length = jax.ShapeDtypeStruct((b,), jnp.int32)
        start = time.perf_counter()
        lowered = forward.lower(shapes, tokens, memory, length)
        lowered_at = time.perf_counter()
        lowered.compile()
        done = time.perf_counter()
        out[name] = dict(lower_s=lowered_at - start, compile_s=done - lowered_at)
        print(f"compile {layers} layers {name}: lower {lowered_at - start:.1f}s, compile {done - lowered_at:.1f}s",
              flush=True)
    return out


def format_table(results: dict) -> str:
    rows = results["rows"]
    ref = {(r["kind"], r["batch"]): r for r in rows if r["mode"] == "reference"}
    lines = [f"{'kind':8} {'mode':10} {'batch':>5} {'ms':>9} {'tok/s':>9} {'roofline ms':>11} "
             f"{'% roofline':>10} {'fast/ref':>8}"]
    for r in rows:
        other = ref.get((r["kind"], r["batch"]))
        speedup = f"{other['ms'] / r['ms']:.1f}x" if other and r["mode"] != "reference" else ""
        lines.append(f"{r['kind']:8} {r['mode']:10} {r['batch']:>5} {r['ms']:>9.2f} {r['tokens_per_s']:>9.1f} "
                     f"{r['roofline_ms']:>11.3f} {r['roofline_pct']:>9.1f}% {speedup:>8}")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--prefill", type=int, default=1024)
    parser.add_argument("--modes", default="fast,reference")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--compile-layers", type=int, default=64, help="0 to skip the compile-time check")
    parser.add_argument("--tiny", action="store_true", help="tiny config: a smoke test on any machine")
    parser.add_argument("--json", default="bench_model.json")
    args = parser.parse_args()
    res = bench_model(args.layers, [int(b) for b in args.batches.split(",")], args.context, args.prefill,
                      args.modes.split(","), args.iters, args.tiny, args.json)
    if args.compile_layers:
        res["compile"] = compile_times(args.compile_layers)
    print(format_table(res))
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
