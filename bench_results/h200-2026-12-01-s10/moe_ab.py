"""Session 10 call A, part 2: the share of 8 in the model (bench_model, fast mode, batches 1
and 8, layers 2 and 8: the per-layer slope) with the MoE kernels' default tilings against the
best of moe_sweep.py's, interleaved in one process, ROUNDS rounds.

    python3 moe_ab.py moe_sweep_share8.json [rounds]
"""
import json, statistics, sys
import bench, kernels as K

sweep = json.load(open(sys.argv[1]))
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
SHARE = sweep["share"]
F, D = 32768 // SHARE, 6144
best = {}
for name, case in sweep["cases"].items():
    ok = sorted((r for r in case["runs"] if "us" in r and r["err"] < 1e-2), key=lambda r: r["us"])
    if ok and not ok[0]["default"]:
        op, m = name.split(" M=")
        best[(op, case["tiles"])] = K.KernelConfig(**ok[0]["cfg"])
print("tuned:", {f"{op} tiles={t}": tuple(c) for (op, t), c in best.items()}, flush=True)

default_config = K.default_config


def tuned_config(op, block_m, n_tiles, k, n, transposed=False):
    if transposed and (k, n) == ((D, F) if op == "gated" else (F, D)) and (op, n_tiles) in best:
        return best[(op, n_tiles)]
    return default_config(op, block_m, n_tiles, k, n, transposed)


per = {}
for rnd in range(ROUNDS):
    for variant, fn in (("default", default_config), ("tuned", tuned_config)):
        K.default_config = fn
        ms = {}
        for layers in (2, 8):
            r = bench.bench_model(layers, [1, 8], 1024, 0, ["fast"], iters=10, share=SHARE)
            ms[layers] = {row["batch"]: row["ms"] for row in r["rows"] if row["kind"] == "decode"}
        slope = {b: (ms[8][b] - ms[2][b]) / 6 * 1e3 for b in (1, 8)}
        per.setdefault(variant, []).append(slope)
        print(f"round {rnd + 1} {variant}: per layer batch 1 {slope[1]:.1f} us, batch 8 {slope[8]:.1f} us; "
              f"2 layers {ms[2]}, 8 layers {ms[8]}", flush=True)
for variant, slopes in per.items():
    print(f"median {variant}: batch 1 {statistics.median(s[1] for s in slopes):.1f} us, "
          f"batch 8 {statistics.median(s[8] for s in slopes):.1f} us per layer", flush=True)
