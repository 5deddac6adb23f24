"""Slots fed by the server's schedule (bench.measure_engine's serving loop, no HTTP), with
the engine's early slot hand-over (free_slots as it is) against the old rule (only empty
slots), alternating 3 times in one process. Tiny model, 32 slots, 128-token requests.
    python bench_results/serve-cpu-2026-11-30/s5/slot_occupancy.py 32   (repository root)
"""
import sys, tempfile, statistics
sys.path.insert(0, ".")
import run, runners, bench
config = run.tiny_demo_config()
d = tempfile.mkdtemp(); ckpt, tok = run.build_tiny_demo(d, config)
slots = int(sys.argv[1])
mr = runners.ModelRunner(model=config, checkpoint_path=ckpt, bs_per_device=slots)
r = runners.InferenceRunner(name="occ", runner=mr, load=ckpt, tokenizer_path=tok, local_mesh_config=(1, 1),
                            pad_sizes=run.TINY_PAD_SIZES)
r.initialize(); r.compile(grouped=True)
new = runners._Engine.free_slots
old = lambda self: [i for i, s in enumerate(self.slots) if s is None]
res = {"before": [], "after": []}
for k in range(3):
    for name, fn in (("before", old), ("after", new)):
        runners._Engine.free_slots = fn
        m = bench.measure_engine(r, seconds=2.0, temperature=0.7, max_tokens=128)
        res[name].append((m["loop_slot_occupancy"], m["loop_tokens_per_s"] / m["decode_tokens_per_s"]))
for name, v in res.items():
    print(name, "occupancy", [f"{o:.3f}" for o, _ in v], "loop/decode", [f"{x:.2f}" for _, x in v])
