"""One process of a multi-process generation run, started by tests/test_multiprocess.py.

    python tests/multiprocess_worker.py --coordinator 127.0.0.1:PORT --num-processes 2 \
        --process-id I --timeout 20 --checkpoint DIR --tokenizer TOK --out OUT \
        [--save DIR2] [--loop] --prompt A --prompt B --max-len 12

Every process: joins the group (runners.initialize_distributed), builds the runner the
release's way on a mesh local (1, 4) x hosts (2, 1) = data 2 x model 4, greedily generates
for the prompts, and writes OUT/result-{I}.json: the tokens, the mesh, and which checkpoint
files it read. With --save it then saves the loaded parameters as host shards in DIR2,
restores them from there into the same runner and generates again. With --loop it
generates again and again after the first result (until killed). Only process 0 prints
the texts, as run.py does. A failure ends the process with runners.EXIT_DISTRIBUTED.
"""

import argparse
import json
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--coordinator", required=True)
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--timeout", type=float, required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--save", default=None)
    p.add_argument("--loop", action="store_true")
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--max-len", type=int, default=12)
    args = p.parse_args()

    import runners

    runners.initialize_distributed(args.coordinator, args.num_processes, args.process_id, args.timeout)
    import jax

    import checkpoint
    import run

    me = jax.process_index()
    read: set[str] = set()
    lock = threading.Lock()

    def record(path: str, nbytes: int) -> None:  # called for every chunk the loader reads
        with lock:
            read.add(os.path.basename(path))

    checkpoint._chunk_hook = record
    hosts = (args.num_processes, 1)
    devices = 4 * args.num_processes
    runner = runners.InferenceRunner(
        pad_sizes=(32,),
        runner=runners.ModelRunner(model=run.tiny_demo_config(), bs_per_device=len(args.prompt) / devices,
                                   checkpoint_path=args.checkpoint),
        name="multiprocess", load=args.checkpoint, tokenizer_path=args.tokenizer,
        local_mesh_config=(1, 4), between_hosts_config=hosts)
    runner.initialize()

    def generate() -> list[list[int]]:
        done = runner.generate(args.prompt, max_len=args.max_len, temperature=0.0)
        if me == 0:
            for prompt, c in zip(args.prompt, done):
                print(f"Output for prompt: {prompt} {c.text}", flush=True)
        return [c.tokens for c in done]

    result = {"process": me, "processes": jax.process_count(), "mesh": dict(runner.mesh.shape),
              "mesh_processes": [[d.process_index for d in row] for row in runner.mesh.devices],
              "batch": runner.batch_size, "tokens": generate(), "read": sorted(read)}
    if args.save:
        params = runner.runner.load_or_init()  # the float32 tree (runner.params holds a bf16 table)
        result["saved"] = [os.path.basename(f) for f in checkpoint.save(params, args.save, overwrite=True)]
        del params
        read.clear()
        runner.runner.checkpoint_path = args.save
        runner.params = runner.runner.load_or_init()  # restored from the host shards
        result["read_saved"] = sorted(read)
        result["tokens_saved"] = generate()
    tmp = os.path.join(args.out, f".result-{me}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, os.path.join(args.out, f"result-{me}.json"))
    while args.loop:  # stands for a long run; the test kills a process meanwhile
        generate()


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - as run.py: say what failed, leave without jax's shutdown
        import traceback

        import runners

        runners.abort_process(f"{traceback.format_exc()}\nError: {type(e).__name__}: {e}",
                              runners.EXIT_DISTRIBUTED)
