"""Session 10: the device's time per call of jitted chains, from one jax.profiler trace."""
import time
import jax
import bench


def device_times(fns, args, trace_dir, reps, chain):
    """Device microseconds per call of each chain in fns, from one jax.profiler trace: each
    chain runs `reps` times, then the host sleeps, so the GPU's kernels fall into one burst per
    chain. Returns [(all kernels' us per call, the Pallas kernel's us per call)] or None per
    chain whose burst could not be told apart (its Pallas kernel count is not reps * chain)."""
    for f in fns:
        jax.block_until_ready(f(*args))
    jax.profiler.start_trace(trace_dir)
    for f in fns:
        for _ in range(reps):
            out = f(*args)
        jax.block_until_ready(out)
        time.sleep(0.03)
    jax.profiler.stop_trace()
    data = bench._newest_trace(trace_dir)
    events = sorted(((e.start_ns, e.duration_ns, e.name) for p in data.planes if p.name.startswith("/device:GPU:0")
                     for line in p.lines if line.name.startswith("Stream") for e in line.events))
    bursts, last_end = [], None
    for start, dur, name in events:
        if last_end is None or start - last_end > 10e6:  # 10 ms: the sleep between chains
            bursts.append([])
        bursts[-1].append((dur, name))
        last_end = start + dur if last_end is None else max(last_end, start + dur)
    if len(bursts) != len(fns):
        print(f"  trace: {len(bursts)} bursts for {len(fns)} chains; no device times", flush=True)
        return [None] * len(fns)
    out = []
    for burst in bursts:
        mine = [d for d, n in burst if n.startswith("int8_")]
        calls = reps * chain
        out.append((sum(d for d, _ in burst) / calls / 1e3, sum(mine) / calls / 1e3) if len(mine) == calls else None)
    return out
