"""Session 12: the gated decode kernel's pipeline stages at one device's share of 8 (32-column blocks), in the
model (bench.py profile). python3 gated_probe.py STAGES OUT.json  (from a tree's root, PYTHONPATH=.)"""
import sys

import kernels

key = ("gated", "decode", True)
kernels._TUNED[key] = kernels._TUNED[key]._replace(num_stages=int(sys.argv[1]))
print(f"gated at the share of 8, batch 1: {kernels.default_config('gated', 16, 2, 6144, 4096, transposed=True)}",
      flush=True)
import bench  # noqa: E402

bench.main(["profile", "--share", "8", "--layers", "4", "--batch", "1", "--json", sys.argv[2]])
