"""Session 12: the dense decode kernel's tiling at one device's share of 8, in the model (bench.py profile).
python3 dense_probe.py BLOCK_N BLOCK_K MIN_SPLIT_ROWS OUT.json  (from a tree's root, PYTHONPATH=.)"""
import sys

import kernels

bn, bk, rows = (int(a) for a in sys.argv[1:4])
key = ("dense", "decode", True)
kernels._TUNED[key] = kernels._TUNED[key]._replace(block_n=bn, block_k=bk)
kernels._MIN_SPLIT_ROWS["dense"] = rows
for name, k, n in (("q/k/v", 6144, 1024), ("output", 768, 6144)):
    print(f"{name} [{k} -> {n}]: {kernels.default_config('dense', 16, 1, k, n, transposed=True)}", flush=True)
import bench  # noqa: E402

bench.main(["profile", "--share", "8", "--layers", "4", "--batch", "1", "--json", sys.argv[4]])
