"""Session 10 call C: the gated decode kernel's narrower column blocks (kernels.default_config,
this tree) against the tuned 64 (the rule off), at one device's share of 8 (batches 1 and 8)
and of 4 (batch 1): profiled (device microseconds per layer, 4 layers), then the wall-clock
slope (layers 2 and 8) at the share of 8, interleaved in one process, two rounds."""
import statistics
import bench, kernels as K

new_config = K.default_config


def old_config(op, block_m, n_tiles, k, n, transposed=False):
    cfg = new_config(op, block_m, n_tiles, k, n, transposed)
    if op == "gated" and block_m <= 32:
        cfg = cfg._replace(block_n=K._TUNED[("gated", "decode", transposed)].block_n)
    return cfg


VARIANTS = (("rule off", old_config), ("rule on", new_config))
for rnd in (1, 2):
    for share, batch in ((8, 1), (8, 8), (4, 1)):
        for variant, fn in VARIANTS:
            K.default_config = fn
            r = bench.profile_decode(4, batch, 1024, None, 10, f"/tmp/trace_{share}_{batch}_{rnd}_{variant[-2:]}",
                                     share=share)
            total = sum(row["us_per_layer"] for rows in r["lines"].values() for row in rows if row["per_step"] >= 4)
            print(f"RESULT round {rnd} share {share} batch {batch} {variant}: all layer kernels {total:.1f} us per "
                  f"layer; { {k: round(v, 1) for k, v in r['summary'].items()} }", flush=True)
per = {}
for rnd in (1, 2):
    for variant, fn in VARIANTS:
        K.default_config = fn
        ms = {}
        for layers in (2, 8):
            r = bench.bench_model(layers, [1, 8], 1024, 0, ["fast"], iters=10, share=8)
            ms[layers] = {row["batch"]: row["ms"] for row in r["rows"] if row["kind"] == "decode"}
        slope = {b: (ms[8][b] - ms[2][b]) / 6 * 1e3 for b in (1, 8)}
        per.setdefault(variant, []).append(slope)
        print(f"SLOPE round {rnd} {variant}: per layer batch 1 {slope[1]:.1f} us, batch 8 {slope[8]:.1f} us; "
              f"2 layers {ms[2]}, 8 layers {ms[8]}", flush=True)
for variant, slopes in per.items():
    print(f"SLOPE median {variant}: batch 1 {statistics.median(s[1] for s in slopes):.1f} us, "
          f"batch 8 {statistics.median(s[8] for s in slopes):.1f} us per layer", flush=True)
