"""Session 14, call C: run bench.py with the one-token output kernel's tiling patched, as main has it (each
program one expert's K slice: kernels.moe_one_token asks default_config("down", 16, k, F, D); at batch 1,
k = 2 tiles, the only "down" call with 2 tiles of 16 rows).
python3 down_probe2.py BLOCK_N SPLIT_K -- <bench.py arguments>  (from a tree's root, PYTHONPATH=.)"""
import sys

import kernels

BLOCK_N, SPLIT = int(sys.argv[1]), int(sys.argv[2])
tuned = kernels.default_config


def patched(op, block_m, n_tiles, k, n, transposed=False):
    cfg = tuned(op, block_m, n_tiles, k, n, transposed)
    if op == "down" and n_tiles == 2 and block_m == 16:
        cfg = cfg._replace(block_n=BLOCK_N, split_k=SPLIT)
    return cfg


kernels.default_config = patched
import bench  # noqa: E402

bench.main(sys.argv[4:])
