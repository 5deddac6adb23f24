"""Session 10 call G: what a GPU trace's kernel events carry (their stats), beside the compiled
program's instruction names, for bench.py profile's placement of kernels by HLO instruction."""
import collections
import bench

r = bench.profile_decode(2, 1, 64, None, 2, "/tmp/trace_probe", share=8)
d = bench._newest_trace("/tmp/trace_probe")
for p in d.planes:
    print("PLANE", p.name, [ln.name for ln in p.lines][:12])
for p in d.planes:
    if not p.name.startswith("/device:GPU:0"):
        continue
    for ln in p.lines:
        seen = collections.OrderedDict()
        for e in ln.events:
            if e.name not in seen:
                seen[e.name] = list(e.stats)
        print("LINE", ln.name, len(seen))
        for n, st in list(seen.items())[:25]:
            print("  EVENT", n, [(k, str(v)[:120]) for k, v in st])
