"""Generate text with Grok-1, or with a tiny random model that runs anywhere (--tiny).

    python run.py                      # the released model: ./checkpoints/ckpt-0, ./tokenizer.model
    python run.py --tiny               # a demo on any machine, CPU included, in well under a minute
    python run.py --random-weights     # Grok-1 on random int8 weights: a new GPU host's smoke test
    python run.py --random-weights --layers 8 --mesh 1x2   # fewer layers, a given mesh
    python run.py --prompt "Hello" --prompt "Once upon a time" --max-len 50 --temperature 0.7

    python run.py serve --tiny         # an OpenAI-compatible HTTP server (server.py); see serve --help
    python run.py plan ...             # the same as --plan: will it fit (planner.py)

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
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import stat
import sys
import tempfile
import time
from typing import Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PROMPT = "The answer to life the universe and everything is of course"
DEFAULT_CHECKPOINT = "./checkpoints/ckpt-0"
DEFAULT_TOKENIZER = "./tokenizer.model"


def _tiny_corpus() -> str:
    """data/tiny_corpus.txt of a checkout, else the copy `pip install .` ships as package data
    (the package grok1_data is the repository's data/ directory)."""
    path = os.path.join(REPO_ROOT, "data", "tiny_corpus.txt")
    if not os.path.isfile(path):
        try:
            from importlib import resources

            installed = resources.files("grok1_data") / "tiny_corpus.txt"
            if installed.is_file():
                return str(installed)
        except ModuleNotFoundError:
            pass
    return path


TINY_CORPUS = _tiny_corpus()
TINY_VOCAB = 512  # model and tokenizer vocabulary of the demo
TINY_SEQUENCE_LEN = 256
TINY_PAD_SIZES = (32, 128)
# A --tiny-dir holds the demo's outputs and a marker listing what this code wrote there
# (relative path -> sha256); only files that match it are ever replaced.
TINY_OUTPUTS = ("ckpt-0", "tokenizer.model", "tokenizer.vocab")
TINY_MARKER = "tiny-demo.json"
TINY_STAGING_PREFIX = ".tiny-demo-staging-"  # a build in progress, swapped in when complete
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


def parse_pad_sizes(text: str) -> tuple[int, ...]:
    """'32,128,1024' -> (32, 128, 1024): prompt buckets, each a positive integer."""
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected prompt buckets as positive integers, e.g. 32,128,1024")
    return sizes


def add_compile_cache_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help=f"JAX's persistent compilation cache: compiled programs are kept in DIR and "
                        f"reused by the next start; 'off' turns it off (env {ENV_COMPILE_CACHE}; default "
                        f"~/.cache/grok1/jax).")


def user_errors() -> tuple[type, ...]:
    """The errors a user fixes (flags, files, prompts): reported in one line, exit status 2."""
    import checkpoint
    import planner
    import runners

    return (runners.InvalidRequestError, runners.MeshConfigError, planner.PlanError, checkpoint.CheckpointError,
            runners.TokenizerError, TinyDirError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    import planner  # --plan, --devices, --device-memory-gb, --batch, --context, --json, --layers

    p = planner.OneLineArgumentParser(  # one-line errors, exit status 2
        description="Generate text with Grok-1 (default) or a tiny random demo model (--tiny).",
        epilog=DOWNLOAD_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true",
                   help="run the demo: a small random model saved in the released checkpoint format and "
                        "a tokenizer trained from data/tiny_corpus.txt, loaded back and sampled; the "
                        "output is random text. Runs on CPU in well under a minute.")
    p.add_argument("--tiny-dir", default=None,
                   help="with --tiny: where to write the demo checkpoint (DIR/ckpt-0) and tokenizer "
                        "(DIR/tokenizer.model); default a temporary directory, removed afterwards. "
                        f"DIR must be new, empty, or a demo written before (DIR/{TINY_MARKER}): "
                        "nothing else is ever overwritten.")
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
    p.add_argument("--layers", type=planner.int_in(1, planner.MAX_LAYERS), default=None, metavar="N",
                   help="with --random-weights, --tiny or --plan: the number of layers (default the "
                        "config's: 64 for Grok-1).")
    p.add_argument("--timings-json", default=None, metavar="PATH",
                   help="with --random-weights: also write the start-up split, the first tokens' times, "
                        "the decode steps' times and the peak memory against the plan to PATH (JSON).")
    add_compile_cache_argument(p)
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


class TinyDirError(Exception):
    """A --tiny-dir holding files the tiny demo did not make; they are never overwritten."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _output_files(directory: str) -> tuple[list[str], list[str]]:
    """(regular files, anything else) at the demo's paths in `directory`, relative to it.

    Symlinks, FIFOs, sockets and devices are "anything else": never read, never replaced.
    """
    files, other = [], []
    for name in TINY_OUTPUTS:
        path = os.path.join(directory, name)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISREG(mode):
            files.append(name)
        elif not stat.S_ISDIR(mode):
            other.append(name)
        else:
            def unreadable(error: OSError) -> None:
                other.append(os.path.relpath(error.filename or path, directory))

            for root, dirs, names in os.walk(path, onerror=unreadable):
                for entry in dirs + names:
                    rel = os.path.relpath(os.path.join(root, entry), directory)
                    mode = os.lstat(os.path.join(root, entry)).st_mode
                    if stat.S_ISREG(mode):
                        files.append(rel)
                    elif not stat.S_ISDIR(mode):
                        other.append(rel)
    return sorted(files), sorted(other)


def _read_tiny_marker(directory: str) -> Optional[dict[str, str]]:
    """The marker's {relative path: sha256}; None without a marker; TinyDirError if unusable."""
    path = os.path.join(directory, TINY_MARKER)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    bad = TinyDirError(f"--tiny-dir {directory!r}: {path} is not a marker written by run.py --tiny; "
                       "refusing to write there. Give a new or empty directory.")
    if not stat.S_ISREG(info.st_mode) or info.st_size > 1 << 20:
        raise bad
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        files = data["files"]
        if data.get("made_by") != "run.py --tiny" or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise bad from None
    return dict(files)


def _write_tiny_marker(directory: str, files: dict[str, str]) -> None:
    """Write the marker atomically (a temporary file renamed over it)."""
    text = json.dumps({"made_by": "run.py --tiny", "files": dict(sorted(files.items()))}, indent=1)
    tmp = os.path.join(directory, f"{TINY_STAGING_PREFIX}{os.getpid()}-{TINY_MARKER}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    os.replace(tmp, os.path.join(directory, TINY_MARKER))


def _short_list(paths: Sequence[str], limit: int = 4) -> str:
    return ", ".join(paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def claim_tiny_dir(directory: str) -> dict[str, str]:
    """Check that the tiny demo may be written into `directory`, and claim it.

    Allowed: a new or empty directory (the marker TINY_MARKER is written at once), or one
    whose marker lists every file at the demo's paths (TINY_OUTPUTS) with its exact sha256,
    i.e. a demo this code wrote before. Anything else raises TinyDirError naming the files
    that would have been replaced. Returns the demo files present, path -> sha256.
    """
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise TinyDirError(f"--tiny-dir {directory!r} is not a directory; give a new or empty directory, "
                           "or leave out --tiny-dir (a temporary one).")
    os.makedirs(directory, exist_ok=True)
    recorded = _read_tiny_marker(directory)
    fix = "Move the files away, give a new or empty directory, or leave out --tiny-dir (a temporary one)."
    if recorded is None:
        entries = sorted(e for e in os.listdir(directory) if not e.startswith(TINY_STAGING_PREFIX))
        clash = [os.path.join(directory, n) for n in TINY_OUTPUTS if n in entries]
        if clash:
            raise TinyDirError(f"--tiny-dir {directory!r}: refusing to write the tiny demo there: it would "
                               f"replace {_short_list(clash)}, which run.py --tiny did not make. {fix}")
        if entries:
            raise TinyDirError(f"--tiny-dir {directory!r}: refusing to write the tiny demo there: the "
                               f"directory holds other files ({_short_list(entries)}) and no {TINY_MARKER} "
                               "of an earlier demo. Give a new or empty directory, or leave out --tiny-dir.")
        _remove_staging(directory)
        _write_tiny_marker(directory, {})
        return {}
    files, other = _output_files(directory)
    foreign = other + [rel for rel in files if recorded.get(rel) != _sha256(os.path.join(directory, rel))]
    if foreign:
        raise TinyDirError(
            f"--tiny-dir {directory!r}: refusing to write the tiny demo there: it would replace "
            f"{_short_list([os.path.join(directory, rel) for rel in foreign])}: not what run.py --tiny "
            f"wrote there (see {TINY_MARKER}). {fix}")
    _remove_staging(directory)
    return {rel: recorded[rel] for rel in files}


def _remove_staging(directory: str) -> None:
    """Delete the leftovers of an interrupted build (named TINY_STAGING_PREFIX...)."""
    for entry in os.listdir(directory):
        path = os.path.join(directory, entry)
        if not entry.startswith(TINY_STAGING_PREFIX):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)


def build_tiny_demo(directory: str, config=None, seed: int = 0) -> tuple[str, str]:
    """Write a random tiny model (DIR/ckpt-0, released format) and a tokenizer (DIR/tokenizer.model).

    Returns (checkpoint directory, tokenizer path). `directory` must be new, empty or an
    earlier demo (claim_tiny_dir; TinyDirError otherwise). The demo is built in a staging
    directory beside, then swapped in; the marker covers the old and the new files while
    they are swapped, so an interrupted build never leaves a file the next one would refuse.
    """
    import checkpoint

    config = config if config is not None else tiny_demo_config()
    before = claim_tiny_dir(directory)
    staging = tempfile.mkdtemp(prefix=TINY_STAGING_PREFIX, dir=directory)
    try:
        train_tiny_tokenizer(staging)
        checkpoint.save(tiny_demo_params(config, seed), os.path.join(staging, "ckpt-0"))
        made = {rel: _sha256(os.path.join(staging, rel)) for rel in _output_files(staging)[0]}
        _write_tiny_marker(directory, {**before, **made})
        for name in TINY_OUTPUTS:
            new, target = os.path.join(staging, name), os.path.join(directory, name)
            if not os.path.lexists(new):
                continue
            if os.path.isdir(target):  # the old demo's checkpoint: out of the way, then deleted
                os.rename(target, os.path.join(staging, "old-" + name))
            os.replace(new, target)
        _write_tiny_marker(directory, made)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return os.path.join(directory, "ckpt-0"), os.path.join(directory, "tokenizer.model")


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
    if not os.path.lexists(tokenizer_path):  # anything else there: runners.load_tokenizer says what
        missing.append(f"tokenizer: {tokenizer_path!r} does not exist")
    return missing


def build_requests(args: argparse.Namespace) -> list:
    """One runners.Request per --prompt, checked (InvalidRequestError names the bad one)."""
    import runners

    prompts = args.prompt or [DEFAULT_PROMPT]
    requests = [runners.Request(prompt=p, temperature=args.temperature, nucleus_p=args.top_p,
                                rng_seed=args.seed + i, max_len=args.max_len) for i, p in enumerate(prompts)]
    for i, request in enumerate(requests):  # bad flags fail now, not after loading the weights
        try:
            runners.check_request(request)
        except runners.InvalidRequestError as e:
            raise runners.InvalidRequestError(f"--prompt {i + 1}: {e}" if len(requests) > 1 else str(e)) from None
    return requests


def generate(args: argparse.Namespace, config, checkpoint_path: str, tokenizer_path: str,
             pad_sizes: Sequence[int], random_weights: bool = False, started: Optional[float] = None) -> None:
    """Build the runner the release's way, then generate for every prompt at once.

    random_weights: no checkpoint, random weights made on the devices; the steps are then
    compiled ahead of time and the start-up split is printed, the first token's time
    counted from `started` (a time.perf_counter() value; default: when this is called).
    """
    started = time.perf_counter() if started is None else started

    import jax
    import numpy as np

    import runners

    prompts = args.prompt or [DEFAULT_PROMPT]
    requests = build_requests(args)
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
    # The tokenizer and the prompts, before the weights (seconds, not minutes, to an error).
    for i, request in enumerate(requests):
        if not runner.tokenize(request.prompt):
            which = f"--prompt {i + 1} " if len(requests) > 1 else "prompt "
            raise runners.InvalidRequestError(
                f"{which}{request.prompt[:40]!r} encodes to no tokens with {tokenizer_path}; give some text.")
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
    """(coordinator, processes, process id, timeout) from the flags, else the environment.

    Out-of-range values (fewer than 1 process, a process id outside 0 .. N-1, a timeout
    that is not a finite number of seconds > 0) print one line and exit with status 2.
    """
    def usage_error(message: str) -> SystemExit:
        print(f"Error: {message}", file=sys.stderr)
        return SystemExit(EXIT_USAGE)

    def pick(value, flag, env, cast, default):
        if value is not None:
            return value, flag
        text = os.environ.get(env)
        if text in (None, ""):
            return default, None
        try:
            return cast(text), f"environment variable {env}"
        except ValueError:
            raise usage_error(f"environment variable {env}={text!r} is not a valid {cast.__name__}.") from None

    coordinator, _ = pick(args.coordinator, "--coordinator", ENV_COORDINATOR, str, None)
    processes, p_from = pick(args.num_processes, "--num-processes", ENV_NUM_PROCESSES, int, 1)
    process_id, i_from = pick(args.process_id, "--process-id", ENV_PROCESS_ID, int, 0)
    timeout, t_from = pick(args.distributed_timeout, "--distributed-timeout", ENV_TIMEOUT, float,
                           DEFAULT_DISTRIBUTED_TIMEOUT)
    if processes < 1:
        raise usage_error(f"{p_from} {processes}: the number of processes must be >= 1.")
    if not 0 <= process_id < processes:
        raise usage_error(f"{i_from} {process_id}: must be in 0 .. {processes - 1} with {processes} "
                          f"process(es){'' if p_from else ' (--num-processes not given: 1)'}.")
    if not (math.isfinite(timeout) and timeout > 0):
        raise usage_error(f"{t_from} {timeout:g}: must be a finite number of seconds > 0.")
    return coordinator, processes, process_id, timeout


# ---------------------------------------------------------------------------------------
# serve: the HTTP server (server.py)
# ---------------------------------------------------------------------------------------

SERVE_PAD_SIZES = (128, 1024)  # prompt buckets of the real model when serving
DEFAULT_SLOTS = 8


def build_serve_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    import server

    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve Grok-1 (or the tiny random demo, --tiny) over an OpenAI-compatible HTTP API: "
                    "POST /v1/completions (streaming included), GET /v1/models, GET /health, GET /metrics. "
                    "Requests join the running batch as slots free up (continuous batching).",
        epilog="Example:\n  python run.py serve --tiny --port 8000\n  curl http://127.0.0.1:8000/v1/completions "
               "-H 'Content-Type: application/json' -d '{\"prompt\": \"The river\", \"max_tokens\": 16}'")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all).")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000).")
    p.add_argument("--tiny", action="store_true",
                   help="serve the demo: a small random model and a tokenizer trained from the demo corpus "
                        "(see `python run.py --help`); its text is random.")
    p.add_argument("--tiny-dir", default=None,
                   help="with --tiny: where to write the demo checkpoint and tokenizer (default a temporary "
                        "directory, removed at exit).")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"checkpoint directory (default {DEFAULT_CHECKPOINT}).")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help=f"SentencePiece tokenizer.model (default {DEFAULT_TOKENIZER}).")
    p.add_argument("--mesh", type=parse_mesh, default=None,
                   help="local device mesh DATAxMODEL, e.g. 1x8; default: chosen from the devices present.")
    p.add_argument("--moe-impl", choices=("fast", "reference"), default="fast",
                   help="mixture-of-experts implementation (default fast).")
    p.add_argument("--slots", type=int, default=DEFAULT_SLOTS,
                   help=f"sequences decoded together (the batch); a request's n may not exceed it "
                        f"(default {DEFAULT_SLOTS}).")
    p.add_argument("--pad-sizes", type=parse_pad_sizes, default=None,
                   help=f"prompt buckets: a prompt is padded to the smallest that holds it, and each compiles "
                        f"its prefills (default {','.join(map(str, SERVE_PAD_SIZES))}; with --tiny "
                        f"{','.join(map(str, TINY_PAD_SIZES))}). A small bucket makes short prompts cheap.")
    p.add_argument("--max-queue", type=int, default=server.DEFAULT_MAX_QUEUE,
                   help=f"most sequences (one per prompt and choice) waiting for a slot; past it requests "
                        f"get 429 (default {server.DEFAULT_MAX_QUEUE}).")
    p.add_argument("--stream-interval-ms", type=float, default=1e3 * server.STREAM_INTERVAL_S,
                   help=f"a stream's tokens go out at most this often, the tokens of the steps between in one "
                        f"chunk; the first token and the end go out at once. Longer intervals cost the server "
                        f"fewer chunks under load (default {1e3 * server.STREAM_INTERVAL_S:g} ms).")
    p.add_argument("--model-name", default=None,
                   help="the model id of /v1/models and the responses (default grok-1, or grok-1-tiny with --tiny).")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="log level of the server (default info).")
    add_compile_cache_argument(p)
    return p


def serve_main(argv: Sequence[str], prog: Optional[str] = None) -> int:
    """`run.py serve ...`: load the model behind an OpenAI-compatible HTTP server."""
    parser = build_serve_parser(prog)
    args = parser.parse_args(argv)
    if args.slots < 1:
        parser.error(f"--slots {args.slots}: need at least 1 slot.")
    if args.max_queue < 0:
        parser.error(f"--max-queue {args.max_queue}: must be >= 0.")
    if not args.stream_interval_ms >= 0:
        parser.error(f"--stream-interval-ms {args.stream_interval_ms:g}: must be >= 0.")
    if not 0 <= args.port < 65536:
        parser.error(f"--port {args.port}: must lie in 0 .. 65535.")
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("jax", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.tiny:
        missing = missing_files(args.checkpoint, args.tokenizer)
        if missing:
            print("Cannot serve Grok-1:\n  " + "\n  ".join(missing) + "\n\n" + DOWNLOAD_HELP, file=sys.stderr)
            return EXIT_USAGE
    elif args.tiny_dir is not None:
        try:  # refuse a directory holding anything but an earlier demo before loading (issue 13)
            claim_tiny_dir(args.tiny_dir)
        except TinyDirError as e:
            print(f"Error: {e}", file=sys.stderr)
            return EXIT_USAGE
    import socket

    try:  # fail now, not after loading the weights
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as e:
        print(f"Error: cannot listen on {args.host}:{args.port}: {e.strerror or e}. Choose another --port "
              "or --host.", file=sys.stderr)
        return EXIT_USAGE

    import runners
    import server

    with contextlib.ExitStack() as stack:
        def load() -> runners.InferenceRunner:
            import jax

            import model

            if args.tiny:
                config = tiny_demo_config(args.moe_impl)
                directory = args.tiny_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="grok1-tiny-"))
                checkpoint_path, tokenizer_path = build_tiny_demo(directory, config)
                pad_sizes = args.pad_sizes or TINY_PAD_SIZES
            else:
                config = model.grok_1_config(moe_impl=args.moe_impl)
                checkpoint_path, tokenizer_path = args.checkpoint, args.tokenizer
                pad_sizes = args.pad_sizes or SERVE_PAD_SIZES
            mesh = args.mesh or runners.auto_mesh_config(config, jax.local_device_count())
            runner = runners.InferenceRunner(
                pad_sizes=pad_sizes,
                runner=runners.ModelRunner(model=config, bs_per_device=args.slots / (mesh[0] * mesh[1]),
                                           checkpoint_path=checkpoint_path),
                name="serve", load=checkpoint_path, tokenizer_path=tokenizer_path, local_mesh_config=mesh)
            runner.initialize()
            return runner

        name = args.model_name or ("grok-1-tiny" if args.tiny else "grok-1")
        runners.enable_compilation_cache(args.compile_cache)  # before the first compilation
        try:
            server.serve(load, args.host, args.port, model_name=name, max_queue=args.max_queue,
                         log_level=args.log_level, stream_interval=args.stream_interval_ms / 1e3)
        except user_errors() as e:
            print(f"Error: {e}", file=sys.stderr)
            return EXIT_USAGE
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in ("run", "serve", "plan") else None
    if command == "serve":
        return serve_main(argv[1:], prog=f"{os.path.basename(sys.argv[0])} serve")
    if command:  # "run" is the default; "plan" is --plan
        argv = argv[1:] if command == "run" else ["--plan", *argv[1:]]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("jax", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import planner
    import runners

    if args.layers is not None and not (args.random_weights or args.tiny or args.plan):
        print(f"Error: --layers {args.layers} changes the model, but the checkpoint fixes its layers; use "
              "it with --random-weights, --tiny or --plan.", file=sys.stderr)
        return EXIT_USAGE
    if args.plan:  # shapes only: nothing is loaded or allocated
        tiny = with_layers(tiny_demo_config(args.moe_impl), args.layers) if args.tiny else None
        return planner.run_plan(args, config=tiny)
    coordinator, processes, process_id, timeout = distributed_settings(args)
    try:  # the flags and prompts, before anything is written or loaded
        build_requests(args)
    except runners.InvalidRequestError as e:
        print(f"Error: {e}", file=sys.stderr)
        return EXIT_USAGE
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
    except user_errors() as e:  # the user fixes these: no traceback
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


def cli() -> None:
    """The console script `grok1` (pyproject [project.scripts]): grok1 [run] ..., grok1 serve ...,
    grok1 plan ..."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
