"""Benchmarks. Subcommands:

  model    decode steps at batch 1, 8 and 32 with a filled KV cache and a 1024-token prefill
           on a model of Grok-1 width with N layers of random int8 weights made on the
           device, for the fast and the reference (release) MoE, against the roofline:
           the bytes a step must read over the measured copy bandwidth (decode), the top-k
           FLOPs over the measured bf16 matmul rate (prefill). Start-up is split into weight
           creation, lowering and compilation of each program. Also the time to compile the
           runner's prefill and decode steps of the full 64-layer model, sharded over --mesh
           (abstract shapes, nothing allocated). Programs go to JAX's persistent compilation
           cache (--compile-cache; default ~/.cache/grok1/jax), so a second run reuses them.
           python bench.py model --layers 4 --json bench_model.json

  profile  a jax.profiler trace of decode steps: the device's kernels per step and per layer,
           and the host's side (XLA's CUDA-graph updates and launches, argument handling):
           python bench.py profile --layers 4 --mesh 1x2 --json prof.json

  project  arithmetic, no devices: per-layer decode times measured on 1 and 2 devices (given,
           or fitted from `model --json` files at 2 layer counts) -> t(n) = F + V/n -> a
           64-layer step and tokens/s at batch 1, 8, 32 on N devices, beside the roofline,
           each step bounded by the host's measured time to enqueue it:
           python bench.py project --devices 8 --device-kind h200 --measured 1=1:0.59,2:0.45
           python bench.py project --devices 8 --from-json l2.json l8.json l2_1x2.json l8_1x2.json

  depth    start-up (cold and warm compilation cache), per-layer decode cost and peak memory
           against the planner at several depths: run.py --random-weights and `bench.py model`
           in fresh processes, repeated and interleaved; medians and spreads.
           python bench.py depth --layers 8,16,32,48 --repeats 3 --mesh 1x2

  kernels  the GPU kernels alone (kernel_bench.py): checks against XLA and float32,
           one MoE layer at 1, 8, 32 and 1024 tokens, tuning sweeps.

  activations  the decode-size ops that take float32 activations (model.activation_dtype:
           the MoE kernels, the q/k projections, the unembedding, XLA attention), timed with
           bf16 and with float32 inputs in one process (issue 12):
           python bench.py activations --json $OUT/activations.json

  memory   the planner's per-device memory against JAX's peak for the runner's compiled
           prefill and decode steps on the devices present (zero weights):
           python bench.py memory --layers 2 --batch 1 --context 8192 [--mesh 1x4]
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
           release's method (copy each file to /dev/shm, plain pickle.load, 32 threads);
           --methods picks some. loader_devices_started makes the process's first
           host->device transfer (a one-time start-up) before the timed load.

Each measured pass runs in a fresh child process so that its peak resident memory can be
reported next to its speed.

  serve    N streaming clients against the HTTP server (server.py) in a child process, on the
           tiny demo model (--tiny, CPU) or a Grok-1-width model of --layers layers with
           random int8 weights made on the device, in --rounds windows of --seconds. After
           each window (no request in flight) the same server process measures its engine at
           the same batch: back-to-back decode steps with different requests in the slots
           (what `model` measures), the same with one request repeated, synchronous engine
           steps, and the serving loop without HTTP. Reports requests/s, output tokens/s
           (the server's own count), p50/p99 time to first token and per output token, the
           host CPU per generated token of the event loop and of the engine thread, and
           per round the ratio to the engine's rates just before and after; medians.
           --contention 0.2,0.4 adds the engine's decode rate beside a process that keeps a
           core busy (on a CPU the model and the server's host work share the cores).
           python bench.py serve --tiny --slots 8 --clients 16 --rounds 6 --seconds 6
           python bench.py serve --layers 4 --slots 32 --clients 64 --rounds 5 --seconds 10 --json bench_out/serve.json

  python bench.py loader --dir /tmp/ckpt_bench --size-gb 2 --json bench_out/loader.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import pickle
import platform
import re
import shutil
import signal
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
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import kernels
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


def start_transfers() -> float:
    """A process's first host->device transfer, timed: one byte onto the first device.

    On an H200 (jax 0.11.2) this start-up took 1.3-1.6 s, once per process (started on a
    thread beside the loader's reads, it held them up just as much); after it, restore()
    onto the GPU ran at 96% of the host rate (BENCHMARKS.md, session 6).
    """
    import jax

    start = time.perf_counter()
    jax.block_until_ready(jax.device_put(np.zeros((1,), np.int8), jax.devices()[0]))
    return time.perf_counter() - start


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


def host_info() -> dict:
    """The measuring host's CPU model and count. The host's share of a result depends on it:
    the same decode step took 0.8, 1.4 and 2.2 ms to enqueue on three H200 hosts."""
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:  # not Linux
        pass
    return {"cpu": name or platform.processor() or "unknown", "cpus": os.cpu_count()}


METHODS = {
    "raw_read": "raw sequential read (1 thread, 64 MB buffer)",
    "loader_devices": "this loader: restore() to devices, default use_shm='auto'",
    "loader_devices_shm": "this loader: restore() to devices, use_shm=True (copy via /dev/shm)",
    "loader_devices_started": "this loader: restore() to devices, after the process's first "
                              "transfer (its one-time start-up timed apart)",
    "loader_host": "this loader: load_tensors() to host numpy, default use_shm='auto'",
    "loader_host_shm": "this loader: load_tensors() to host numpy, use_shm=True",
    "release_host": "release method: copy to /dev/shm + pickle.load, 32 threads, host numpy",
    "release_devices": "release method + jax.device_put of all leaves",
}


def loader_child(args: argparse.Namespace) -> None:
    """One measured pass; prints a JSON line (with the loader's own log lines)."""
    import logging

    import checkpoint  # noqa: F401  (imports jax, model: outside the timed region)
    import jax

    device = jax.devices()[0]  # the platform jax picks: the GPU where there is one
    log: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: log.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("checkpoint").addHandler(handler)
    logging.getLogger("checkpoint").setLevel(logging.INFO)
    m = args.method
    startup = start_transfers() if m == "loader_devices_started" else None
    if args.cold:
        drop_page_cache(checkpoint_files(args.dir))
    base_rss = _proc_status("VmRSS")
    start = time.perf_counter()
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
                      "peak_rss": peak, "transfer_startup_s": startup, "platform": device.platform,
                      "device": getattr(device, "device_kind", str(device)), "log": log}))


def measure(method: str, directory: str, cold: bool, workers: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "_loader_child", "--dir", directory,
           "--method", method, "--workers", str(workers)] + (["--cold"] if cold else [])
    # JAX_PLATFORMS is left as the caller has it: unset, jax picks the GPU where there is one,
    # so "onto devices" means onto the GPU (JAX_PLATFORMS=cpu measures onto CPU devices).
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise RuntimeError(f"{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def loader_bench(args: argparse.Namespace) -> dict:
    methods = ["raw_read"] + [m for m in args.methods.split(",") if m and m != "raw_read"]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"bench.py loader: unknown --methods {', '.join(unknown)}; "
                         f"choose from {', '.join(METHODS)}")
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
    info.update(platform=warm["platform"], device=warm["device"])
    print(f"onto devices = onto {warm['device']} ({warm['platform']}; JAX_PLATFORMS="
          f"{os.environ.get('JAX_PLATFORMS', '(unset: jax picks)')})", flush=True)
    for _ in range(args.repeats):
        for method in methods:
            r = measure(method, directory, cold=True, workers=args.workers)
            results.setdefault(method, []).append(r)
            placing = [line.split("; ", 1)[1] for line in r.get("log", []) if "; placing:" in line]
            first = r.get("transfer_startup_s")
            print(f"  cold {method:<22} {r['seconds']:7.3f} s  {size / 1e9 / r['seconds']:6.2f} GB/s"
                  + (f"  ({placing[0]})" if placing else "")
                  + (f"  (first transfer before it: {first:.2f} s)" if first is not None else ""),
                  flush=True)
    if args.warm:  # everything in the page cache: the loaders' own (CPU) cost
        measure("raw_read", directory, cold=False, workers=args.workers)
        for _ in range(args.repeats):
            for method in methods:
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
    release = best.get("release_host")
    for m in methods:
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
            "vs_release_host": release["seconds"] / r["seconds"] if release else None,
            "peak_rss_over_size": max((x["peak_rss"] - x["base_rss"]) for x in results[m]) / size,
            "all_seconds": [x["seconds"] for x in results[m]],
            "transfer_startup_s": [x.get("transfer_startup_s") for x in results[m]],
        }
        if warm_results:
            ws = min(x["seconds"] for x in warm_results[m])
            row.update(warm_seconds=ws, warm_gb_per_s=size / 1e9 / ws,
                       warm_vs_raw=min(x["seconds"] for x in warm_results["raw_read"]) / ws)
        rows.append(row)
    print()
    print(f"checkpoint: {len(files)} files, {size / 1e9:.3f} GB in {directory} ({fstype}, "
          f"use_shm='auto' -> {auto}); page cache: {cache_note}; devices: {info['device']} "
          f"({info['platform']})")
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
              f"{row['paired_vs_raw']:7.2f} "
              + (f"{row['vs_release_host']:9.2f}" if row["vs_release_host"] else f"{'-':>9}")
              + f" {row['peak_rss_over_size']:9.2f}"
              + (f"  {row['warm_gb_per_s']:9.2f} {row['warm_vs_raw']:6.2f}" if warm_results else ""))
    # Issue 11's target: restore() onto the devices at >= 90% of the best rate to host memory.
    hosts = [m for m in ("loader_host", "loader_host_shm") if m in best]
    host = min(hosts, key=lambda m: best[m]["seconds"]) if hosts else None
    onto = {}
    for m in [m for m in ("loader_devices", "loader_devices_shm", "loader_devices_started")
              if m in best and host]:
        onto[m] = {"vs_best_host": best[host]["seconds"] / best[m]["seconds"],
                   "paired_vs_best_host": float(np.median([h["seconds"] / x["seconds"] for h, x in
                                                           zip(results[host], results[m])]))}
        print(f"{m} ({info['device']}): {100 * onto[m]['vs_best_host']:.0f}% of the best host rate "
              f"({host}, {size / 1e9 / best[host]['seconds']:.2f} GB/s); paired "
              f"{100 * onto[m]['paired_vs_best_host']:.0f}%")
    report = {"checkpoint": {**info, "dir": directory, "dims": BENCH_DIMS}, "cache": cache_note,
              "best_host_method": host, "onto_devices": onto,
              "warm_raw_gb_per_s": warm_gbps, "repeats": args.repeats, "workers": args.workers,
              "host": host_info(), "load_average_end": os.getloadavg(), "rows": rows}
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


TIMED_WARMUP, TIMED_REPS, DISPATCH_REPS = 2, 5, 10


def timed(fn: Callable[[], Any], warmup: int = TIMED_WARMUP, iters: int = 10, reps: int = TIMED_REPS) -> float:
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


def dispatch_time(fn: Callable[[], Any], reps: int = DISPATCH_REPS) -> float:
    """Seconds the host spends in one call of fn() (already compiled) before it returns, with
    the device idle (each call waits for the one before): the work of enqueueing the program
    (on a GPU: reading the arguments, updating and launching its CUDA graphs), which a step
    cannot go below however fast the devices are."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
        jax.block_until_ready(out)
    return statistics.median(times)


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


def _whole(mesh: Any) -> Any:
    """An array whole on every device of `mesh` (without one: committed to the first device,
    as a jitted step's outputs are, so that its calls are one program)."""
    return NamedSharding(mesh, P()) if mesh is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])


def routed_forward(config: model.LanguageModelConfig, mesh: Any = None, memory_sharding: Any = None):
    """forward(params, tokens, memory, length, into=None) -> (LanguageModelOutput, experts):
    model.make_forward with the cache donated, also returning every layer's expert choice:
    the experts [B, T, k], or where the route kernel chooses them inside the MoE
    (kernels.route) the router's logits [B, T, E] it chose from, or {"logit_parts": [P, B*T,
    E]} where the junction kernel made them as partial sums (decode_bytes takes each; the
    parts are added on the host, so the step runs no kernel the runner's does not).

    `into`: the (logits, experts) of the call before (or blank_outputs()), donated and
    written over. Then the step returns no fresh buffer, as the runner's decode step
    (runners.DecodeStep): a fresh output moves between calls and XLA shares its allocation
    with temporaries, so the step's CUDA graphs would be updated at every call.

    memory_sharding (with a mesh): the cache's, as filled_memory places it; the step returns
    it so placed (the logits and experts replicated), and its calls are one program. Left to
    XLA, the cache comes back in an equivalent but unequal sharding and the second call
    compiles again."""

    def fn(tokens, memory, length, into=None):
        del into  # only donated: the outputs are written over it
        experts, depth = [], [0]

        def record(method, args, kwargs, context):
            if (isinstance(context.module, model.MoELayer) and context.method_name == "__call__"
                    and kwargs.get("logits") is not None):  # made by the junction kernel, as partial sums
                experts.append({"logit_parts": kwargs["logits"]})
                return method(*args, **kwargs)
            if not isinstance(context.module, model.Router) or context.method_name not in ("__call__", "logits"):
                return method(*args, **kwargs)
            depth[0] += 1  # Router.__call__ calls Router.logits
            out = method(*args, **kwargs)
            depth[0] -= 1
            if context.method_name == "__call__":
                experts.append(out[1])
            elif depth[0] == 0:  # the logits alone: the route kernel picks the experts
                experts.append(out)
            return out

        with hk.intercept_methods(record):
            out = config.make(mesh=mesh)(tokens, memory, length=length)
        return out, experts

    out_shardings = None
    if mesh is not None and memory_sharding is not None:
        out_shardings = (model.LanguageModelOutput(logits=_whole(mesh), model_state=memory_sharding), _whole(mesh))
    return jax.jit(hk.without_apply_rng(hk.transform(fn)).apply, donate_argnums=(2, 4), keep_unused=True,
                   out_shardings=out_shardings)


def in_place_step(forward: Any, params: Any, tokens: jax.Array, length: jax.Array, memory: model.Memory,
                  into: tuple) -> Callable[[], tuple]:
    """step() -> (logits, experts): routed_forward's next decode step from `memory` (the
    context grows by one token a step), written over the cache and the outputs of the step
    before (`into` at first), as the runner's decode step is."""
    state = {"memory": memory, "into": into}

    def step():
        out, experts = forward(params, tokens, state["memory"], length, state["into"])
        state["memory"], state["into"] = out.model_state, (out.logits, experts)
        return state["into"]

    return step


def blank_outputs(forward: Any, mesh: Any, *args: Any) -> tuple:
    """Zeros for routed_forward's `into` at its first call with args (params, tokens, memory,
    length): (logits, experts), replicated as the step returns them."""
    out, experts = forward.eval_shape(*args)
    return jax.tree_util.tree_map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), _whole(mesh)),
                                  (out.logits, experts))


def _cache_sharding(config: model.LanguageModelConfig, mesh: Any, batch: int, cache_len: int) -> Any:
    """The cache's shardings on `mesh` (None without one), as filled_memory places it."""
    return None if mesh is None else model.memory_shardings(config, mesh, batch, cache_len)


def filled_memory(config: model.LanguageModelConfig, batch: int, context: int, cache_len: int,
                  mesh: Any = None) -> model.Memory:
    """A cache holding `context` random keys/values per sequence (step = context).

    One small program makes a layer's cache and runs once per layer: one program for all
    layers took minutes to compile on the 1x2 mesh of 2 x H200 at 32 and 48 layers
    (XLA's slow-compile alarm named it, 2026-11-30). The values are the same either way."""
    cfg = config.model
    # Placed (committed) as the step's outputs will be, so that its first call and the
    # later ones are one program.
    shardings = _whole(None) if mesh is None else _cache_sharding(config, mesh, batch, cache_len).layers[0]
    shape = (batch, cache_len, cfg.num_kv_heads, cfg.key_size)

    def make(key):
        k = jax.random.normal(key, shape, config.fprop_dtype)
        return model.KVMemory(k, k * 0.5, jnp.full((batch,), context, jnp.int32))

    make_layer = jax.jit(make, out_shardings=shardings)
    return model.Memory([make_layer(jax.random.key(100 + i)) for i in range(cfg.num_layers)])


def weight_bytes(leaf: Any) -> int:
    """Bytes of a leaf (array or jax.ShapeDtypeStruct); a quantized weight: int8 + scales."""
    if isinstance(leaf, model.QuantizedWeight8bit):
        return weight_bytes(leaf.weight) + weight_bytes(leaf.scales)
    return math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize


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
        if isinstance(chosen, dict):  # routed_forward: the junction's partial sums of the logits
            chosen = np.sum(np.asarray(chosen["logit_parts"], np.float64), axis=0)
        chosen = np.asarray(chosen)
        if chosen.dtype.kind == "f":  # the router's logits (routed_forward): their top k
            chosen = np.argsort(-chosen, axis=-1, kind="stable")[..., :config.model.num_selected_experts]
        touched = len(np.unique(chosen))
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


def device_share(config: model.LanguageModelConfig, n: int) -> model.LanguageModelConfig:
    """One device's part of a 1xN mesh as a model of its own: 1/N of the query and KV heads,
    of the experts' width and of the vocabulary; the residual stream as wide as before (the
    fast path keeps it whole on every model shard). On one device it runs the local work of a
    sharded decode step without its collectives, at the sizes N devices would each have."""
    cfg = config.model
    share = dataclasses.replace(cfg, num_q_heads=cfg.num_q_heads // n, num_kv_heads=cfg.num_kv_heads // n,
                                widening_factor=cfg.widening_factor / n)
    if (n < 1 or cfg.num_q_heads % n or cfg.num_kv_heads % n or config.vocab_size % n
            or share.ffn_size != cfg.ffn_size // n):
        raise ValueError(f"--share {n}: needs n >= 1 dividing the {cfg.num_q_heads} query and {cfg.num_kv_heads} "
                         f"KV heads, the vocabulary ({config.vocab_size}) and the experts' width ({cfg.ffn_size})")
    return dataclasses.replace(config, vocab_size=config.vocab_size // n, model=share).initialize()


def bench_config(layers: int, tiny: bool, share: int | None = None,
                 mesh_shape: tuple[int, int] | None = None) -> model.LanguageModelConfig:
    """The model a bench runs: Grok-1 width (tiny: the tiny config) at `layers` layers, or one
    device's share of a 1x`share` mesh (device_share), which runs on one device only."""
    config = model.tiny_config(num_layers=layers) if tiny else model.grok_1_config(num_layers=layers)
    if share is None:
        return config
    if mesh_shape is not None:
        raise ValueError("--share runs one device's share on one device: leave --mesh out")
    return device_share(config, share)


def bench_params(config: model.LanguageModelConfig, mesh: Mesh | None = None, share: int | None = None) -> dict:
    """Random weights of a bench's model, drawn on its devices. A share's row-blocked weights
    (the attention's output projection, the experts' down projection) get the scale blocks
    one device of a 1x`share` mesh holds: 1/share of the release's."""
    blocks = model.RELEASE_SCALE_BLOCKS // (share or 1)
    return model.init_random_params(config, seed=0, mesh=mesh, scale_blocks=blocks, on_device=True)


def bench_model(layers: int, batches: list[int], context: int, prefill_len: int, modes: list[str],
                iters: int = 10, tiny: bool = False, json_path: str | None = None,
                mesh_shape: tuple[int, int] | None = None, cache_len: int | None = None,
                share: int | None = None) -> dict:
    """Decode and prefill timings for each mode, with roofline fractions.

    cache_len: positions of the decode KV cache (default: the context plus room for the timed
    steps); a larger one shows whether a step's cost follows the tokens or the capacity.
    share: time device_share(config, share) on one device instead (no mesh): what each of
    `share` devices computes, without the collectives.

    tiny=True swaps in the tiny config and small ceilings: a smoke test for any laptop.
    """
    results: dict = {"device": str(jax.devices()[0].device_kind), "num_devices": jax.device_count(),
                     "host": host_info(), "layers": layers, "context": context, "prefill_len": prefill_len}
    bw = copy_bandwidth(0.01 if tiny else 1.0)
    flops = matmul_rate(512 if tiny else 8192)
    results.update(copy_bandwidth_GBps=bw / 1e9, matmul_TFLOPs=flops / 1e12)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s; host "
          f"{results['host']['cpu']} ({results['host']['cpus']} CPUs)", flush=True)

    import runners

    base = bench_config(layers, tiny, share, mesh_shape)
    if share is not None:
        results["share"] = share
    mesh = None
    if mesh_shape is not None:  # the roofline then assumes every device's bandwidth
        mesh = runners.make_mesh(mesh_shape, (1, 1))
        results["mesh"] = dict(mesh.shape)
    devices = 1 if mesh is None else mesh.size
    bw_all = bw * devices
    start = time.perf_counter()
    raw = bench_params(base, mesh, share)
    # Each mode gets the layouts its own runner would (the reference mode keeps the
    # checkpoint's int8 layout); without the reference mode the conversion is in place.
    prepared = {mode: model.prepare_for_inference(raw, model.with_moe_impl(base, mode),
                                                  consume=modes == ["fast"]) for mode in modes}
    del raw
    jax.block_until_ready(prepared)
    results["weights_s"] = time.perf_counter() - start
    print(f"weights: {layers} layers made on the devices in {results['weights_s']:.1f} s", flush=True)
    # Room for every step a batch takes: timed()'s, dispatch_time()'s and the routing step.
    steps = TIMED_WARMUP + TIMED_REPS * iters + DISPATCH_REPS + 1
    cache_len = cache_len or -(-(context + steps) // 128) * 128
    results["cache_len"] = cache_len
    rows, logits = [], {}
    for mode in modes:
        config, params = model.with_moe_impl(base, mode), prepared[mode]
        for batch in batches:
            forward = routed_forward(config, mesh, _cache_sharding(config, mesh, batch, cache_len))
            tokens = jax.random.randint(jax.random.key(batch), (batch, 1), 4, config.vocab_size)
            length = jnp.ones((batch,), jnp.int32)
            # The first step from the same cache is compared across modes (later steps
            # drift apart as each mode writes its own keys and values).
            memory = filled_memory(config, batch, context, cache_len, mesh)
            into = blank_outputs(forward, mesh, params, tokens, memory, length)
            startup = runners.timed_compile(forward, params, tokens, memory, length, into)
            first, experts = forward(params, tokens, memory, length, into)
            logits[(mode, batch)] = np.asarray(first.logits, np.float32)
            into = first.logits, experts
            del first  # its cache
            step = in_place_step(forward, params, tokens, length,
                                 filled_memory(config, batch, context, cache_len, mesh), into)
            seconds = timed(step, iters=iters)
            dispatch = dispatch_time(step)
            _, experts = step()
            need = decode_bytes(params, config, experts, batch, context)
            row = dict(kind="decode", mode=mode, batch=batch, ms=seconds * 1e3, tokens_per_s=batch / seconds,
                       roofline_ms=need / bw_all * 1e3, roofline_pct=100 * need / bw_all / seconds,
                       dispatch_ms=dispatch * 1e3, **startup)
            rows.append(row)
            print(row, flush=True)
            save(json_path, results, rows)
            del step  # the cache goes before the next batch's

        if prefill_len <= 0:
            continue
        forward = model.make_forward(config, mesh, donate_memory=True)
        tokens = jax.random.randint(jax.random.key(7), (1, prefill_len), 4, config.vocab_size)
        length = jnp.full((1,), prefill_len, jnp.int32)
        holder = {}

        def prefill():
            holder["m"] = model.init_memory(config, 1, prefill_len, mesh)
            return forward(params, tokens, holder["m"], length).logits

        startup = runners.timed_compile(forward, params, tokens, model.init_memory(config, 1, prefill_len, mesh),
                                        length)
        seconds = timed(prefill, iters=max(3, iters // 2))
        need = prefill_flops(config, prefill_len)
        row = dict(kind="prefill", mode=mode, batch=1, tokens=prefill_len, ms=seconds * 1e3,
                   tokens_per_s=prefill_len / seconds, roofline_ms=need / (flops * devices) * 1e3,
                   roofline_pct=100 * need / (flops * devices) / seconds, **startup)
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


def compile_times(layers: int = 64, batch: int = 8, prefill_len: int = 1024, cache_len: int = 8192,
                  mesh_shape: tuple[int, int] | None = None) -> dict:
    """Seconds to lower and compile the runner's prefill (one prompt of prefill_len tokens) and
    decode (batch slots of cache_len) steps of Grok-1 with `layers` layers, sharded over the
    mesh (default 1x1, one device): what run.py compiles, from abstract shapes, nothing
    allocated."""
    import runners

    config = dataclasses.replace(model.grok_1_config(num_layers=layers), sequence_len=cache_len).initialize()
    mesh = runners.make_mesh(mesh_shape or (1, 1), (1, 1))
    prefill, decode = runners.make_step_functions(config, mesh, batch)
    params, memory, state = runners.abstract_step_inputs(config, mesh, batch)
    times = runners.compile_steps(prefill, decode, params, memory, state, config, batch, [prefill_len])
    out = {"prefill": times[f"prefill {prefill_len}"], "decode": times["decode"], "mesh": dict(mesh.shape)}
    for name in ("prefill", "decode"):
        print(f"compile {layers} layers {name} on mesh {dict(mesh.shape)}: lower {out[name]['lower_s']:.1f}s, "
              f"compile {out[name]['compile_s']:.1f}s", flush=True)
    return out


def _newest_trace(trace_dir: str) -> Any:
    """The jax.profiler ProfileData of the newest trace under trace_dir."""
    import glob

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        raise RuntimeError(f"no *.xplane.pb written under {trace_dir}")
    return jax.profiler.ProfileData.from_file(files[-1])


_HLO_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = ')
_DECODER_LAYER = re.compile(r'op_name="[^"]*?decoder_layer_(\d+)/')


def _hlo_op_layers(hlo_text: str) -> dict[str, int | None]:
    """{HLO instruction name: its decoder layer, or None outside the layers} for every
    instruction of a compiled program's text, by the source in its op_name metadata."""
    out: dict[str, int | None] = {}
    for line in hlo_text.splitlines():
        m = _HLO_INSTRUCTION.match(line)
        if m:
            layer = _DECODER_LAYER.search(line)
            out[m.group(1)] = int(layer.group(1)) if layer else None
    return out


def _place_runs(events: Any, op_layers: dict[str, int | None]) -> dict:
    """{kernel/op name: [count, total ns, in_layers]} of one trace line's events, given as
    (name, duration ns, stats). A run is placed by the HLO instruction it ran: its "hlo_op"
    stat (XLA on a CPU), else its own name, which on a GPU is the fusion instruction's with
    '.' and '-' made '_' (inside a CUDA graph every kernel's hlo_op names the graph; Pallas
    kernels carry their own names and are not placed). in_layers: of the runs placed, the
    share inside a decoder layer; None where none was placed, and on a line whose placed runs
    name fewer instructions than half its placed kernels (one annotation for many kernels)."""
    by_name = {**{re.sub(r"[.\-]", "_", k): v for k, v in op_layers.items()}, **op_layers}
    table: dict = {}  # name -> [count, ns, runs placed, runs placed in a layer]
    ops = set()
    for name, duration_ns, stats in events:
        entry = table.setdefault(name, [0, 0, 0, 0])
        entry[0] += 1
        entry[1] += duration_ns
        op = next((v for k, v in stats if k == "hlo_op" and v in op_layers), None)
        if op is None and name in by_name:
            op = name
        if op is not None:
            ops.add(op)
            entry[2] += 1
            entry[3] += by_name[op] is not None
    trusted = len(ops) >= 0.5 * sum(1 for e in table.values() if e[2])
    return {n: [c, ns, inside / placed if trusted and placed else None] for n, (c, ns, placed, inside) in table.items()}


def _device_kernel_times(data: Any, op_layers: dict[str, int | None] | None = None) -> dict:
    """{line name: {kernel/op name: [count, total ns, in_layers]}} on the first GPU (or any
    device) plane of a trace; in_layers from _place_runs by op_layers (_hlo_op_layers)."""
    planes = ([p for p in data.planes if p.name.startswith("/device:GPU:0")]
              or [p for p in data.planes if p.name.startswith("/device:")]
              or [p for p in data.planes if p.name == "/host:CPU"])
    return {line.name: _place_runs(((e.name, e.duration_ns, e.stats) for e in line.events), op_layers or {})
            for plane in planes[:1] for line in plane.lines}


def device_seconds(fn: Callable, args: tuple, calls: int) -> float | None:
    """The GPU's seconds per call of fn(*args): its kernels' durations while `calls` calls,
    queued back to back, run under a jax.profiler trace. None where the trace holds no GPU
    stream. Unlike the wall clock it leaves out the host's enqueueing, which at small sizes
    can take longer than the kernels."""
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        try:
            for _ in range(calls):
                out = fn(*args)
            jax.block_until_ready(out)
        finally:
            jax.profiler.stop_trace()
        lines = _device_kernel_times(_newest_trace(trace_dir))
    ns = sum(entry[1] for name, table in lines.items() if name.startswith("Stream") for entry in table.values())
    return ns / calls / 1e9 if ns else None


# The host's side of a step: the runtime's events (by name) that enqueue it. On a GPU, XLA
# records the step into CUDA graphs (command buffers), updates them when a buffer they use
# has moved, and launches them; the first two read the call's arguments. The events nest:
# ExecuteThunks holds the command-buffer ones, command_buffer::execute holds cuGraphLaunch.
HOST_EVENTS = ("ParseArguments", "ExecutePrepare", "ExecuteThunks", "command_buffer::update",
               "command_buffer::execute", "cuGraphLaunch")


def _host_event_times(data: Any) -> dict:
    """{HOST_EVENTS name: [count, total ns]} over every host thread of a trace (an event
    counts under the first name it contains, e.g. "[0] GpuExecutable::ExecuteThunks")."""
    out = {name: [0, 0] for name in HOST_EVENTS}
    for plane in data.planes:
        if not plane.name.startswith("/host"):
            continue
        for line in plane.lines:
            for event in line.events:
                name = next((n for n in HOST_EVENTS if n in event.name), None)
                if name is not None:
                    out[name][0] += 1
                    out[name][1] += event.duration_ns
    return out


def profile_decode(layers: int, batch: int, context: int, mesh_shape: tuple[int, int] | None, steps: int,
                   trace_dir: str, json_path: str | None = None, cache_len: int | None = None,
                   tiny: bool = False, share: int | None = None) -> dict:
    """A jax.profiler trace of `steps` decode steps of the fast path; the device's kernels
    and XLA ops summed per step and per layer (microseconds), the largest first; then the
    host's side of those steps (HOST_EVENTS, summed over the host's threads: one thread per
    device enqueues its program). tiny=True: the tiny config, a smoke test for any laptop.
    share: one device's part of a 1xN mesh on one device (device_share)."""
    config = bench_config(layers, tiny, share, mesh_shape)
    mesh = None
    if mesh_shape is not None:
        import runners

        mesh = runners.make_mesh(mesh_shape, (1, 1))
    params = model.prepare_for_inference(bench_params(config, mesh, share), config, consume=True)
    cache_len = cache_len or -(-(context + steps + 8) // 128) * 128
    forward = routed_forward(config, mesh, _cache_sharding(config, mesh, batch, cache_len))
    tokens = jax.random.randint(jax.random.key(batch), (batch, 1), 4, config.vocab_size)
    length = jnp.ones((batch,), jnp.int32)
    memory = filled_memory(config, batch, context, cache_len, mesh)
    into = blank_outputs(forward, mesh, params, tokens, memory, length)
    # Which of the program's instructions belong to a layer (the first layer's fusions may
    # carry other names than the rest's): lowered before the first step donates the cache.
    op_layers = _hlo_op_layers(forward.lower(params, tokens, memory, length, into).compile().as_text())
    step = in_place_step(forward, params, tokens, length, memory, into)
    for _ in range(3):
        jax.block_until_ready(step())
    jax.profiler.start_trace(trace_dir)
    for _ in range(steps):
        out = step()
    jax.block_until_ready(out)
    jax.profiler.stop_trace()
    trace = _newest_trace(trace_dir)
    lines = _device_kernel_times(trace, op_layers)
    results = {"device": str(jax.devices()[0].device_kind), "host": host_info(), "layers": layers, "batch": batch,
               "context": context, "cache_len": cache_len, "mesh": None if mesh is None else dict(mesh.shape),
               "steps": steps, "lines": {}}
    for name, table in lines.items():
        rows = sorted(((n, c / steps, ns / steps / 1e3, f) for n, (c, ns, f) in table.items()), key=lambda r: -r[2])
        results["lines"][name] = [dict(name=n, per_step=c, us_per_step=us, us_per_layer=us / layers, in_layers=f)
                                  for n, c, us, f in rows]
        total = sum(r[2] for r in rows)
        print(f"--- {name}: {total:.1f} us per step, {total / layers:.1f} us per layer", flush=True)
        for n, c, us, f in rows[:40]:
            where = "" if f is None else " (in layers)" if f == 1 else " (outside)" if f == 0 else f" ({f:.0%} in layers)"
            print(f"{us:10.1f} us/step {c:6.1f}x  {n[:110]}{where}", flush=True)
    results["summary"] = summarize_profile(results)
    layer_us = sum(v for k, v in results["summary"].items() if k != "outside_layers")
    print("per layer, by kind (us):", {k: round(v, 1) for k, v in results["summary"].items()},
          f"; a layer's kernels: {layer_us:.1f} us", flush=True)
    host = _host_event_times(trace)
    results["host_events"] = {n: dict(per_step=c / steps, us_per_step=ns / steps / 1e3,
                                      us_per_layer=ns / steps / 1e3 / layers) for n, (c, ns) in host.items()}
    print(f"--- the host's side, all threads ({results['host']['cpu']}, {results['host']['cpus']} CPUs):",
          flush=True)
    for n, r in results["host_events"].items():
        print(f"{r['us_per_step']:10.1f} us/step {r['per_step']:6.1f}x  {r['us_per_layer']:8.1f} us/layer  {n}",
              flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    return results


KERNEL_KINDS = (  # (kind, substrings of the kernel or op name), the first match wins
    ("collective", ("nccl", "psum", "all_reduce", "all-reduce", "allreduce", "all_gather", "all-gather",
                    "reduce_scatter", "reduce-scatter", "collective")),
    ("moe_gated", ("int8_gated_matmul",)),
    ("moe_down", ("int8_grouped_matmul",)),
    ("dense_int8", ("int8_dense_matmul",)),
    ("xla_dot", ("gemm", "dot", "nvjet", "cutlass", "cublas")),
)


def summarize_profile(results: dict) -> dict:
    """Device microseconds per layer by kind of kernel, over every line of the trace.

    A kernel that runs at least once per layer counts in the layers; one that runs fewer
    times by the share of its runs whose HLO instruction lies in a layer's code (a row's
    in_layers, where the trace tells: the first layer's fusions may carry other names than
    the rest's), else not. A Pallas kernel (not placed by instruction) whose variants JAX
    named apart (name, name__1, ...: the last layer's junction, say) counts in the layers
    where the variants together run once per layer. The rest (the embedding, the logits) is
    "outside_layers" (per step, divided by the layers only to compare). Collectives, whose
    events spread over several streams, always count as "collective".
    """
    layers = results["layers"]
    out: dict = {}

    def family(name: str) -> str:  # a Pallas kernel's name without JAX's __N suffix
        return re.sub(r"__\d+$", "", name)

    for rows in results["lines"].values():
        runs: dict = {}  # family -> runs per step
        for r in rows:
            runs[family(r["name"])] = runs.get(family(r["name"]), 0.0) + r["per_step"]
        for r in rows:
            kind = next((k for k, subs in KERNEL_KINDS if any(s in r["name"] for s in subs)), "other")
            inside = r.get("in_layers")
            if kind == "collective":
                out[kind] = out.get(kind, 0.0) + r["us_per_layer"]
                continue
            if r["per_step"] >= layers or (inside is None and runs[family(r["name"])] >= layers):
                share = 1.0
            else:
                share = inside or 0.0
            for k, f in ((kind, share), ("outside_layers", 1.0 - share)):
                if f:
                    out[k] = out.get(k, 0.0) + f * r["us_per_layer"]
    return out


def profile_bench(args: argparse.Namespace) -> dict:
    mesh = tuple(int(n) for n in args.mesh.split("x")) if args.mesh else None
    return profile_decode(args.layers, args.batch, args.context, mesh, args.steps, args.trace_dir, args.json,
                          args.cache_len, tiny=args.tiny, share=args.share)


def format_model_table(results: dict) -> str:
    rows = results["rows"]
    ref = {(r["kind"], r["batch"]): r for r in rows if r["mode"] == "reference"}
    lines = [f"{'kind':8} {'mode':10} {'batch':>5} {'ms':>9} {'tok/s':>9} {'roofline ms':>11} "
             f"{'% roofline':>10} {'fast/ref':>8} {'host ms':>8}"]
    for r in rows:
        other = ref.get((r["kind"], r["batch"]))
        speedup = f"{other['ms'] / r['ms']:.1f}x" if other and r["mode"] != "reference" else ""
        host = f"{r['dispatch_ms']:.2f}" if "dispatch_ms" in r else ""  # enqueueing a step
        lines.append(f"{r['kind']:8} {r['mode']:10} {r['batch']:>5} {r['ms']:>9.2f} {r['tokens_per_s']:>9.1f} "
                     f"{r['roofline_ms']:>11.3f} {r['roofline_pct']:>9.1f}% {speedup:>8} {host:>8}")
    return "\n".join(lines)


def model_bench(args: argparse.Namespace) -> dict:
    import runners

    cache = runners.enable_compilation_cache(args.compile_cache)
    print(f"compilation cache: {cache or 'off'}", flush=True)
    mesh = tuple(int(n) for n in args.mesh.split("x")) if args.mesh else None
    res = bench_model(args.layers, [int(b) for b in args.batches.split(",")], args.context, args.prefill,
                      args.modes.split(","), args.iters, args.tiny, args.json, mesh, args.cache_len, args.share)
    if args.compile_layers:
        res["compile"] = compile_times(args.compile_layers, mesh_shape=mesh)
    res["compilation_cache"] = dict(runners.compilation_stats(), dir=cache)
    save(args.json, res, res["rows"])
    print(format_model_table(res))
    print(format_startup(res))
    return res


def format_startup(results: dict) -> str:
    """Start-up: weight creation, then lowering and compilation of each measured program."""
    lines = [f"start-up: weights {results['weights_s']:.1f} s"]
    for r in results["rows"]:
        if "lower_s" in r:
            lines.append(f"  {r['kind']} {r['mode']} batch {r['batch']}: lower {r['lower_s']:.1f} s, "
                         f"compile {r['compile_s']:.1f} s")
    for name, t in results.get("compile", {}).items():
        if name != "mesh":
            lines.append(f"  compile check, {name} on mesh {results['compile']['mesh']}: lower "
                         f"{t['lower_s']:.1f} s, compile {t['compile_s']:.1f} s")
    c = results.get("compilation_cache")
    if c:
        lines.append(f"  compilation cache {c['dir'] or 'off'}: {c['cache_hits']} read, "
                     f"{c['cache_writes']} written, {c['compiles']} compile requests")
    return "\n".join(lines)


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
        print("| rounding at | only this point | this point and the KV cache | every point but this |\n"
              "|---|---:|---:|---:|")
        for point in costs[0]:
            med = lambda key: float(np.median([c[point].get(key, np.nan) for c in costs]))
            print(f"| {point} | {_fmt(med('only'))} | {_fmt(med('with the cache'))} | {_fmt(med('all but'))} |",
                  flush=True)
        save_json(args.json, out)
    return out


def save_json(path: str | None, results: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


# ---------------------------------------------------------------------------------------
# depth: start-up, decode per layer and peak memory against the number of layers
# ---------------------------------------------------------------------------------------


def _spread(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


CHILD_TIMED_OUT = "timeout"  # a depth run's code when its child overran --child-timeout


def _child(cmd: list[str], log: str, timeout_s: float | None = None) -> int | str:
    """Run one measurement in a fresh process (its own memory peak and caches); log its output.

    Returns the exit status, or CHILD_TIMED_OUT when the child ran past timeout_s: it then
    gets SIGABRT, which Python's faulthandler (turned on for the child) answers by writing
    every thread's stack to the log, so a hang shows where it hangs and costs one point of a
    depth run, not the whole run.
    """
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler prints the stacks, then the process ends
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    with open(log, "a") as f:
        f.write(f"\n[bench.py depth: killed after {timeout_s:g} s (--child-timeout)]\n")
    return CHILD_TIMED_OUT


def depth_bench(args: argparse.Namespace) -> dict:
    """For each depth, repeated and interleaved (a slow phase of a noisy machine then hits
    every depth alike), each in a fresh process: run.py --random-weights with an empty
    compilation cache (cold start) and again with the one it filled (warm start), and
    `bench.py model` (decode per batch, weights, lowering, compile). Summarises medians and
    spreads, per-layer decode cost, and the measured peak memory against the planner's."""
    layers = [int(n) for n in args.layers.split(",")]
    args.out, args.cache_root = os.path.abspath(args.out), os.path.abspath(args.cache_root)  # children run in REPO
    os.makedirs(args.out, exist_ok=True)
    runs: list[dict] = []
    for rep in range(args.repeats):
        for n in layers:
            cache = os.path.join(args.cache_root, f"run-L{n}-r{rep}")
            shutil.rmtree(cache, ignore_errors=True)
            for phase in ("cold", "warm") if args.warm else ("cold",):
                if "startup" not in args.parts:
                    break
                path = os.path.join(args.out, f"startup-L{n}-r{rep}-{phase}.json")
                cmd = [sys.executable, os.path.join(REPO, "run.py"), "--random-weights", "--layers", str(n),
                       "--mesh", args.mesh, "--max-len", str(args.steps), "--temperature", "0",
                       "--compile-cache", cache, "--timings-json", path] + (["--tiny"] if args.tiny else [])
                start = time.perf_counter()
                code = _child(cmd, path[:-5] + ".log", args.child_timeout)
                rec = dict(kind="startup", phase=phase, layers=n, rep=rep, code=code,
                           process_s=time.perf_counter() - start)
                if code == 0:
                    with open(path) as f:
                        rec.update(json.load(f))
                runs.append(rec)
                print(f"L={n} rep {rep} {phase} start: exit {code}, first token "
                      f"{rec.get('first_token_s') or float('nan'):.1f} s, process {rec['process_s']:.1f} s",
                      flush=True)
                if code != 0:
                    break  # a warm start needs the cold one's programs; a hang would only repeat
            if "decode" in args.parts:
                path = os.path.join(args.out, f"model-L{n}-r{rep}.json")
                cmd = [sys.executable, os.path.abspath(__file__), "model", "--layers", str(n), "--batches",
                       args.batches, "--modes", "fast", "--prefill", str(args.prefill), "--context",
                       str(args.context), "--iters", str(args.iters), "--compile-layers", "0", "--mesh", args.mesh,
                       *(["--tiny"] if args.tiny else []),
                       "--compile-cache", os.path.join(args.cache_root, f"model-L{n}"), "--json", path]
                code = _child(cmd, path[:-5] + ".log", args.child_timeout)
                rec = dict(kind="model", layers=n, rep=rep, code=code)
                if code == 0:
                    with open(path) as f:
                        rec.update(json.load(f))
                runs.append(rec)
                print(f"L={n} rep {rep} model bench: exit {code}", flush=True)
            if args.json:
                save(args.json, {"runs": runs}, [])
    summary = summarize_depth(runs, layers)
    print(format_depth(summary))
    report = {"summary": summary, "runs": runs}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


def summarize_depth(runs: list[dict], layers: list[int]) -> dict:
    """Medians and spreads per depth; decode per layer (ms / layers, and the slope between depths)."""
    out: dict = {}
    for n in layers:
        row: dict = {}
        for phase in ("cold", "warm"):
            ok = [r for r in runs if r["kind"] == "startup" and r["layers"] == n and r["phase"] == phase
                  and r["code"] == 0]
            if not ok:
                continue
            row[phase] = {
                "first_token_s": _spread([r["first_token_s"] for r in ok]),
                "first_decoded_token_s": _spread([r["first_decoded_token_s"] for r in ok]),
                "weights_s": _spread([r["weights_s"] for r in ok]),
                "lower_s": _spread([sum(p["lower_s"] for p in r["programs"].values()) for r in ok]),
                "compile_s": _spread([sum(p["compile_s"] for p in r["programs"].values()) for r in ok]),
                "process_s": _spread([r["process_s"] for r in ok]),
                "cache_hits": _spread([r["cache"]["cache_hits"] for r in ok]),
                "peak_gb": _spread([(r.get("memory") or {}).get("peak_gb") for r in ok]),
                "planned_gb": _spread([(r.get("memory") or {}).get("planned_gb") for r in ok]),
            }
        models = [r for r in runs if r["kind"] == "model" and r["layers"] == n and r["code"] == 0]
        for batch in sorted({x["batch"] for r in models for x in r["rows"] if x["kind"] == "decode"}):
            ms = [x["ms"] for r in models for x in r["rows"] if x["kind"] == "decode" and x["batch"] == batch]
            row[f"decode_b{batch}_ms"] = _spread(ms)
            row[f"decode_b{batch}_ms_per_layer"] = _spread([m / n for m in ms])
        out[n] = row
    for key in sorted({k for row in out.values() for k in row if k.endswith("_ms")}):
        points = [(n, out[n][key]["median"]) for n in layers if out[n].get(key)]
        for (a, ma), (b, mb) in zip(points, points[1:]):
            out[b][key + "_slope_per_layer"] = (mb - ma) / (b - a)  # the marginal cost of a layer
    return out


def format_depth(summary: dict) -> str:
    lines = []
    for n, row in summary.items():
        parts = [f"{n:>3} layers:"]
        for phase in ("cold", "warm"):
            if phase in row:
                p = row[phase]
                parts.append(f"{phase} first token {p['first_token_s']['median']:.1f} s "
                             f"[{p['first_token_s']['min']:.1f}-{p['first_token_s']['max']:.1f}] (weights "
                             f"{p['weights_s']['median']:.1f}, lower {p['lower_s']['median']:.1f}, compile "
                             f"{p['compile_s']['median']:.1f})")
                if p["peak_gb"]:
                    parts.append(f"peak {p['peak_gb']['median']:.1f} GB vs planned {p['planned_gb']['median']:.1f}")
        for key, value in row.items():
            if key.endswith("_ms_per_layer"):
                parts.append(f"{key[:-13]} {value['median']:.3f} ms/layer [{value['min']:.3f}-{value['max']:.3f}]")
            elif key.endswith("_slope_per_layer"):
                parts.append(f"{key[:-16]} slope {value:.3f} ms/layer")
        lines.append(parts[0] + " " + "; ".join(parts[1:]))
    return "\n".join(lines)


def kernels_bench(args: argparse.Namespace) -> None:
    import kernel_bench  # the kernel checks and sweeps: a module below this one

    kernel_bench.main(args.rest, (copy_bandwidth, matmul_rate, device_seconds))


# ---------------------------------------------------------------------------------------
# activations: the decode-size ops with bf16 against float32 (hi/lo split) activations
# ---------------------------------------------------------------------------------------


def activations_bench(args: argparse.Namespace) -> dict:
    """What float32 activations cost at decode sizes (issue 12): each op that takes them
    (model.activation_dtype), once with bf16 inputs (the release's precision) and once with
    float32 ones, in one process, interleaved per shape. At Grok-1 width with random int8
    weights in the inference layout: the MoE layer's kernels (dispatch, gated, down,
    combine), the q and k projections (4 rotated weight copies, so that L2 does not hold
    them), the unembedding against a bf16 table, and the XLA attention of one decode step
    (model.MultiHeadAttention._attend). --small: tiny widths, Pallas in interpret mode (a
    smoke test on a CPU)."""
    small = args.small
    e, d, f, v, h, g, k = (8, 256, 512, 1024, 16, 8, 16) if small else (8, 6144, 32768, 131072, 48, 8, 128)
    backend = "interpret" if small else "auto"
    key = jax.random.key(0)
    bf16, f32 = jnp.bfloat16, jnp.float32
    out: dict = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
                 "split_max_rows": kernels.SPLIT_MAX_ROWS, "rows": []}

    def int8(seed: int, shape: tuple, nb: int):
        kw = jax.random.fold_in(key, seed)
        w = jax.random.randint(kw, shape, -127, 128, dtype=jnp.int8)
        scale = jax.random.uniform(jax.random.fold_in(kw, 1), (*shape[:-2], nb, shape[-1]), f32, 0.5, 1.5)
        return jnp.swapaxes(w, -1, -2), (scale / (73 * np.sqrt(shape[-2]))).astype(bf16)  # [.., N, K]

    def measure(name: str, fn: Callable, *operands) -> None:
        row = {"op": name}
        for label, dtype in (("bf16", bf16), ("float32", f32)):
            jitted = jax.jit(functools.partial(fn, dtype=dtype))
            row[f"{label}_us"] = timed(lambda: jitted(*operands), iters=2 if small else 20) * 1e6
        row["ratio"] = row["float32_us"] / row["bf16_us"]
        out["rows"].append(row)
        print(f"| {name} | {row['bf16_us']:.1f} | {row['float32_us']:.1f} | {row['ratio']:.3f} |", flush=True)
        save_json(args.json, out)

    print("| op | bf16 us | float32 us | ratio |\n|---|---:|---:|---:|", flush=True)
    (wi, si), (wv, sv), (wo, so) = int8(1, (e, d, f), 1), int8(2, (e, d, f), 1), int8(3, (e, f, d), 8)

    def moe(x, idx, gates, dtype):
        plan = kernels.make_plan(idx, e, kernels.default_block_m(idx.size))
        xs = kernels.dispatch(x.astype(dtype), plan)
        hid = kernels.grouped_matmul_gated(xs, wi, si, wv, sv, plan, backend=backend, out_dtype=dtype, transposed=True)
        y = kernels.grouped_matmul(hid, wo, so, plan, backend=backend, out_dtype=dtype, transposed=True)
        return kernels.combine(y, gates, plan, out_dtype=f32)

    for m in (1, 8, 32):
        x = jax.random.normal(jax.random.fold_in(key, 10 + m), (m, d), f32)
        probs = jax.nn.softmax(2 * jax.random.normal(jax.random.fold_in(key, 20 + m), (m, e)), axis=-1)
        gates, idx = jax.lax.top_k(probs, 2)
        measure(f"MoE layer, {m} tokens", moe, x, idx.astype(jnp.int32), gates)

    def dense(x, ws, dtype):
        return tuple(kernels.int8_matmul(x.astype(dtype), w, sc, backend=backend, out_dtype=f32, transposed=True)
                     for w, sc in ws)

    for label, n_out, seed in (("q", h * k, 100), ("k", g * k, 200)):
        ws = [int8(seed + r, (d, n_out), 1) for r in range(4)]
        for m in (1, 8, 32):
            measure(f"{label} projection x4, {m} rows", dense, jax.random.normal(jax.random.fold_in(key, seed + m), (m, d)), ws)

    table = jax.random.normal(jax.random.fold_in(key, 400), (v, d), bf16)
    for b in (1, 8, 32):
        hb = jax.random.normal(jax.random.fold_in(key, 500 + b), (b, 1, d), f32)
        measure(f"unembedding, batch {b}", lambda x, t, dtype: model.einsum_f32("btd,vd->btv", x.astype(dtype), t,
                                                                                 split_axis=1), hb, table)

    cfg = model.tiny_config(emb_size=d, key_size=k, num_q_heads=h, num_kv_heads=g).model
    real = model.activation_dtype

    def attend(q, keys, values, mask, step, dtype):
        model.activation_dtype = lambda c, rows: real(c, rows) if dtype == f32 else bf16  # traced once per dtype
        try:
            fn = hk.without_apply_rng(hk.transform(
                lambda *a: model.MultiHeadAttention(cfg, None)._attend(*a))).apply
            return fn({}, q, keys, values, mask, step)
        finally:
            model.activation_dtype = real

    for b in (1, 8, 32):
        for cache in (1024, 8192):
            q = jax.random.normal(jax.random.fold_in(key, 600 + b), (b, 1, g, h // g, k), f32)
            kv = jax.random.normal(jax.random.fold_in(key, 700 + cache), (b, cache, g, k), bf16)
            measure(f"attention (XLA), batch {b}, {cache} keys", attend, q, kv, kv, jnp.ones((b, 1), bool),
                    jnp.full((b,), cache - 1, jnp.int32))
    return out


# ---------------------------------------------------------------------------------------
# project: measured per-layer decode times -> a 64-layer tokens/s on N devices
# ---------------------------------------------------------------------------------------

# Nominal HBM bandwidth per device, bytes/s (the vendors' data sheets).
NOMINAL_BANDWIDTH = {"h200": 4.8e12, "h100": 3.35e12}
PROJECT_BATCHES = (1, 8, 32)


def fit_fixed_variable(points: dict[int, float]) -> tuple[float, float]:
    """(F, V) of t(n) = F + V / n, least squares over {devices n: time t} (exact for two n)."""
    if len(points) < 2:
        raise ValueError(f"fitting t(n) = F + V/n needs times on at least 2 device counts, got "
                         f"{sorted(points) or 'none'}")
    x = np.array([1.0 / n for n in points])
    t = np.array(list(points.values()), dtype=np.float64)
    slope, intercept = np.polyfit(x, t, 1)
    return float(intercept), float(slope)


def fit_line(points: dict[int, float]) -> tuple[float, float]:
    """(intercept, slope) of t(L) = c + s * L, least squares over {layers L: time t}."""
    if len(points) < 2:
        raise ValueError(f"a per-layer time needs runs at 2 or more layer counts, got {sorted(points)}")
    slope, intercept = np.polyfit(np.array(list(points), dtype=np.float64),
                                  np.array(list(points.values()), dtype=np.float64), 1)
    return float(intercept), float(slope)


def expected_experts_touched(batch: int, num_experts: int = 8, selected: int = 2) -> float:
    """Distinct experts a layer reads for `batch` tokens, if each token picks `selected` of
    `num_experts` uniformly: E * (1 - ((E - k) / E) ** B). 2 at batch 1, 7.2 at 8, 8.0 at 32."""
    return num_experts * (1.0 - ((num_experts - selected) / num_experts) ** batch)


def decode_step_bytes(config: model.LanguageModelConfig, batch: int, context: int,
                      experts_touched: float) -> tuple[float, float]:
    """(bytes per layer, bytes outside the layers) a decode step of the config's width must
    read, by decode_bytes on abstract 1- and 2-layer trees: per layer the attention weights,
    norms, router, `experts_touched` experts (linear in it, so a fraction is an average)
    and the KV cache of `context` tokens; outside, the bf16 unembedding and the final norm."""
    totals = {}
    for layers in (1, 2):
        cfg = dataclasses.replace(config, model=dataclasses.replace(config.model, num_layers=layers))
        shapes = model.param_shapes(cfg)
        no_expert = decode_bytes(shapes, cfg, [np.zeros((0,), np.int32)] * layers, batch, context)
        one_expert = decode_bytes(shapes, cfg, [np.zeros((1,), np.int32)] * layers, batch, context)
        totals[layers] = no_expert + experts_touched * (one_expert - no_expert)
    per_layer = totals[2] - totals[1]
    return per_layer, totals[1] - per_layer


@dataclasses.dataclass
class BatchInputs:
    """What the projection of one batch size starts from (times in ms)."""
    per_layer_ms: dict[int, float]  # devices -> measured per-layer decode time
    non_layer_ms: dict[int, float] = dataclasses.field(default_factory=dict)  # devices -> intercept
    # N -> per-layer time of one device's share of a 1xN mesh, run alone (bench.py model --share)
    share_layer_ms: dict[int, float] = dataclasses.field(default_factory=dict)
    share_non_layer_ms: dict[int, float] = dataclasses.field(default_factory=dict)  # N -> its intercept


def step_bytes(config: model.LanguageModelConfig, batch: int, context: int) -> tuple[float, int, int]:
    """(experts touched per layer, bytes per layer, bytes outside the layers) of a decode step
    of `batch` rows, the experts the expectation under uniform top-k routing."""
    touched = expected_experts_touched(batch, config.model.num_experts, config.model.num_selected_experts)
    return (touched, *decode_step_bytes(config, batch, context, touched))


def project_decode(inputs: dict[int, BatchInputs], devices: int, layers: int, bandwidth: float,
                   context: int, config: model.LanguageModelConfig,
                   non_layer_ms: float | None = None) -> list[dict]:
    """Per batch: fit t(n) = F + V/n to the per-layer times, then a `layers`-layer step on
    `devices` devices = layers * t(devices) + the non-layer cost, next to the roofline
    (the step's bytes over devices * bandwidth, bytes/s per device).

    The non-layer cost is, first found: `non_layer_ms` as given; the same F + V/n fit of
    the measured intercepts (time at 0 layers) when there are 2 device counts of them; else
    the roofline of the non-layer bytes (not measured).

    Where one device's share of a 1x`devices` mesh was measured (share_layer_ms), a second
    projection rests on it: per layer that local work plus the collectives, taken as what a
    1x2 layer costs beyond its share of 2 (None where either is missing: then the local
    work alone, a lower bound)."""
    rows = []
    for batch in sorted(inputs):
        inp = inputs[batch]
        fixed, variable = fit_fixed_variable(inp.per_layer_ms)
        touched, layer_bytes, other_bytes = step_bytes(config, batch, context)
        roof_layer_ms = {n: layer_bytes / (n * bandwidth) * 1e3 for n in inp.per_layer_ms}
        roof_other_ms = other_bytes / (devices * bandwidth) * 1e3
        if non_layer_ms is not None:
            other_ms, other_source = non_layer_ms, "given (--non-layer-ms)"
        elif len(inp.non_layer_ms) >= 2:
            f_o, v_o = fit_fixed_variable(inp.non_layer_ms)
            other_ms = f_o + v_o / devices
            other_source = f"the fit of the measured intercepts ({f_o:.3f} {v_o:+.3f}/n ms)"
        else:
            other_ms, other_source = roof_other_ms, "its roofline (not measured)"
        layer_ms = fixed + variable / devices
        step_ms = layers * layer_ms + other_ms
        roof_ms = (layers * layer_bytes + other_bytes) / (devices * bandwidth) * 1e3
        rows.append(dict(
            batch=batch, measured_per_layer_ms=dict(inp.per_layer_ms), fixed_ms=fixed,
            variable_ms=variable, per_layer_roofline_ms=roof_layer_ms, experts_touched=touched,
            layer_bytes=layer_bytes, non_layer_bytes=other_bytes, per_layer_ms=layer_ms,
            layers_ms=layers * layer_ms, layers_tokens_per_s=batch / (layers * layer_ms) * 1e3,
            non_layer_ms=other_ms, non_layer_source=other_source, step_ms=step_ms,
            tokens_per_s=batch / step_ms * 1e3, roofline_ms=roof_ms,
            roofline_tokens_per_s=batch / roof_ms * 1e3, roofline_pct=100 * roof_ms / step_ms))
        if devices in inp.share_layer_ms:
            local = inp.share_layer_ms[devices]
            collectives = (inp.per_layer_ms[2] - inp.share_layer_ms[2]
                           if 2 in inp.per_layer_ms and 2 in inp.share_layer_ms else None)
            share_step = layers * (local + (collectives or 0.0)) + other_ms
            rows[-1].update(share_local_ms=local, share_collectives_ms=collectives, share_step_ms=share_step,
                            share_tokens_per_s=batch / share_step * 1e3, share_roofline_pct=100 * roof_ms / share_step)
    return rows


def project_share_only(inputs: dict[int, BatchInputs], devices: int, layers: int, bandwidth: float,
                       context: int, config: model.LanguageModelConfig) -> list[dict]:
    """Per batch measured only as one device's share of a 1x`devices` mesh (bench.py model
    --share): a `layers`-layer step of that device's local work (layers x the share's
    per-layer time + its own intercept), without the collectives, which such runs cannot
    measure: a lower bound on the step; beside the roofline (the step's bytes over devices x
    bandwidth). Rows carry project_decode's step fields, so bound_by_host takes them too."""
    rows = []
    for batch in sorted(inputs):
        inp = inputs[batch]
        if devices not in inp.share_layer_ms:
            continue
        touched, layer_bytes, other_bytes = step_bytes(config, batch, context)
        local, other = inp.share_layer_ms[devices], inp.share_non_layer_ms.get(devices, 0.0)
        step = layers * local + other
        roof_ms = (layers * layer_bytes + other_bytes) / (devices * bandwidth) * 1e3
        rows.append(dict(batch=batch, experts_touched=touched, layer_bytes=layer_bytes, non_layer_bytes=other_bytes,
                         share_local_ms=local, share_non_layer_ms=other, step_ms=step,
                         tokens_per_s=batch / step * 1e3, roofline_ms=roof_ms,
                         roofline_tokens_per_s=batch / roof_ms * 1e3, roofline_pct=100 * roof_ms / step))
    return rows


def host_floor_ms(fit: dict, layers: int) -> float:
    """The host's time to enqueue a step of `layers` layers, from a host_enqueue_ms fit."""
    return fit["outside_ms"] + fit["per_layer_ms"] * layers


def bound_by_host(rows: list[dict], host_fits: list[dict], layers: int, share: int | None = None) -> None:
    """Add to each projected row the floor the host's enqueue time puts on its step, and the
    step that floor allows: max(device step, floor). The devices run a step no faster than
    the host enqueues the next one, however deep the queue (each device's kernels are
    launched by its own thread, so the floor stays the per-device one). Per batch, the fit
    measured on the most devices is used (its intercept holds the launch of every device's
    program); rows of a batch without such a fit are left as they are. share: take the fits of
    `--share share` runs instead (rows of project_share_only)."""
    for r in rows:
        fits = [h for h in host_fits if h["batch"] == r["batch"] and h.get("share") == share]
        if not fits:
            continue
        fit = max(fits, key=lambda h: h["devices"])
        floor = host_floor_ms(fit, layers)
        step = max(r["step_ms"], floor)
        r.update(host_floor_ms=floor, host_floor_devices=fit["devices"], bounded_step_ms=step,
                 bounded_tokens_per_s=r["batch"] / step * 1e3,
                 bounded_roofline_pct=100 * r["roofline_ms"] / step)


def parse_measured(specs: list[str]) -> dict[int, BatchInputs]:
    """--measured BATCH=N:MS,N:MS (per-layer ms on N devices), once per batch size."""
    out: dict[int, BatchInputs] = {}
    for spec in specs:
        try:
            batch_text, points_text = spec.split("=", 1)
            batch = int(batch_text)
            points = {}
            for item in points_text.split(","):
                n, ms = item.split(":")
                points[int(n)] = float(ms)
            if batch < 1 or any(n < 1 or ms <= 0 for n, ms in points.items()):
                raise ValueError
        except ValueError:
            raise ValueError(f"--measured {spec!r}: expected BATCH=N:MS,N:MS, e.g. 1=1:0.59,2:0.45 "
                             "(batch 1: 0.59 ms per layer on 1 device, 0.45 ms on 2)") from None
        if batch in out:
            raise ValueError(f"--measured: batch {batch} given twice")
        out[batch] = BatchInputs(points)
    return out


def read_model_runs(paths: list[str], mode: str) -> tuple[dict[int, BatchInputs], dict]:
    """Per-layer times from `bench.py model --json` files: for every (devices, batch) the
    decode ms of `mode` at 2 or more layer counts, fitted as intercept + per layer * layers.
    Devices: the mesh's size (1x N meshes only), 1 without a mesh. Returns the inputs and
    what the files say about themselves (device kinds, copy bandwidths, contexts)."""
    times: dict[tuple[int, int], dict[int, float]] = {}
    shares: dict[tuple[int, int], dict[int, float]] = {}  # (N, batch): the same, of --share N runs
    host: dict[tuple[int, int, int | None], dict[int, float]] = {}  # (devices, batch, share): enqueue times
    meta: dict[str, set] = {"device": set(), "host": set(), "copy_bandwidth_GBps": set(), "context": set()}
    for path in paths:
        try:
            with open(path) as f:
                res = json.load(f)
            mesh = res.get("mesh") or {}
            layers, rows = int(res["layers"]), res["rows"]
            meta["context"].add(int(res["context"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a `bench.py model --json` result ({type(e).__name__}: {e})") from None
        if mesh.get("data", 1) != 1:
            raise ValueError(f"{path}: mesh {mesh}: the projection needs 1xN meshes (data axis 1)")
        devices = math.prod(mesh.values()) if mesh else 1
        share = res.get("share")
        meta["device"].add(res.get("device"))
        if res.get("host"):  # files from before the field: no entry
            meta["host"].add(f"{res['host'].get('cpu')} ({res['host'].get('cpus')} CPUs)")
        if res.get("copy_bandwidth_GBps"):
            meta["copy_bandwidth_GBps"].add(round(float(res["copy_bandwidth_GBps"])))
        for r in rows:
            if r.get("kind") == "decode" and r.get("mode") == mode:
                where = f"one device's share of {share}" if share else f"{devices} device(s)"
                seen = (shares if share else times).setdefault((share or devices, int(r["batch"])), {})
                if layers in seen:
                    raise ValueError(f"{path}: a second run of {layers} layers on {where}, "
                                     f"batch {r['batch']}; give one file per (devices, layers)")
                seen[layers] = float(r["ms"])
                if "dispatch_ms" in r:
                    host.setdefault((share or devices, int(r["batch"]), share), {})[layers] = float(r["dispatch_ms"])
    if not times and not shares:
        raise ValueError(f"{', '.join(paths)}: no decode rows of mode {mode!r}")
    out: dict[int, BatchInputs] = {}
    for (devices, batch), by_layers in sorted(times.items()):
        if len(by_layers) < 2:
            raise ValueError(f"{devices} device(s), batch {batch}: runs at layers {sorted(by_layers)} only; "
                             "the per-layer time is a slope: give runs at 2 layer counts (e.g. 2 and 8)")
        intercept, slope = fit_line(by_layers)
        inp = out.setdefault(batch, BatchInputs({}))
        inp.per_layer_ms[devices] = slope
        inp.non_layer_ms[devices] = intercept
    for (n, batch), by_layers in sorted(shares.items()):
        if len(by_layers) < 2:
            raise ValueError(f"one device's share of {n}, batch {batch}: runs at layers {sorted(by_layers)} only; "
                             "give runs at 2 layer counts (e.g. 2 and 8)")
        inp = out.setdefault(batch, BatchInputs({}))
        inp.share_non_layer_ms[n], inp.share_layer_ms[n] = fit_line(by_layers)
    meta_out: dict = {k: sorted(v, key=str) for k, v in meta.items()}
    # Per (devices, batch): ms outside the layers and ms per layer of enqueueing a step; share:
    # N where the runs were one device's share of a 1xN mesh (devices is then N), else None.
    meta_out["host_enqueue_ms"] = [
        dict(zip(("devices", "batch", "share", "outside_ms", "per_layer_ms"), (*key, *fit_line(by_layers))))
        for key, by_layers in sorted(host.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0))
        if len(by_layers) >= 2]
    return out, meta_out


def format_projection(rows: list[dict], header: list[str]) -> str:
    """The inputs, then one line per batch: projected step and tokens/s beside the roofline."""
    lines = list(header)
    for r in rows:
        measured = ", ".join(f"{n} dev {ms:.3f} (roofline {r['per_layer_roofline_ms'][n]:.3f}, "
                             f"{100 * r['per_layer_roofline_ms'][n] / ms:.0f}%)"
                             for n, ms in sorted(r["measured_per_layer_ms"].items()))
        lines.append(f"  batch {r['batch']:>2}: per-layer ms measured: {measured}; fit F + V/n = {r['fixed_ms']:.3f} "
                     f"{r['variable_ms']:+.3f}/n ms")
        lines.append(f"            bytes per layer {r['layer_bytes'] / 1e9:.3f} GB ({r['experts_touched']:.2f} "
                     f"experts), outside the layers {r['non_layer_bytes'] / 1e9:.3f} GB; non-layer cost "
                     f"{r['non_layer_ms']:.3f} ms from {r['non_layer_source']}")
    lines.append("")
    lines.append(f"{'batch':>5} {'ms/layer':>9} {'layers ms':>10} {'tok/s':>8} {'+non-layer':>10} "
                 f"{'step ms':>8} {'tok/s':>8} | {'roofline ms':>11} {'tok/s':>8} {'% roofline':>10}")
    for r in rows:
        lines.append(f"{r['batch']:>5} {r['per_layer_ms']:9.3f} {r['layers_ms']:10.2f} "
                     f"{r['layers_tokens_per_s']:8.1f} {r['non_layer_ms']:10.3f} {r['step_ms']:8.2f} "
                     f"{r['tokens_per_s']:8.1f} | {r['roofline_ms']:11.3f} {r['roofline_tokens_per_s']:8.1f} "
                     f"{r['roofline_pct']:9.1f}%")
    shared = [r for r in rows if "share_step_ms" in r]
    if shared:
        lines += ["", "from one device's share measured alone (bench.py model --share N), per layer its local work "
                  "plus the collectives (a 1x2 layer less its share of 2; unmeasured: left out, a lower bound):"]
    for r in shared:
        coll = r["share_collectives_ms"]
        coll_text = f"+ {coll:.3f} collectives" if coll is not None else "+ collectives not measured"
        lines.append(f"{r['batch']:>5} {r['share_local_ms']:.3f} ms local {coll_text} -> step {r['share_step_ms']:.2f} "
                     f"ms, {r['share_tokens_per_s']:.1f} tok/s, {r['share_roofline_pct']:.1f}% of the roofline")
    return "\n".join(lines)


def format_share_projection(rows: list[dict], header: list[str]) -> str:
    """The inputs, then one line per batch of project_share_only: the step of the share's
    local work beside the roofline."""
    lines = list(header) + ["", f"{'batch':>5} {'ms/layer':>9} {'+outside':>9} {'step ms':>8} {'tok/s':>8} | "
                                f"{'roofline ms':>11} {'tok/s':>8} {'% roofline':>10}"]
    for r in rows:
        lines.append(f"{r['batch']:>5} {r['share_local_ms']:9.4f} {r['share_non_layer_ms']:9.3f} {r['step_ms']:8.2f} "
                     f"{r['tokens_per_s']:8.1f} | {r['roofline_ms']:11.3f} {r['roofline_tokens_per_s']:8.1f} "
                     f"{r['roofline_pct']:9.1f}%")
    return "\n".join(lines)


def project_bench(args: argparse.Namespace) -> dict:
    """`bench.py project`: the inputs checked and printed, then the projection."""
    if bool(args.measured) == bool(args.from_json):
        raise ValueError("give the per-layer times either with --measured (per batch) or with "
                         "--from-json (bench.py model result files), not both and not neither")
    if args.devices < 1 or args.layers < 1:
        raise ValueError(f"--devices and --layers must be >= 1, got {args.devices} and {args.layers}")
    if args.host_json and not args.from_json:
        raise ValueError("--host-json goes with --from-json")
    meta: dict = {}
    if args.measured:
        inputs = parse_measured(args.measured)
        source = "command line (--measured)"
    else:
        inputs, meta = read_model_runs(args.from_json, args.mode)
        source = f"{len(args.from_json)} bench.py model file(s), mode {args.mode}: {', '.join(args.from_json)}"
    context = args.context
    if meta.get("context"):
        if len(meta["context"]) > 1:
            raise ValueError(f"--from-json: the files were measured at different contexts {meta['context']}")
        if context is not None and context != meta["context"][0]:
            raise ValueError(f"--context {context}, but the files were measured with {meta['context'][0]} "
                             "tokens in the cache; leave --context out or give files of that context")
        context = meta["context"][0]
    context = 1024 if context is None else context
    if args.bandwidth_gbs is not None:
        if args.bandwidth_gbs <= 0:
            raise ValueError(f"--bandwidth-gbs must be > 0, got {args.bandwidth_gbs}")
        bandwidth, bw_source = args.bandwidth_gbs * 1e9, "given by --bandwidth-gbs"
    else:
        bandwidth, bw_source = NOMINAL_BANDWIDTH[args.device_kind], f"{args.device_kind} nominal"
    config = model.grok_1_config()
    # A batch measured on one device count has no F + V/n: said, not projected (unless none has
    # more). With none, runs of one device's share of a 1x--devices mesh still give a lower bound.
    single = {b: sorted(inp.per_layer_ms) for b, inp in inputs.items() if len(inp.per_layer_ms) < 2}
    shares_only = len(single) == len(inputs) and any(args.devices in inp.share_layer_ms for inp in inputs.values())
    if shares_only:
        single = {}
        rows = project_share_only(inputs, args.devices, args.layers, bandwidth, context, config)
        title = f"from one device's share of a 1x{args.devices} mesh measured alone"
        model_line = ("  model: step = layers x the share's per-layer time + its intercept; the collectives are not "
                      "in these runs (measure a 1x2 mesh and its --share 2 to add them): a lower bound on the step")
    else:
        if len(single) < len(inputs):
            inputs = {b: inp for b, inp in inputs.items() if b not in single}
        else:
            single = {}  # nothing to project: fit_fixed_variable says why
        rows = project_decode(inputs, args.devices, args.layers, bandwidth, context, config, args.non_layer_ms)
        title = f"model axis {args.devices}"
        model_line = ("  model: step = layers x (F + V/n) + non-layer cost (embedding, final norm, logits); roofline = "
                      "the step's bytes / (n x bandwidth)")
    header = [
        f"Projected decode: Grok-1 ({config.model.emb_size} wide, {args.layers} layers) on {args.devices} x "
        f"{args.device_kind}, {title}",
        "inputs:",
        f"  per-layer decode times from {source}",
        f"  bandwidth per device {bandwidth / 1e9:.0f} GB/s ({bw_source})"
        + (f"; the files' measured copy bandwidth: {meta['copy_bandwidth_GBps']} GB/s on {meta['device']}"
           if meta.get("copy_bandwidth_GBps") else ""),
        f"  KV cache holds {context} tokens per sequence; experts per layer: the expectation under "
        "uniform top-2 routing",
        model_line,
    ]
    for b, counts in sorted(single.items()):
        where = f"{counts[0]} device(s)" if counts else "one device's share"
        header.append(f"  batch {b}: measured on {where} only, so no F + V/n: not projected")
    missing = [b for b in PROJECT_BATCHES if b not in {r["batch"] for r in rows} and b not in single]
    if missing:
        header.append(f"  not measured, not projected: batch {', '.join(map(str, missing))}")
    print(format_share_projection(rows, header) if shares_only else format_projection(rows, header))
    # The host enqueues every step's kernels on its own; the devices cannot step faster.
    host_meta = meta
    if args.host_json:  # the host's side from other runs (say, of a newer step)
        _, host_meta = read_model_runs(args.host_json, args.mode)
        print(f"  host floor from {len(args.host_json)} other bench.py model file(s): {', '.join(args.host_json)}")
    if host_meta.get("host_enqueue_ms") and host_meta.get("host"):
        print(f"  host floor measured on: {'; '.join(host_meta['host'])}")
    for h in host_meta.get("host_enqueue_ms", []):
        where = f"one device's share of {h['share']}" if h.get("share") else f"{h['devices']} device(s)"
        print(f"  host, measured on {where}, batch {h['batch']}: enqueueing a step took "
              f"{h['outside_ms']:.3f} ms + {h['per_layer_ms']:.4f} ms per layer -> "
              f"{host_floor_ms(h, args.layers):.2f} ms at {args.layers} layers, "
              "a floor on the step while the devices wait for it")
    bound_by_host(rows, host_meta.get("host_enqueue_ms", []), args.layers, args.devices if shares_only else None)
    bounded = [r for r in rows if "bounded_step_ms" in r]
    if bounded:
        print(f"\nbounded by the host (step = max(devices, host floor)):\n{'batch':>5} {'devices ms':>10} "
              f"{'host ms':>8} {'step ms':>8} {'tok/s':>8} {'% roofline':>10}")
        for r in bounded:
            print(f"{r['batch']:>5} {r['step_ms']:10.2f} {r['host_floor_ms']:8.2f} {r['bounded_step_ms']:8.2f} "
                  f"{r['bounded_tokens_per_s']:8.1f} {r['bounded_roofline_pct']:9.1f}%")
    report = {"devices": args.devices, "device_kind": args.device_kind, "layers": args.layers,
              "bandwidth_bytes_per_s": bandwidth, "bandwidth_source": bw_source, "context": context,
              "source": source, "files_meta": meta, "rows": rows, "shares_only": shares_only}
    if args.host_json:
        report.update(host_source=args.host_json, host_meta=host_meta)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


# ---------------------------------------------------------------------------------------
# memory: the planner's estimate against the peak device memory of the runner's steps
# ---------------------------------------------------------------------------------------


def measure_peak(config: model.LanguageModelConfig, phase: str, batch: int, context: int,
                 mesh_shape: tuple[int, int] | None = None) -> dict:
    """Run the runner's compiled prefill or decode step once on the present devices and
    report JAX's peak device memory (memory_stats()['peak_bytes_in_use'], the largest
    device) next to the plan. Run each phase in a fresh process: the peak never resets.

    Parameters are zeros, in the layouts the runner uses (memory does not depend on
    values). The step is compiled before anything is allocated, so compile-time scratch
    memory does not count. prefill: one request of `context` tokens into a fresh cache, inserted into a batch cache of
    `batch` x `context`; decode: one step of `batch` active slots.
    """
    import planner
    import runners

    GB = planner.GB
    config = dataclasses.replace(config, sequence_len=context).initialize()
    devices = jax.devices()
    mesh_shape = tuple(mesh_shape) if mesh_shape else planner.choose_mesh(config, len(devices), None, batch,
                                                                          context)
    mesh = runners.make_mesh(mesh_shape, config=config, devices=devices)
    prefill, decode = runners.make_step_functions(config, mesh, batch)
    # The engine's inputs, the parameters in the layouts prepare_for_inference makes.
    a_params, a_mem, a_state = runners.abstract_step_inputs(config, mesh, batch)
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    step = prefill if phase == "prefill" else decode
    args = runners.step_arguments(config, batch, context if phase == "prefill" else None)
    compiled = step.lower(a_params, a_mem, a_state, *args).compile()
    analysis = compiled.memory_analysis()

    def zeros(tree):
        return jax.jit(lambda: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), tree),
                       out_shardings=jax.tree_util.tree_map(lambda s: s.sharding, tree))()

    params, memory, state = zeros(a_params), zeros(a_mem), zeros(a_state)
    jax.block_until_ready((params, memory, state))
    stats = lambda: [d.memory_stats() or {} for d in devices]  # noqa: E731
    resident = max(s.get("bytes_in_use", 0) for s in stats())
    out = jax.block_until_ready(compiled(params, memory, state, *args))
    after = stats()
    del out
    peak = max(s.get("peak_bytes_in_use", 0) for s in after)
    p = planner.plan(config, len(devices), max(s.get("bytes_limit", 0) for s in after) / GB or None, batch,
                     context, mesh_shape, suggest=False, runtime_overhead_gb=0.0)
    planned_total = p.bytes["prefill_total" if phase == "prefill" else "decode_total"]
    return dict(
        phase=phase, devices=len(devices), device_kind=devices[0].device_kind, mesh=list(mesh_shape),
        batch=batch, context=context, layers=config.model.num_layers, moe_impl=config.model.moe_impl,
        measured_peak_gb=peak / GB, measured_resident_gb=resident / GB,
        measured_workspace_gb=(peak - resident) / GB,
        planned_peak_gb=planned_total / GB,
        planned_resident_gb=(planned_total - p.bytes[f"{phase}_workspace"]) / GB,
        planned_workspace_gb=p.bytes[f"{phase}_workspace"] / GB,
        planned_terms_gb=p.prefill_terms_gb if phase == "prefill" else p.decode_terms_gb,
        xla_temp_gb=getattr(analysis, "temp_size_in_bytes", 0) / GB if analysis else None,
        ratio=planned_total / peak if peak else None,
        bytes_limit_gb=max(s.get("bytes_limit", 0) for s in after) / GB,
    )


def memory_bench(args: argparse.Namespace) -> int:
    """--phase prefill|decode runs in this process; both runs each in a fresh process (the
    peak never resets). Prints one JSON line per phase."""
    import planner

    if args.phase == "both":
        status = 0
        for phase in ("prefill", "decode"):
            cmd = [sys.executable, os.path.abspath(__file__), "memory", "--phase", phase,
                   "--batch", str(args.batch)]
            for flag, value in (("--context", args.context), ("--layers", args.layers),
                                ("--mesh", args.mesh), ("--moe-impl", args.moe_impl)):
                if value is not None:
                    cmd += [flag, str(value)]
            cmd += ["--tiny"] if args.tiny else []
            status |= subprocess.call(cmd, cwd=REPO)
        return status
    config = planner.config_from_args(args)
    mesh = tuple(int(n) for n in args.mesh.lower().split("x")) if args.mesh else None
    result = measure_peak(config, args.phase, args.batch, args.context or config.sequence_len, mesh)
    print(json.dumps(result))
    return 0



# ---------------------------------------------------------------------------------------
# serve: the HTTP server under load
# ---------------------------------------------------------------------------------------

SERVE_PROMPTS = [
    "The river", "Once upon a time", "On a clear night far from the lights of a town the sky is crowded",
    "The answer to life the universe and everything is of course", "A cat sat by the door and",
    "In the morning the baker opened the shop", "She walked along the shore", "The old map showed",
]


def measure_engine(runner: Any, seconds: float = 1.0, temperature: float = 0.7, max_tokens: int = 128,
                   depth: Optional[int] = None) -> dict:
    """Decode rate of the runner's engine with every slot busy, each for about `seconds`:
    back-to-back jitted decode steps (dispatch overlaps the device, as `model` measures),
    and synchronous engine.step() calls (each waits for its tokens and turns them into
    text). Rates are totals over the time (as the server's are), not medians. Then the
    serving loop without HTTP ("loop"): the server's engine-thread schedule (server.py's
    Scheduler: prefills into free slots, grouped by bucket, `depth` (default PIPELINE_DEPTH) steps queued,
    tokens turned into text) over requests like the load's (its prompts, `max_tokens`, `temperature`, the
    end-of-sequence token allowed), for `seconds`.

    The slots hold different requests, as under load: the prompts of the load, sampled at
    `temperature` with different seeds (`model` feeds random tokens). A batch of one
    request repeated ("same rows", the rate this function reported before) routes every
    row to the same two experts, which the fast MoE computes faster than the different
    experts of different rows. The end-of-sequence token is masked so that nobody leaves
    the batch while it is timed; it is refilled (untimed) before its requests reach the end
    of the context."""
    import runners
    import server

    depth = depth or server.PIPELINE_DEPTH
    engine, owner = runner.engine(), object()
    batch, config = runner.batch_size, runner.runner.model
    chunk = 10
    room = [0]  # steps the batch can still take
    active = np.ones((batch,), bool)

    def requests(same: bool) -> list:
        out = []
        for i in range(batch):
            prompt = SERVE_PROMPTS[0 if same else i % len(SERVE_PROMPTS)]
            request = runners.Request(prompt=prompt, temperature=0.0 if same else temperature, rng_seed=i,
                                      max_len=config.sequence_len - 64)
            prepared = runner.prepare(request, i)
            prepared.mask[config.eos_token] = False
            out.append(prepared)
        return out

    def fill(batch_requests: list) -> None:
        engine.release(owner)
        for prepared in batch_requests:
            engine.admit(prepared, owner)
        room[0] = min(p.max_len for p in batch_requests) - 2

    def raw_chunk() -> None:
        for _ in range(chunk):
            engine.memory, engine.state, out = engine.decode(engine.params, engine.memory, engine.state, active)
            engine.decode.recycle(out)  # unread: the next step's copy goes over it, as collect() lets it
        jax.block_until_ready(engine.state)

    def step_chunk() -> None:
        for _ in range(chunk):
            engine.step()

    def rate(run_chunk: Callable[[], None], budget: float, same: bool = False) -> float:
        """Seconds per step over chunks of back-to-back steps until `budget` seconds have run."""
        batch_requests = requests(same)
        fill(batch_requests)
        run_chunk()  # warm-up
        room[0] -= chunk
        steps, elapsed = 0, 0.0
        while elapsed < budget or steps < 5 * chunk:
            if room[0] < chunk:
                fill(batch_requests)
            start = time.perf_counter()
            run_chunk()
            elapsed += time.perf_counter() - start
            steps += chunk
            room[0] -= chunk
        return elapsed / steps

    def serving_loop(budget: float) -> tuple[float, float]:
        """Generated tokens/s of the server's schedule without HTTP (see server.Scheduler.run),
        and the slots its decode steps fed, on average, over the batch (the schedule's own
        loss, whatever the device: a slot stands empty between requests)."""
        import collections

        pending: collections.deque = collections.deque()
        tokens, i, steps, rows = 0, 0, 0, 0
        start = time.perf_counter()
        while time.perf_counter() - start < budget:
            waiting = []
            for _ in engine.free_slots():  # the server's admission: grouped by bucket
                request = runners.Request(prompt=SERVE_PROMPTS[i % len(SERVE_PROMPTS)], temperature=temperature,
                                          rng_seed=i, max_len=max_tokens)
                waiting.append(runner.prepare(request, i))
                i += 1
            for group in engine.prefill_groups(waiting):
                pending.append(engine.dispatch_admit_many([waiting[k] for k in group], owner))
            while len(pending) < depth:
                handle = engine.dispatch()
                if handle is None:
                    break
                steps, rows = steps + 1, rows + len(handle.rows)
                pending.append(handle)
            for event in engine.collect(pending.popleft()):
                tokens += not (event.finished and event.finish_reason == "eos")
        elapsed = time.perf_counter() - start
        while pending:
            engine.collect(pending.popleft())
        return tokens / elapsed, rows / max(steps, 1) / batch

    try:
        raw = rate(raw_chunk, seconds)
        same = rate(raw_chunk, seconds / 2, same=True)
        synchronous = rate(step_chunk, seconds / 2)
        engine.release(owner)
        serving_loop(0.1)  # warm-up
        engine.release(owner)
        loop, occupancy = serving_loop(seconds)
    finally:
        engine.release(owner)
    return {"batch": batch, "decode_ms": raw * 1e3, "decode_tokens_per_s": batch / raw,
            "decode_same_rows_tokens_per_s": batch / same,
            "engine_step_ms": synchronous * 1e3, "engine_step_tokens_per_s": batch / synchronous,
            "loop_tokens_per_s": loop, "loop_slot_occupancy": occupancy}


def serve_pad_sizes(args: argparse.Namespace) -> tuple[int, ...]:
    """The prompt buckets of the benchmarked server: --pad-sizes, else those `run.py serve`
    uses for the model (the demo's for --tiny)."""
    import run

    if args.pad_sizes:
        return tuple(args.pad_sizes)
    return run.TINY_PAD_SIZES if args.tiny else run.SERVE_PAD_SIZES


def serve_pipeline_depth(args: argparse.Namespace) -> int:
    """The benchmarked server's engine pipeline depth: the option, else server.PIPELINE_DEPTH."""
    import server

    return args.pipeline_depth or server.PIPELINE_DEPTH


def serve_stream_interval_ms(args: argparse.Namespace) -> float:
    """The benchmarked server's --stream-interval-ms: the option, else run.py serve's default."""
    import server

    return 1e3 * server.STREAM_INTERVAL_S if args.stream_interval_ms is None else args.stream_interval_ms


def _serving_threads_cpu() -> dict[str, float]:
    """CPU seconds so far of the server's two serving threads: the event loop (HTTP, the
    streams' chunks) on the main thread and the engine thread (steps, tokens into text)."""
    import threading

    def cpu(thread: Optional[threading.Thread]) -> float:
        if thread is None or thread.ident is None or not thread.is_alive():
            return 0.0
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))

    engine = next((t for t in threading.enumerate() if t.name == "grok1-engine"), None)
    return {"event_loop": cpu(threading.main_thread()), "engine": cpu(engine)}


def serve_child(args: argparse.Namespace) -> None:
    """The server process of `serve`: build the runner, measure its engine, then serve. Each
    line read from stdin names a file: the engine is measured again (the parent sends it
    only while no request is in flight) and the result written there."""
    import logging
    import threading

    import run
    import runners
    import server

    logging.basicConfig(level=logging.WARNING)
    directory = tempfile.mkdtemp(prefix="grok1-bench-serve-")

    def load() -> Any:
        if args.tiny:
            config = run.tiny_demo_config()
            ckpt, tokenizer = run.build_tiny_demo(directory, config)
            model_runner = runners.ModelRunner(model=config, checkpoint_path=ckpt)
        else:
            config = model.grok_1_config(num_layers=args.layers)
            tokenizer = args.tokenizer or run.train_tiny_tokenizer(directory)
            model_runner = runners.ModelRunner(model=config, random_weights=True)
        pad_sizes = serve_pad_sizes(args)
        mesh = tuple(int(n) for n in args.mesh.split("x")) if args.mesh else None
        devices = math.prod(mesh) if mesh else jax.local_device_count()
        model_runner.bs_per_device = args.slots / devices
        r = runners.InferenceRunner(name="bench", runner=model_runner, load=model_runner.checkpoint_path,
                                    tokenizer_path=tokenizer, local_mesh_config=mesh, pad_sizes=pad_sizes)
        r.initialize()
        return r

    def measure(runner: Any, path: str) -> None:
        threads_cpu = _serving_threads_cpu()  # no request is in flight: serving's CPU so far
        result = measure_engine(runner, args.engine_seconds, args.temperature, args.max_tokens,
                                serve_pipeline_depth(args))
        result["serving_threads_cpu_s"] = threads_cpu
        result["device"] = str(jax.devices()[0].device_kind)
        with open(path + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(path + ".tmp", path)

    def control(runner: Any) -> None:
        for line in sys.stdin:
            if line.strip():
                measure(runner, line.strip())

    def on_ready(runner: Any) -> None:
        # The server compiles its grouped prefills while it serves; compile them now, so that
        # the rounds measure serving with every group size, not the first minutes after start.
        runner.compile(grouped=True)
        measure(runner, args.engine_json)
        threading.Thread(target=control, args=(runner,), name="bench-control", daemon=True).start()

    try:
        server.serve(load, "127.0.0.1", args.port, model_name="bench", max_queue=100000, log_level="warning",
                     on_ready=on_ready, stream_interval=args.stream_interval_ms / 1e3,
                     pipeline_depth=serve_pipeline_depth(args))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _serve_client(port: int, prompt: str, max_tokens: int, temperature: float) -> dict:
    """One streamed completion: its timings and token count."""
    import http.client

    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "stream": True,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    first = last = None
    tokens = 0
    for line in resp:
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        now = time.perf_counter()
        if event["choices"]:
            first = first if first is not None else now
            last = now
        elif event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    conn.close()
    end = time.perf_counter()
    return {"start": start, "end": end, "ttft": (first or end) - start, "tokens": tokens,
            "tpot": (last - first) / (tokens - 1) if tokens > 1 and first is not None else None}


def _server_counter(port: int, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as f:
        for line in f.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise KeyError(name)


def _prefill_counts(port: int) -> tuple[float, float] | None:
    """(prefill calls, sequences given their first token) so far, or None from a server
    without the prefill-call metric."""
    try:
        return (_server_counter(port, "grok1_prefill_calls_total"),
                _server_counter(port, "grok1_time_to_first_token_seconds_count"))
    except KeyError:
        return None


def _per_call(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float | None:
    """Sequences admitted per prefill call between two _prefill_counts (None if unknown)."""
    if before is None or after is None or after[0] == before[0]:
        return None
    return (after[1] - before[1]) / (after[0] - before[0])


def burn_child(args: argparse.Namespace) -> None:
    """Keep one core busy `duty` of the time (busy 1 ms x duty, then sleep) for `seconds`:
    the stand-in for host work beside the engine in `serve --contention`."""
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        while time.perf_counter() - start < args.duty * 1e-3:
            pass
        time.sleep((1 - args.duty) * 1e-3)


def _cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of process `pid` so far (Linux /proc; NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def serve_bench(args: argparse.Namespace) -> dict:
    """Rounds of load, each followed by an engine measurement in the same server process
    while no request is in flight: other jobs on the machine change its speed over time,
    so every window is compared with the engine's rate just before and just after it."""
    import random
    import socket
    import threading
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine_json = tempfile.mktemp(prefix="grok1-engine-", suffix=".json")
    cmd = [sys.executable, os.path.join(REPO, "bench.py"), "_serve_child", "--port", str(port),
           "--slots", str(args.slots), "--engine-json", engine_json, "--engine-seconds", str(args.engine_seconds),
           "--temperature", str(args.temperature), "--max-tokens", str(args.max_tokens)]
    cmd += ["--tiny"] if args.tiny else ["--layers", str(args.layers)]
    cmd += ["--mesh", args.mesh] if args.mesh else []
    cmd += ["--tokenizer", args.tokenizer] if args.tokenizer else []
    cmd += ["--pad-sizes", ",".join(map(str, args.pad_sizes))] if args.pad_sizes else []
    cmd += ["--stream-interval-ms", str(serve_stream_interval_ms(args))]
    cmd += ["--pipeline-depth", str(args.pipeline_depth)] if args.pipeline_depth else []
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, text=True)

    def wait_for(path: str, what: str) -> dict:
        deadline = time.monotonic() + args.load_timeout
        while not os.path.exists(path):
            if child.poll() is not None:
                raise SystemExit(f"the server process ended with status {child.returncode} {what}")
            if time.monotonic() > deadline:
                raise SystemExit(f"no engine measurement after {args.load_timeout} s {what}")
            time.sleep(0.1)
        with open(path) as f:
            result = json.load(f)
        os.remove(path)
        return result

    def show(engine: dict, when: str) -> None:
        print(f"engine at batch {engine['batch']} ({when}): back-to-back decode {engine['decode_tokens_per_s']:.0f} "
              f"tok/s ({engine['decode_ms']:.2f} ms/step; same rows {engine['decode_same_rows_tokens_per_s']:.0f} "
              f"tok/s), serving loop without HTTP {engine['loop_tokens_per_s']:.0f} tok/s, synchronous engine.step "
              f"{engine['engine_step_tokens_per_s']:.0f} tok/s ({engine['engine_step_ms']:.2f} ms/step)", flush=True)

    running = threading.Event()  # clients send requests while set
    stop = threading.Event()
    done: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    busy = [0]  # clients with a request in flight
    resumed = [0, 0.0]  # how often the load was started, when

    def client(i: int) -> None:
        rng = random.Random(i)
        seen = 0
        while True:
            running.wait()
            if stop.is_set():
                return
            with lock:
                if not running.is_set():
                    continue
                busy[0] += 1
                generation, start = resumed
            try:
                if generation != seen:  # spread the clients' first requests over one request's time
                    seen = generation
                    time.sleep(max(0.0, start + args.stagger * i / args.clients - time.perf_counter()))
                r = _serve_client(port, rng.choice(SERVE_PROMPTS), args.max_tokens, args.temperature)
                with lock:
                    done.append(r)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
            finally:
                with lock:
                    busy[0] -= 1

    rounds = []
    contention: dict[float, list[float]] = {}  # busy fraction -> decode tok/s, interleaved with 0
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    try:
        deadline = time.monotonic() + args.load_timeout
        while True:
            if child.poll() is not None:
                raise SystemExit(f"the server process ended with status {child.returncode} while loading")
            if time.monotonic() > deadline:
                raise SystemExit(f"the server was not ready after {args.load_timeout} s")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as f:
                    if f.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        engine = wait_for(engine_json, "while loading")
        engine_tokens = _server_counter(port, "grok1_generated_tokens_total")
        show(engine, "before round 1")
        for t in threads:
            t.start()
        for k in range(args.rounds):
            with lock:
                resumed[:] = [resumed[0] + 1, time.perf_counter()]
            running.set()
            time.sleep(args.warmup)  # the batch fills up
            t0, tokens0 = time.perf_counter(), _server_counter(port, "grok1_generated_tokens_total")
            prefills0 = _prefill_counts(port)
            cpu0, server0 = os.times(), _cpu_seconds(child.pid)
            time.sleep(args.seconds)
            t1, tokens1 = time.perf_counter(), _server_counter(port, "grok1_generated_tokens_total")
            prefills1 = _prefill_counts(port)
            cpu1, server1 = os.times(), _cpu_seconds(child.pid)
            running.clear()
            idle_by = time.monotonic() + 600
            while busy[0] and time.monotonic() < idle_by:
                time.sleep(0.01)
            child.stdin.write(engine_json + "\n")
            child.stdin.flush()
            after = wait_for(engine_json, f"measuring the engine after round {k + 1}")
            after_tokens = _server_counter(port, "grok1_generated_tokens_total")
            show(after, f"after round {k + 1}")
            # Host CPU of the serving threads per generated token, over the round (its warm-up
            # and drain included; the engine measurements run on another thread).
            served = max(after_tokens - engine_tokens, 1)
            host_us = {name: 1e6 * (after["serving_threads_cpu_s"][name] - engine["serving_threads_cpu_s"][name])
                       / served for name in ("event_loop", "engine")}
            rate = (tokens1 - tokens0) / (t1 - t0)
            decode = (engine["decode_tokens_per_s"] + after["decode_tokens_per_s"]) / 2
            step = (engine["engine_step_tokens_per_s"] + after["engine_step_tokens_per_s"]) / 2
            same = (engine["decode_same_rows_tokens_per_s"] + after["decode_same_rows_tokens_per_s"]) / 2
            loop = (engine["loop_tokens_per_s"] + after["loop_tokens_per_s"]) / 2
            occupancy = (engine["loop_slot_occupancy"] + after["loop_slot_occupancy"]) / 2
            window = [r for r in done if t0 <= r["end"] <= t1]
            rounds.append({
                "t0": t0, "t1": t1, "seconds": t1 - t0, "output_tokens_per_s": rate,
                "requests_per_s": len(window) / (t1 - t0), "decode_tokens_per_s": decode,
                "engine_step_tokens_per_s": step, "decode_same_rows_tokens_per_s": same,
                "loop_tokens_per_s": loop, "loop_vs_decode": loop / decode, "server_vs_loop": rate / loop,
                "loop_slot_occupancy": occupancy, "server_vs_decode": rate / decode, "server_vs_decode_same_rows": rate / same,
                "server_vs_engine_step": rate / step,
                "clients_cpu_cores": (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (t1 - t0),
                "server_cpu_cores": (server1 - server0) / (t1 - t0),
                "load_average": os.getloadavg()[0], "engine_after": after,
                "host_cpu_us_per_token": host_us,
                "sequences_per_prefill_call": _per_call(prefills0, prefills1)})
            print(f"round {k + 1}: {rate:.0f} output tok/s = {100 * rate / decode:.0f}% of back-to-back decode "
                  f"({decode:.0f} tok/s, mean of before and after), {100 * rate / loop:.0f}% of the serving loop "
                  f"without HTTP ({loop:.0f} tok/s = {100 * loop / decode:.0f}% of decode); CPU cores: server "
                  f"{rounds[-1]['server_cpu_cores']:.2f}, clients {rounds[-1]['clients_cpu_cores']:.2f}; "
                  f"load average {rounds[-1]['load_average']:.1f}; host CPU per token: event loop "
                  f"{host_us['event_loop']:.0f} us, engine thread {host_us['engine']:.0f} us", flush=True)
            engine, engine_tokens = after, after_tokens
        stop.set()
        running.set()
        for t in threads:
            t.join(timeout=600)
        for _ in range(args.contention_repeats if args.contention else 0):
            for duty in [0.0] + args.contention:
                burner = None
                if duty:
                    burner = subprocess.Popen([sys.executable, os.path.join(REPO, "bench.py"), "_burn", "--duty",
                                               str(duty), "--seconds", str(4 * args.engine_seconds + 2)])
                    time.sleep(0.2)
                child.stdin.write(engine_json + "\n")
                child.stdin.flush()
                measured = wait_for(engine_json, "measuring the engine beside a busy process")
                if burner is not None:
                    burner.terminate()
                    burner.wait()
                contention.setdefault(duty, []).append(measured["decode_tokens_per_s"])
    finally:
        stop.set()
        running.set()
        child.terminate()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
        if os.path.exists(engine_json):
            os.remove(engine_json)

    window = [r for r in done if any(w["t0"] <= r["end"] <= w["t1"] for w in rounds)]
    ttft = [r["ttft"] for r in window]
    tpot = [r["tpot"] for r in window if r["tpot"] is not None]
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1e3 if xs else float("nan")  # noqa: E731
    med = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
    results = {
        "model": "tiny" if args.tiny else f"grok-1 width, {args.layers} layers", "host": host_info(),
        "slots": args.slots,
        "clients": args.clients, "rounds": args.rounds, "seconds": args.seconds, "max_tokens": args.max_tokens,
        "pad_sizes": list(serve_pad_sizes(args)),
        "stream_interval_ms": serve_stream_interval_ms(args),
        "pipeline_depth": serve_pipeline_depth(args),
        "temperature": args.temperature, "requests_per_s": med("requests_per_s"),
        "output_tokens_per_s": med("output_tokens_per_s"), "decode_tokens_per_s": med("decode_tokens_per_s"),
        "engine_step_tokens_per_s": med("engine_step_tokens_per_s"),
        "decode_same_rows_tokens_per_s": med("decode_same_rows_tokens_per_s"),
        "server_vs_decode": med("server_vs_decode"), "server_vs_engine_step": med("server_vs_engine_step"),
        "server_vs_decode_same_rows": med("server_vs_decode_same_rows"),
        "loop_tokens_per_s": med("loop_tokens_per_s"), "loop_vs_decode": med("loop_vs_decode"),
        "server_vs_loop": med("server_vs_loop"), "loop_slot_occupancy": med("loop_slot_occupancy"),
        "server_vs_decode_range": [min(r["server_vs_decode"] for r in rounds),
                                   max(r["server_vs_decode"] for r in rounds)],
        "server_cpu_cores": med("server_cpu_cores"), "clients_cpu_cores": med("clients_cpu_cores"),
        "host_cpu_us_per_token": {name: statistics.median(r["host_cpu_us_per_token"][name] for r in rounds)
                                  for name in ("event_loop", "engine")},
        "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
        "tpot_p50_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99), "requests": len(window),
        "errors": len(errors), "round_results": rounds,
    }
    per_call = [r["sequences_per_prefill_call"] for r in rounds if r["sequences_per_prefill_call"] is not None]
    if per_call:
        results["sequences_per_prefill_call"] = statistics.median(per_call)
    if contention:
        base = contention[0.0]
        results["contention"] = [
            {"busy_core_fraction": duty, "decode_tokens_per_s": statistics.median(rates),
             "vs_alone": statistics.median(r / b for r, b in zip(rates, base))}
            for duty, rates in sorted(contention.items())]
    print(json.dumps({k: v for k, v in results.items() if k != "round_results"}, indent=1))
    lo, hi = results["server_vs_decode_range"]
    print(f"\n{args.clients} clients, {args.slots} slots, {args.rounds} rounds of {args.seconds:g} s, medians: "
          f"{results['requests_per_s']:.2f} req/s, {results['output_tokens_per_s']:.0f} output tok/s = "
          f"{100 * results['server_vs_decode']:.0f}% (rounds {100 * lo:.0f}-{100 * hi:.0f}%) of back-to-back decode "
          f"({results['decode_tokens_per_s']:.0f} tok/s; {100 * results['server_vs_decode_same_rows']:.0f}% of "
          f"same-rows decode, {results['decode_same_rows_tokens_per_s']:.0f} tok/s), "
          f"{100 * results['server_vs_loop']:.0f}% of the serving loop without HTTP "
          f"({results['loop_tokens_per_s']:.0f} tok/s = {100 * results['loop_vs_decode']:.0f}% of decode, "
          f"slots fed {100 * results['loop_slot_occupancy']:.0f}%), "
          f"{100 * results['server_vs_engine_step']:.0f}% of "
          f"synchronous engine steps ({results['engine_step_tokens_per_s']:.0f} tok/s); TTFT p50/p99 "
          f"{results['ttft_p50_ms']:.1f}/{results['ttft_p99_ms']:.1f} ms, TPOT p50/p99 "
          f"{results['tpot_p50_ms']:.2f}/{results['tpot_p99_ms']:.2f} ms; CPU cores: server "
          f"{results['server_cpu_cores']:.2f}, clients {results['clients_cpu_cores']:.2f}; host CPU per token: "
          f"event loop {results['host_cpu_us_per_token']['event_loop']:.0f} us, engine thread "
          f"{results['host_cpu_us_per_token']['engine']:.0f} us; {len(errors)} errors"
          + (f" (first: {errors[0]})" if errors else "")
          + (f"; {results['sequences_per_prefill_call']:.2f} sequences per prefill call"
             if "sequences_per_prefill_call" in results else ""))
    for row in results.get("contention", []):
        print(f"engine decode beside a process busy {100 * row['busy_core_fraction']:.0f}% of one core: "
              f"{row['decode_tokens_per_s']:.0f} tok/s = {100 * row['vs_alone']:.0f}% of its rate alone "
              f"(medians of {args.contention_repeats}, interleaved)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def _pad_sizes(text: str) -> list[int]:
    """argparse type of --pad-sizes: run.parse_pad_sizes (imported here: bench.py loads run.py
    only where it is needed)."""
    import run

    return list(run.parse_pad_sizes(text))


def main(argv: list[str] | None = None) -> Any:
    """Runs one subcommand; returns what it returns (a report dict for most)."""
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
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, from {', '.join(METHODS)} (raw_read, the "
                        "yardstick, always runs)")
    p.set_defaults(func=loader_bench)

    p = sub.add_parser("model", help="decode/prefill at Grok-1 width, fast vs reference, vs roofline")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batches", default="1,8,32", help="decode batch sizes")
    p.add_argument("--context", type=int, default=1024, help="tokens already in the KV cache when decoding")
    p.add_argument("--cache-len", type=int, default=None,
                   help="KV cache positions for decode (default: the context plus room for the timed steps)")
    p.add_argument("--prefill", type=int, default=1024, help="prompt length of the prefill (0: decode only)")
    p.add_argument("--modes", default="fast,reference")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--compile-layers", type=int, default=64,
                   help="layers of the abstract compile-time check of the runner's prefill and decode "
                        "steps, sharded over --mesh (0 skips it)")
    p.add_argument("--tiny", action="store_true", help="tiny config: a smoke test on any machine")
    p.add_argument("--mesh", default=None, help="DATAxMODEL mesh over the local devices, e.g. 1x2 "
                                                 "(default: one device, no mesh)")
    p.add_argument("--share", type=int, default=None, metavar="N",
                   help="one device's share of a 1xN mesh (1/N of the heads, experts' width and vocabulary) "
                        "on one device: the local work of a sharded step, without its collectives")
    p.add_argument("--json", default="bench_model.json", help="write the results here")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="JAX's persistent compilation cache directory, 'off' to turn it off (default "
                        "$GROK1_COMPILATION_CACHE, else ~/.cache/grok1/jax)")
    p.set_defaults(func=model_bench)

    p = sub.add_parser("profile", help="jax.profiler trace of decode steps: device time per kernel and per "
                                       "layer, and the host's time enqueueing them")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--cache-len", type=int, default=None, help="KV cache positions (default: the context "
                                                                "plus room for the steps)")
    p.add_argument("--mesh", default=None, help="DATAxMODEL mesh over the local devices, e.g. 1x2")
    p.add_argument("--share", type=int, default=None, metavar="N",
                   help="one device's share of a 1xN mesh on one device (as bench.py model --share)")
    p.add_argument("--trace-dir", default="bench_out/trace")
    p.add_argument("--json", default=None, help="write the per-kernel table here")
    p.add_argument("--tiny", action="store_true", help="the tiny model (a smoke test for any machine)")
    p.set_defaults(func=profile_bench)

    p = sub.add_parser("depth", help="start-up, per-layer decode and peak memory against depth (fresh "
                                     "processes, repeated, interleaved)")
    p.add_argument("--layers", default="8,16,32,48", help="depths to measure")
    p.add_argument("--repeats", type=int, default=3, help="rounds over all depths (median and spread)")
    p.add_argument("--mesh", default="1x2", help="DATAxMODEL mesh")
    p.add_argument("--parts", default="startup,decode", help="startup (run.py --random-weights) and/or "
                                                             "decode (bench.py model)")
    p.add_argument("--no-warm", dest="warm", action="store_false",
                   help="skip the second start from the filled compilation cache")
    p.add_argument("--steps", type=int, default=16, help="tokens generated by each start")
    p.add_argument("--batches", default="1,8", help="decode batch sizes of the model bench")
    p.add_argument("--context", type=int, default=1024, help="tokens in the cache while decoding")
    p.add_argument("--prefill", type=int, default=128, help="prefill length of the model bench")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--cache-root", default=os.path.join(tempfile.gettempdir(), "grok1-depth-cache"),
                   help="compilation caches of the runs (emptied for each cold start)")
    p.add_argument("--tiny", action="store_true", help="the tiny config: a smoke test on any machine")
    p.add_argument("--child-timeout", type=float, default=900.0, metavar="SECONDS",
                   help="end a run that takes longer (its log then holds every thread's stack) and go on "
                        "with the next (default 900)")
    p.add_argument("--out", default="bench_depth", help="directory of each run's JSON and log")
    p.add_argument("--json", default="bench_depth.json", help="all runs and the summary")
    p.set_defaults(func=depth_bench)

    p = sub.add_parser("precision", help="bf16 precision vs the float64 reference (issue 12)")
    p.add_argument("--configs", default="2 layers,12 layers", help="recipes, comma-separated")
    p.add_argument("--modes", default="fast,reference", help="MoE modes, comma-separated")
    p.add_argument("--seeds", type=int, default=5, help="random models per recipe (p90 table)")
    p.add_argument("--ablation-seeds", type=int, default=3,
                   help="models per recipe for the rounding costs (host numpy; 0 skips them)")
    p.add_argument("--json", default=None, help="write every number here")
    p.set_defaults(func=precision_bench)

    p = sub.add_parser("kernels", add_help=False,  # --help goes to kernel_bench's own parser
                       help="GPU kernel checks, micro-benchmarks and tuning sweeps "
                            "(kernel_bench.py; `bench.py kernels --help` lists its options)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=kernels_bench)

    p = sub.add_parser("activations", help="decode-size ops with bf16 against float32 (hi/lo split) "
                                           "activations (issue 12)")
    p.add_argument("--small", action="store_true", help="tiny widths, Pallas interpreted: a CPU smoke test")
    p.add_argument("--json", default=None, help="write every number here")
    p.set_defaults(func=activations_bench)

    p = sub.add_parser("project", help="measured per-layer decode times -> 64-layer tokens/s on N devices, "
                                       "beside the roofline (arithmetic only, no devices)")
    p.add_argument("--devices", type=int, default=8, help="devices of the projected 1xN mesh")
    p.add_argument("--device-kind", choices=sorted(NOMINAL_BANDWIDTH), default="h200")
    p.add_argument("--bandwidth-gbs", type=float, default=None,
                   help="bandwidth per device in GB/s for the roofline, e.g. the measured copy bandwidth "
                        "(default: the kind's nominal)")
    p.add_argument("--measured", action="append", default=[], metavar="BATCH=N:MS,N:MS",
                   help="per-layer decode ms on N devices, once per batch: --measured 1=1:0.59,2:0.45")
    p.add_argument("--from-json", nargs="+", default=None, metavar="FILE",
                   help="bench.py model --json results instead: 2+ layer counts per device count")
    p.add_argument("--host-json", nargs="+", default=None, metavar="FILE",
                   help="bench.py model --json results to take the host's enqueue floor from instead of "
                        "--from-json's (2+ layer counts, e.g. a newer step measured on fewer devices)")
    p.add_argument("--mode", default="fast", help="which mode's rows to read from the files")
    p.add_argument("--layers", type=int, default=64)
    p.add_argument("--context", type=int, default=None,
                   help="tokens in the KV cache for the roofline (default: the files', else 1024)")
    p.add_argument("--non-layer-ms", type=float, default=None,
                   help="measured time outside the layers on N devices (default: fitted from the files' "
                        "intercepts, else its roofline)")
    p.add_argument("--json", default=None, help="write the projection here")
    p.set_defaults(func=project_bench)

    p = sub.add_parser("memory", help="the planner's per-device memory against the peak of the "
                                      "runner's compiled steps on the devices present (zero weights)")
    p.add_argument("--phase", choices=("prefill", "decode", "both"), default="both")
    p.add_argument("--layers", type=int, default=None, help="layers of Grok-1 width (default 64)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=None, help="KV cache length (default 8192)")
    p.add_argument("--mesh", default=None, help="DATAxMODEL (default: the planner's layout)")
    p.add_argument("--moe-impl", choices=model.MOE_IMPLS, default=None)
    p.add_argument("--tiny", action="store_true", help="the tiny config instead of Grok-1 width")
    p.set_defaults(func=memory_bench)

    p = sub.add_parser("serve", help="the HTTP server under load: req/s, tok/s, TTFT, TPOT vs the engine")
    p.add_argument("--tiny", action="store_true", help="the tiny demo model (CPU); default a Grok-1-width model")
    p.add_argument("--layers", type=int, default=4, help="layers of the Grok-1-width model (default 4)")
    p.add_argument("--slots", type=int, default=8, help="the server's batch (default 8)")
    p.add_argument("--clients", type=int, default=16, help="concurrent streaming clients (default 16)")
    p.add_argument("--rounds", type=int, default=5,
                   help="measured windows, each followed by an engine measurement (default 5); medians are reported")
    p.add_argument("--seconds", type=float, default=6.0, help="length of each measured window (default 6)")
    p.add_argument("--warmup", type=float, default=2.0,
                   help="seconds of load before each window (default 2)")
    p.add_argument("--stagger", type=float, default=0.5,
                   help="the clients' first requests of a round start over this many seconds (default 0.5)")
    p.add_argument("--engine-seconds", type=float, default=1.0,
                   help="seconds of each of the engine's decode measurements (default 1)")
    p.add_argument("--contention", type=lambda v: [float(x) for x in v.split(",") if x], default=[],
                   help="after the rounds, the engine's decode rate while another process keeps one core "
                        "busy these fractions of the time, e.g. 0.2,0.4 (CPU: how host work beside the model "
                        "slows it), interleaved with the rate alone")
    p.add_argument("--contention-repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens of every request (default 128)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--mesh", default=None, help="DATAxMODEL mesh (default: chosen from the devices present)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer of the Grok-1-width model (default: the demo's, trained on the fly)")
    p.add_argument("--pad-sizes", type=_pad_sizes, default=None,
                   help="the server's prompt buckets, e.g. 32,128 (default: run.py serve's for the model)")
    p.add_argument("--stream-interval-ms", type=float, default=None,
                   help="the server's --stream-interval-ms (default: run.py serve's)")
    p.add_argument("--pipeline-depth", type=int, default=None,
                   help="decode steps the server's engine keeps dispatched (default: server.PIPELINE_DEPTH); "
                        "the serving loop measured beside the rounds uses the same")
    p.add_argument("--load-timeout", type=float, default=1800.0, help="seconds to wait for the server to load")
    p.add_argument("--json", default=None, help="write the results here")
    p.set_defaults(func=serve_bench)

    c = sub.add_parser("_serve_child", help=argparse.SUPPRESS)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--slots", type=int, required=True)
    c.add_argument("--engine-json", required=True)
    c.add_argument("--engine-seconds", type=float, default=1.0)
    c.add_argument("--temperature", type=float, default=0.7)
    c.add_argument("--max-tokens", type=int, default=128)
    c.add_argument("--tiny", action="store_true")
    c.add_argument("--layers", type=int, default=4)
    c.add_argument("--mesh", default=None)
    c.add_argument("--tokenizer", default=None)
    c.add_argument("--pad-sizes", type=_pad_sizes, default=None)
    c.add_argument("--stream-interval-ms", type=float, required=True)
    c.add_argument("--pipeline-depth", type=int, default=None)
    c.set_defaults(func=serve_child)

    c = sub.add_parser("_burn", help=argparse.SUPPRESS)
    c.add_argument("--duty", type=float, required=True)
    c.add_argument("--seconds", type=float, required=True)
    c.set_defaults(func=burn_child)

    c = sub.add_parser("_loader_child", help=argparse.SUPPRESS)
    c.add_argument("--dir", required=True)
    c.add_argument("--method", choices=sorted(METHODS), required=True)
    c.add_argument("--workers", type=int, default=32)
    c.add_argument("--cold", action="store_true")
    c.set_defaults(func=loader_child)

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["kernels"]:  # its options, --help included, are kernel_bench's own
        return kernels_bench(argparse.Namespace(rest=argv[1:]))
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except ValueError as e:  # bad inputs of `project`: one line, exit 2
        if args.command != "project":
            raise
        print(f"bench.py project: error: {e}", file=sys.stderr)
        sys.exit(2)
    if isinstance(status, int) and status:
        sys.exit(status)
    return status


if __name__ == "__main__":
    main()
