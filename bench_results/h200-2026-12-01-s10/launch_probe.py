"""Session 10 call J: what a CUDA-graph node costs the host, XLA fusions against Pallas
(Triton) kernels. One jitted program of N tiny dependent kernels, either N XLA fusions (an
optimization barrier between them) or N Pallas kernels; timed by the wall clock with calls
queued back to back, and profiled: the host's enqueue events and the device's kernels, per
node. Decides whether folding small XLA ops into Pallas kernels also lowers the host's floor."""
import statistics, sys, time
import jax, jax.numpy as jnp
from jax.experimental import pallas as pl
import bench


def pallas_step(x):
    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 1.0001 + 1.0
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), name="tiny")(x)


def xla_step(x):
    return jax.lax.optimization_barrier(x * 1.0001 + 1.0)


def program(step, n):
    @jax.jit
    def f(x):
        for _ in range(n):
            x = step(x)
        return x
    return f


x = jnp.ones((16, 128), jnp.float32)
for n in (32, 128):
    for kind, step in (("xla", xla_step), ("pallas", pallas_step)):
        f = program(step, n)
        jax.block_until_ready(f(x))
        walls = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(50):
                y = f(x)
            jax.block_until_ready(y)
            walls.append((time.perf_counter() - t) / 50)
        trace = f"/tmp/trace_launch_{kind}_{n}"
        jax.profiler.start_trace(trace)
        for _ in range(20):
            y = f(x)
        jax.block_until_ready(y)
        jax.profiler.stop_trace()
        data = bench._newest_trace(trace)
        host = bench._host_event_times(data)
        lines = bench._device_kernel_times(data)
        kernels = sum(e[0] for name, t in lines.items() if name.startswith("Stream") for e in t.values()) / 20
        dev = sum(e[1] for name, t in lines.items() if name.startswith("Stream") for e in t.values()) / 20 / 1e3
        per = {k: v[1] / 20 / 1e3 for k, v in host.items()}
        print(f"RESULT {kind:6} n={n:3}: wall {statistics.median(walls) * 1e6:7.1f} us per call; device {dev:6.1f} us "
              f"in {kernels:.0f} kernels ({dev / max(kernels, 1):.2f} each); host per call: "
              + ", ".join(f"{k} {v:.1f}" for k, v in per.items()) + f"; cuGraphLaunch per node "
              f"{per['cuGraphLaunch'] / n:.2f} us, ExecuteThunks per node {per['ExecuteThunks'] / n:.2f} us", flush=True)
