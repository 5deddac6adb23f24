"""Session 14: run bench.py with the one-token output kernel's tiling patched (kernels.moe_one_token asks
default_config("down", 16, 1, F, D) for it: one tile, all experts per program; commit 393a7a1, reverted
after call B).
python3 down_probe.py BLOCK_N SPLIT_K -- <bench.py arguments>  (from a tree's root, PYTHONPATH=.)"""
import sys

import kernels

BLOCK_N, SPLIT = int(sys.argv[1]), int(sys.argv[2])
tuned = kernels.default_config


def patched(op, block_m, n_tiles, k, n, transposed=False):
    cfg = tuned(op, block_m, n_tiles, k, n, transposed)
    if op == "down" and n_tiles == 1 and block_m == 16:
        cfg = cfg._replace(block_n=BLOCK_N, split_k=SPLIT)
    return cfg


kernels.default_config = patched
import bench  # noqa: E402

bench.main(sys.argv[4:])
