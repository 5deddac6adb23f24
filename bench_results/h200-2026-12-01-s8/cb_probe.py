"""Session 8 probe (issue 11's host floor). Call s8a found why XLA re-records the decode
step's CUDA graph at every step: two of the program's allocations move between calls
(updated_allocs=2), and XLA shares each with many temporaries, so 47 of 69 commands are
updated (~230 us per 2-layer step). The two are fresh outputs: the logits, and layer 1's
step counter, whose donated input jax drops as unused (keep_unused=False), so the output
cannot alias it. With no allocation moving (cb_minimal.py) XLA launches the graph as
recorded. Variants, each run as its own process:
  fwd_plain   jit(apply, donate memory)                      (bench.py model's step today)
  fwd_keep    same, keep_unused=True                         (every step counter aliased)
  fwd_into    keep_unused + logits written into a donated buffer (nothing fresh)
  run_decode  runners' decode step as the engine runs it (numpy `active` each call)
  run_dev     same with `active` a device array held still
  run_keep    runners' decode with keep_unused=True, `active` held still
Prints the host's enqueue time (device idle) and the step time queued back to back.
argv: variant layers [batch]"""
import dataclasses, functools, os, statistics, sys, time
sys.path.insert(0, os.getcwd())
import jax, jax.numpy as jnp, numpy as np
import bench, model, runners

variant, layers = sys.argv[1], int(sys.argv[2])
batch = int(sys.argv[3]) if len(sys.argv) > 3 else 1
tiny = os.environ.get("TINY") == "1"
context = 64 if tiny else 1024
cache_len = context + 128
base = model.tiny_config(num_layers=layers) if tiny else model.grok_1_config(num_layers=layers)
config = dataclasses.replace(base, sequence_len=cache_len).initialize()
mesh = runners.make_mesh((1, 1), (1, 1))
params = model.prepare_for_inference(model.init_random_params(config, seed=0, mesh=mesh, on_device=True), config,
                                     consume=True)
memory = bench.filled_memory(config, batch, context, cache_len, mesh)
keep = variant in ("fwd_keep", "fwd_into", "run_keep")
jit = functools.partial(jax.jit, keep_unused=True) if keep else jax.jit

if variant.startswith("fwd"):
    apply = model.make_apply(config, mesh)
    tokens = jax.random.randint(jax.random.key(1), (batch, 1), 4, config.vocab_size)
    length = jnp.ones((batch,), jnp.int32)
    if variant == "fwd_into":
        def into(params, tokens, memory, length, logits_buf):
            out = apply(params, tokens, memory, length)
            return out.logits, out.model_state
        f = jit(into, donate_argnums=(2, 4))
        s = {"mem": memory, "buf": jnp.zeros((batch, 1, config.model.vocab_size), jnp.float32)}

        def step():
            s["buf"], s["mem"] = f(params, tokens, s["mem"], length, s["buf"])
            return s["buf"]
    else:
        f = jit(apply, donate_argnums=(2,))
        s = {"mem": memory}

        def step():
            out = f(params, tokens, s["mem"], length)
            s["mem"] = out.model_state
            return out.logits
else:
    if variant == "run_keep":
        runners.jax = type("J", (), {"__getattr__": lambda self, n: jit if n == "jit" else getattr(jax, n)})()
    _, decode = runners.make_step_functions(config, mesh, batch)
    runners.jax = jax
    state = jax.device_put(runners._empty_state(batch, config.model.vocab_size),
                           jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    active_np = np.ones((batch,), bool)
    active_dev = jax.device_put(active_np)
    s = {"mem": memory, "state": state}

    def step():
        active = np.ones((batch,), bool) if variant == "run_decode" else active_dev
        s["mem"], s["state"], out = decode(params, s["mem"], s["state"], active)
        return out

lowered = (f.lower(params, tokens, s["mem"], length, s["buf"]) if variant == "fwd_into" else
           f.lower(params, tokens, s["mem"], length) if variant.startswith("fwd") else
           decode.lower(params, s["mem"], s["state"], active_dev))
hlo = lowered.as_text()
aliased = hlo.count("tf.aliasing_output") + hlo.count("jax.buffer_donor")
print(f"{variant}: {aliased} donated parameters marked in the lowered module", flush=True)
for _ in range(3):
    jax.block_until_ready(step())


def dispatch_us(reps=20):
    jax.block_until_ready(step())
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); out = step(); ts.append(time.perf_counter() - t); jax.block_until_ready(out)
    return statistics.median(ts) * 1e6


def queued_ms(n=20):
    jax.block_until_ready(step())
    t = time.perf_counter()
    for _ in range(n):
        out = step()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n * 1e3


h, q = [], []
for _ in range(int(os.environ.get("ROUNDS", "3"))):
    h.append(dispatch_us()); q.append(queued_ms())
print(f"{variant} {layers} layers batch {batch}: host enqueue {[round(x, 1) for x in h]} us, step queued "
      f"{[round(x, 4) for x in q]} ms; medians {statistics.median(h):.1f} us, {statistics.median(q):.4f} ms",
      flush=True)
