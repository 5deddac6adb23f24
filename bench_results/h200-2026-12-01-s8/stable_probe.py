"""Session 7 probe (issue 11's host floor): XLA records the decode step into CUDA graphs and,
in call F's host trace, updates every graph at every step (command_buffer::update, ~100 us
per layer) before launching it. A graph must be updated when a buffer it uses moved; the
step's logits are a fresh output buffer at every call. Here the same step with the logits
written into a donated buffer (every output then aliases an input), against the plain step:
the host's enqueue time with the device idle, and the time per step queued back to back."""
import os, statistics, sys, time
sys.path.insert(0, os.getcwd())
import jax, jax.numpy as jnp
import bench, model

layers, ndev = int(sys.argv[1]), int(sys.argv[2])
tiny = os.environ.get("TINY") == "1"
config = (model.tiny_config(num_layers=layers) if tiny else model.grok_1_config(num_layers=layers))
mesh = None
if ndev > 1:
    import runners
    mesh = runners.make_mesh((1, ndev), (1, 1))
params = model.prepare_for_inference(model.init_random_params(config, seed=0, mesh=mesh, on_device=True), config,
                                     consume=True)
apply = model.make_apply(config, mesh)
batch, context = 1, (64 if tiny else 1024)
cache_len = context + 128
tokens = jax.random.randint(jax.random.key(1), (batch, 1), 4, config.vocab_size)
length = jnp.ones((batch,), jnp.int32)
plain = jax.jit(apply, donate_argnums=(2,))


def into(params, tokens, memory, length, logits_buf):
    out = apply(params, tokens, memory, length)
    return out.logits, out.model_state


aliased = jax.jit(into, donate_argnums=(2, 4))
state = {"plain": {"mem": bench.filled_memory(config, batch, context, cache_len, mesh)},
         "aliased": {"mem": bench.filled_memory(config, batch, context, cache_len, mesh)}}
first = plain(params, tokens, state["plain"]["mem"], length)
state["plain"]["mem"] = first.model_state
state["aliased"]["buf"] = first.logits + 0


def step(v):
    s = state[v]
    if v == "plain":
        out = plain(params, tokens, s["mem"], length)
        s["mem"] = out.model_state
        return out.logits
    s["buf"], s["mem"] = aliased(params, tokens, s["mem"], length, s["buf"])
    return s["buf"]


def dispatch_us(v, reps=20):
    jax.block_until_ready(step(v))
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); out = step(v); ts.append(time.perf_counter() - t); jax.block_until_ready(out)
    return statistics.median(ts) * 1e6


def queued_ms(v, n=20):
    jax.block_until_ready(step(v))
    t = time.perf_counter()
    for _ in range(n):
        out = step(v)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n * 1e3


VARIANTS = tuple(os.environ.get("ONLY", "plain,aliased").split(","))
for v in VARIANTS:  # compile and warm each
    for _ in range(3):
        jax.block_until_ready(step(v))
res = {v: {"dispatch_us": [], "step_ms": []} for v in VARIANTS}
for rnd in range(3):
    for v in VARIANTS:
        res[v]["dispatch_us"].append(dispatch_us(v))
        res[v]["step_ms"].append(queued_ms(v))
for v, r in res.items():
    print(f"{layers} layers, {ndev} device(s), {v:>8}: host enqueue {[round(x, 1) for x in r['dispatch_us']]} us, "
          f"step queued {[round(x, 4) for x in r['step_ms']]} ms; medians {statistics.median(r['dispatch_us']):.1f} us, "
          f"{statistics.median(r['step_ms']):.4f} ms", flush=True)

if os.environ.get("TRACE_DIR"):  # the host's events of 5 queued steps of each variant
    import glob
    for v in VARIANTS:
        d = os.path.join(os.environ["TRACE_DIR"], v)
        jax.block_until_ready(step(v))
        jax.profiler.start_trace(d)
        for _ in range(5):
            out = step(v)
        jax.block_until_ready(out)
        jax.profiler.stop_trace()
        data = jax.profiler.ProfileData.from_file(sorted(glob.glob(os.path.join(d, "**", "*.xplane.pb"),
                                                                   recursive=True))[-1])
        sums = {}
        for plane in data.planes:
            if plane.name.startswith("/host"):
                for line in plane.lines:
                    for e in line.events:
                        if any(k in e.name for k in ("command_buffer::", "cuGraphLaunch", "ExecuteThunks",
                                                     "ParseArguments", "ExecutePrepare")):
                            key = e.name.split(" (")[0]
                            c = sums.setdefault(key, [0, 0.0])
                            c[0] += 1
                            c[1] += e.duration_ns / 1e3
        print(f"{layers} layers, {ndev} device(s), {v:>8} host trace per step: "
              + "; ".join(f"{k} {c / 5:.1f}x {us / 5:.1f} us" for k, (c, us) in sorted(sums.items())), flush=True)
