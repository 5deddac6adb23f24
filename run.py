"""Generate text with Grok-1, or with a tiny random model that runs anywhere (--tiny).

    python run.py                      # the released model: ./checkpoints/ckpt-0, ./tokenizer.model
    python run.py --tiny               # a demo on any machine, CPU included, in well under a minute
    python run.py --random-weights     # Grok-1 on random int8 weights: a new GPU host's smoke test
    python run.py --random-weights --layers 8 --mesh 1x2   # fewer layers, a given mesh
    python run.py --prompt "Hello" --prompt "Once upon a time" --max-len 50 --temperature 0.7

    # several processes (hosts): start one per host, same flags but --process-id
    python run.py --coordinator HOST0:1234 --num-processes 2 --process-id 0 ...   # on HOST0
    python run.py --coordinator HOST0:1234 --num-processes 2 --process-id 1 ...   # on HOST1

The default does what the release's run.py does: the Grok-1 config, the checkpoint, the
tokenizer, 100 tokens at temperature 0.01 from the test prompt. The mesh defaults to the
devices present. --tiny saves a small random model in the released checkpoint format,
trains a small SentencePiece tokenizer (ids 0 [PAD], 1 [BOS], 2 [EOS], 3 [UNK]) from
data/tiny_corpus.txt, loads both back through the same restore path and generates.

--random-weights runs the whole runner (mesh, memory plan, prefill, decode, sampling) on
random int8 weights made on the devices, with no checkpoint: the check of a new GPU host
before downloading 318 GB. The model is Grok-1 (--tiny: the demo's); --layers N overrides
its depth (Grok-1 has 64), --context S its KV cache length (8192). The tokenizer is
--tokenizer when that file exists (Grok-1's tokenizer.model), otherwise a small demo
tokenizer trained on the spot (the model then only ever samples its 512 ids). It prints
the start-up split (set-up, weight creation, lowering and compilation of every step, the
first token) and, where the devices report it, the peak memory against the planner's.

Compiled programs go to JAX's persistent compilation cache (default ~/.cache/grok1/jax;
--compile-cache DIR or GROK1_COMPILATION_CACHE=DIR moves it, "off" turns it off), so that
a second start loads them instead of compiling again.

With --num-processes N > 1 every process joins a jax.distributed group (process 0 hosts
the coordinator), the mesh spans all processes (--hosts, default Nx1), every process runs
the same steps and only process 0 prints. If a process dies or the coordinator cannot be
reached, the others exit with status 3 and an error within --distributed-timeout seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PROMPT = "The answer to life the universe and everything is of course"
DEFAULT_CHECKPOINT = "./checkpoints/ckpt-0"
DEFAULT_TOKENIZER = "./tokenizer.model"
TINY_CORPUS = os.path.join(REPO_ROOT, "data", "tiny_corpus.txt")
TINY_VOCAB = 512  # model and tokenizer vocabulary of the demo
TINY_SEQUENCE_LEN = 256
TINY_PAD_SIZES = (32, 128)
EXIT_USAGE = 2  # missing files, bad flags: the user has something to fix
EXIT_DISTRIBUTED = 3  # the process group failed (same as runners.EXIT_DISTRIBUTED)
# Environment variables read when the matching flag is not given.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_TIMEOUT = "GROK1_DISTRIBUTED_TIMEOUT"
DEFAULT_DISTRIBUTED_TIMEOUT = 120.0  # seconds (runners.DEFAULT_DISTRIBUTED_TIMEOUT_S)
ENV_COMPILE_CACHE = "GROK1_COMPILATION_CACHE"  # runners.COMPILATION_CACHE_ENV

DOWNLOAD_HELP = """\
To run the real model, download the weights and the tokenizer from the Hugging Face repo
xai-org/grok-1: the files ckpt-0/* (770 files, about 318 GB) and tokenizer.model, e.g.

    pip install huggingface_hub[hf_transfer]
    huggingface-cli download xai-org/grok-1 --repo-type model \\
        --include "ckpt-0/*" "tokenizer.model" --local-dir checkpoints

then run:  python run.py --checkpoint checkpoints/ckpt-0 --tokenizer checkpoints/tokenizer.model

Memory: the int8 weights need about 320 GB of GPU memory in total (e.g. 8 GPUs of 80 GB,
mesh 1x8), plus room for the KV cache.

To try the code without the weights, on any machine:  python run.py --tiny"""


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def parse_mesh(text: str) -> tuple[int, int]:
    """'1x8' -> (1, 8): the local mesh (data, model)."""
    try:
        data, model = (int(part) for part in text.lower().split("x"))
        if data < 1 or model < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected DATAxMODEL, e.g. 1x8") from None
    return data, model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Generate text with Grok-1 (default) or a tiny random demo model (--tiny).",
        epilog=DOWNLOAD_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true",
                   help="run the demo: a small random model saved in the released checkpoint format and "
                        "a tokenizer trained from data/tiny_corpus.txt, loaded back and sampled; the "
                        "output is random text. Runs on CPU in well under a minute.")
    p.add_argument("--tiny-dir", default=None,
                   help="with --tiny: where to write the demo checkpoint (DIR/ckpt-0) and tokenizer "
                        "(DIR/tokenizer.model); default a temporary directory, removed afterwards.")
    p.add_argument("--prompt", action="append", default=None,
                   help=f"a prompt; repeat for several, which run at once in separate slots "
                        f"(default: {DEFAULT_PROMPT!r}).")
    p.add_argument("--max-len", type=int, default=100, help="most tokens to generate per prompt (default 100).")
    p.add_argument("--temperature", type=float, default=0.01,
                   help="sampling temperature; 0 is greedy (default 0.01, as the release).")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling top-p in (0, 1] (default 1).")
    p.add_argument("--seed", type=int, default=42, help="sampling seed of the first prompt; prompt i uses seed + i (default 42).")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help=f"checkpoint directory of tensor files, or its parent holding ckpt-0 "
                        f"(default {DEFAULT_CHECKPOINT}).")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                   help=f"SentencePiece tokenizer.model (default {DEFAULT_TOKENIZER}).")
    p.add_argument("--mesh", type=parse_mesh, default=None,
                   help="local device mesh DATAxMODEL, e.g. 1x8; default: chosen from the devices present.")
    p.add_argument("--moe-impl", choices=("fast", "reference"), default="fast",
                   help="mixture-of-experts implementation: 'fast' runs only the chosen experts with int8 "
                        "kernels; 'reference' is the release's algorithm (default fast).")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated.")
    p.add_argument("--random-weights", action="store_true",
                   help="no checkpoint: random int8 weights made on the devices (Grok-1, or the demo "
                        "model with --tiny), through the whole runner; prints the start-up times. "
                        "Checks a GPU host before the 318 GB download.")
    p.add_argument("--layers", type=int, default=None, metavar="N",
                   help="with --random-weights, --tiny or --plan: the number of layers (default the "
                        "config's: 64 for Grok-1).")
    p.add_argument("--timings-json", default=None, metavar="PATH",
                   help="with --random-weights: also write the start-up split, the first tokens' times, "
                        "the decode steps' times and the peak memory against the plan to PATH (JSON).")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help=f"JAX's persistent compilation cache: compiled programs are kept in DIR and "
                        f"reused by the next start; 'off' turns it off (env {ENV_COMPILE_CACHE}; default "
                        f"~/.cache/grok1/jax).")
    g = p.add_argument_group(
        "several processes (hosts)",
        "Start the same command once per process (host), each with its own --process-id;\n"
        "process 0 hosts the coordinator at --coordinator. Each process uses its local\n"
        "devices (--mesh); the mesh spans all of them (--mesh times --hosts).")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help=f"address of process 0's coordinator, the same in every process "
                        f"(env {ENV_COORDINATOR}).")
    g.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help=f"how many processes take part (env {ENV_NUM_PROCESSES}; default 1).")
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help=f"this process's index, 0 .. N-1; host shard I of a checkpoint saved by N "
                        f"processes is its own (env {ENV_PROCESS_ID}).")
    g.add_argument("--hosts", type=parse_mesh, default=None, metavar="DATAxMODEL",
                   help="how the processes are arranged in the mesh (between_hosts_config); its "
                        "product is N. Default Nx1: hosts split the data (batch) axis, the model axis "
                        "stays inside each host. The mesh is --mesh times --hosts.")
    g.add_argument("--distributed-timeout", type=float, default=None, metavar="SECONDS",
                   help=f"the longest any process waits for the others: to join, for a heartbeat "
                        f"of a dead process, for a generation step (the first, which compiles, gets "
                        f"10x); then it exits with status {EXIT_DISTRIBUTED} (env {ENV_TIMEOUT}; "
                        f"default {DEFAULT_DISTRIBUTED_TIMEOUT:g}).")
    import planner  # --plan, --devices, --device-memory-gb, --batch, --context, --json, --layers

    planner.add_plan_arguments(p)
    return p


# ---------------------------------------------------------------------------------------
# The tiny demo's model and tokenizer
# ---------------------------------------------------------------------------------------


def tiny_demo_config(moe_impl: str = "fast"):
    """The demo's model: Grok-1's structure (8 experts top-2, GQA 2:1, int8) at toy size.

    8 kv heads, as in Grok-1, so that the demo runs on the same meshes as the real model
    (a model axis of 1, 2, 4 or 8 devices).
    """
    import model

    return model.tiny_config(vocab_size=TINY_VOCAB, sequence_len=TINY_SEQUENCE_LEN, moe_impl=moe_impl,
                             num_q_heads=16, num_kv_heads=8, key_size=8, attn_output_multiplier=8**-0.5)


def train_tiny_tokenizer(directory: str, corpus: str = TINY_CORPUS, vocab_size: int = TINY_VOCAB) -> str:
    """Train a SentencePiece model with Grok-1's special ids on `corpus`; returns its path."""
    import sentencepiece

    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(directory, "tokenizer")
    sentencepiece.SentencePieceTrainer.train(
        input=corpus, model_prefix=prefix, vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        pad_piece="[PAD]", bos_piece="[BOS]", eos_piece="[EOS]", unk_piece="[UNK]",
        num_threads=1, minloglevel=2)
    return prefix + ".model"


def tiny_demo_params(config, seed: int = 0) -> dict:
    """Random parameters (model.init_random_params), rescaled so the text depends on context.

    Plain random weights leave the residual stream dominated by the current token's
    embedding, so greedy decoding repeats one token. Scaling the embedding table by 20 (this
    sharpens the output distribution) and the two post-block norm scales by 60 lets each
    layer's output outweigh the embedding. The weights are still random.
    """
    import model

    params = model.init_random_params(config, seed)
    out = dict(params)
    out["language_model/in_out_embed"] = {"embeddings": params["language_model/in_out_embed"]["embeddings"] * 20.0}
    for module, leaves in params.items():
        if module.endswith(("/rms_norm_1", "/rms_norm_3")):
            out[module] = {"scale": leaves["scale"] * 60.0}
    return out


def build_tiny_demo(directory: str, config=None, seed: int = 0) -> tuple[str, str]:
    """Write a random tiny model (DIR/ckpt-0, released format) and a tokenizer (DIR/tokenizer.model).

    Returns (checkpoint directory, tokenizer path).
    """
    import checkpoint

    config = config if config is not None else tiny_demo_config()
    tokenizer = train_tiny_tokenizer(directory)
    ckpt = os.path.join(directory, "ckpt-0")
    checkpoint.save(tiny_demo_params(config, seed), ckpt, overwrite=True)
    return ckpt, tokenizer


# ---------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------


def missing_files(checkpoint_path: str, tokenizer_path: str) -> list[str]:
    """What of the real model is not where the flags say."""
    import checkpoint

    missing = []
    directory = checkpoint.resolve_checkpoint_dir(checkpoint_path)
    if not os.path.isfile(os.path.join(directory, checkpoint.tensor_filename(0))):
        missing.append(f"checkpoint: no tensor files (tensor00000_000, ...) in {checkpoint_path!r}")
    if not os.path.isfile(tokenizer_path):
        missing.append(f"tokenizer: {tokenizer_path!r} does not exist")
    return missing


def generate(args: argparse.Namespace, config, checkpoint_path: str, tokenizer_path: str,
             pad_sizes: Sequence[int], random_weights: bool = False, started: Optional[float] = None) -> None:
    """Build the runner the release's way, then generate for every prompt at once.

    random_weights: no checkpoint, random weights made on the devices; the steps are then
    compiled ahead of time and the start-up split is printed, the first token's time
    counted from `started` (a time.perf_counter() value; default: when this is called).
    """
    started = time.perf_counter() if started is None else started
    import json

    import jax
    import numpy as np

    import runners

    prompts = args.prompt or [DEFAULT_PROMPT]
    requests = [runners.Request(prompt=p, temperature=args.temperature, nucleus_p=args.top_p,
                                rng_seed=args.seed + i, max_len=args.max_len) for i, p in enumerate(prompts)]
    for request in requests:  # bad flags fail now, not after loading the weights
        runners.check_request(request)
    mesh = args.mesh or runners.auto_mesh_config(config, jax.local_device_count())
    processes = jax.process_count()
    hosts = args.hosts or (processes, 1)
    devices = mesh[0] * mesh[1] * processes
    print = _printer()  # only process 0 prints; every process runs the same steps
    runner = runners.InferenceRunner(
        pad_sizes=tuple(pad_sizes),
        runner=runners.ModelRunner(model=config, bs_per_device=len(prompts) / devices,
                                   checkpoint_path=checkpoint_path, random_weights=random_weights),
        name="local", load=checkpoint_path, tokenizer_path=tokenizer_path,
        local_mesh_config=mesh, between_hosts_config=hosts)
    start = time.perf_counter()
    cache_before = runners.compilation_stats()
    runner.initialize()
    where = f" over {processes} processes" if processes > 1 else ""
    if random_weights:
        programs = runner.compile()
        print(startup_report(runner, programs, cache_before, where), flush=True)
    else:
        print(f"Loaded in {time.perf_counter() - start:.1f} s: mesh {dict(runner.mesh.shape)}{where}, "
              f"{runner.batch_size} slot(s).", flush=True)

    start, count, done, first, decoded, stamps = time.perf_counter(), 0, {}, None, None, []
    live = args.stream and len(prompts) == 1
    if live:
        print(f"Output for prompt: {prompts[0]}", end="", flush=True)
    for event in runner.stream(requests):
        count += 1
        first = first or time.perf_counter()  # the prefill's token
        if decoded is None and event.index > 0:  # the first decode step's
            decoded = time.perf_counter()
        if event.request_id == 0:
            stamps.append(time.perf_counter())
        if live:
            print(event.text, end="", flush=True)
        elif args.stream:
            print(f"[{event.request_id}] {event.token_id:>6} {event.prob:6.3f} {event.text!r}", flush=True)
        if event.finished:
            done[event.request_id] = event.completion
    if live:
        print()
    seconds = time.perf_counter() - start
    for i, prompt in enumerate(prompts):
        c = done[i]
        if not live:
            print(f"Output for prompt: {prompt}", c.text)
        print(f"  ({len(c.tokens)} tokens, stopped at {c.finish_reason})")
    print(f"{count} tokens in {seconds:.2f} s ({count / max(seconds, 1e-9):.1f} tokens/s, "
          + ("compiled ahead)." if random_weights else "compilation included)."))
    if random_weights and first is not None:
        print(f"First token (prefill) {first - start:.2f} s after the compilation, {first - started:.1f} s after "
              "start" + (f"; first decoded token {decoded - started:.1f} s after start." if decoded else "."))
    if random_weights:
        line, memory = memory_report(runner, max(runner.buckets))
        if line:
            print(line)
        if getattr(args, "timings_json", None) and jax.process_index() == 0:
            steps = np.diff(stamps[1:]) if len(stamps) > 2 else np.zeros(0)  # decode steps of request 0
            report = dict(
                layers=config.model.num_layers, emb_size=config.model.emb_size, mesh=dict(runner.mesh.shape),
                batch=runner.batch_size, buckets=list(runner.buckets), **runner.timings, programs=programs,
                first_token_s=first - started if first else None,
                first_decoded_token_s=decoded - started if decoded else None,
                compile_to_first_token_s=first - start if first else None,
                decode_step_ms_median=float(np.median(steps) * 1e3) if steps.size else None,
                decode_steps=int(steps.size), cache=dict(runners.compilation_stats(), dir=cache_dir()),
                memory=memory)
            with open(args.timings_json, "w") as f:
                json.dump(report, f, indent=1)


def cache_dir() -> Optional[str]:
    """The persistent compilation cache's directory, None when it is off."""
    import jax

    return jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache else None


def memory_report(runner, prefill_len: int) -> tuple[Optional[str], Optional[dict]]:
    """The measured peak device memory (JAX's peak_bytes_in_use, largest device of this
    process) against the planner's estimate of this run: (a line, the numbers in GB); (None,
    None) where devices report none (CPU)."""
    import jax

    import planner

    devices = [d for d in runner.mesh.devices.flat if d.process_index == jax.process_index()]
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    if not all(peaks):
        return None, None
    config = runner.runner.model
    p = planner.plan(config, runner.mesh.devices.size, None, runner.batch_size, config.sequence_len,
                     tuple(runner.mesh.devices.shape), prefill_len=prefill_len, runtime_overhead_gb=0.0,
                     suggest=False)
    peak = max(peaks) / 1e9
    line = (f"Peak device memory {peak:.2f} GB (largest device; weight creation included); the planner's "
            f"estimate {p.total_gb:.2f} GB (prefill {p.prefill_total_gb:.2f}, decode {p.decode_total_gb:.2f}), "
            f"{p.total_gb / peak:.3f}x the measured peak.")
    return line, dict(peak_gb=peak, planned_gb=p.total_gb, planned_prefill_gb=p.prefill_total_gb,
                      planned_decode_gb=p.decode_total_gb)


def startup_report(runner, programs: dict, cache_before: dict, where: str = "") -> str:
    """The start-up split of a --random-weights run, one line per part, in seconds."""
    import jax

    import runners

    cfg = runner.runner.model.model
    t = runner.timings
    weights_gb = sum(x.nbytes for x in jax.tree_util.tree_leaves(runner.params)) / 1e9
    lines = [f"Start-up with random weights: {cfg.num_layers} layers of width {cfg.emb_size} "
             f"({weights_gb:.3g} GB of weights in all), mesh {dict(runner.mesh.shape)}{where}, "
             f"{runner.batch_size} slot(s):",
             f"  {'set-up (tokenizer, mesh, memory plan)':<40} {t['setup_s']:8.2f} s",
             f"  {'weight creation on the devices':<40} {t['weights_s']:8.2f} s",
             f"  {'KV cache and slot state':<40} {t['engine_s']:8.2f} s"]
    for part, key in (("lowering", "lower_s"), ("compile", "compile_s")):
        for name, times in programs.items():
            lines.append(f"  {part + ' ' + name:<40} {times[key]:8.2f} s")
    total = sum(t.values()) + sum(v for times in programs.values() for v in times.values())
    lines.append(f"  {'total':<40} {total:8.2f} s")
    stats = runners.compilation_stats()
    hits = stats["cache_hits"] - cache_before["cache_hits"]
    writes = stats["cache_writes"] - cache_before["cache_writes"]
    directory = cache_dir()
    lines.append(f"  compilation cache: {directory}: {hits} program(s) read from it, {writes} compiled and "
                 f"written" if directory else "  compilation cache: off")
    return "\n".join(lines)


def _printer():
    """print in process 0, a no-op in the others (they run the same steps silently)."""
    import builtins

    import jax

    return builtins.print if jax.process_index() == 0 else (lambda *a, **k: None)


def run_tiny(args: argparse.Namespace) -> None:
    import jax

    config = with_layers(tiny_demo_config(args.moe_impl), args.layers)
    print = _printer()
    with contextlib.ExitStack() as stack:
        directory = args.tiny_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="grok1-tiny-"))
        if jax.process_count() > 1:  # every process (host) writes and reads its own copy
            directory = os.path.join(directory, f"process-{jax.process_index()}")
        start = time.perf_counter()
        checkpoint_path, tokenizer_path = build_tiny_demo(directory, config)
        print(f"Tiny demo: a random {config.model.num_layers}-layer model (8 experts, top-2, int8 weights) "
              f"saved in the released checkpoint format at {checkpoint_path}, and a {TINY_VOCAB}-piece "
              f"tokenizer trained from {os.path.relpath(TINY_CORPUS)} at {tokenizer_path} "
              f"({time.perf_counter() - start:.1f} s). Loading both back through checkpoint.restore.",
              flush=True)
        generate(args, config, checkpoint_path, tokenizer_path, TINY_PAD_SIZES)
        print("The weights are random, so the text above is random too: this shows that the code path "
              "works, not what Grok-1 says. For the real model see `python run.py --help`.")


def with_layers(config, layers: Optional[int]):
    """`config` with its number of layers replaced (None: unchanged)."""
    if layers is None:
        return config
    import dataclasses

    return dataclasses.replace(config, model=dataclasses.replace(config.model, num_layers=layers)).initialize()


def random_weights_tokenizer(args: argparse.Namespace, config, directory: str) -> tuple[str, str]:
    """(tokenizer path, what it is) for --random-weights: --tokenizer when the file exists,
    else a demo tokenizer trained into `directory`. FileNotFoundError when --tokenizer names
    a missing file; ValueError when it has more pieces than the model has ids."""
    import sentencepiece

    if os.path.isfile(args.tokenizer):
        path, what = args.tokenizer, f"the tokenizer {args.tokenizer}"
    elif args.tokenizer != DEFAULT_TOKENIZER:
        raise FileNotFoundError(f"--tokenizer {args.tokenizer!r} does not exist; leave the flag out to "
                                f"use a demo tokenizer trained on the spot.")
    else:
        path = train_tiny_tokenizer(directory)
        what = (f"a {TINY_VOCAB}-piece demo tokenizer trained from {os.path.relpath(TINY_CORPUS)} (no "
                f"{DEFAULT_TOKENIZER} here; pass --tokenizer for Grok-1's), so only its ids are sampled")
    pieces = sentencepiece.SentencePieceProcessor(model_file=path).vocab_size()
    if pieces > config.vocab_size:
        raise ValueError(f"the tokenizer {path!r} has {pieces} pieces, more than the model's "
                         f"{config.vocab_size} ids; use Grok-1's config (leave out --tiny) or another tokenizer.")
    return path, what


def run_random(args: argparse.Namespace, started: Optional[float] = None) -> int:
    """--random-weights: the whole runner on random int8 weights made on the devices."""
    import model

    config = tiny_demo_config(args.moe_impl) if args.tiny else model.grok_1_config(moe_impl=args.moe_impl)
    config = with_layers(config, args.layers)
    if args.context:  # the planner's --context: the KV cache length of each slot
        import dataclasses

        config = dataclasses.replace(config, sequence_len=args.context).initialize()
    print = _printer()
    with tempfile.TemporaryDirectory(prefix="grok1-tokenizer-") as directory:
        try:
            tokenizer_path, what = random_weights_tokenizer(args, config, directory)
        except (FileNotFoundError, ValueError) as e:
            print(f"Error: {e}", file=sys.stderr)
            return EXIT_USAGE
        print(f"Random weights, no checkpoint: {'the demo model' if args.tiny else 'Grok-1'} with "
              f"{config.model.num_layers} layers, int8 weights made on the devices; {what}.", flush=True)
        pads = sorted({min(size, config.sequence_len) for size in (TINY_PAD_SIZES if args.tiny else (1024,))})
        generate(args, config, "", tokenizer_path, pads, random_weights=True, started=started)
    print("The weights are random, so the text above is random too: this checks the devices, the "
          "mesh and the code path, not what Grok-1 says.")
    return 0


def run_real(args: argparse.Namespace) -> int:
    missing = missing_files(args.checkpoint, args.tokenizer)
    if missing:
        print("Cannot run Grok-1:\n  " + "\n  ".join(missing) + "\n\n" + DOWNLOAD_HELP, file=sys.stderr)
        return EXIT_USAGE
    import model

    generate(args, model.grok_1_config(moe_impl=args.moe_impl), args.checkpoint, args.tokenizer, (1024,))
    return 0


def distributed_settings(args: argparse.Namespace) -> tuple[Optional[str], int, int, float]:
    """(coordinator, processes, process id, timeout) from the flags, else the environment."""
    def pick(value, env, cast, default):
        if value is not None:
            return value
        text = os.environ.get(env)
        if text in (None, ""):
            return default
        try:
            return cast(text)
        except ValueError:
            raise SystemExit(f"Error: environment variable {env}={text!r} is not a valid "
                             f"{cast.__name__}.") from None

    coordinator = pick(args.coordinator, ENV_COORDINATOR, str, None)
    processes = pick(args.num_processes, ENV_NUM_PROCESSES, int, 1)
    process_id = pick(args.process_id, ENV_PROCESS_ID, int, 0)
    timeout = pick(args.distributed_timeout, ENV_TIMEOUT, float, DEFAULT_DISTRIBUTED_TIMEOUT)
    return coordinator, processes, process_id, timeout


def main(argv: Optional[Sequence[str]] = None) -> int:
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("jax", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import checkpoint
    import planner
    import runners

    if args.layers is not None and args.layers < 1:
        print(f"Error: --layers {args.layers}: the model needs at least 1 layer.", file=sys.stderr)
        return EXIT_USAGE
    if args.layers is not None and not (args.random_weights or args.tiny or args.plan):
        print(f"Error: --layers {args.layers} changes the model, but the checkpoint fixes its layers; use "
              "it with --random-weights, --tiny or --plan.", file=sys.stderr)
        return EXIT_USAGE
    if args.plan:  # shapes only: nothing is loaded or allocated
        tiny = with_layers(tiny_demo_config(args.moe_impl), args.layers) if args.tiny else None
        return planner.run_plan(args, config=tiny)
    coordinator, processes, process_id, timeout = distributed_settings(args)
    several = processes > 1
    if several:
        if not coordinator:
            print(f"Error: --num-processes {processes} needs --coordinator HOST:PORT (or "
                  f"{ENV_COORDINATOR}): the address where process 0 listens.", file=sys.stderr)
            return EXIT_USAGE
        try:  # before anything else touches jax's devices
            runners.initialize_distributed(coordinator, processes, process_id, timeout)
        except runners.DistributedError as e:
            print(f"Error: {e}", file=sys.stderr)
            return EXIT_USAGE
        if process_id != 0:
            logging.getLogger().setLevel(logging.WARNING)
    context = f" (process {process_id} of {processes})" if several else ""
    runners.enable_compilation_cache(args.compile_cache)  # before the first compilation
    try:
        if args.random_weights:
            return run_random(args, started)
        if args.tiny:
            run_tiny(args)
            return 0
        code = run_real(args)
        if several and code:
            runners.abort_process("", code)  # said why already; don't wait in jax's shutdown
        return code
    except (runners.InvalidRequestError, runners.MeshConfigError, planner.PlanError, checkpoint.CheckpointError,
            FileNotFoundError) as e:  # things the user fixes: say what, no traceback
        if several:  # every process fails alike; no need to wait for the others
            runners.abort_process(f"Error{context}: {e}", EXIT_USAGE)
        print(f"Error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        if not several:
            raise
        import traceback

        # A collective whose peer died fails here (a JaxRuntimeError); leave at once rather
        # than in jax's shutdown, which would wait for the dead peer.
        runners.abort_process(
            f"{traceback.format_exc()}\nError{context}: {type(e).__name__}: {e}\nAnother process "
            "probably died, was killed or cannot be reached; see its log. Ending this one.",
            EXIT_DISTRIBUTED)


if __name__ == "__main__":
    sys.exit(main())
