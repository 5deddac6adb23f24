"""bench.py with settings overridden, for A/B runs in one call:
    python .scratch/variant.py [nosplit=BLOCK_N] [splitrows=N] -- <bench.py args>
nosplit: decode dense and down kernels without split-K, BLOCK_N-wide column blocks instead;
splitrows: kernels.SPLIT_MAX_ROWS (0: bf16 activations into every GPU matmul, as before issue 12)."""
import os, sys
sys.path.insert(0, os.getcwd())
import kernels
sep = sys.argv.index("--")
for opt in sys.argv[1:sep]:
    key, val = opt.split("=")
    if key == "nosplit":
        for op in ("dense", "down"):
            kernels._TUNED[(op, "decode", True)] = kernels.KernelConfig(block_n=int(val), block_k=128, split_k=1,
                                                                        num_warps=4, num_stages=3)
    elif key == "splitrows":
        kernels.SPLIT_MAX_ROWS = int(val)
    else:
        raise SystemExit(f"unknown option {opt}")
import bench
bench.main(sys.argv[sep + 1:])
