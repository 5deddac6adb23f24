"""Session 9 call L: at one device's share of 8, the dense projections through the Pallas int8
kernel (main's rule: fewer than 8 rows) against XLA's int8 dot, in the model (bench_model,
fast mode, batch 1 and 8, layers 2 and 8: the per-layer slope). One process, variants
interleaved."""
import bench, kernels

res = {}
for rnd in (1, 2):
    for variant, rows in (("pallas", 8), ("xla", 0)):
        kernels._DENSE_PALLAS_MAX_ROWS = rows  # "auto": Pallas below this many rows
        for layers in (2, 8):
            r = bench.bench_model(layers, [1, 8], 1024, 0, ["fast"], iters=10, share=8)
            res[(rnd, variant, layers)] = {row["batch"]: row["ms"] for row in r["rows"] if row["kind"] == "decode"}
        per = {b: (res[(rnd, variant, 8)][b] - res[(rnd, variant, 2)][b]) / 6 * 1e3 for b in (1, 8)}
        print(f"round {rnd} {variant}: per layer batch 1 {per[1]:.1f} us, batch 8 {per[8]:.1f} us; "
              f"2 layers {res[(rnd, variant, 2)]}, 8 layers {res[(rnd, variant, 8)]}", flush=True)
