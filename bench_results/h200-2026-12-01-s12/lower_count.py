"""Session 12: lower the runner's decode program for CUDA on a CPU and count the Triton lowerings by grid
(python3 lower_count.py LAYERS, from a tree's root with PYTHONPATH=.)."""
import sys, time, collections
import jax
from jax._src.pallas.triton import lowering as tl
import kernels, model, runners
orig = tl.lower_jaxpr_to_triton_module
stats = collections.defaultdict(lambda: [0, 0.0])
def wrapped(*a, **k):
    t = time.perf_counter()
    r = orig(*a, **k)
    gm = a[1]; name = str(getattr(gm, "debug_info", None) or "")[:60] + " " + str(getattr(gm, "grid", ""))
    stats[str(name)][0] += 1
    stats[str(name)][1] += time.perf_counter() - t
    return r
tl.lower_jaxpr_to_triton_module = wrapped
import jax._src.pallas.triton.pallas_call_registration as reg
reg.lowering.lower_jaxpr_to_triton_module = wrapped
n = int(sys.argv[1])
config = model.grok_1_config(num_layers=n).initialize()
mesh = runners.make_mesh((1, 1), config=config, devices=jax.devices()[:1])
with kernels.auto_backend("pallas"):
    prefill, decode = runners.make_step_functions(config, mesh, 1)
    a = runners.abstract_step_inputs(config, mesh, 1)
    t = time.perf_counter()
    decode.step.trace(*a, *runners.step_arguments(config, 1, None)).lower(lowering_platforms=("cuda",))
print(f"{n} layers: {time.perf_counter() - t:.2f} s")
for k, (c, s) in sorted(stats.items(), key=lambda kv: -kv[1][1]):
    print(f"  {k}: {c} lowerings, {s:.2f} s")
