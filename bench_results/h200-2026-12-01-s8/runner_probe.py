"""Session 8 call E probe: the runner's decode step (runners.make_step_functions) as the engine
calls it (numpy `active`, the StepOutput read back), in whatever tree is the working dir:
the host's enqueue time with the device idle and the time per step queued back to back.
argv: layers batch [mesh, e.g. 1x2]."""
import dataclasses, os, statistics, sys, time
sys.path.insert(0, os.getcwd())
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import bench, model, runners

layers, batch = int(sys.argv[1]), int(sys.argv[2])
shape = tuple(int(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "1x1").split("x"))
tiny = os.environ.get("TINY") == "1"
context = 64 if tiny else 1024
cache_len = context + 256
base = model.tiny_config(num_layers=layers) if tiny else model.grok_1_config(num_layers=layers)
config = dataclasses.replace(base, sequence_len=cache_len).initialize()
mesh = runners.make_mesh(shape, (1, 1))
params = model.prepare_for_inference(model.init_random_params(config, seed=0, mesh=mesh, on_device=True), config,
                                     consume=True)
_, decode = runners.make_step_functions(config, mesh, batch)
s = {"mem": bench.filled_memory(config, batch, context, cache_len, mesh),
     "state": jax.device_put(runners._empty_state(batch, config.model.vocab_size), NamedSharding(mesh, P()))}


def step():
    active = np.ones((batch,), bool)  # a new numpy array each step, as the engine's
    s["mem"], s["state"], out = decode(params, s["mem"], s["state"], active)
    return out


def collect(out):  # as the engine's collect(): read the tokens, hand the buffers back
    np.asarray(out.draw.token)
    if hasattr(decode, "recycle"):
        decode.recycle(out)


for _ in range(3):
    collect(step())


def dispatch_us(reps=20):
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); out = step(); ts.append(time.perf_counter() - t); collect(out)
    return statistics.median(ts) * 1e6


def queued_ms(n=20, depth=2):  # the engine pipelined: step N dispatched, then step N - depth collected
    collect(step())
    t = time.perf_counter()
    outs = []
    for _ in range(n):
        outs.append(step())
        if len(outs) > depth:
            collect(outs.pop(0))
    for out in outs:
        collect(out)
    return (time.perf_counter() - t) / n * 1e3


h, q = [], []
for _ in range(int(os.environ.get("ROUNDS", "3"))):
    h.append(dispatch_us()); q.append(queued_ms())
print(f"runner decode {layers} layers batch {batch} mesh {shape}: host enqueue {[round(x, 1) for x in h]} us, "
      f"step queued {[round(x, 4) for x in q]} ms; medians {statistics.median(h):.1f} us, {statistics.median(q):.4f} ms",
      flush=True)
