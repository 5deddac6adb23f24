"""Benchmarks. Subcommands:

  model    decode steps at batch 1, 8 and 32 with a filled KV cache and a 1024-token prefill
           on a model of Grok-1 width with N layers of random int8 weights made on the
           device, for the fast and the reference (release) MoE, against the roofline:
           the bytes a step must read over the measured copy bandwidth (decode), the top-k
           FLOPs over the measured bf16 matmul rate (prefill). Also the time to compile the
           full 64-layer model (abstract shapes, nothing allocated).
           python bench.py model --layers 4 --json bench_model.json

  kernels  the GPU kernels alone (kernel_bench.py): checks against XLA and float32,
           one MoE layer at 1, 8, 32 and 1024 tokens, tuning sweeps.

  precision  bf16 precision of the forward pass against the float64 reference (issue 12), on
           the issue's random "2 layers" and "12 layers" models, both MoE modes, on the default
           device: p90 logits error of prefill and teacher-forced decode (plain, and with the
           model's own expert choices), per-op per-layer errors, and what each bf16 rounding
           point costs in tests/reference.py's emulation.
           python bench.py precision --seeds 5 --json $OUT/precision.json

  loader   write a ~N GB checkpoint of random data shaped like a scaled-down Grok, then
           measure, each pass from a dropped page cache where the kernel allows it:
           the raw sequential read speed of the files, this project's loader (to devices
           and to host memory, with and without the /dev/shm copy-through) and the
           release's method (copy each file to /dev/shm, plain pickle.load, 32 threads).

Each measured pass runs in a fresh child process so that its peak resident memory can be
reported next to its speed.

  python bench.py loader --dir /tmp/ckpt_bench --size-gb 2 --json bench_out/loader.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import model

REPO = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------
# loader: the checkpoint
# ---------------------------------------------------------------------------------------

# A scaled-down Grok layer: width D, ffn F, E experts, grouped-query attention 6:1.
BENCH_DIMS = dict(d=1536, f=4096, e=8, vocab=32768, q_heads=12, kv_heads=2, key_size=128)


def bench_param_shapes(size_gb: float) -> dict:
    """Params shapes {module: {name: (kind, shape)}} with as many layers as fit size_gb.

    kind "f32" for float32 arrays, ("q", blocks) for int8 weights with bf16 scales of
    `blocks` rows; the module paths and the quantization blocks are the real model's.
    """
    d, f, e, v = BENCH_DIMS["d"], BENCH_DIMS["f"], BENCH_DIMS["e"], BENCH_DIMS["vocab"]
    hq, hkv, k = BENCH_DIMS["q_heads"], BENCH_DIMS["kv_heads"], BENCH_DIMS["key_size"]
    layer = {
        "moe/linear": ("w", ("q", 1), (e, d, f)),
        "moe/linear_v": ("w", ("q", 1), (e, d, f)),
        "moe/linear_1": ("w", ("q", 8), (e, f, d)),
        "multi_head_attention/query": ("w", ("q", 1), (d, hq * k)),
        "multi_head_attention/key": ("w", ("q", 1), (d, hkv * k)),
        "multi_head_attention/value": ("w", ("q", 1), (d, hkv * k)),
        "multi_head_attention/linear": ("w", ("q", 8), (hq * k, d)),
        "router": ("w", "f32", (d, e)),
        "rms_norm": ("scale", "f32", (d,)),
        "rms_norm_1": ("scale", "f32", (d,)),
        "rms_norm_2": ("scale", "f32", (d,)),
        "rms_norm_3": ("scale", "f32", (d,)),
    }
    per_layer = sum(np.prod(s) * (4 if kind == "f32" else 1) for _, kind, s in layer.values())
    embed = v * d * 4
    num_layers = max(1, int(round((size_gb * 1e9 - embed) / per_layer)))
    tree = {
        "language_model/in_out_embed": {"embeddings": ("f32", (v, d))},
        "language_model/rms_norm": {"scale": ("f32", (d,))},
    }
    for i in range(num_layers):
        for module, (name, kind, shape) in layer.items():
            tree[f"transformer/decoder_layer_{i}/{module}"] = {name: (kind, shape)}
    return tree


def _random_leaf(rng: np.random.Generator, kind: Any, shape: tuple) -> Any:
    import ml_dtypes

    from model import QuantizedWeight8bit

    if kind == "f32":
        return rng.standard_normal(shape, dtype=np.float32)
    blocks = kind[1]
    weight = np.frombuffer(rng.bytes(int(np.prod(shape))), np.int8).reshape(shape)
    scales = rng.uniform(0.5, 1.5, (*shape[:-2], blocks, shape[-1])).astype(ml_dtypes.bfloat16)
    return QuantizedWeight8bit(weight=weight, scales=scales)


def write_bench_checkpoint(directory: str, size_gb: float, seed: int = 0) -> dict:
    """Writes the random checkpoint with checkpoint.save; returns its description."""
    import checkpoint

    tree = bench_param_shapes(size_gb)
    rng = np.random.default_rng(seed)
    params = {m: {n: _random_leaf(rng, kind, shape) for n, (kind, shape) in p.items()}
              for m, p in tree.items()}
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    start = time.perf_counter()
    files = checkpoint.save(params, directory)
    seconds = time.perf_counter() - start
    size = sum(os.path.getsize(f) for f in files)
    return {"files": len(files), "bytes": size, "write_seconds": seconds,
            "num_layers": sum(1 for m in tree if m.endswith("/router"))}


def checkpoint_files(directory: str) -> list[str]:
    names = sorted(n for n in os.listdir(directory) if n.startswith("tensor"))
    return [os.path.join(directory, n) for n in names]


def drop_page_cache(files: list[str]) -> None:
    """Asks the kernel to evict the files' (clean) pages: POSIX_FADV_DONTNEED per file."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------
# loader: the measured methods (each runs inside a child process)
# ---------------------------------------------------------------------------------------


def run_raw_read(directory: str) -> int:
    """Sequential read of every file, one after the other, into one reused buffer."""
    buf = bytearray(64 * 1024 * 1024)
    view = memoryview(buf)
    total = 0
    for f in checkpoint_files(directory):
        with open(f, "rb", buffering=0) as fh:
            while True:
                n = fh.readinto(view)
                if not n:
                    break
                total += n
    return total


def _shapes_for(directory: str) -> Any:
    """The checkpoint's params shapes, read back from the file headers (no data read)."""
    import jax

    import checkpoint
    from model import QuantizedWeight8bit

    size_gb = sum(os.path.getsize(f) for f in checkpoint_files(directory)) / 1e9
    tree = bench_param_shapes(size_gb)
    import ml_dtypes

    def leaf(kind, shape):
        if kind == "f32":
            return jax.ShapeDtypeStruct(shape, np.float32)
        return QuantizedWeight8bit(
            jax.ShapeDtypeStruct(shape, np.int8),
            jax.ShapeDtypeStruct((*shape[:-2], kind[1], shape[-1]), ml_dtypes.bfloat16))

    shapes = {m: {n: leaf(*v) for n, v in p.items()} for m, p in tree.items()}
    n_files = len(checkpoint_files(directory))
    if len(checkpoint.checkpoint_leaves(shapes)[1]) != n_files:
        raise SystemExit(f"{directory}: {n_files} files do not match the bench layout")
    return shapes


def run_loader(directory: str, to_devices: bool, use_shm: Any, workers: int) -> int:
    import jax

    import checkpoint

    shapes = _shapes_for(directory)
    if to_devices:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
        out = checkpoint.restore(directory, shapes, mesh, num_workers=workers, use_shm=use_shm,
                                 progress=False)
    else:
        paths, leaves, _ = checkpoint.checkpoint_leaves(shapes)
        out = checkpoint.load_tensors(leaves, directory, paths=paths, num_workers=workers,
                                      use_shm=use_shm, progress=False)
    return sum(x.nbytes for x in _leaves(out))


def run_release_method(directory: str, to_devices: bool, workers: int = 32) -> int:
    """The release's loading method, re-implemented: per file a named temporary file in
    /dev/shm, a file copy into it, a plain pickle.load, then removal; 32 threads."""
    import model  # noqa: F401  (pickle resolves model.QuantizedWeight8bit)

    def one(path: str) -> Any:
        fd, tmp = tempfile.mkstemp(dir="/dev/shm")
        try:
            shutil.copyfile(path, tmp)
            with open(tmp, "rb") as fh:
                return pickle.load(fh)
        finally:
            os.remove(tmp)
            os.close(fd)

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        values = list(pool.map(one, checkpoint_files(directory)))
    if to_devices:
        import jax

        device = jax.devices()[0]
        values = jax.block_until_ready(jax.device_put(values, device))
    return sum(x.nbytes for x in _leaves(values))


def _leaves(tree: Any) -> list:
    import jax

    return jax.tree_util.tree_leaves(tree)


def _proc_status(key: str) -> int:
    """VmRSS / VmHWM of this process in bytes (VmHWM, unlike ru_maxrss, starts afresh at exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


METHODS = {
    "raw_read": "raw sequential read (1 thread, 64 MB buffer)",
    "loader_devices": "this loader: restore() to devices, default use_shm='auto'",
    "loader_devices_shm": "this loader: restore() to devices, use_shm=True (copy via /dev/shm)",
    "loader_host": "this loader: load_tensors() to host numpy, default use_shm='auto'",
    "loader_host_shm": "this loader: load_tensors() to host numpy, use_shm=True",
    "release_host": "release method: copy to /dev/shm + pickle.load, 32 threads, host numpy",
    "release_devices": "release method + jax.device_put of all leaves",
}


def loader_child(args: argparse.Namespace) -> None:
    """One measured pass; prints a JSON line."""
    import checkpoint  # noqa: F401  (imports jax, model: outside the timed region)
    import jax

    jax.devices()
    if args.cold:
        drop_page_cache(checkpoint_files(args.dir))
    base_rss = _proc_status("VmRSS")
    start = time.perf_counter()
    m = args.method
    if m == "raw_read":
        nbytes = run_raw_read(args.dir)
    elif m.startswith("loader_"):
        nbytes = run_loader(args.dir, to_devices="devices" in m,
                            use_shm=True if m.endswith("_shm") else "auto", workers=args.workers)
    else:
        nbytes = run_release_method(args.dir, to_devices=m.endswith("devices"))
    seconds = time.perf_counter() - start
    peak = _proc_status("VmHWM")
    print(json.dumps({"method": m, "seconds": seconds, "bytes": nbytes, "base_rss": base_rss,
                      "peak_rss": peak}))


def measure(method: str, directory: str, cold: bool, workers: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "_loader_child", "--dir", directory,
           "--method", method, "--workers", str(workers)] + (["--cold"] if cold else [])
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode:
        raise RuntimeError(f"{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def loader_bench(args: argparse.Namespace) -> dict:
    directory = os.path.abspath(args.dir)
    info = None
    if args.reuse and os.path.isdir(directory) and checkpoint_files(directory):
        files = checkpoint_files(directory)
        info = {"files": len(files), "bytes": sum(os.path.getsize(f) for f in files),
                "write_seconds": None, "reused": True}
    else:
        print(f"writing a ~{args.size_gb} GB checkpoint to {directory} ...", flush=True)
        info = write_bench_checkpoint(directory, args.size_gb, args.seed)
    files = checkpoint_files(directory)
    size = info["bytes"]
    import checkpoint

    fstype = checkpoint.filesystem_type(directory)
    auto = checkpoint._resolve_use_shm("auto", directory)
    info.update(filesystem=fstype, auto_uses_shm=auto)
    print(f"{len(files)} files, {size / 1e9:.3f} GB on {fstype} (use_shm='auto' -> {auto})",
          flush=True)

    results: dict[str, list[dict]] = {}
    warm_results: dict[str, list[dict]] = {}
    # Warm reference read first (pages cached), then every method cold, repeated; methods
    # interleaved so that a slow phase of the disk hits all of them alike.
    warm = measure("raw_read", directory, cold=False, workers=args.workers)
    for _ in range(args.repeats):
        for method in METHODS:
            r = measure(method, directory, cold=True, workers=args.workers)
            results.setdefault(method, []).append(r)
            print(f"  cold {method:<22} {r['seconds']:7.3f} s  {size / 1e9 / r['seconds']:6.2f} GB/s",
                  flush=True)
    if args.warm:  # everything in the page cache: the loaders' own (CPU) cost
        measure("raw_read", directory, cold=False, workers=args.workers)
        for _ in range(args.repeats):
            for method in METHODS:
                r = measure(method, directory, cold=False, workers=args.workers)
                warm_results.setdefault(method, []).append(r)
                print(f"  warm {method:<22} {r['seconds']:7.3f} s", flush=True)

    best = {m: min(rs, key=lambda r: r["seconds"]) for m, rs in results.items()}
    median = {m: float(np.median([r["seconds"] for r in rs])) for m, rs in results.items()}
    raw_gbps = size / 1e9 / best["raw_read"]["seconds"]
    raw_median_gbps = size / 1e9 / median["raw_read"]
    warm_gbps = size / 1e9 / warm["seconds"]
    cache_note = (
        "cold (posix_fadvise DONTNEED took effect: cold raw read is "
        f"{warm_gbps / raw_gbps:.1f}x slower than warm)"
        if warm_gbps > 1.3 * raw_gbps else
        "probably WARM: dropping the page cache with posix_fadvise had no visible effect "
        f"(cold {raw_gbps:.2f} GB/s vs warm {warm_gbps:.2f} GB/s); the disk below may be "
        "cached by the host"
    )
    rows = []
    for m in METHODS:
        r = best[m]
        gbps = size / 1e9 / r["seconds"]
        row = {
            "method": m, "description": METHODS[m], "seconds": r["seconds"], "gb_per_s": gbps,
            "vs_raw": gbps / raw_gbps,
            "median_seconds": median[m],
            "median_vs_raw_median": (size / 1e9 / median[m]) / raw_median_gbps,
            # Per round raw time / method time (measured minutes apart at most), then the
            # median: robust to slow phases of a shared machine.
            "paired_vs_raw": float(np.median([r["seconds"] / x["seconds"] for r, x in
                                              zip(results["raw_read"], results[m])])),
            "vs_release_host": best["release_host"]["seconds"] / r["seconds"],
            "peak_rss_over_size": max((x["peak_rss"] - x["base_rss"]) for x in results[m]) / size,
            "all_seconds": [x["seconds"] for x in results[m]],
        }
        if warm_results:
            ws = min(x["seconds"] for x in warm_results[m])
            row.update(warm_seconds=ws, warm_gb_per_s=size / 1e9 / ws,
                       warm_vs_raw=min(x["seconds"] for x in warm_results["raw_read"]) / ws)
        rows.append(row)
    print()
    print(f"checkpoint: {len(files)} files, {size / 1e9:.3f} GB in {directory} ({fstype}, "
          f"use_shm='auto' -> {auto}); page cache: {cache_note}")
    print(f"warm raw read: {warm_gbps:.2f} GB/s; {args.repeats} cold passes per method: best, "
          "median (vs raw's median), paired (median over rounds of raw s / method s); "
          "peak RSS over the checkpoint size (worst pass)")
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"on {os.cpu_count()} CPUs")
    print(f"{'method':<22} {'best s':>7} {'GB/s':>7} {'x raw':>7} {'median s':>9} {'x raw':>7} "
          f"{'paired':>7} {'x release':>9} {'RSS/size':>9}"
          + ("  warm GB/s  x raw" if warm_results else ""))
    for row in rows:
        print(f"{row['method']:<22} {row['seconds']:7.3f} {row['gb_per_s']:7.2f} "
              f"{row['vs_raw']:7.2f} {row['median_seconds']:9.3f} {row['median_vs_raw_median']:7.2f} "
              f"{row['paired_vs_raw']:7.2f} {row['vs_release_host']:9.2f} {row['peak_rss_over_size']:9.2f}"
              + (f"  {row['warm_gb_per_s']:9.2f} {row['warm_vs_raw']:6.2f}" if warm_results else ""))
    report = {"checkpoint": {**info, "dir": directory, "dims": BENCH_DIMS}, "cache": cache_note,
              "warm_raw_gb_per_s": warm_gbps, "repeats": args.repeats, "workers": args.workers,
              "cpu_count": os.cpu_count(), "load_average_end": os.getloadavg(), "rows": rows}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    if not args.keep:
        shutil.rmtree(directory)
    return report


# ---------------------------------------------------------------------------------------
# model: decode and prefill at Grok-1 width, fast against reference, against the roofline
# ---------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], warmup: int = 2, iters: int = 10, reps: int = 5) -> float:
    """Seconds per call of fn(), which returns arrays: the median over `reps` of `iters` calls
    queued back to back (dispatch overlaps the device work, as in a serving loop) and
    synchronized at the end. Warm-up calls (compilation included) are not timed."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    per_call = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn()
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - start) / iters)
    return statistics.median(per_call)


# --- the two ceilings --------------------------------------------------------------------


def copy_bandwidth(gbytes: float = 1.0) -> float:
    """Bytes/s of a device-to-device elementwise pass over uint32 words (read + written)."""
    x = jax.random.bits(jax.random.key(0), (int(gbytes * 2**30) // 4,), jnp.uint32)
    f = jax.jit(lambda a: a ^ jnp.uint32(0x5A5A5A5A))
    seconds = timed(lambda: f(x), iters=50)
    return 2 * x.nbytes / seconds


def matmul_rate(n: int = 8192) -> float:
    """FLOP/s of an n x n x n bf16 matrix product on random data."""
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: x @ y)
    return 2 * n**3 / timed(lambda: f(a, b), iters=20)


# --- the model -----------------------------------------------------------------------------


def routed_forward(config: model.LanguageModelConfig, mesh: Any = None):
    """Like model.make_forward (cache donated), but also returns every layer's expert choice."""

    def fn(tokens, memory, length):
        experts = []

        def record(method, args, kwargs, context):
            out = method(*args, **kwargs)
            if isinstance(context.module, model.Router) and context.method_name == "__call__":
                experts.append(out[1])
            return out

        with hk.intercept_methods(record):
            out = config.make(mesh=mesh)(tokens, memory, length=length)
        return out, experts

    return jax.jit(hk.without_apply_rng(hk.transform(fn)).apply, donate_argnums=(2,))


def filled_memory(config: model.LanguageModelConfig, batch: int, context: int, cache_len: int,
                  mesh: Any = None) -> model.Memory:
    """A cache holding `context` random keys/values per sequence (step = context)."""
    cfg = config.model
    shardings = None if mesh is None else model.memory_shardings(config, mesh, batch, cache_len)

    def make():
        shape = (batch, cache_len, cfg.num_kv_heads, cfg.key_size)
        layers = []
        for i in range(cfg.num_layers):
            k = jax.random.normal(jax.random.key(100 + i), shape, config.fprop_dtype)
            layers.append(model.KVMemory(k, k * 0.5, jnp.full((batch,), context, jnp.int32)))
        return model.Memory(layers)

    return jax.jit(make, out_shardings=shardings)()


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
                iters: int = 10, tiny: bool = False, json_path: str | None = None,
                mesh_shape: tuple[int, int] | None = None) -> dict:
    """Decode and prefill timings for each mode, with roofline fractions.

    tiny=True swaps in the tiny config and small ceilings: a smoke test for any laptop.
    """
    results: dict = {"device": str(jax.devices()[0].device_kind), "num_devices": jax.device_count(),
                     "layers": layers, "context": context, "prefill_len": prefill_len}
    bw = copy_bandwidth(0.01 if tiny else 1.0)
    flops = matmul_rate(512 if tiny else 8192)
    results.update(copy_bandwidth_GBps=bw / 1e9, matmul_TFLOPs=flops / 1e12)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s", flush=True)

    base = model.tiny_config(num_layers=layers) if tiny else model.grok_1_config(num_layers=layers)
    mesh = None
    if mesh_shape is not None:  # the roofline then assumes every device's bandwidth
        import runners

        mesh = runners.make_mesh(mesh_shape, (1, 1))
        results["mesh"] = dict(mesh.shape)
    devices = 1 if mesh is None else mesh.size
    bw_all = bw * devices
    params = model.init_random_params(base, seed=0, mesh=mesh, on_device=True)
    params = model.prepare_for_inference(params, base)
    jax.block_until_ready(params)
    cache_len = -(-(context + 64) // 128) * 128  # room for the timed steps
    rows, logits = [], {}
    for mode in modes:
        config = dataclasses.replace(base, model=dataclasses.replace(base.model, moe_impl=mode))
        forward = routed_forward(config, mesh)
        for batch in batches:
            tokens = jax.random.randint(jax.random.key(batch), (batch, 1), 4, config.vocab_size)
            length = jnp.ones((batch,), jnp.int32)
            # The first step from the same cache is compared across modes (later steps
            # drift apart as each mode writes its own keys and values).
            first, _ = forward(params, tokens, filled_memory(config, batch, context, cache_len, mesh), length)
            logits[(mode, batch)] = np.asarray(first.logits, np.float32)
            state = {"memory": filled_memory(config, batch, context, cache_len, mesh)}

            def step():
                out, experts = forward(params, tokens, state["memory"], length)
                state["memory"] = out.model_state  # the context grows by one token a step
                return out.logits, experts

            seconds = timed(step, iters=iters)
            _, experts = step()
            need = decode_bytes(params, config, experts, batch, context)
            row = dict(kind="decode", mode=mode, batch=batch, ms=seconds * 1e3, tokens_per_s=batch / seconds,
                       roofline_ms=need / bw_all * 1e3, roofline_pct=100 * need / bw_all / seconds)
            rows.append(row)
            print(row, flush=True)
            save(json_path, results, rows)
            del state

        forward = model.make_forward(config, mesh, donate_memory=True)
        tokens = jax.random.randint(jax.random.key(7), (1, prefill_len), 4, config.vocab_size)
        length = jnp.full((1,), prefill_len, jnp.int32)
        holder = {}

        def prefill():
            holder["m"] = model.init_memory(config, 1, prefill_len, mesh)
            return forward(params, tokens, holder["m"], length).logits

        seconds = timed(prefill, iters=max(3, iters // 2))
        need = prefill_flops(config, prefill_len)
        row = dict(kind="prefill", mode=mode, batch=1, tokens=prefill_len, ms=seconds * 1e3,
                   tokens_per_s=prefill_len / seconds, roofline_ms=need / (flops * devices) * 1e3,
                   roofline_pct=100 * need / (flops * devices) / seconds)
        rows.append(row)
        print(row, flush=True)
        save(json_path, results, rows)

    if len(modes) > 1:  # the kernels checked against the release's algorithm, end to end
        for batch in batches:
            a, b = logits[(modes[0], batch)], logits[(modes[1], batch)]  # [B, 1, V]
            err = float(np.linalg.norm(a - b) / np.linalg.norm(b))
            rows_err = np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)
            results.setdefault("fast_vs_reference_row_rel_l2_median", {})[batch] = float(np.median(rows_err))
            results.setdefault("fast_vs_reference_rel_l2", {})[batch] = err
            results.setdefault("nan", {})[batch] = bool(np.isnan(a).any() or np.isnan(b).any())
        print("fast vs reference, first decode step: relative L2", results["fast_vs_reference_rel_l2"],
              "median over rows", results["fast_vs_reference_row_rel_l2_median"], "NaN", results["nan"], flush=True)
    results["rows"] = rows
    save(json_path, results, rows)
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


def format_model_table(results: dict) -> str:
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


def model_bench(args: argparse.Namespace) -> dict:
    mesh = tuple(int(n) for n in args.mesh.split("x")) if args.mesh else None
    res = bench_model(args.layers, [int(b) for b in args.batches.split(",")], args.context, args.prefill,
                      args.modes.split(","), args.iters, args.tiny, args.json, mesh)
    if args.compile_layers:
        res["compile"] = compile_times(args.compile_layers)
        save(args.json, res, res["rows"])
    print(format_model_table(res))
    return res


# ---------------------------------------------------------------------------------------
# precision: the model against the float64 reference
# ---------------------------------------------------------------------------------------

PRECISION_LAYERS = {"first": 0, "last": -1}


def _fmt(x: float) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.2e}"


def precision_bench(args: argparse.Namespace) -> dict:
    """The study of issue 12; prints markdown tables, writes everything to --json."""
    from tests import precision as pr, reference  # the recipe, the traces, the float64 reference

    configs = [c.strip() for c in args.configs.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    bad = [f"unknown config {c!r} (expected some of {sorted(pr.RECIPES)})" for c in configs if c not in pr.RECIPES]
    bad += [f"unknown MoE mode {m!r} (expected some of {model.MOE_IMPLS})" for m in modes if m not in model.MOE_IMPLS]
    if bad or args.seeds < 1:
        print(f"bench.py precision: {'; '.join(bad) or '--seeds must be >= 1'}", file=sys.stderr)
        sys.exit(2)
    device = jax.devices()[0]
    out: dict = {"device": f"{device.platform}: {device.device_kind}", "jax": jax.__version__,
                 "configs": configs, "modes": modes, "seeds": args.seeds, "runs": {}, "ops": {}, "ablation": {}}
    print(f"# precision on {out['device']}, jax {jax.__version__}", flush=True)

    # 1. p90 of the logits over seeds.
    lines = ["| config | MoE mode | prefill p90 (median, min-max) | decode p90 (median) | "
             "prefill p90, model's routing | decode p90, model's routing | routing flips (median) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    first: dict = {}
    for name in configs:
        for seed in range(args.seeds):
            r = pr.make_recipe(name, seed)
            if seed == 0:
                first[name] = r
            params = pr.to_device(r.params)
            for mode in modes:
                out["runs"][f"{name}|{mode}|{seed}"] = pr.measure(r, mode, params)
                print(name, mode, "seed", seed, out["runs"][f"{name}|{mode}|{seed}"], flush=True)
        for mode in modes:
            runs = [out["runs"][f"{name}|{mode}|{s}"] for s in range(args.seeds)]
            get = lambda kind, key: [run[kind][key] for run in runs]
            med = lambda v: float(np.median(v))
            lines.append(
                f"| {name} | {mode} | {_fmt(med(get('prefill', 'p90')))} ({_fmt(min(get('prefill', 'p90')))}-"
                f"{_fmt(max(get('prefill', 'p90')))}) | {_fmt(med(get('decode', 'p90')))} | "
                f"{_fmt(med(get('prefill', 'p90_same_routing')))} | {_fmt(med(get('decode', 'p90_same_routing')))} | "
                f"{med(get('prefill', 'flips')):.0f} of {len(r.experts) * int(r.valid.sum())} |")
        save_json(args.json, out)
    table = "\n".join(lines)
    print(table, flush=True)

    # 2. Per op, first and last layer, seed 0, against float64 with the model's routing.
    for name in configs:
        r = first[name]
        params = pr.to_device(r.params)
        num_layers = len(r.experts)
        head = "| op | " + " | ".join(f"{mode} L{PRECISION_LAYERS[w] % num_layers}" for mode in modes
                                       for w in PRECISION_LAYERS) + " |"
        rows = {}
        for mode in modes:
            got = pr.model_trace(pr.recipe_config(name, mode), params, r.tokens)
            experts = np.stack([got[f"layer_{i}/experts"] for i in range(num_layers)])
            want = reference.trace(r.exact, pr.recipe_config(name), r.tokens, experts=experts)
            ops = pr.compare_traces(got, want, r.valid, num_layers)
            out["ops"][f"{name}|{mode}"] = ops
            for op, row in ops.items():
                if len(row) == 1:  # before the first layer, or after the last
                    vals = [row[0], np.nan] if op == "embed" else [np.nan, row[0]]
                else:
                    vals = [row[PRECISION_LAYERS[w]] for w in PRECISION_LAYERS]
                rows.setdefault(op, []).extend(vals)
        print(f"\n{name}, seed 0: p90 relative error per op vs float64 (same routing)", flush=True)
        print(head + "\n|---|" + "---:|" * (len(modes) * len(PRECISION_LAYERS)), flush=True)
        for op, vals in rows.items():
            print(f"| {op} | " + " | ".join(_fmt(v) for v in vals) + " |", flush=True)
        save_json(args.json, out)

    # 3. What each rounding point costs (reference emulation, float64's routing). Numpy on
    # the host only: the same on every machine (--ablation-seeds 0 skips it).
    for name in configs if args.ablation_seeds > 0 else []:
        costs = [pr.ablation(pr.make_recipe(name, seed).exact, pr.recipe_config(name),
                             pr.padded_tokens(seed=seed + 1)) for seed in range(args.ablation_seeds)]
        out["ablation"][name] = costs
        print(f"\n{name}: reference emulation, p90 logits error (median of {args.ablation_seeds} seeds)", flush=True)
        print("| rounding at | only this point | every point but this |\n|---|---:|---:|")
        for point in costs[0]:
            only = float(np.median([c[point]["only"] for c in costs]))
            but = float(np.median([c[point].get("all but", np.nan) for c in costs]))
            print(f"| {point} | {_fmt(only)} | {_fmt(but)} |", flush=True)
        save_json(args.json, out)
    return out


def save_json(path: str | None, results: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


def kernels_bench(args: argparse.Namespace) -> None:
    import kernel_bench  # the kernel micro-benchmarks and tuning sweeps live in their own module

    sys.argv = ["kernel_bench.py", *args.rest]
    kernel_bench.main()


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("loader", help="checkpoint loading speed vs raw reads and the release")
    p.add_argument("--dir", required=True, help="where to write the bench checkpoint (local disk)")
    p.add_argument("--size-gb", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=2, help="cold passes per method (best is reported)")
    p.add_argument("--workers", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--reuse", action="store_true", help="reuse a checkpoint already in --dir")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    p.add_argument("--warm", action="store_true",
                   help="also measure every method with the files in the page cache")
    p.set_defaults(func=loader_bench)

    p = sub.add_parser("model", help="decode/prefill at Grok-1 width, fast vs reference, vs roofline")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batches", default="1,8,32", help="decode batch sizes")
    p.add_argument("--context", type=int, default=1024, help="tokens already in the KV cache when decoding")
    p.add_argument("--prefill", type=int, default=1024, help="prompt length of the prefill")
    p.add_argument("--modes", default="fast,reference")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--compile-layers", type=int, default=64,
                   help="layers of the abstract compile-time check (0 skips it)")
    p.add_argument("--tiny", action="store_true", help="tiny config: a smoke test on any machine")
    p.add_argument("--mesh", default=None, help="DATAxMODEL mesh over the local devices, e.g. 1x2 "
                                                 "(default: one device, no mesh)")
    p.add_argument("--json", default="bench_model.json", help="write the results here")
    p.set_defaults(func=model_bench)

    p = sub.add_parser("precision", help="bf16 precision vs the float64 reference (issue 12)")
    p.add_argument("--configs", default="2 layers,12 layers", help="recipes, comma-separated")
    p.add_argument("--modes", default="fast,reference", help="MoE modes, comma-separated")
    p.add_argument("--seeds", type=int, default=5, help="random models per recipe (p90 table)")
    p.add_argument("--ablation-seeds", type=int, default=3,
                   help="models per recipe for the rounding costs (host numpy; 0 skips them)")
    p.add_argument("--json", default=None, help="write every number here")
    p.set_defaults(func=precision_bench)

    p = sub.add_parser("kernels", help="GPU kernel checks, micro-benchmarks and tuning sweeps "
                                       "(arguments go to kernel_bench.py; see --help there)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=kernels_bench)

    c = sub.add_parser("_loader_child", help=argparse.SUPPRESS)
    c.add_argument("--dir", required=True)
    c.add_argument("--method", choices=sorted(METHODS), required=True)
    c.add_argument("--workers", type=int, default=32)
    c.add_argument("--cold", action="store_true")
    c.set_defaults(func=loader_child)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
