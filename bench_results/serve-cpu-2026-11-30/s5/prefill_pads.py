"""Median time of one prefill call of 2 short prompts (2-4 tokens) in the 128-token bucket,
tiny model, on the code in the directory given (a tree made with `git archive`).
    python bench_results/serve-cpu-2026-11-30/s5/prefill_pads.py <tree>
"""
import sys, time, tempfile, statistics
sys.path.insert(0, sys.argv[1])
import run, runners
config = run.tiny_demo_config()
d = tempfile.mkdtemp(); ckpt, tok = run.build_tiny_demo(d, config)
mr = runners.ModelRunner(model=config, checkpoint_path=ckpt, bs_per_device=8)
r = runners.InferenceRunner(name="pf", runner=mr, load=ckpt, tokenizer_path=tok, local_mesh_config=(1, 1), pad_sizes=(128,))
r.initialize(); r.compile(grouped=True)
engine, owner = r.engine(), object()
prompts = ["The river", "Once upon a time", "A cat sat by the door and", "She walked along the shore"][:2]
times = []
for it in range(30):
    prepared = [r.prepare(runners.Request(p, 0.7, 1.0, i, 4), i) for i, p in enumerate(prompts)]
    t = time.perf_counter()
    h = engine.dispatch_admit_many(prepared, owner)
    engine.collect(h)
    times.append(time.perf_counter() - t)
    engine.release(owner)
print(sys.argv[1], f"prefill of 2 short prompts, bucket 128: median {1e3*statistics.median(times[2:]):.2f} ms")
