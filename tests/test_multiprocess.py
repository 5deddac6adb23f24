"""Multi-process runs over jax.distributed, on loopback: 2 processes x 4 CPU devices.

The test starts the processes itself (tests/multiprocess_worker.py, and run.py) on
127.0.0.1 with a free port; CPU collectives between them go through gloo. Every wait on a
child is bounded, and leftovers are killed. What is checked:
  - the mesh spans both processes (data 2 x model 4, process p owning mesh row p);
  - greedy generation from the tiny single-shard checkpoint equals a one-process,
    one-device run of the same checkpoint, token for token, in both processes;
  - checkpoint.save from the 2-process run writes 2 host shards whose blocks (placed by
    their manifests) rebuild the saved parameters exactly; restoring them, each process
    reads only its own shard, and generation again gives the one-process tokens;
  - killing one process mid-run ends the other with an error, within the timeout;
  - a coordinator that cannot be reached, or a peer that never joins, ends run.py with
    status 3 and a message saying which, within the timeout;
  - run.py over 2 processes prints once (process 0) the text a one-process run gives.
"""

import contextlib
import io
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

import numpy as np
import pytest

import checkpoint
import model
import run
import runners

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multiprocess_worker.py")
PROMPTS = ["The river", "On a clear night far from the lights"]
MAX_LEN = 12
TIMEOUT_S = 10  # --distributed-timeout of the children: heartbeat, join and step limit
BOUND_S = 240  # no wait on a child lasts longer than this: a hang fails the test, never blocks it


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CACHE_DIR = None  # set by the `compile_cache` fixture


def child_env(devices: int = 4) -> dict:
    env = dict(os.environ)
    if CACHE_DIR:  # the children compile the same programs: later launches reuse them
        env["JAX_COMPILATION_CACHE_DIR"] = CACHE_DIR
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO
    env["PYTHONUNBUFFERED"] = "1"
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    return env


class Children:
    """Processes started with their output in files; every one still alive is killed on exit."""

    def __init__(self, directory):
        self.directory = directory
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str], env: Optional[dict] = None) -> subprocess.Popen:
        out = open(os.path.join(self.directory, f"{name}.out"), "w")
        err = open(os.path.join(self.directory, f"{name}.err"), "w")
        proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env={**child_env(), **(env or {})},
                                stdout=out, stderr=err, start_new_session=True)
        proc.name, proc.files = name, (out, err)
        self.procs.append(proc)
        return proc

    def output(self, proc) -> tuple[str, str]:
        for f in proc.files:
            f.flush()
        read = lambda suffix: open(os.path.join(self.directory, f"{proc.name}.{suffix}")).read()  # noqa: E731
        return read("out"), read("err")

    def wait(self, proc, timeout: float = BOUND_S) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            out, err = self.output(proc)
            pytest.fail(f"{proc.name} still running after {timeout} s (a hang).\nstdout:\n{out[-2000:]}\n"
                        f"stderr:\n{err[-4000:]}")

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()  # SIGKILL: jax's preemption handler swallows SIGTERM
                proc.wait(timeout=30)
            for f in proc.files:
                f.close()


@contextlib.contextmanager
def children(directory):
    group = Children(directory)
    try:
        yield group
    finally:
        group.kill_all()


# ---------------------------------------------------------------------------------------
# Fixtures: the tiny checkpoint, the one-process reference, the 2-process run
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    global CACHE_DIR
    CACHE_DIR = str(tmp_path_factory.mktemp("jax_cache"))
    yield
    CACHE_DIR = None


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    directory = tmp_path_factory.mktemp("demo")
    ckpt, tokenizer = run.build_tiny_demo(str(directory))
    return {"dir": directory, "ckpt": ckpt, "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def reference(demo):
    """Greedy completions of PROMPTS by one process on the workers' (2, 4) mesh of 8 devices:
    the same program, so the same tokens (another mesh rounds differently in bf16 and may
    flip a near-tie)."""
    runner = runners.InferenceRunner(
        pad_sizes=(32,),
        runner=runners.ModelRunner(model=run.tiny_demo_config(), bs_per_device=0.25, checkpoint_path=demo["ckpt"]),
        name="reference", load=demo["ckpt"], tokenizer_path=demo["tokenizer"], local_mesh_config=(2, 4))
    runner.initialize()
    done = runner.generate(PROMPTS, max_len=MAX_LEN, temperature=0.0)
    assert all(len(c.tokens) == MAX_LEN for c in done)  # no early eos: the whole length is compared
    return done


def start_workers(group, work, demo, *extra) -> list:
    """Start 2 workers on a free port; wait (bounded) until both wrote their result."""
    port = free_port()
    procs = [group.start(f"worker{i}", [
        WORKER, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
        "--timeout", str(TIMEOUT_S), "--checkpoint", demo["ckpt"], "--tokenizer", demo["tokenizer"],
        "--out", str(work), "--max-len", str(MAX_LEN), *[a for p in PROMPTS for a in ("--prompt", p)],
        *extra]) for i in range(2)]
    results = [work / f"result-{i}.json" for i in range(2)]
    deadline = time.monotonic() + BOUND_S
    while not all(r.exists() for r in results):
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"{proc.name} exited with {proc.returncode} before its result:\n"
                            f"{group.output(proc)[1][-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no results after {BOUND_S} s:\n" + "\n".join(group.output(p)[1][-2000:] for p in procs))
        time.sleep(0.1)
    return procs


def kill_and_wait(group, victim, survivor) -> dict:
    """SIGKILL `victim` mid-run; the survivor's exit status, output and seconds to exit."""
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    code = group.wait(survivor, timeout=TIMEOUT_S + 60)
    out, err = group.output(survivor)
    return {"returncode": code, "seconds": time.monotonic() - killed_at, "stdout": out, "stderr": err}


@pytest.fixture(scope="module")
def two_process_run(demo, tmp_path_factory):
    """2 workers: generate from the _000 checkpoint, save 2 host shards, restore them,
    generate again, then loop until process 1 is killed; process 0 must then exit."""
    work = tmp_path_factory.mktemp("two_process_run")
    saved = work / "saved"
    with children(str(work)) as group:
        procs = start_workers(group, work, demo, "--save", str(saved), "--loop")
        survivor = kill_and_wait(group, procs[1], procs[0])  # both are generating in a loop
    results = [json.loads((work / f"result-{i}.json").read_text()) for i in range(2)]
    return {"results": results, "saved": saved, "survivor": survivor}


# ---------------------------------------------------------------------------------------
# Tests without other processes
# ---------------------------------------------------------------------------------------


def test_watchdog_fires_only_when_a_guarded_block_overruns():
    fired = []
    dog = runners.Watchdog(0.3, " (process 1 of 2)", on_expire=fired.append)
    with dog.guard("quick step"):
        time.sleep(0.05)
    time.sleep(0.5)
    assert fired == []  # left in time: disarmed
    with dog.guard("slow step"):
        deadline = time.monotonic() + 5
        while not fired and time.monotonic() < deadline:
            time.sleep(0.02)
    assert len(fired) == 1 and "Error (process 1 of 2): slow step did not finish within 0.3 s" in fired[0]
    with pytest.raises(ValueError):
        runners.Watchdog(0)


def test_initialize_distributed_checks_its_settings():
    for args, needle in [(("127.0.0.1:1234", 0, 0), "num_processes=0"),
                         (("127.0.0.1:1234", 2, 2), "process_id=2"),
                         (("127.0.0.1:1234", 2, -1), "process_id=-1"),
                         (("localhost", 2, 0), "expected HOST:PORT"),
                         (("127.0.0.1:99999", 2, 0), "expected HOST:PORT")]:
        with pytest.raises(runners.DistributedError, match=needle):
            runners.initialize_distributed(*args)
    with pytest.raises(runners.DistributedError, match="timeout"):
        runners.initialize_distributed("127.0.0.1:1234", 2, 0, timeout_s=0)
    runners.initialize_distributed("unused:1", 1, 0)  # one process: nothing to join
    assert runners.parse_coordinator("[::1]:8476") == ("::1", 8476)
    assert runners.distributed_timeout() is None


def test_run_py_documents_the_multi_process_flags_and_their_environment_variables():
    text = run.build_parser().format_help()
    for flag in ("--coordinator", "--num-processes", "--process-id", "--hosts", "--distributed-timeout",
                 "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "GROK1_DISTRIBUTED_TIMEOUT"):
        assert flag in text, flag
    assert run.EXIT_DISTRIBUTED == runners.EXIT_DISTRIBUTED
    assert run.DEFAULT_DISTRIBUTED_TIMEOUT == runners.DEFAULT_DISTRIBUTED_TIMEOUT_S


def test_make_mesh_refuses_hosts_that_do_not_match_the_processes():
    with pytest.raises(runners.MeshConfigError, match="describes 2 hosts"):
        runners.make_mesh((1, 4), (2, 1))


# ---------------------------------------------------------------------------------------
# Two processes
# ---------------------------------------------------------------------------------------


def test_two_processes_generate_the_one_process_tokens_from_the_single_shard_checkpoint(
        two_process_run, reference, demo):
    expected = [c.tokens for c in reference]
    n_files = len(os.listdir(demo["ckpt"]))
    for i, result in enumerate(two_process_run["results"]):
        assert result["process"] == i and result["processes"] == 2
        assert result["mesh"] == {"data": 2, "model": 4} and result["batch"] == 2
        assert result["mesh_processes"] == [[0] * 4, [1] * 4]  # process p owns mesh row p
        assert result["tokens"] == expected
        # Every process read the released-style _000 files, all of them.
        assert result["read"] == [f"tensor{k:05d}_000" for k in range(n_files)]


def test_two_process_save_writes_host_shards_that_rebuild_the_parameters(two_process_run, demo):
    saved = two_process_run["saved"]
    params = run.tiny_demo_params(run.tiny_demo_config(), 0)  # what the demo checkpoint holds
    order = [(m, n) for m in sorted(params) for n in sorted(params[m])]  # leaf i = file i (SPEC 4)
    names = sorted(os.listdir(saved))
    assert names == sorted([f"tensor{k:05d}_{h:03d}" for k in range(len(order)) for h in (0, 1)]
                           + ["host_shard_000.json", "host_shard_001.json"])
    for h, result in enumerate(two_process_run["results"]):
        assert result["saved"] == [f"tensor{k:05d}_{h:03d}" for k in range(len(order))]
    manifests = [json.loads((saved / f"host_shard_{h:03d}.json").read_text()) for h in (0, 1)]
    split = 0
    for k, (module, name) in enumerate(order):
        leaf = params[module][name]
        whole = ({"weight": np.asarray(leaf.weight), "scales": np.asarray(leaf.scales)}
                 if isinstance(leaf, model.QuantizedWeight8bit) else {"value": np.asarray(leaf)})
        rebuilt = {f: np.zeros_like(a) for f, a in whole.items()}
        covered = {f: np.zeros(a.shape, bool) for f, a in whole.items()}
        for h in (0, 1):
            entry = manifests[h]["tensors"][str(k)]
            assert entry["path"] == f"params/{module}/{name}"
            with open(saved / f"tensor{k:05d}_{h:03d}", "rb") as f:
                value = pickle.load(f)  # files we just wrote: trusted
            parts = ({"weight": value.weight, "scales": value.scales}
                     if isinstance(value, model.QuantizedWeight8bit) else {"value": value})
            assert set(parts) == set(whole)
            for field, block in parts.items():
                box = entry[field]
                assert box["shape"] == list(whole[field].shape) and block.dtype == whole[field].dtype
                region = tuple(slice(a, b) for a, b in zip(box["start"], box["stop"]))
                assert block.shape == rebuilt[field][region].shape
                rebuilt[field][region] = block
                covered[field][region] = True
                split += block.size < whole[field].size
        for field in whole:
            assert covered[field].all(), (module, name, field)
            np.testing.assert_array_equal(rebuilt[field], whole[field], err_msg=f"{module}/{name} {field}")
    assert split > len(order)  # most leaves are split between the hosts, not copied whole
    emb = manifests[1]["tensors"]["0"]["value"]  # table [V, D] sharded (None, (data, model))
    assert (emb["start"], emb["stop"]) == ([0, 32], [512, 64])  # host 1: the second half of D


def test_each_process_restores_only_its_own_host_shard_and_generates_the_same(two_process_run, reference):
    expected = [c.tokens for c in reference]
    for h, result in enumerate(two_process_run["results"]):
        assert result["read_saved"] == [f"tensor{k:05d}_{h:03d}" for k in range(len(result["saved"]))]
        assert result["tokens_saved"] == expected


def check_survivor(s: dict) -> None:
    assert s["returncode"] is not None and s["returncode"] != 0, s
    if s["returncode"] == runners.EXIT_DISTRIBUTED:  # a collective failed, or the watchdog fired
        # (jax's runtime error: JaxRuntimeError; XlaRuntimeError in older jax, e.g. 0.7.0)
        assert any(m in s["stderr"] for m in ("Error: JaxRuntimeError", "Error: XlaRuntimeError",
                                              "did not finish within")), s["stderr"][-3000:]
    else:  # jax's heartbeat found the process dead and ended this one (SIGABRT)
        assert s["returncode"] == -signal.SIGABRT, s
        assert "detected fatal errors" in s["stderr"], s["stderr"][-3000:]
    assert s["seconds"] < TIMEOUT_S + 60  # bounded (the wait above fails first otherwise)
    print(f"survivor: status {s['returncode']}, {s['seconds']:.2f} s after the kill")


def test_killing_a_process_mid_run_ends_the_other_with_an_error(two_process_run):
    check_survivor(two_process_run["survivor"])


def test_killing_the_coordinator_mid_run_ends_the_other_with_an_error(demo, reference, tmp_path):
    with children(str(tmp_path)) as group:
        procs = start_workers(group, tmp_path, demo, "--loop")
        survivor = kill_and_wait(group, procs[0], procs[1])  # process 0 hosts the coordinator
    check_survivor(survivor)
    result = json.loads((tmp_path / "result-1.json").read_text())
    assert result["tokens"] == [c.tokens for c in reference]


def test_a_two_shard_checkpoint_does_not_load_on_other_layouts(two_process_run, demo, tmp_path):
    saved = two_process_run["saved"]
    config = run.tiny_demo_config()
    mesh = runners.make_mesh((2, 4))
    with pytest.raises(checkpoint.CheckpointError, match="host shard holds only"):
        checkpoint.restore(str(saved), model.param_shapes(config), mesh,
                           state_sharding=model.param_shardings(config, mesh), progress=False)
    listing = io.StringIO()
    assert checkpoint.inspect_checkpoint(str(saved), out=listing) == 0
    n_files = len(os.listdir(demo["ckpt"]))
    assert f"host 001: {n_files} tensor files" in listing.getvalue() and "host_shard_001.json" in listing.getvalue()
    # merge_host_shards gives back the single-shard checkpoint, byte for byte.
    merged = tmp_path / "merged"
    checkpoint.merge_host_shards(str(saved), str(merged))
    names = sorted(os.listdir(demo["ckpt"]))
    assert sorted(os.listdir(merged)) == names
    for name in names:
        assert (merged / name).read_bytes() == open(os.path.join(demo["ckpt"], name), "rb").read(), name
    # A manifest that leaves part of a leaf uncovered, or is not a manifest, is refused.
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    doc = json.loads((broken / "host_shard_001.json").read_text())
    doc["tensors"]["0"]["value"].update(start=[0, 16], stop=[512, 48])  # same block size, wrong place
    (broken / "host_shard_001.json").write_text(json.dumps(doc))
    with pytest.raises(checkpoint.CorruptCheckpointError, match="cover only 24576 of 32768"):
        checkpoint.merge_host_shards(str(broken), str(tmp_path / "merged2"))
    (broken / "host_shard_001.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(checkpoint.CorruptCheckpointError, match="not a host shard manifest"):
        checkpoint.merge_host_shards(str(broken), str(tmp_path / "merged3"))


def run_py(group, name, port, process_id, *extra):
    return group.start(name, [os.path.join(REPO, "run.py"), "--tiny", "--coordinator", f"127.0.0.1:{port}",
                              "--num-processes", "2", "--process-id", str(process_id), *extra])


def test_run_py_unreachable_coordinator_or_missing_peer_ends_with_status_3(tmp_path):
    timeout = 3
    with children(str(tmp_path)) as group:
        # Process 1 with nobody at the coordinator's port (flags); process 0 alone, waiting
        # for process 1 (the same settings from environment variables).
        lonely = run_py(group, "lonely1", free_port(), 1, "--distributed-timeout", str(timeout))
        alone = group.start("alone0", [os.path.join(REPO, "run.py"), "--tiny"], env={
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}", "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": "0", "GROK1_DISTRIBUTED_TIMEOUT": str(timeout)})
        for proc, needle in ((lonely, "cannot be reached"), (alone, "for all 2 processes to join")):
            code = group.wait(proc, timeout=timeout + 60)
            err = group.output(proc)[1]
            assert code == runners.EXIT_DISTRIBUTED, err[-3000:]
            assert f"did not finish within {timeout} s" in err and needle in err, err[-3000:]


def test_run_py_on_two_processes_prints_once_what_one_process_gives(reference, tmp_path):
    port = free_port()
    with children(str(tmp_path)) as group:
        procs = [run_py(group, f"run{i}", port, i, "--tiny-dir", str(tmp_path / "tiny"), "--temperature", "0",
                        "--max-len", str(MAX_LEN), "--distributed-timeout", str(TIMEOUT_S),
                        *[a for p in PROMPTS for a in ("--prompt", p)]) for i in range(2)]
        codes = [group.wait(p) for p in procs]
        (out0, err0), (out1, err1) = group.output(procs[0]), group.output(procs[1])
    assert codes == [0, 0], err0[-3000:] + err1[-3000:]
    assert "mesh {'data': 2, 'model': 4} over 2 processes, 2 slot(s)" in out0
    for prompt, c in zip(PROMPTS, reference):
        assert f"Output for prompt: {prompt} {c.text}\n" in out0
    assert "Output for prompt" not in out1 and "Loaded in" not in out1  # only process 0 prints
    # Each process wrote and read its own copy of the demo (as separate hosts would).
    assert sorted(os.listdir(tmp_path / "tiny")) == ["process-0", "process-1"]
