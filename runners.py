"""Batched text generation with Grok-1: the release's runner API, with its defects fixed.

Reads top to bottom in the order a request flows:
  several processes (initialize_distributed, the Watchdog) -> meshes (make_mesh,
  auto_mesh_config) -> ModelRunner (mesh, batch size, parameters from a
  checkpoint or random) -> Request and its checks -> sampling (temperature, token mask,
  nucleus, greedy, the probability / top-8 report) -> the compiled prefill and decode steps
  -> _Engine (slots, one decode step for all active slots, streamed text) ->
  InferenceRunner (initialize, stream, generate, the release-style run() generator) ->
  sample_from_model.

What differs from the release (SPEC section 7): every slot keeps its own tokens, settings
and seed; a request stops at the end-of-sequence token or at max_len; temperature 0 is
greedy; cut prompts and cut lengths are warned about; bad settings raise
InvalidRequestError; any number of devices works and a batch never rounds to 0.

Several processes (hosts): every process calls initialize_distributed() first, then runs
the same code with the same requests; the mesh spans all processes (between_hosts_config)
and jax's multi-controller runtime runs the collectives. A dead process, a coordinator
that cannot be reached or a step that never finishes ends the others with a clear error
within the configured timeout instead of a hang.

Shapes: B batch (slots), T tokens, S sequence_len (the cache of a slot), V vocabulary.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import logging
import math
import os
import socket
import sys
import threading
import time
import warnings
from typing import Any, Iterable, Iterator, Mapping, NoReturn, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import checkpoint as xai_checkpoint
import planner
import model as grok_model
from model import LanguageModelConfig

logger = logging.getLogger(__name__)

TOP_K = 8  # how many of the most likely tokens every step reports, as in the release
# Requests may ask for temperatures up to this (check_request); far beyond any logit gap,
# sampling there is already uniform over the allowed tokens.
MAX_TEMPERATURE = 1e6
# The sampler clamps temperatures to this range (sample_tokens): 1 / t stays a normal
# float32 and logits / t cannot overflow for any finite float32 logit of sane size.
SAMPLING_MIN_TEMPERATURE = 1e-20
SAMPLING_MAX_TEMPERATURE = 1e30
# The most requests one prefill call takes (a power of two; see prefill_rows_limit). Each
# (bucket, rows) pair is a program of its own, compiled at its first use or ahead
# (InferenceRunner.compile(grouped=True), or compile_prefill, which the server calls
# while it serves).
MAX_PREFILL_ROWS = 8


# ---------------------------------------------------------------------------------------
# Errors and warnings
# ---------------------------------------------------------------------------------------


class InvalidRequestError(ValueError):
    """A Request that cannot be run: empty prompt, or a setting outside its range."""


class MeshConfigError(ValueError):
    """A mesh that does not fit the devices present or the model's dimensions."""


class RunnerBusyError(RuntimeError):
    """The InferenceRunner is held by a consumer of the calling thread (an open stream() or
    run() generator): waiting for it would never end. Exhaust or close() that one first."""


class PromptTruncatedWarning(UserWarning):
    """A prompt or a max_len was cut to fit the pad buckets or the context."""


def _warn(message: str, category: type = PromptTruncatedWarning) -> None:
    """warnings.warn attributed to the first caller outside this module."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


# ---------------------------------------------------------------------------------------
# Several processes: jax.distributed, and a watchdog so that nobody waits forever
# ---------------------------------------------------------------------------------------

DEFAULT_DISTRIBUTED_TIMEOUT_S = 120.0
# A program's first step compiles it too; its deadline is this many times the step limit.
FIRST_STEP_TIMEOUT_FACTOR = 10
EXIT_DISTRIBUTED = 3  # exit status of a process ended because the group failed


class DistributedError(RuntimeError):
    """The process group cannot start or cannot go on (bad settings, a peer or the
    coordinator gone, a step past its deadline)."""


def abort_process(message: str, code: int = EXIT_DISTRIBUTED) -> NoReturn:
    """Print `message` to stderr and end this process at once with `code`.

    os._exit, not sys.exit: a thread blocked in a collective whose peer is gone can
    never return, and jax's graceful shutdown would wait for that peer.
    """
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - closed stdout: still exit
        pass
    try:
        if message:
            sys.stderr.write(message.rstrip("\n") + "\n")
        sys.stderr.flush()
    finally:
        os._exit(code)


class Watchdog:
    """Ends the process (abort_process) when a guarded block overruns its deadline.

    One daemon thread; `with dog.guard("decode step"):` arms it for `timeout_s` seconds,
    leaving the block disarms it. Blocks may nest; the innermost deadline applies.
    on_expire(message) replaces the default action (tests use it).
    """

    def __init__(self, timeout_s: float, context: str = "",
                 on_expire: Optional[Any] = None, explain: Optional[Any] = None):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s!r}: must be > 0 seconds.")
        self.timeout_s = float(timeout_s)
        self.context = context
        self._on_expire = on_expire or abort_process
        self._explain = explain
        self._armed: list[tuple[float, float, str]] = []  # (deadline, seconds, what), innermost last
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self.fired: Optional[str] = None

    @contextlib.contextmanager
    def guard(self, what: str, timeout_s: Optional[float] = None) -> Iterator[None]:
        seconds = self.timeout_s if timeout_s is None else float(timeout_s)
        entry = (time.monotonic() + seconds, seconds, what)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="grok1-watchdog", daemon=True)
                self._thread.start()
            self._armed.append(entry)
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                if entry in self._armed:
                    self._armed.remove(entry)
                self._cond.notify_all()

    def _watch(self) -> None:
        while True:
            with self._cond:
                if not self._armed:
                    self._cond.wait()
                    continue
                entry = self._armed[-1]
                left = entry[0] - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self._armed.remove(entry)
            _, seconds, what = entry
            message = (f"Error{self.context}: {what} did not finish within {seconds:g} s. Another "
                       "process is probably dead, stuck or unreachable; ending this one (raise the "
                       "limit with --distributed-timeout if the others are legitimately slower).")
            if self._explain is not None:
                message += " " + self._explain()
            self.fired = message
            self._on_expire(message)


_distributed_timeout_s: Optional[float] = None  # set by initialize_distributed


def distributed_context() -> str:
    """' (process i of N)' in a multi-process run, else ''. Used in messages."""
    return f" (process {jax.process_index()} of {jax.process_count()})" if jax.process_count() > 1 else ""


def distributed_timeout() -> Optional[float]:
    """The timeout given to initialize_distributed (None before, or with one process)."""
    return _distributed_timeout_s


def parse_coordinator(address: str) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 as '[::1]:PORT') -> (host, port), or DistributedError."""
    host, sep, port = str(address).rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(
            f"coordinator address {address!r}: expected HOST:PORT, e.g. 10.0.0.1:1234 (process 0 "
            "listens there, the others connect to it).")
    return host, int(port)


def _probe(host: str, port: int) -> str:
    """Whether a TCP connection to the coordinator opens now, in words."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return f"The coordinator {host}:{port} accepts connections, so some process has not joined."
    except OSError as e:
        return (f"The coordinator {host}:{port} cannot be reached ({e.strerror or e}); start process 0 "
                "there, or check the address, the port and the firewall.")


def initialize_distributed(
    coordinator_address: str,
    num_processes: int,
    process_id: int,
    timeout_s: float = DEFAULT_DISTRIBUTED_TIMEOUT_S,
) -> None:
    """Join a group of `num_processes` processes (jax.distributed); call it before any other
    jax call, with the same coordinator and count in every process.

    coordinator_address: HOST:PORT where process 0 runs the coordinator (all processes
    give the same one). process_id: this process's index, 0 .. num_processes - 1; host
    shard h of a checkpoint belongs to process h.
    timeout_s bounds every wait on the others: joining (all processes must connect within
    it), the heartbeat after which a silent process is declared dead (jax then ends the
    others), the shutdown barrier at exit, and, through InferenceRunner.step_timeout's
    watchdog, each generation step. A join that overruns ends this process (abort_process,
    status EXIT_DISTRIBUTED) with a message saying whether the coordinator could be reached:
    a thread stuck in jax's connect cannot be interrupted otherwise. Bad settings raise
    DistributedError. On CPU, collectives across processes go through gloo.
    One process (num_processes 1) needs no coordinator and starts nothing.
    """
    global _distributed_timeout_s
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise DistributedError(f"num_processes={num_processes!r}: must be an integer >= 1.")
    if (isinstance(process_id, bool) or not isinstance(process_id, int)
            or not 0 <= process_id < num_processes):
        raise DistributedError(
            f"process_id={process_id!r}: must be an integer in 0 .. {num_processes - 1} "
            f"(num_processes={num_processes}); give each process its own.")
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise DistributedError(f"timeout={timeout_s!r}: must be a number of seconds > 0.")
    if num_processes == 1:
        return
    host, port = parse_coordinator(coordinator_address)
    if jax.distributed.is_initialized():
        raise DistributedError("jax.distributed is already initialised in this process.")
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    seconds = max(1, int(math.ceil(timeout_s)))
    context = f" (process {process_id} of {num_processes})"
    everyone = (f"Start all {num_processes} processes (--process-id 0 to {num_processes - 1}) with the "
                "same --coordinator and --num-processes.")
    joining = Watchdog(timeout_s, context,
                       explain=(lambda: _probe(host, port)) if process_id else (lambda: everyone))
    what = (f"joining the group at {host}:{port}" if process_id else
            f"waiting at {host}:{port} for all {num_processes} processes to join")
    logger.info("Process %d of %d: joining the group at %s:%d (timeout %g s).",
                process_id, num_processes, host, port, timeout_s)
    with joining.guard(what):
        # jax's own limits are a backstop a few seconds later: its failure is an abort with
        # a terse message, ours says what to check.
        limits = dict(initialization_timeout=seconds + 5, heartbeat_timeout_seconds=seconds,
                      shutdown_timeout_seconds=seconds)
        accepted = inspect.signature(jax.distributed.initialize).parameters  # older jax lacks some
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
            **{k: v for k, v in limits.items() if k in accepted})
        devices = jax.devices()  # the global device exchange, under the same deadline
    _distributed_timeout_s = float(timeout_s)
    logger.info("Process %d of %d joined: %d devices in all, %d here.", process_id, num_processes,
                len(devices), jax.local_device_count())


# ---------------------------------------------------------------------------------------
# Start-up: JAX's persistent compilation cache
# ---------------------------------------------------------------------------------------

COMPILATION_CACHE_ENV = "GROK1_COMPILATION_CACHE"  # a directory, or "off"
COMPILATION_CACHE_OFF = ("", "0", "off", "none", "no", "false")
_compile_events: collections.Counter = collections.Counter()
_compile_listeners_registered = False


def default_compilation_cache_dir() -> str:
    """$XDG_CACHE_HOME/grok1/jax, else ~/.cache/grok1/jax."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "grok1", "jax")


def _count_compile_event(event: str, *args: Any, **kwargs: Any) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _compile_events["cache_hits"] += 1
    elif event == "/jax/compilation_cache/cache_misses":  # recorded when an entry is written
        _compile_events["cache_writes"] += 1
    elif event == "/jax/core/compile/backend_compile_duration":  # XLA compile or cache read
        _compile_events["compiles"] += 1


def compilation_stats() -> dict[str, int]:
    """Counts since the first enable_compilation_cache call: "compiles" (programs handed to
    XLA, cache hits included), "cache_hits" (loaded from the persistent cache) and
    "cache_writes" (compiled and written to it)."""
    return {k: _compile_events[k] for k in ("compiles", "cache_hits", "cache_writes")}


def enable_compilation_cache(directory: Optional[str] = None) -> Optional[str]:
    """Turn JAX's persistent compilation cache on (or off); returns the directory, or None.

    With it on, a second start loads the compiled programs (prefill, decode, the random
    weight generators) from disk instead of compiling them again. directory: where to
    keep them; None reads the environment variable GROK1_COMPILATION_CACHE, and without
    it uses default_compilation_cache_dir() (~/.cache/grok1/jax). "off" (or "", "0",
    "none") turns the cache off, also one set through JAX's own settings. Every program is
    written, whatever its compile time or size (JAX skips programs that compile in under
    a second by default, e.g. the weight generators). A directory that cannot be created
    leaves the cache off, with a warning. Call it before the first compilation; calling it
    again switches directories (the cache is re-read lazily).
    """
    global _compile_listeners_registered
    from jax.experimental.compilation_cache import compilation_cache

    if not _compile_listeners_registered:
        jax.monitoring.register_event_listener(_count_compile_event)
        jax.monitoring.register_event_duration_secs_listener(_count_compile_event)
        _compile_listeners_registered = True
    if directory is None:
        directory = os.environ.get(COMPILATION_CACHE_ENV, default_compilation_cache_dir())
    path: Optional[str] = None
    if str(directory).strip().lower() not in COMPILATION_CACHE_OFF:
        path = os.path.abspath(os.path.expanduser(str(directory)))
        try:
            os.makedirs(path, exist_ok=True)
            if not os.access(path, os.W_OK):
                raise PermissionError(f"{path} is not writable")
        except OSError as e:
            logger.warning("Compilation cache off: cannot use %s (%s). Pass another directory "
                           "(run.py --compile-cache DIR, or %s=DIR).", path, e, COMPILATION_CACHE_ENV)
            path = None
    jax.config.update("jax_enable_compilation_cache", path is not None)
    if path is not None:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size limit
    compilation_cache.reset_cache()  # takes effect even after earlier compilations
    return path


# ---------------------------------------------------------------------------------------
# Meshes
# ---------------------------------------------------------------------------------------


def auto_mesh_config(config: LanguageModelConfig, num_devices: int) -> tuple[int, int]:
    """The local mesh (data, model) to use when none is given: the planner's layout.

    planner.choose_mesh prefers model parallelism (up to what divides the kv heads and every
    dimension the model axis splits), then data. If no layout uses all num_devices (a model
    too narrow for them), the most devices that have one are used. Memory is checked
    separately, once the batch size is known (ModelRunner.initialize).
    """
    if num_devices < 1:
        raise MeshConfigError(f"num_devices={num_devices}: need at least one device.")
    for n in range(num_devices, 0, -1):
        try:
            return planner.choose_mesh(config, n)
        except planner.PlanError:
            continue
    raise MeshConfigError(f"No (data, model) layout of 1 to {num_devices} devices splits this model.")


def _pair(value: Any, name: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise MeshConfigError(f"{name}={value!r}: expected two integers (data, model), e.g. (1, 8).") from None
    if a < 1 or b < 1:
        raise MeshConfigError(f"{name}={value!r}: both sizes must be >= 1.")
    return a, b


def make_mesh(
    local_mesh_config: Optional[Sequence[int]] = None,
    between_hosts_config: Optional[Sequence[int]] = None,
    *,
    config: Optional[LanguageModelConfig] = None,
    devices: Optional[Sequence[Any]] = None,
) -> Mesh:
    """A ("data", "model") mesh over this host's devices (and the other hosts', if any).

    local_mesh_config (data, model): the mesh of one host. None picks one: the planner's
    layout from auto_mesh_config when `config` is given, else (1, all local devices). A smaller mesh
    than the devices present uses the first ones; a larger one is an error.
    between_hosts_config (data, model): how hosts are arranged; its product must equal the
    number of processes (None: (processes, 1), hosts along "data"). The mesh's shape is
    the elementwise product of the two: a hybrid mesh in which each process's devices form
    one contiguous (local) block, process p at block (p // hosts_model, p % hosts_model).
    Hosts along "data" (N, 1) keep the model axis's frequent collectives inside each host.
    `devices` (one host only) picks the local devices to use.
    """
    num_processes = jax.process_count()
    hosts = _pair(between_hosts_config or (num_processes, 1), "between_hosts_config")
    if math.prod(hosts) != num_processes:
        raise MeshConfigError(
            f"between_hosts_config={hosts} describes {math.prod(hosts)} hosts, but jax runs "
            f"{num_processes} process(es). Use ({num_processes}, 1) or start the "
            "matching number of processes.")
    if devices is not None and num_processes > 1:
        raise MeshConfigError("make_mesh(devices=...) picks devices of one host; with several "
                              "processes every process's devices are used (leave devices out).")
    local_devices = list(devices) if devices is not None else jax.local_devices()
    if local_mesh_config is None:
        local = auto_mesh_config(config, len(local_devices)) if config is not None else (1, len(local_devices))
    else:
        local = _pair(local_mesh_config, "local_mesh_config")
    need = math.prod(local)
    if need > len(local_devices):
        raise MeshConfigError(
            f"local_mesh_config={local} needs {need} devices per host but "
            f"{len(local_devices)} are present ({local_devices[0].platform}). Pass a mesh whose "
            f"product is at most {len(local_devices)}, or None to choose one automatically."
        )
    if need < len(local_devices):
        logger.info("Mesh %s uses %d of the %d local devices.", local, need, len(local_devices))
    axis_types = (jax.sharding.AxisType.Auto,) * 2
    if num_processes == 1:
        grid = np.array(local_devices[:need], dtype=object).reshape(local)
    else:
        grid = _hybrid_grid(local, hosts, need)
    return Mesh(grid, ("data", "model"), axis_types=axis_types)


def _hybrid_grid(local: tuple[int, int], hosts: tuple[int, int], need: int) -> np.ndarray:
    """The device grid of a mesh spanning every process: one local block per process.

    Every process computes the same grid (from jax.devices(), ordered by process index).
    When each process uses all its devices, jax's create_hybrid_device_mesh arranges the
    block (it knows accelerator topologies); otherwise each process's first `need` devices
    by id are laid out in order.
    """
    by_process: dict[int, list[Any]] = collections.defaultdict(list)
    for d in jax.devices():
        by_process[d.process_index].append(d)
    counts = {p: len(ds) for p, ds in sorted(by_process.items())}
    if min(counts.values()) < need:
        raise MeshConfigError(
            f"local_mesh_config={local} needs {need} devices per host, but the processes have "
            f"{counts} devices; pass a local mesh of at most {min(counts.values())} devices.")
    if all(n == need for n in counts.values()):
        from jax.experimental import mesh_utils

        try:
            return mesh_utils.create_hybrid_device_mesh(local, hosts, devices=jax.devices(),
                                                        process_is_granule=True)
        except (ValueError, NotImplementedError, AssertionError) as e:
            logger.info("create_hybrid_device_mesh failed (%s); laying devices out in order.", e)
    blocks = [np.array(sorted(by_process[p], key=lambda d: d.id)[:need], dtype=object).reshape(local)
              for p in sorted(by_process)]
    rows = [np.concatenate(blocks[r * hosts[1]:(r + 1) * hosts[1]], axis=1) for r in range(hosts[0])]
    return np.concatenate(rows, axis=0)


def _check_mesh_fits(config: LanguageModelConfig, mesh: Mesh) -> None:
    """Raise MeshConfigError naming the first parameter whose dimension the mesh cannot split."""
    one_layer = dataclasses.replace(config, model=dataclasses.replace(config.model, num_layers=1))
    try:
        grok_model.param_shardings(one_layer, mesh)  # layers are all alike
    except ValueError as e:
        best = auto_mesh_config(config, mesh.devices.size)
        raise MeshConfigError(
            f"The mesh {dict(mesh.shape)} does not fit this model: {e} "
            f"For {mesh.devices.size} device(s), (data, model) = {best} fits; or pass None "
            "(run.py: leave out --mesh) to choose automatically."
        ) from None


# ---------------------------------------------------------------------------------------
# ModelRunner: mesh, batch size, parameters
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelRunner:
    """Holds the model config and produces the mesh, batch size and parameters.

    bs_per_device: slots per device; batch = bs_per_device * devices in the mesh (at least 1,
      where the release crashed on 0). load_rename_rules / load_exclude_rules: regex rules
      mapping the code's parameter paths to the checkpoint's (see checkpoint.restore).
    rng_seed: the seed of random parameters when no checkpoint is given.
    transform_forward: accepted for compatibility with the release; unused.
    checkpoint_path: the checkpoint directory (or its parent holding ckpt-0); "" means
      random parameters (drawn on the host: fine for small models).
    random_weights: ignore any checkpoint and draw random int8 weights on the devices,
      already sharded (model.init_random_params(on_device=True)): a smoke test of a host at
      Grok-1 width without the 318 GB download. The values depend on rng_seed only.
    """

    model: LanguageModelConfig
    bs_per_device: float = 2.0
    load_rename_rules: Optional[list[tuple[str, str]]] = None
    load_exclude_rules: Optional[list[str]] = None
    rng_seed: int = 42
    transform_forward: bool = False
    checkpoint_path: str = ""
    random_weights: bool = False

    def initialize(
        self,
        init_data: Any = None,
        local_mesh_config: Optional[Sequence[int]] = None,
        between_hosts_config: Optional[Sequence[int]] = None,
    ) -> None:
        """Build the mesh (checked against the model) and the batch size.

        init_data is accepted for compatibility with the release and not needed.
        """
        del init_data
        self.model.initialize()
        self.between_hosts_config = tuple(between_hosts_config or (jax.process_count(), 1))
        self.mesh = make_mesh(local_mesh_config, self.between_hosts_config, config=self.model)
        _check_mesh_fits(self.model, self.mesh)
        local_devices = sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)
        wanted = self.bs_per_device * local_devices
        self.local_batch_size = int(math.floor(wanted + 1e-6))
        if self.local_batch_size < 1:
            logger.info("bs_per_device=%s x %d devices rounds to %.3f slots; using 1.",
                        self.bs_per_device, local_devices, wanted)
            self.local_batch_size = 1
        self.batch_size = self.local_batch_size * jax.process_count()
        logger.info("Mesh %s, batch size %d.", dict(self.mesh.shape), self.batch_size)
        # Refuse now, with the planner's numbers, rather than after an hour of loading.
        # The planner reads memory limits from the devices, and only this process's can be
        # queried: with several hosts (all alike), its own stand in for the others'.
        mine = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
        devices = [mine[i % len(mine)] for i in range(self.mesh.devices.size)]
        planner.refuse_if_cannot_fit(self.model, devices, self.batch_size,
                                     self.model.sequence_len, mesh_shape=tuple(self.mesh.devices.shape))

    def load_or_init(self, init_data: Any = None, from_checkpoint: bool = True) -> dict:
        """The parameters, placed on the mesh: restored from checkpoint_path, else random.

        InferenceRunner.initialize owns what this returns: it converts the arrays in place
        to the layouts inference reads (model.prepare_for_inference with consume=True)."""
        del init_data
        if not hasattr(self, "mesh"):
            raise RuntimeError("ModelRunner.initialize() must run before load_or_init().")
        config = self.model
        if self.random_weights:
            logger.info("Random weights made on the devices (seed %d); no checkpoint is read.", self.rng_seed)
            return grok_model.init_random_params(config, self.rng_seed, self.mesh, on_device=True)
        shapes = grok_model.param_shapes(config)
        shardings = grok_model.param_shardings(config, self.mesh, shapes)
        if not (from_checkpoint and self.checkpoint_path):
            logger.warning("No checkpoint given: using random parameters (seed %d).", self.rng_seed)
            return grok_model.init_random_params(config, self.rng_seed, self.mesh)
        init_state = None
        if self.load_rename_rules or self.load_exclude_rules:
            # Parameters the rules exclude keep these values.
            init_state = grok_model.init_random_params(config, self.rng_seed, self.mesh)
        return xai_checkpoint.restore(
            self.checkpoint_path, shapes, self.mesh,
            between_hosts_config=self.between_hosts_config,
            params_only=True, state_sharding=shardings, init_state=init_state,
            rename_rules=tuple(self.load_rename_rules or ()),
            exclude_rules=tuple(self.load_exclude_rules or ()),
        )


# ---------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Request:
    """One generation request (the release's fields, plus an optional token mask).

    temperature: 0 is greedy (argmax); > 0 samples from softmax(logits / temperature).
    nucleus_p: top-p in (0, 1]; 1 keeps every token. rng_seed: the request's own seed (the
    same seed gives the same sample, whatever else runs beside it). max_len: the most
    tokens to generate; generation also stops at the end-of-sequence token.
    token_mask: optional [V] booleans, True where a token may be sampled (ANDed with the
      default mask, which excludes the pad id and ids beyond the tokenizer).
    """

    prompt: str
    temperature: float = 1.0
    nucleus_p: float = 1.0
    rng_seed: int = 42
    max_len: int = 100
    token_mask: Optional[Any] = None


def check_request(request: Request, vocab_size: Optional[int] = None) -> None:
    """Raise InvalidRequestError (a ValueError) naming the field of a request that cannot run."""
    if not isinstance(request, Request):
        raise TypeError(f"expected a runners.Request, got {type(request).__name__}")
    if not isinstance(request.prompt, str):
        raise InvalidRequestError(f"prompt must be a str, got {type(request.prompt).__name__}.")
    if not request.prompt:
        raise InvalidRequestError("prompt is empty: give at least one token of text.")
    _check_text(request.prompt)
    t = request.temperature
    if isinstance(t, bool) or not isinstance(t, (int, float, np.number)) or not math.isfinite(t) or t < 0:
        raise InvalidRequestError(f"temperature={t!r}: must be a finite number >= 0 (0 = greedy).")
    if t > MAX_TEMPERATURE:
        raise InvalidRequestError(
            f"temperature={t!r}: must be at most {MAX_TEMPERATURE:g}; sampling is already uniform over "
            "the allowed tokens long before that.")
    p = request.nucleus_p
    if isinstance(p, bool) or not isinstance(p, (int, float, np.number)) or not 0 < p <= 1:
        raise InvalidRequestError(f"nucleus_p (top_p)={p!r}: must lie in (0, 1]; 1 keeps every token.")
    m = request.max_len
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise InvalidRequestError(f"max_len={m!r}: must be an integer >= 1.")
    if isinstance(request.rng_seed, bool) or not isinstance(request.rng_seed, (int, np.integer)):
        raise InvalidRequestError(f"rng_seed={request.rng_seed!r}: must be an integer.")
    if request.token_mask is not None:
        mask = np.asarray(request.token_mask)
        if mask.ndim != 1 or (vocab_size is not None and mask.shape[0] != vocab_size):
            raise InvalidRequestError(
                f"token_mask has shape {mask.shape}; expected ({vocab_size},), one flag per token.")
        if not mask.astype(bool).any():
            raise InvalidRequestError("token_mask allows no token at all.")


def _check_text(prompt: str) -> None:
    """Raise InvalidRequestError if `prompt` holds a lone surrogate (not valid Unicode).

    Python hands invalid UTF-8 bytes of a command line or file name over as lone surrogates
    U+DC80..U+DCFF (surrogateescape); the tokenizer could not encode them.
    """
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        char = prompt[e.start]
        raw = (f" (the invalid UTF-8 byte 0x{ord(char) - 0xDC00:02X} as Python passes it on)"
               if 0xDC80 <= ord(char) <= 0xDCFF else "")
        raise InvalidRequestError(
            f"prompt {prompt[:40]!r}{'...' if len(prompt) > 40 else ''} is not valid text: character "
            f"{e.start} is a lone surrogate U+{ord(char):04X}{raw}. Give the prompt as UTF-8.") from None


@dataclasses.dataclass
class _Prepared:
    """A checked request, tokenized and fitted to a pad bucket and the context."""

    request_id: Any
    request: Request
    tokens: list[int]  # the prompt after any left truncation
    bucket: int
    max_len: int  # after any cut to the context
    mask: np.ndarray  # [V] bool


# ---------------------------------------------------------------------------------------
# Sampling (inside jit, float32)
# ---------------------------------------------------------------------------------------


def top_p_filter(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Nucleus filtering as in the release. logits [B, V] float32, top_p [B] -> [B, V].

    Sort ascending; find the first index where the cumulative probability reaches
    1 - top_p; keep the logits >= the logit there, set the rest to -inf. (If rounding keeps
    the sum from reaching 1 - top_p, only the largest logit is kept.)
    """
    sorted_logits = jnp.sort(logits, axis=-1)  # [B, V] ascending
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    reached = cum >= (1.0 - top_p)[:, None]
    first = jnp.where(jnp.any(reached, axis=-1), jnp.argmax(reached, axis=-1), logits.shape[-1] - 1)
    threshold = jnp.take_along_axis(sorted_logits, first[:, None], axis=-1)  # [B, 1]
    return jnp.where(logits >= threshold, logits, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class Draw:
    """The sampled token of each row and the report about it."""

    token: jax.Array  # [B] int32
    prob: jax.Array  # [B] float32: probability of the token under the distribution used
    top_ids: jax.Array  # [B, k] int32
    top_probs: jax.Array  # [B, k] float32


jax.tree_util.register_dataclass(Draw, data_fields=["token", "prob", "top_ids", "top_probs"], meta_fields=[])


def sample_tokens(
    logits: jax.Array, mask: jax.Array, temperature: jax.Array, top_p: jax.Array, keys: jax.Array,
    top_k: int = TOP_K,
) -> Draw:
    """One token per row. logits [B, V], mask [B, V] bool, temperature/top_p [B], keys [B].

    Float32 throughout: logits / temperature, disallowed tokens to -inf, nucleus filter,
    categorical sample. Rows with temperature 0 take the argmax of the allowed logits (no
    division by zero); their reported probabilities are those at temperature 1 (after the
    row's top-p filter).

    Numerically safe for any temperature and any logits: the temperature is clamped to
    [SAMPLING_MIN_TEMPERATURE, SAMPLING_MAX_TEMPERATURE] (XLA divides by multiplying with
    1 / t, and 1 / t must stay a normal float32: above about 8.5e37 it flushes to 0 and
    -inf * 0 gave NaN everywhere); the mask is applied after the division; NaN logits count
    as -inf and overflowing ones are clipped to the float32 range. A masked token is never
    returned: should no allowed token survive (all NaN), the first allowed one is taken.
    """
    logits = logits.astype(jnp.float32)
    greedy = temperature <= 0
    t = jnp.clip(jnp.where(greedy, 1.0, temperature).astype(jnp.float32),
                 SAMPLING_MIN_TEMPERATURE, SAMPLING_MAX_TEMPERATURE)
    big = jnp.finfo(jnp.float32).max
    finite = jnp.where(jnp.isnan(logits), -jnp.inf, logits)
    allowed = jnp.where(mask, finite, -jnp.inf)
    scaled = jnp.where(mask, jnp.clip(finite / t[:, None], -big, big), -jnp.inf)  # [B, V]
    filtered = top_p_filter(scaled, top_p.astype(jnp.float32))  # [B, V]
    sampled = jax.vmap(jax.random.categorical)(keys, filtered)
    token = jnp.where(greedy, jnp.argmax(allowed, axis=-1), sampled).astype(jnp.int32)
    ok = jnp.take_along_axis(mask, token[:, None], axis=-1)[:, 0]
    token = jnp.where(ok, token, jnp.argmax(mask, axis=-1)).astype(jnp.int32)
    probs = jax.nn.softmax(filtered, axis=-1)
    prob = jnp.take_along_axis(probs, token[:, None], axis=-1)[:, 0]
    top_probs, top_ids = jax.lax.top_k(probs, min(top_k, probs.shape[-1]))
    return Draw(token, prob, top_ids.astype(jnp.int32), top_probs)


def request_keys(seed: jax.Array, count: jax.Array) -> jax.Array:
    """The key of a request's token number `count`: fold_in(key(seed), count). [B] -> [B]."""
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seed, count)


# ---------------------------------------------------------------------------------------
# Compiled steps: prefill a request into its slot, decode all slots by one token
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """What one step hands back to the host: the draw of every row and which rows finished."""

    draw: Draw
    done: jax.Array  # [B] bool: the row's request ended with this token


jax.tree_util.register_dataclass(StepOutput, data_fields=["draw", "done"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class SlotState:
    """Per-slot state kept on the devices. All [B] except mask [B, V] and last."""

    token: jax.Array  # int32: the last sampled token, fed at the next step
    count: jax.Array  # int32: tokens generated so far (also the sampling key counter)
    max_len: jax.Array  # int32
    temperature: jax.Array  # float32
    top_p: jax.Array  # float32
    seed: jax.Array  # uint32
    mask: jax.Array  # bool [B, V]
    last: StepOutput  # the latest decode step's output, written over the one before (DecodeStep)


jax.tree_util.register_dataclass(
    SlotState, data_fields=["token", "count", "max_len", "temperature", "top_p", "seed", "mask", "last"],
    meta_fields=[])


def _empty_state(batch: int, vocab: int) -> SlotState:
    zeros = np.zeros((batch,), np.int32)
    last = StepOutput(Draw(token=zeros, prob=np.zeros((batch,), np.float32), top_ids=np.zeros((batch, TOP_K), np.int32),
                           top_probs=np.zeros((batch, TOP_K), np.float32)), done=np.zeros((batch,), bool))
    return SlotState(token=zeros, count=zeros, max_len=np.ones((batch,), np.int32),
                     temperature=np.zeros((batch,), np.float32), top_p=np.ones((batch,), np.float32),
                     seed=np.zeros((batch,), np.uint32), mask=np.ones((batch, vocab), bool), last=last)


def _insert_cache(big: grok_model.Memory, small: grok_model.Memory, slot: jax.Array) -> grok_model.Memory:
    """Put R one-sequence caches [R, bucket, G, K] into rows `slot` [R] of [B, S, G, K],
    zero-padded to S. A row after the first whose slot is out of range (>= B: padding)
    writes nothing."""
    layers = []
    for b, s in zip(big.layers, small.layers):
        pad = ((0, 0), (0, b.k.shape[1] - s.k.shape[1]), (0, 0), (0, 0))
        k = jnp.pad(s.k.astype(b.k.dtype), pad)  # [R, S, G, K]
        v = jnp.pad(s.v.astype(b.v.dtype), pad)
        layers.append(grok_model.KVMemory(k=_set_rows(b.k, slot, k), v=_set_rows(b.v, slot, v),
                                          step=_set_rows(b.step, slot, s.step.astype(b.step.dtype))))
    return grok_model.Memory(layers=layers)


def _set_rows(a: jax.Array, slot: jax.Array, value: jax.Array) -> jax.Array:
    """a.at[slot].set(value) for slot [R], in place. Row 0 is a request (its slot in range);
    a later row whose slot is out of range is padding and is dropped. The engine gives each
    padding row its own index >= B, so the indices are unique."""
    value = value.astype(a.dtype)
    if slot.shape[0] == 1:
        # A dynamic_update_slice, in place: XLA turns a one-row scatter into a read of the
        # row, a select and a copy of the whole donated buffer (4x the time on the CPU).
        return jax.lax.dynamic_update_slice_in_dim(a, value, slot[0], axis=0)
    return a.at[slot].set(value, mode="drop", unique_indices=True)


def make_step_functions(config: LanguageModelConfig, mesh: Mesh, batch_size: int):
    """The jitted (prefill, decode) pair. Both donate the cache and the slot state.

    prefill(params, memory, state, tokens [R, bucket], length [R], slot [R], temperature [R],
            top_p [R], seed [R], max_len [R], mask [R, V]) -> (memory, state, StepOutput of R rows)
      runs R prompts (right-padded with the pad id to their common bucket) through a fresh
      cache of the bucket's size, samples each one's first token, and writes its cache,
      step (= prompt length) and settings into row slot[r] of the batch. Row 0 is a
      request; a later row whose slot is out of range (>= batch_size) is padding: it is
      computed and writes nothing.
      Compiles once per (bucket, R); the engine uses R = 1 and powers of two up to
      prefill_rows_limit.
    decode(params, memory, state, active [B] bool) -> (memory, state, StepOutput of B rows)
      feeds every active slot its last token; inactive slots' caches do not advance (their
      rows of the output are meaningless). Compiles once. A DecodeStep: two programs, the
      step in place and a copy of its output for the host.
    """
    cfg = config.model
    seq_len = config.sequence_len

    lm = grok_model.make_apply(config, mesh)

    def finished(token, count, max_len):
        return (token == config.eos_token) | (count >= max_len)

    def prefill(params, memory, state, tokens, length, slot, temperature, top_p, seed, max_len, mask):
        rows, bucket = tokens.shape
        small = grok_model.init_layer_memories(rows, bucket, cfg.num_kv_heads, cfg.key_size, cfg.num_layers,
                                               config.fprop_dtype)
        out = lm(params, tokens, small, length)
        logits = out.logits[:, 0, :]  # [R, V]: each row's last real position
        first = jnp.zeros((rows,), jnp.int32)  # the first token of each request: key counter 0
        draw = sample_tokens(logits, mask, temperature, top_p, request_keys(seed, first))
        memory = _insert_cache(memory, out.model_state, slot)
        state = SlotState(
            token=_set_rows(state.token, slot, draw.token), count=_set_rows(state.count, slot, first + 1),
            max_len=_set_rows(state.max_len, slot, max_len),
            temperature=_set_rows(state.temperature, slot, temperature),
            top_p=_set_rows(state.top_p, slot, top_p), seed=_set_rows(state.seed, slot, seed),
            mask=_set_rows(state.mask, slot, mask), last=state.last,
        )
        return memory, state, StepOutput(draw, finished(draw.token, first + 1, max_len))

    def decode(params, memory, state, active):
        length = active.astype(jnp.int32)  # 0 leaves a free slot's cache where it is
        tokens = jnp.where(active, state.token, config.pad_token)[:, None]  # [B, 1]
        out = lm(params, tokens, memory, length)
        keys = request_keys(state.seed, state.count)
        draw = sample_tokens(out.logits[:, 0, :], state.mask, state.temperature, state.top_p, keys)
        count = state.count + length
        last = StepOutput(draw, active & finished(draw.token, count, state.max_len))
        return out.model_state, dataclasses.replace(
            state, token=jnp.where(active, draw.token, state.token), count=count, last=last)

    memory_sharding = grok_model.memory_shardings(config, mesh, batch_size, seq_len)
    replicated = NamedSharding(mesh, P())
    prefill_jit = jax.jit(prefill, donate_argnums=(1, 2), out_shardings=(memory_sharding, replicated, replicated))
    # keep_unused: the cache steps of layers 1.. and state.last are only written, never
    # read; jax would drop them from the program and their donation with them.
    decode_jit = jax.jit(decode, donate_argnums=(1, 2), keep_unused=True,
                         out_shardings=(memory_sharding, replicated))

    def copy(last, spare=None):
        del spare  # donated: the copy is written over it
        return jax.tree_util.tree_map(jnp.copy, last)

    take = jax.jit(copy, out_shardings=replicated)
    take_into = jax.jit(copy, out_shardings=replicated, donate_argnums=1, keep_unused=True)
    return prefill_jit, DecodeStep(decode_jit, take, take_into)


class DecodeStep:
    """decode(params, memory, state, active) -> (memory, state, StepOutput) in two programs.

    `step` returns only buffers it was given: the cache and the state, donated, with its
    StepOutput written into state.last. `take` copies state.last for the host, who reads it
    after later steps have donated the state; it writes over a spare output the host is done
    with (recycle()) where there is one. `active` (numpy) goes to the devices only when it
    changes. One caller at a time (the engine's lock).

    Why: on a GPU XLA records a program into CUDA graphs, and before each launch updates the
    commands touching any buffer that lies elsewhere than at the last call, ~5 us of host
    time per command. A fresh output moves at every call, and XLA lets the temporaries of
    all layers share its allocation; fresh copies in `take` took the place of the step's
    temporaries, which then moved. Either way most of the step's commands were updated at
    every step (BENCHMARKS.md, "Session 8").
    """

    SPARES = 8  # recycled outputs kept for `take` to write over

    def __init__(self, step: Any, take: Any, take_into: Any):
        self.step = step  # jitted (params, memory, state, active) -> (memory, state)
        self.take = take  # jitted StepOutput -> a copy of it
        self.take_into = take_into  # jitted (StepOutput, spare, donated) -> the copy, in the spare
        self._spares: list[StepOutput] = []
        self._active: Optional[tuple[bytes, jax.Array]] = None  # the last `active`, on the devices

    def __call__(self, params: Any, memory: grok_model.Memory, state: SlotState,
                 active: Any) -> tuple[grok_model.Memory, SlotState, StepOutput]:
        memory, state = self.step(params, memory, state, self._placed(active, state))
        if self._spares:
            return memory, state, self.take_into(state.last, self._spares.pop())
        return memory, state, self.take(state.last)

    def recycle(self, out: StepOutput) -> None:
        """Hand back a StepOutput of this step that the host has read: a later call writes
        over it (its arrays are deleted then; do not read them after this)."""
        if len(self._spares) < self.SPARES:
            self._spares.append(out)

    def lower(self, params: Any, memory: Any, state: Any, active: Any) -> Any:
        """The step's lowering for these inputs (arrays or shapes), `active` placed as calls
        place it: what compile_steps compiles."""
        placed = jax.ShapeDtypeStruct(np.shape(active), np.bool_, sharding=state.token.sharding)
        return self.step.lower(params, memory, state, placed)

    def _placed(self, active: Any, state: SlotState) -> jax.Array:
        active = np.asarray(active, bool)
        key = active.tobytes()
        if self._active is None or self._active[0] != key:
            self._active = (key, jax.device_put(active, state.token.sharding))
        return self._active[1]


def step_arguments(config: LanguageModelConfig, batch_size: int, bucket: Optional[int] = None,
                   rows: int = 1) -> tuple:
    """Host arguments of a step after (params, memory, state), of the types _Engine passes:
    prefill's (tokens [rows, bucket], length, slot, temperature, top_p, seed, max_len [rows],
    mask [rows, V]) when `bucket` is given, else decode's (active [B],). Values are
    placeholders (row r writes slot r, or nothing when r >= batch_size)."""
    if bucket is None:
        return (np.ones((batch_size,), bool),)
    r = rows
    return (np.zeros((r, bucket), np.int32), np.full((r,), bucket, np.int32), np.arange(r, dtype=np.int32),
            np.ones((r,), np.float32), np.ones((r,), np.float32), np.zeros((r,), np.uint32),
            np.ones((r,), np.int32), np.ones((r, config.vocab_size), bool))


def prefill_rows_limit(config: LanguageModelConfig, batch_size: int, bucket: int) -> int:
    """The most requests one prefill call of `bucket` takes: the largest power of two
    <= MAX_PREFILL_ROWS, the batch and sequence_len // bucket. The last bound keeps R x
    bucket tokens within the one prefill of sequence_len tokens the memory planner sizes
    (planner.plan's default), so grouping never needs more memory than was planned."""
    cap = min(MAX_PREFILL_ROWS, batch_size, max(1, config.sequence_len // bucket))
    return 1 << (cap.bit_length() - 1)


def grouped_prefills(config: LanguageModelConfig, batch_size: int, buckets: Sequence[int]) -> list[tuple[int, int]]:
    """(bucket, rows) of every prefill of several requests the engine may call: rows 2, 4,
    ... up to prefill_rows_limit per bucket, the smaller groups first."""
    limits = {b: prefill_rows_limit(config, batch_size, b) for b in buckets}
    rows = sorted({2 ** k for b in buckets for k in range(1, limits[b].bit_length())})
    return [(b, r) for r in rows for b in buckets if r <= limits[b]]


def prefill_rows(count: int) -> int:
    """Rows of the prefill call for `count` requests: the next power of two (1, 2, 4, 8,
    ...), so that few programs per bucket exist; the extra rows are padding."""
    if count < 1:
        raise ValueError(f"count={count}: a prefill call takes at least one request.")
    return 1 << (count - 1).bit_length()


def abstract_step_inputs(config: LanguageModelConfig, mesh: Mesh, batch_size: int) -> tuple:
    """(params, memory, state) of the engine as sharded jax.ShapeDtypeStructs: lowering with
    them compiles the runner's steps for this mesh without allocating anything."""
    def abstract(tree, shardings):
        return jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)

    params = grok_model.inference_param_shapes(config, mesh)  # the tree prepare_for_inference makes
    cfg = config.model
    memory = jax.eval_shape(lambda: grok_model.init_layer_memories(
        batch_size, config.sequence_len, cfg.num_kv_heads, cfg.key_size, cfg.num_layers, config.fprop_dtype))
    memory = abstract(memory, grok_model.memory_shardings(config, mesh, batch_size, config.sequence_len))
    state = _empty_state(batch_size, config.vocab_size)
    state = abstract(state, jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()), state))
    return params, memory, state


def timed_compile(fn: Any, *args: Any) -> dict[str, float]:
    """Lower and compile the jitted `fn` for `args` before its first call (the jit's own cache
    keeps the program for the calls that follow); returns the seconds of each part."""
    start = time.perf_counter()
    lowered = fn.lower(*args)
    lowered_at = time.perf_counter()
    lowered.compile()
    return {"lower_s": lowered_at - start, "compile_s": time.perf_counter() - lowered_at}


def compile_steps(prefill: Any, decode: Any, params: Any, memory: Any, state: Any, config: LanguageModelConfig,
                  batch_size: int, buckets: Sequence[int], grouped: bool = False) -> dict[str, dict[str, float]]:
    """Lower and compile the jitted steps of make_step_functions ahead of time, timing each
    part; see InferenceRunner.compile. params / memory / state: arrays (the jit's own
    cache then serves later calls with them) or abstract_step_inputs' shapes. grouped:
    also the prefills of several requests (2, 4, ... rows up to prefill_rows_limit)."""
    out = {}
    calls = [(f"prefill {b}", prefill, step_arguments(config, batch_size, b)) for b in buckets]
    if grouped:
        calls += [(f"prefill {b} x{r}", prefill, step_arguments(config, batch_size, b, r))
                  for b, r in grouped_prefills(config, batch_size, buckets)]
    calls.append(("decode", decode, step_arguments(config, batch_size)))
    for i, (name, fn, args) in enumerate(calls, 1):  # a deep model takes tens of seconds each: say so
        out[name] = timed_compile(fn, params, memory, state, *args)
        logger.info("Compiled %s (%d of %d programs): lowered in %.2f s, compiled in %.2f s.", name, i, len(calls),
                    out[name]["lower_s"], out[name]["compile_s"])
    if isinstance(decode, DecodeStep):  # and its copies of the output for the host (a moment)
        decode.take.lower(state.last).compile()
        decode.take_into.lower(state.last, state.last).compile()
    return out


# ---------------------------------------------------------------------------------------
# What the runner hands back: token events, completions
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Completion:
    """A finished request. tokens / probs / top_k exclude the end-of-sequence token."""

    request_id: Any
    request: Request
    prompt_tokens: list[int]  # as run (after any truncation)
    tokens: list[int]
    text: str
    probs: list[float]  # probability of each generated token
    top_k: list[tuple[tuple[int, float], ...]]  # the 8 most likely (token, prob) per step
    finish_reason: str  # "eos" or "max_len"


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token of one request, as soon as it is sampled.

    text is the new piece of decoded text (may be "" while a multi-byte character is
    incomplete, and is "" for the end-of-sequence token). On the last event of a request
    finished is True and completion holds the whole result.
    """

    request_id: Any
    index: int  # position of this token in the request's output
    token_id: int
    text: str
    prob: float
    top_k: tuple[tuple[int, float], ...]
    finished: bool
    finish_reason: Optional[str] = None
    completion: Optional[Completion] = None


class GeneratedText(str):
    """What run() yields: the decoded text (a str, as in the release) with its Completion."""

    completion: Completion

    def __new__(cls, completion: Completion) -> "GeneratedText":
        obj = super().__new__(cls, completion.text)
        obj.completion = completion
        return obj


class _TextStream:
    """Turns a growing token list into text pieces at O(1) cost per token.

    SentencePiece decodes whole sequences (it drops the first piece's leading space and
    joins byte pieces into characters), so a piece's text depends on its neighbours. Like
    the usual incremental detokenizers, this decodes only a short window: the tokens of
    the last emitted piece (context) and those not emitted yet, and emits the difference.
    Text ending in U+FFFD (a multi-byte character cut short) waits for the next token;
    once more than MAX_PENDING tokens wait, all but the last MAX_PENDING are emitted (a
    UTF-8 character has at most 4 bytes, so their bytes can no longer combine with later
    ones). A control token ([BOS], [PAD], ...) decodes to nothing; with no token pending
    it stays out of the window (it may still split a pending multi-byte character, so
    then it goes in). The pieces add up to decode(tokens). (One case costs more than O(1):
    with a tokenizer that drops all leading whitespace, as the demo's does, a run of lone
    "\u2581" tokens decodes to "" on its own, so the window keeps the piece before the run.)
    """

    MAX_PENDING = 4

    def __init__(self, tokenizer: Any, context: Sequence[int] = ()):
        """context: tokens the text continues (e.g. the prompt's last few), so that the first
        piece reads as it does after them (with its leading space); they are not emitted."""
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self._window: list[int] = list(context)  # context tokens, then pending ones
        self._read = len(self._window)  # window[:_read] is context: its text has been emitted
        self._context_text = tokenizer.decode(self._window) if self._window else ""  # decode(window[:_read])
        self._is_control = getattr(tokenizer, "is_control", None)

    def _emit(self, stop: int, text: str) -> str:
        """Emit text (= decode(window[:stop])) beyond the context; window[_read:stop] becomes
        the new context, unless its text alone is empty (e.g. a lone "\u2581", which decodes
        to "" at the start of a text): then the old context stays in front of it, so that the
        start-of-text rules (SentencePiece strips leading spaces) apply as in the whole text."""
        piece = text[len(self._context_text):]
        context_text = self.tokenizer.decode(self._window[self._read:stop])
        if context_text:
            self._window = self._window[self._read:]
            stop -= self._read
        self._read, self._context_text = stop, context_text or text
        return piece

    def _advance(self, final: bool) -> str:
        if len(self._window) == self._read:
            return ""
        full = self.tokenizer.decode(self._window)
        if final or (not full.endswith("\ufffd") and full.startswith(self._context_text)):
            return self._emit(len(self._window), full)
        if len(self._window) - self._read > self.MAX_PENDING:
            stop = len(self._window) - self.MAX_PENDING
            text = self.tokenizer.decode(self._window[:stop])
            if full.startswith(text) and text.startswith(self._context_text):
                return self._emit(stop, text)
        return ""  # an incomplete character (or text that later tokens change): wait

    def push(self, token: int) -> str:
        """Add a generated token; returns the text it completes (often "" or one piece)."""
        self.tokens.append(token)
        if self._read == len(self._window) and self._is_control is not None and self._is_control(token):
            return ""  # decodes to nothing; with nothing pending it cannot split a character either
        self._window.append(token)
        return self._advance(final=False)

    def finish(self) -> str:
        """The text still held back (an unfinished character decodes to U+FFFD)."""
        return self._advance(final=True)


# ---------------------------------------------------------------------------------------
# The engine: slots, prefill, decode steps
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Slot:
    prepared: _Prepared
    owner: object
    stream: _TextStream
    probs: list[float] = dataclasses.field(default_factory=list)
    top_k: list[tuple[tuple[int, float], ...]] = dataclasses.field(default_factory=list)
    # Tokens the steps dispatched so far will have drawn for this request (the prefill's
    # first one included), collected or not: a slot reaching max_len takes no more steps.
    dispatched: int = 1

    @property
    def last_step_dispatched(self) -> bool:
        """The step that draws the request's max_len-th token is dispatched: it takes no
        more steps, and its slot may take the next request (_Engine.free_slots)."""
        return self.dispatched >= self.prepared.max_len


def _to_host(tree: Any) -> Any:
    """numpy copies of replicated outputs (one local copy: also works with several hosts).
    The copy starts when the caller waits for the step: the outputs are a few hundred bytes
    (copying them ahead with copy_to_host_async was tried, never shown to help, and removed
    while the hang on 2 GPUs was looked for; see BENCHMARKS.md, "Session 5")."""
    return jax.tree_util.tree_map(
        lambda a: np.asarray(a) if a.is_fully_addressable else np.asarray(a.addressable_data(0)), tree)


@dataclasses.dataclass(frozen=True)
class StepHandle:
    """A step that was dispatched and whose tokens are not collected yet (_Engine.collect).

    program: ("decode",) or ("prefill", bucket, rows of the call). rows: (row of the step's
    output, slot, the _Slot that held the slot at dispatch) for every row whose token belongs
    to a request (a prefill's padding rows have none).
    """

    program: tuple
    rows: tuple[tuple[int, int, _Slot], ...]
    out: StepOutput


class _Engine:
    """The batch cache [B, S] and B slots; admits prepared requests and steps all of them.

    One consumer (a stream() or a run() generator, the `owner`) may hold slots at a time,
    so that nobody receives another's tokens. `lock` makes each operation (admit, step,
    release, a params swap) atomic: the steps donate the cache and the slot state, so two
    at once would use deleted buffers.

    Steps can be queued: dispatch_admit() (one request), dispatch_admit_many() (several of
    one bucket in one prefill call; prefill_groups() splits a list into such calls) and
    dispatch() start a prefill or a decode step and return at once with a StepHandle;
    collect(handle) waits for that step's tokens and turns them into events. The device
    runs the steps in dispatch order (each takes the cache and slot state the one before
    left), so collecting the handles in that order hands every request its tokens in order,
    while the host works on step t the device already runs the steps queued after it.
    """

    def __init__(self, config: LanguageModelConfig, mesh: Mesh, params: Any, batch_size: int, tokenizer: Any,
                 watchdog: Optional[Watchdog] = None):
        self.config = config
        # The layouts inference reads fastest (bf16 table, transposed int8; see model.py). The
        # tree was just loaded for this engine: converting it in place needs no second copy.
        self.params = grok_model.prepare_for_inference(params, config, consume=True)
        self.tokenizer = tokenizer
        # With several processes the host values below (and every step's inputs) are the
        # same in each process: jax takes them as replicated global arrays.
        self.memory = grok_model.init_memory(config, batch_size, config.sequence_len, mesh)
        self.state = jax.device_put(_empty_state(batch_size, config.vocab_size), NamedSharding(mesh, P()))
        self.prefill, self.decode = make_step_functions(config, mesh, batch_size)
        self.slots: list[Optional[_Slot]] = [None] * batch_size
        # Requests whose last step is dispatched (they reach max_len there) and whose slot
        # already holds a newer request: their tokens still to be collected are theirs.
        self._retiring: list[_Slot] = []
        self.watchdog = watchdog
        # Prompt tokens that TokenEvent texts are decoded after. 0: the generated tokens alone,
        # whose pieces add up to Completion.text; > 0 (server.py): the first piece keeps the
        # space that joins it to the prompt.
        self.text_context = 0
        self._warm: set[tuple] = set()  # programs that have compiled and run once
        self.lock = threading.RLock()

    @contextlib.contextmanager
    def _deadline(self, program: tuple) -> Iterator[None]:
        """Arm the watchdog around one step (dispatch and wait). A program's first run
        includes its compilation, so it gets FIRST_STEP_TIMEOUT_FACTOR times the limit."""
        if self.watchdog is None:
            yield
            return
        warm = program in self._warm
        seconds = self.watchdog.timeout_s * (1 if warm else FIRST_STEP_TIMEOUT_FACTOR)
        name = f"{program[0]} step" + (f" (bucket {program[1]}, {program[2]} rows)" if len(program) > 1 else "")
        with self.watchdog.guard(name + ("" if warm else ", compilation included"), seconds):
            yield
        self._warm.add(program)

    def free_slots(self) -> list[int]:
        """Slots a request may be admitted into: empty ones, and those whose request has had
        its last step dispatched (the one that reaches its max_len). A prefill into such a
        slot runs on the device right after that step, not after the host has collected
        it, so the slot does not stand empty while queued steps drain; the old request keeps
        the tokens still to be collected."""
        return [i for i, s in enumerate(self.slots) if s is None or s.last_step_dispatched]

    def num_busy_slots(self) -> int:
        """Slots holding a request (one being retired in a slot admitted again counts once)."""
        return sum(s is not None for s in self.slots)

    def _requests(self) -> Iterator[_Slot]:
        """Every request in flight: those in the slots and those being retired."""
        yield from (s for s in self.slots if s is not None)
        yield from self._retiring

    def num_active(self, owner: object = None) -> int:
        """Requests in flight (of `owner`, if given), whose tokens are not all collected."""
        return sum(owner is None or s.owner is owner for s in self._requests())

    def _drop(self, rec: _Slot) -> None:
        """Forget a request: free its slot, or take it from the retiring ones."""
        for i, s in enumerate(self.slots):
            if s is rec:
                self.slots[i] = None
                return
        self._retiring.remove(rec)

    def release(self, owner: object) -> None:
        """Free every slot `owner` holds (its requests are dropped)."""
        with self.lock:
            for rec in [s for s in self._requests() if s.owner is owner]:
                self._drop(rec)

    def cancel(self, request_id: Any, owner: object) -> bool:
        """Free the slot of `owner`'s request `request_id` at once (the request is dropped).
        False if no slot holds it (it finished already)."""
        with self.lock:
            for rec in self._requests():
                if rec.owner is owner and rec.prepared.request_id == request_id:
                    self._drop(rec)
                    return True
            return False

    def admit(self, prepared: _Prepared, owner: object) -> TokenEvent:
        """Prefill a request into the first free slot (free_slots()[0]); returns the event
        of its first token."""
        with self.lock:
            return self.collect(self.dispatch_admit(prepared, owner))[0]

    def dispatch_admit(self, prepared: _Prepared, owner: object) -> StepHandle:
        """Start the prefill of a request into the first free slot (free_slots()[0]) without
        waiting for it; the slot is taken at once, and decode steps dispatched from now on
        feed it. collect() the handle for the event of its first token."""
        return self.dispatch_admit_many([prepared], owner)

    def prefill_groups(self, prepared: Sequence[_Prepared],
                       limits: Optional[Mapping[int, int]] = None) -> list[list[int]]:
        """Split requests into prefill calls for dispatch_admit_many: indices into `prepared`,
        grouped by bucket (buckets in order of first appearance, requests in input order),
        at most prefill_rows_limit(bucket) per call, and at most limits.get(bucket, 1) when
        `limits` is given (the group sizes whose programs are compiled, say)."""
        by_bucket: dict[int, list[int]] = {}
        for i, p in enumerate(prepared):
            by_bucket.setdefault(p.bucket, []).append(i)
        batch = len(self.slots)
        groups = []
        for bucket, items in by_bucket.items():
            cap = prefill_rows_limit(self.config, batch, bucket)
            if limits is not None:
                cap = max(1, min(cap, limits.get(bucket, 1)))
            groups += [items[k:k + cap] for k in range(0, len(items), cap)]
        return groups

    def dispatch_admit_many(self, prepared: Sequence[_Prepared], owner: object) -> StepHandle:
        """Start one prefill call for requests of one bucket (at most prefill_rows_limit of
        it), into the first free slots in order, without waiting; like dispatch_admit, the
        slots are taken at once. The call has prefill_rows(len(prepared)) rows; the extra
        rows are padding: all pad tokens (no expert computes them), the first request's
        settings, and no slot to write. collect() the handle for the events of the first
        tokens, in the order of `prepared`."""
        with self.lock:
            if any(s.owner is not owner for s in self._requests()):
                raise RunnerBusyError(
                    "Another stream() / run() generator still has requests in flight on this "
                    "InferenceRunner; exhaust or close() it first.")
            if not prepared:
                raise ValueError("dispatch_admit_many: no requests given.")
            bucket, batch, n = prepared[0].bucket, len(self.slots), len(prepared)
            if any(p.bucket != bucket for p in prepared):
                raise ValueError(f"dispatch_admit_many: buckets {sorted({p.bucket for p in prepared})} differ; "
                                 "one call takes one bucket (split them with prefill_groups()).")
            limit = prefill_rows_limit(self.config, batch, bucket)
            if n > limit:
                raise ValueError(f"dispatch_admit_many: {n} requests of bucket {bucket}, more than one call "
                                 f"takes ({limit}); use prefill_groups().")
            free = self.free_slots()
            if len(free) < n:
                raise RuntimeError(f"{n} requests but {len(free)} free slot(s)")  # callers check free_slots()
            rows = prefill_rows(n)
            group = list(prepared) + [prepared[0]] * (rows - n)  # padding rows take the first's settings
            tokens = np.full((rows, bucket), self.config.pad_token, np.int32)  # right-padded
            lengths = np.zeros((rows,), np.int32)  # a padding row: no token at all
            for r, p in enumerate(prepared):
                tokens[r, :len(p.tokens)] = p.tokens
                lengths[r] = len(p.tokens)
            # Padding rows write nothing: each its own slot index >= batch (see _set_rows).
            slots = np.array(free[:n] + list(range(batch, batch + rows - n)), np.int32)
            settings = [(p.request.temperature, p.request.nucleus_p, int(p.request.rng_seed) % 2**32, p.max_len)
                        for p in group]
            temperature, top_p, seed, max_len = zip(*settings)
            program = ("prefill", bucket, rows)
            with self._deadline(program):
                self.memory, self.state, out = self.prefill(
                    self.params, self.memory, self.state, tokens, lengths, slots,
                    np.array(temperature, np.float32), np.array(top_p, np.float32), np.array(seed, np.uint32),
                    np.array(max_len, np.int32), np.stack([p.mask for p in group]))
            handle_rows = []
            for r, p in enumerate(prepared):
                context = p.tokens[-self.text_context:] if self.text_context else ()
                if self.slots[free[r]] is not None:  # its request's last step is dispatched
                    self._retiring.append(self.slots[free[r]])
                rec = self.slots[free[r]] = _Slot(p, owner, _TextStream(self.tokenizer, context))
                handle_rows.append((r, free[r], rec))
            return StepHandle(program, tuple(handle_rows), out)

    def step(self) -> list[TokenEvent]:
        """One decode step of every active slot; returns one event per active slot."""
        with self.lock:
            handle = self.dispatch()
            return [] if handle is None else self.collect(handle)

    def dispatch(self) -> Optional[StepHandle]:
        """Start one decode step of every active slot without waiting for its tokens, so that
        the host can handle earlier steps' meanwhile (collect() them). Returns the handle for
        collect(), or None when no slot takes part.

        A slot whose dispatched steps already reach its max_len takes no part (its row stays
        where it is). One whose request drew end-of-sequence in a step not collected yet
        still takes part (the host cannot know yet); its cache row advances, never past the
        request's max_len, and collect() drops its row. The decode program takes this
        choice as its `active` input: deciding it on the device from the slot state (ff418a1)
        hung the runner in its first decode step at 24+ layers on 2 x H200 (BENCHMARKS.md,
        "The runner's hang")."""
        with self.lock:
            rows = tuple((i, i, s) for i, s in enumerate(self.slots)
                         if s is not None and not s.last_step_dispatched)
            if not rows:
                return None
            active = np.zeros((len(self.slots),), bool)
            for _, slot, rec in rows:
                active[slot] = True
                rec.dispatched += 1
            with self._deadline(("decode",)):  # the first call compiles
                self.memory, self.state, out = self.decode(self.params, self.memory, self.state, active)
            return StepHandle(("decode",), rows, out)

    def collect(self, handle: StepHandle) -> list[TokenEvent]:
        """Wait for a dispatched step; one event per row whose request is still in flight (one
        that has finished, or was cancelled or released since, gets nothing from that step).
        Collect handles in the order they were dispatched."""
        with self.lock:
            rows = [(row, slot, rec) for row, slot, rec in handle.rows
                    if self.slots[slot] is rec or any(r is rec for r in self._retiring)]
            if not rows:
                return []  # nothing to wait for: a later step's collect() waits for this one too
            with self._deadline(handle.program):
                out = _to_host(handle.out)
            if handle.program == ("decode",):
                self.decode.recycle(handle.out)
            # Python scalars for the whole step at once (numpy item access per value is slower).
            token, done, prob = out.draw.token.tolist(), out.done.tolist(), out.draw.prob.tolist()
            top_ids, top_probs = out.draw.top_ids.tolist(), out.draw.top_probs.tolist()
            return [self._emit(rec, token[row], done[row], prob[row], tuple(zip(top_ids[row], top_probs[row])))
                    for row, _, rec in rows]

    def _emit(self, rec: _Slot, token: int, done: bool, prob: float,
              top: tuple[tuple[int, float], ...]) -> TokenEvent:
        index = len(rec.stream.tokens)
        is_eos = token == self.config.eos_token
        if is_eos:
            piece = rec.stream.finish()
        else:
            rec.probs.append(prob)
            rec.top_k.append(top)
            piece = rec.stream.push(token) + (rec.stream.finish() if done else "")
        if not done:
            return TokenEvent(rec.prepared.request_id, index, token, piece, prob, top, False)
        self._drop(rec)
        reason = "eos" if is_eos else "max_len"
        p = rec.prepared
        completion = Completion(p.request_id, p.request, list(p.tokens), list(rec.stream.tokens),
                                self.tokenizer.decode(rec.stream.tokens), rec.probs, rec.top_k, reason)
        return TokenEvent(p.request_id, index, token, piece, prob, top, True, reason, completion)


# ---------------------------------------------------------------------------------------
# InferenceRunner
# ---------------------------------------------------------------------------------------


class TokenizerError(ValueError):
    """A tokenizer file that is empty, not a regular file, not a SentencePiece model, or not
    one that belongs to the model."""


def load_tokenizer(path: str) -> Any:
    """A SentencePieceProcessor for `path`, with a message saying where to get one.

    Raises FileNotFoundError when `path` does not exist and TokenizerError when it is not a
    usable SentencePiece model (a directory, a FIFO, an empty or garbage file).
    """
    import sentencepiece
    import stat

    try:
        info = os.stat(path)
    except FileNotFoundError:
        info = None
    except OSError as e:
        raise TokenizerError(f"Tokenizer {path!r} cannot be read: {e.strerror or e}.") from None
    if info is None:
        raise FileNotFoundError(
            f"Tokenizer {path!r} not found. The Grok-1 tokenizer is tokenizer.model in the "
            "Hugging Face repo xai-org/grok-1; `python run.py --tiny` makes a small one for a demo.")
    if not stat.S_ISREG(info.st_mode):  # a directory, or a FIFO that open() would block on
        raise TokenizerError(f"Tokenizer {path!r} is not a regular file; give the path of tokenizer.model.")
    if info.st_size == 0:
        raise TokenizerError(f"Tokenizer {path!r} is empty (0 bytes); download tokenizer.model again.")
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=os.fspath(path))
        if sp.vocab_size() < 1:
            raise RuntimeError("no pieces")
    except (RuntimeError, OSError) as e:
        raise TokenizerError(
            f"Tokenizer {path!r} ({info.st_size} bytes) is not a SentencePiece model "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); download tokenizer.model again.") from None
    return sp


@dataclasses.dataclass
class InferenceRunner:
    """Serves generation requests with a ModelRunner's model. Call initialize() first.

    load: the checkpoint path (used when runner.checkpoint_path is empty). local_mesh_config
    (data, model): None chooses from the devices present (see auto_mesh_config).
    between_hosts_config (data, model): the layout of the processes (see make_mesh); None
    is (processes, 1).
    pad_sizes: prompt buckets; each compiles one prefill program. Prompts are right-padded
    to the smallest bucket that holds them.
    step_timeout: seconds a generation step (dispatch and the wait for its result) may take
    before the watchdog ends the process with an error (a program's first step, which also
    compiles it, gets FIRST_STEP_TIMEOUT_FACTOR times as long). None: the timeout given to
    initialize_distributed in a multi-process run, no limit otherwise; 0: no limit.

    Threads: the runner serves one consumer at a time, and is safe to share between threads.
    A consumer is one generate() call, or one stream() / run() generator from its first
    next() until it is exhausted or closed. A consumer started while another thread's holds
    the runner waits for it to finish, so concurrent generate() calls run one after another
    and each returns exactly what it would alone. One started while a consumer of the same
    thread holds the runner raises RunnerBusyError (it could never be released). Close
    stream() and run() generators you do not exhaust: an open one holds the runner.
    """

    name: str
    runner: ModelRunner
    load: str
    tokenizer_path: str = "/tmp/xai_data/tokenizer.model"
    local_mesh_config: Optional[tuple[int, int]] = None
    between_hosts_config: Optional[tuple[int, int]] = None
    pad_sizes: tuple[int, ...] = (1024,)
    step_timeout: Optional[float] = None
    # The consumer holding the runner: (what, thread id), or None; guarded by _busy.
    _holder: Optional[tuple[str, int]] = dataclasses.field(default=None, init=False, repr=False, compare=False)
    # abstract_step_inputs of the engine, made once for compile_prefill.
    _abstract_inputs: Optional[tuple] = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _busy: threading.Condition = dataclasses.field(
        default_factory=threading.Condition, init=False, repr=False, compare=False)

    # ----- setup -----

    def initialize(self) -> None:
        """Load the tokenizer, build the mesh, load the parameters, allocate the batch cache.

        Sets self.timings: seconds of "setup_s" (tokenizer, mesh, memory check), "weights_s"
        (loading or making the parameters, until they are on the devices) and "engine_s"
        (the cache and slot state). The steps compile at their first use, or in compile().
        """
        start = time.perf_counter()
        config = self.runner.model.initialize()
        if not self.runner.checkpoint_path and self.load:
            self.runner.checkpoint_path = self.load
        self._ensure_tokenizer()
        self.buckets = self._check_pad_sizes(config)
        hosts = self.between_hosts_config or (jax.process_count(), 1)
        self.runner.initialize(None, self.local_mesh_config, hosts)
        self.mesh = self.runner.mesh
        self.batch_size = self.runner.batch_size
        set_up = time.perf_counter()
        params = jax.block_until_ready(self.runner.load_or_init())
        made = time.perf_counter()
        self._engine = _Engine(config, self.mesh, params, self.batch_size, self.tokenizer, self._watchdog())
        self.timings = {"setup_s": set_up - start, "weights_s": made - set_up,
                        "engine_s": time.perf_counter() - made}
        logger.info("%s: %d slot(s), buckets %s, mesh %s.", self.name, self.batch_size, self.buckets,
                    dict(self.mesh.shape))

    def compile(self, grouped: bool = False) -> dict[str, dict[str, float]]:
        """Compile the prefill step of every pad bucket and the decode step now, ahead of time,
        instead of at their first use; later steps reuse the programs. grouped: also the
        prefills of several requests in one call (engine.dispatch_admit_many: "prefill
        <bucket> x<rows>", rows 2, 4, ... up to prefill_rows_limit), which otherwise compile
        at their first use, stalling the running requests meanwhile.

        Returns {"prefill <bucket>": {"lower_s": .., "compile_s": ..}, ..., "decode": {..}}:
        the seconds of tracing and lowering to StableHLO (jit(...).lower) and of XLA's
        compilation (.compile(), or a read from the persistent compilation cache).
        """
        engine = self._require_initialized()
        return compile_steps(engine.prefill, engine.decode, engine.params, engine.memory, engine.state,
                             self.runner.model, self.batch_size, self.buckets, grouped)

    def compile_prefill(self, bucket: int, rows: int) -> dict[str, float]:
        """Compile the prefill of `rows` requests of `bucket` (see grouped_prefills) ahead,
        from the shapes alone: safe beside a thread that runs steps (server.py compiles the
        grouped prefills so while it already serves). Returns its lower_s and compile_s."""
        engine = self._require_initialized()
        config = self.runner.model
        if self._abstract_inputs is None:  # the engine's shapes: the same for every program
            self._abstract_inputs = abstract_step_inputs(config, self.mesh, self.batch_size)
        return timed_compile(engine.prefill, *self._abstract_inputs,
                             *step_arguments(config, self.batch_size, bucket, rows))

    def _watchdog(self) -> Optional[Watchdog]:
        seconds = self.step_timeout
        if seconds is None:
            seconds = _distributed_timeout_s if jax.process_count() > 1 else None
        return Watchdog(seconds, distributed_context()) if seconds else None

    def _ensure_tokenizer(self) -> Any:
        if getattr(self, "tokenizer", None) is None:
            config = self.runner.model
            tokenizer = load_tokenizer(self.tokenizer_path)
            n = tokenizer.vocab_size()
            if n > config.vocab_size:
                raise TokenizerError(
                    f"Tokenizer {self.tokenizer_path!r} has {n} pieces but the model's vocab_size is "
                    f"{config.vocab_size}: they do not belong together.")
            if (tokenizer.pad_id(), tokenizer.eos_id()) != (config.pad_token, config.eos_token):
                _warn(f"Tokenizer pad/eos ids ({tokenizer.pad_id()}, {tokenizer.eos_id()}) differ "
                      f"from the model config's ({config.pad_token}, {config.eos_token}).", UserWarning)
            # Never sampled: ids the tokenizer cannot decode, and the pad id (fed back, the
            # model would treat it as padding and ignore it).
            self._vocab_mask = np.arange(config.vocab_size) < n
            self._vocab_mask[config.pad_token] = False
            self.tokenizer = tokenizer
        return self.tokenizer

    def _check_pad_sizes(self, config: LanguageModelConfig) -> list[int]:
        sizes = sorted({int(s) for s in self.pad_sizes})
        if not sizes or sizes[0] < 1:
            raise ValueError(f"pad_sizes={self.pad_sizes!r}: need at least one bucket, all >= 1.")
        if sizes[-1] > config.sequence_len:
            _warn(f"pad_sizes {tuple(s for s in sizes if s > config.sequence_len)} exceed the model's "
                  f"sequence_len {config.sequence_len}; using {config.sequence_len} as the largest bucket.")
            sizes = sorted({min(s, config.sequence_len) for s in sizes})
        return sizes

    @property
    def params(self) -> Any:
        """The model parameters (set by initialize(); assign new ones of the same shapes and
        shardings to swap weights without recompiling)."""
        return self._engine.params if hasattr(self, "_engine") else getattr(self, "_params", None)

    @params.setter
    def params(self, value: Any) -> None:
        if hasattr(self, "_engine"):
            prepared = grok_model.prepare_for_inference(value, self._engine.config)
            with self._engine.lock:  # between two steps, never during one
                self._engine.params = prepared
        else:
            self._params = value

    def engine(self) -> _Engine:
        """The slot engine, for a caller that schedules requests itself (server.py).

        engine.admit(prepare(request, id), owner) prefills a request into a free slot and
        returns its first TokenEvent; engine.step() decodes every active slot by one token.
        dispatch_admit() and dispatch() start the same steps without waiting and return a
        StepHandle; collect(handle), in dispatch order, waits for its tokens (so the host can
        work on one step while the device runs those queued after it). Several requests are
        prefilled in one call by dispatch_admit_many(), in the groups prefill_groups()
        makes (one bucket each). engine.cancel(id, owner) frees one request's slot;
        free_slots() (empty slots, and those whose request's last step is dispatched),
        num_busy_slots() and num_active() (requests whose tokens are not all collected) say
        what is in use. Each operation holds the engine's
        lock; still, one scheduler should drive it, and nothing else (stream(), generate(),
        run()) should use this runner meanwhile, since requests of another owner make
        admit() refuse.
        """
        return self._require_initialized()

    def _require_initialized(self) -> _Engine:
        if not hasattr(self, "_engine"):
            raise RuntimeError("InferenceRunner.initialize() must run first.")
        return self._engine

    def _acquire(self, what: str) -> None:
        """Hold the runner for one consumer (see the class docstring): wait while another
        thread's consumer holds it; RunnerBusyError if one of this thread does. Pair with
        _release()."""
        me = threading.get_ident()
        with self._busy:
            while self._holder is not None:
                if self._holder[1] == me:
                    raise RunnerBusyError(
                        f"{what}: another stream() / run() generator of this thread ({self._holder[0]}) "
                        "is still in flight on this InferenceRunner; exhaust or close() it first (a "
                        "runner serves one consumer at a time).")
                self._busy.wait()
            self._holder = (what, me)

    def _release(self) -> None:
        with self._busy:
            self._holder = None
            self._busy.notify_all()

    # ----- requests -----

    def tokenize(self, prompt: str) -> list[int]:
        """The prompt's token ids, as the runner feeds them (no BOS, as in the release)."""
        return list(self._ensure_tokenizer().encode(prompt))

    def prepare(self, request: Union[Request, str], request_id: Any = 0,
                tokens: Optional[Sequence[int]] = None) -> _Prepared:
        """Check and tokenize a request, fit it to a bucket and the context (warning on cuts).
        tokens: the prompt's tokens when the caller has them already (tokenize(prompt)), so
        that the prompt is not encoded twice."""
        if isinstance(request, str):
            request = Request(prompt=request)
        config = self.runner.model
        check_request(request, config.vocab_size)
        tokens = self.tokenize(request.prompt) if tokens is None else list(tokens)
        if not tokens:
            raise InvalidRequestError(f"prompt {request.prompt!r} encodes to no tokens.")
        buckets = getattr(self, "buckets", None) or self._check_pad_sizes(config)
        seq_len = config.sequence_len
        limit = min(buckets[-1], seq_len - 1)  # keep room for at least one generated token
        if len(tokens) > limit:
            _warn(f"Request {request_id!r}: the prompt has {len(tokens)} tokens, more than fit "
                  f"(largest pad bucket {buckets[-1]}, context {seq_len}); dropped its first "
                  f"{len(tokens) - limit} tokens and kept the last {limit}.")
            tokens = tokens[-limit:]
        max_len = int(request.max_len)
        if len(tokens) + max_len > seq_len:
            _warn(f"Request {request_id!r}: prompt ({len(tokens)} tokens) + max_len ({max_len}) exceeds "
                  f"the context of {seq_len} tokens; max_len cut to {seq_len - len(tokens)}.")
            max_len = seq_len - len(tokens)
        mask = self._vocab_mask.copy()
        if request.token_mask is not None:
            mask &= np.asarray(request.token_mask).astype(bool)
            if not mask.any():
                raise InvalidRequestError("token_mask allows no token the tokenizer can decode.")
        bucket = next(b for b in buckets if b >= len(tokens))
        return _Prepared(request_id, request, tokens, bucket, max_len, mask)

    # ----- generation -----

    def stream(self, requests: Union[Request, str, Iterable[Union[Request, str]]]) -> Iterator[TokenEvent]:
        """Generate for several requests at once, yielding each token as it is produced.

        Requests take free slots in order, each as soon as one is free; events carry
        request_id = the request's index in `requests`. A list is checked whole before
        anything runs; other iterables are read lazily. Closing the iterator frees its slots.
        The iterator holds the runner from its first next() until it is exhausted or closed
        (another thread's call waits; see the class docstring).
        """
        engine = self._require_initialized()
        if isinstance(requests, (Request, str)):
            requests = [requests]
        if isinstance(requests, (list, tuple)):
            items: Iterator[_Prepared] = iter([self.prepare(r, i) for i, r in enumerate(requests)])
        else:
            items = (self.prepare(r, i) for i, r in enumerate(requests))
        return self._stream(engine, items)

    def _stream(self, engine: _Engine, items: Iterator[_Prepared]) -> Iterator[TokenEvent]:
        owner = object()
        exhausted = False
        self._acquire("stream()")
        try:
            while True:
                while not exhausted and engine.free_slots():
                    prepared = next(items, None)
                    if prepared is None:
                        exhausted = True
                    else:
                        yield engine.admit(prepared, owner)
                if engine.num_active(owner) == 0:
                    if exhausted:
                        return
                    continue
                yield from engine.step()
        finally:
            engine.release(owner)
            self._release()

    def generate(
        self, prompts: Union[str, Sequence[Union[str, Request]]], max_len: int = 100, temperature: float = 0.0,
        nucleus_p: float = 1.0, rng_seed: int = 42,
    ) -> list[Completion]:
        """Complete each prompt (str, using the keyword settings, or a Request); in input order.

        Safe to call from several threads: the calls run one at a time, each as if alone."""
        if isinstance(prompts, (str, Request)):
            prompts = [prompts]
        requests = [p if isinstance(p, Request) else Request(p, temperature, nucleus_p, rng_seed, max_len)
                    for p in prompts]
        done: dict[int, Completion] = {}
        for event in self.stream(requests):
            if event.finished:
                done[event.request_id] = event.completion
        return [done[i] for i in range(len(requests))]

    def run(self) -> Iterator[Optional[GeneratedText]]:
        """The release's generator protocol, on the same engine.

        `next(gen)` yields None: ready for a request. `gen.send(Request(...))` queues it;
        while slots are free it yields None again (send more, or send None to start
        decoding), otherwise it decodes until some request finishes and yields that
        request's text (a GeneratedText: a str with .completion). Call next() or send() again
        to continue. With one slot (the release's setup) send(request) returns the text.
        An invalid request raises from send() and ends the generator. The generator holds
        the runner from its first next() until it is closed (another thread's call waits;
        see the class docstring).
        """
        engine = self._require_initialized()
        owner = object()
        pending: collections.deque[_Prepared] = collections.deque()
        outputs: collections.deque[GeneratedText] = collections.deque()
        counter = iter(range(1 << 62))
        want_more = True

        def take(sent: Any) -> bool:
            if sent is None:
                return False
            pending.append(self.prepare(sent, next(counter)))
            return True

        self._acquire("run()")
        try:
            while True:
                while pending and engine.free_slots():
                    event = engine.admit(pending.popleft(), owner)
                    if event.finished:
                        outputs.append(GeneratedText(event.completion))
                if outputs:
                    sent = yield outputs.popleft()
                    want_more = True
                    take(sent)
                elif want_more and engine.free_slots() and not pending:
                    sent = yield None
                    want_more = take(sent)
                elif engine.num_active(owner) == 0 and not pending:
                    want_more = True  # nothing to decode: ask for requests again
                else:
                    for event in engine.step():
                        if event.finished:
                            outputs.append(GeneratedText(event.completion))
        finally:
            engine.release(owner)
            self._release()


def sample_from_model(server: Iterator, prompt: str, max_len: int, temperature: float) -> str:
    """Send one request to a run() generator and return its text (top_p 1, seed 42)."""
    next(server)
    out = server.send(Request(prompt=prompt, temperature=temperature, nucleus_p=1.0, rng_seed=42, max_len=max_len))
    while out is None:  # more slots than requests: tell it to start decoding
        out = server.send(None)
    return out
