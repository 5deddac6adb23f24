"""Session 10 call B, part 2: the share of 8 in the model, profiled (bench.profile_decode, 4
layers, batches 1 and 8): the MoE kernels' default tilings against the best of moe_sweep.py's
(by the device's time per call, all kernels of the call). Device microseconds per layer by
kind, and all kernels together.

    python3 moe_prof_ab.py moe_sweep_share8.json
"""
import json, sys
import bench, kernels as K

sweep = json.load(open(sys.argv[1]))
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


for rnd in (1, 2):
    for batch in (1, 8):
        for variant, fn in (("default", default_config), ("tuned", tuned_config)):
            K.default_config = fn
            r = bench.profile_decode(4, batch, 1024, None, 10, f"/tmp/trace_ab_{variant}_{batch}_{rnd}", share=SHARE)
            total = sum(row["us_per_layer"] for rows in r["lines"].values() for row in rows
                        if row["per_step"] >= 4)
            print(f"RESULT round {rnd} batch {batch} {variant}: all layer kernels {total:.1f} us per layer; "
                  f"{ {k: round(v, 1) for k, v in r['summary'].items()} }", flush=True)
