"""Session 14: run bench.py with the one-token output kernel's tiling patched.
python3 down_probe.py TILES BLOCK_N SPLIT_K -- <bench.py arguments>  (from a tree's root, PYTHONPATH=.)
TILES: the tiles kernels.moe_one_token asks default_config("down", 16, TILES, F, D) for: 1 in call B's
"fold" tree (393a7a1, reverted: each program walks every expert), 2 in call C's (main: one expert each)."""
import sys

import kernels

TILES, BLOCK_N, SPLIT = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
tuned = kernels.default_config


def patched(op, block_m, n_tiles, k, n, transposed=False):
    cfg = tuned(op, block_m, n_tiles, k, n, transposed)
    if op == "down" and n_tiles == TILES and block_m == 16:
        cfg = cfg._replace(block_n=BLOCK_N, split_k=SPLIT)
    return cfg


kernels.default_config = patched
import bench  # noqa: E402

bench.main(sys.argv[5:])
