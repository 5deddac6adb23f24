"""Session 13: run bench.py with the junction kernel's slices and warps patched.
python3 junction_probe.py SLICES WARPS -- <bench.py arguments>  (from a tree's root, PYTHONPATH=.)"""
import sys

import kernels

kernels.JUNCTION_SLICES, kernels.JUNCTION_WARPS = int(sys.argv[1]), int(sys.argv[2])
import bench  # noqa: E402

bench.main(sys.argv[4:])
