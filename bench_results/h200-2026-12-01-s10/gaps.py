"""Session 10 call E: where the device waits between a decode step's kernels. One profile
(bench.profile_decode, 4 layers, batch 1, 10 steps) whose trace is kept; on the compute
stream each idle interval before a kernel is charged to (kernel before -> kernel after).
Prints per layer: kernels' time, idle time, and the pairs with the most idle time.

    python3 gaps.py SHARE_OR_0 TAG
"""
import collections, glob, json, os, sys
import jax
import bench

share = int(sys.argv[1]) or None
tag = sys.argv[2]
out_dir = os.environ.get("OUT", ".")
trace_dir = f"/tmp/trace_gaps_{tag}"
r = bench.profile_decode(4, 1, 1024, None, 10, trace_dir, share=share)
files = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True), key=os.path.getmtime)
data = jax.profiler.ProfileData.from_file(files[-1])
plane = [p for p in data.planes if p.name.startswith("/device:GPU:0")][0]
line = max((ln for ln in plane.lines if ln.name.startswith("Stream")), key=lambda ln: len(list(ln.events)))
events = sorted((e.start_ns, e.end_ns, e.name) for e in line.events)
busy, idle, pairs = 0, 0, collections.defaultdict(lambda: [0, 0])
for (s0, e0, n0), (s1, e1, n1) in zip(events, events[1:]):
    busy += e0 - s0
    gap = s1 - e0
    if 0 < gap < 200_000:  # longer: between steps (the host's turn), not inside one
        idle += gap
        pairs[(n0, n1)][0] += 1
        pairs[(n0, n1)][1] += gap
steps, layers = 10, 4
res = {"tag": tag, "share": share, "kernels_us_per_layer": busy / steps / layers / 1e3,
       "idle_us_per_layer": idle / steps / layers / 1e3,
       "pairs": sorted(([a, b, c / steps, ns / steps / layers / 1e3] for (a, b), (c, ns) in pairs.items()),
                       key=lambda p: -p[3])}
print(f"GAPS {tag}: kernels {res['kernels_us_per_layer']:.1f} us per layer (incl. outside layers / 4), "
      f"idle inside steps {res['idle_us_per_layer']:.1f} us per layer", flush=True)
for a, b, c, us in res["pairs"][:20]:
    print(f"GAPS {tag}: {us:6.2f} us/layer {c:5.1f}x per step  {a[:40]} -> {b[:40]}", flush=True)
json.dump(res, open(f"{out_dir}/gaps-{tag}.json", "w"), indent=1)
