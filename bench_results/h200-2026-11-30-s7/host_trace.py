"""Session 7 probe (issue 11's host floor): the host side of a jax.profiler trace of decode
steps. bench.profile_decode takes the trace; here every host thread's events are summed by
name (count per step, microseconds per step), so that the work the host does per kernel
launch shows where its ~0.19 ms per layer goes."""
import glob, json, os, sys
import jax
sys.path.insert(0, os.getcwd())
import bench

layers, mesh = int(sys.argv[1]), (None if sys.argv[2] == "1" else (1, int(sys.argv[2])))
trace_dir, steps = sys.argv[3], 5
bench.profile_decode(layers, 1, 1024, mesh, steps, trace_dir)
files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
data = jax.profiler.ProfileData.from_file(files[-1])
out = {}
for plane in data.planes:
    if not plane.name.startswith("/host"):
        continue
    for line in plane.lines:
        table = {}
        for e in line.events:
            c = table.setdefault(e.name, [0, 0])
            c[0] += 1
            c[1] += e.duration_ns
        busy = sum(v[1] for v in table.values())
        if busy < 1e5:
            continue
        rows = sorted(table.items(), key=lambda kv: -kv[1][1])
        out[f"{plane.name} | {line.name}"] = [(n[:120], c / steps, ns / steps / 1e3) for n, (c, ns) in rows[:60]]
for name, rows in out.items():
    print(f"=== {name}")
    for n, c, us in rows[:45]:
        print(f"{us:10.1f} us/step {c:7.1f}x  {n}")
json.dump(out, open(os.path.join(os.environ.get("R", "/tmp"), f"host_trace_L{layers}_m{sys.argv[2]}.json"), "w"), indent=1)
