"""checkpoint.load_tensors onto devices: file reads overlap host->device transfers, the byte
budget holds each host buffer until its transfer is done, and failures stop everything.

Transfers are replaced by objects whose completion the test controls (`FakeTransfer`), so the
order of reads, transfers and waits is observed directly, without timing. The values are the
arrays the test itself saved.
"""

import os
import re
import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import checkpoint as ck
from test_checkpoint import open_fds_into, shm_dir  # noqa: F401 - shm_dir is a fixture


class FakeTransfer:
    """A placed leaf whose transfer is done only once something waits for it; with a `gate`
    (threading.Event), waiting also lasts until the gate opens (10 s at most)."""

    gate = None

    def __init__(self, k, value, log):
        self.k, self.value, self.log, self.done = k, value, log, False

    def block_until_ready(self):
        if not self.done:
            if self.gate is not None and not self.gate.wait(10):
                self.log.append(("gate timed out", self.k))
            self.log.append(("wait", self.k))
            self.done = True
        return self


def save_leaves(directory, count, size=4096, seed=0):
    rng = np.random.default_rng(seed)
    params = {f"m{i}": {"w": rng.standard_normal(size).astype(np.float32)} for i in range(count)}
    ck.save(params, directory)
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    paths, leaves, _ = ck.checkpoint_leaves(shapes)
    return [params[f"m{i}"]["w"] for i in range(count)], paths, leaves


def leaf_index(where):
    return int(re.search(r"tensor(\d{5})_", where).group(1))


@pytest.fixture
def fake_transfers(monkeypatch):
    """Replaces placing with FakeTransfer; returns the event log: ("read", k) after each
    chunk read of file k, ("place", k) when its transfer is queued, ("wait", k) when waited."""
    log = []
    lock = threading.Lock()

    def place(value, sharding, boxes=None, where="", wait=True):
        assert not wait, "the pipeline must not wait inside _place"
        k = leaf_index(where)
        log.append(("place", k))
        return FakeTransfer(k, value, log)

    def hook(path, nbytes):
        with lock:
            log.append(("read", leaf_index(os.path.basename(path))))

    monkeypatch.setattr(ck, "_place", place)
    monkeypatch.setattr(ck, "_is_ready", lambda value: value.done)
    monkeypatch.setattr(ck, "_chunk_hook", hook)
    return log


def test_reads_go_on_while_transfers_are_in_flight(tmp_path, fake_transfers, monkeypatch):
    values, paths, leaves = save_leaves(tmp_path, 6)
    # No transfer can finish before the last file is being read: a loader whose reader
    # waited for its own transfers would stall here (and the gate time out).
    gate = threading.Event()
    monkeypatch.setattr(FakeTransfer, "gate", gate)
    hook = ck._chunk_hook

    def gated_hook(path, nbytes):
        hook(path, nbytes)
        if os.path.basename(path).startswith("tensor00005"):
            gate.set()

    monkeypatch.setattr(ck, "_chunk_hook", gated_hook)
    out = ck.load_tensors(leaves, str(tmp_path), shardings=[object()] * 6, paths=paths, num_workers=1,
                          use_shm=False, max_inflight_bytes=1 << 30, progress=False)
    log = fake_transfers
    assert not [e for e in log if e[0] == "gate timed out"], log
    # One worker read the files in order, and none waited for a transfer.
    assert list(dict.fromkeys(k for what, k in log if what == "read")) == list(range(6))
    assert sorted(k for what, k in log if what == "place") == list(range(6))
    assert sorted(k for what, k in log if what == "wait") == list(range(6))  # all done at the end
    assert [t.k for t in out] == list(range(6))
    for t, want in zip(out, values):
        np.testing.assert_array_equal(t.value, want)


def test_budget_keeps_host_buffers_until_their_transfer_is_done(tmp_path, fake_transfers):
    _, paths, leaves = save_leaves(tmp_path, 5, seed=1)
    stats = {}
    ck.load_tensors(leaves, str(tmp_path), shardings=[object()] * 5, paths=paths, num_workers=4,
                    use_shm=False, max_inflight_bytes=1, progress=False, _stats=stats)
    log = fake_transfers
    # A budget of one file: the next file (in whatever order the 4 workers take them) is
    # read only once the previous leaf's transfer is done.
    order = list(dict.fromkeys(k for what, k in log if what == "read"))
    assert sorted(order) == list(range(5))
    for previous, following in zip(order, order[1:]):
        assert log.index(("wait", previous)) < log.index(("read", following)), log
    size = os.path.getsize(tmp_path / "tensor00000_000")
    assert stats["peak_inflight"] == size  # one host buffer at a time
    assert set(stats) >= {"queue_s", "wait_transfers_s", "wait_reads_s"}


@pytest.mark.parametrize("error", [RuntimeError("device lost"), KeyboardInterrupt()])
def test_a_failed_transfer_stops_the_load(tmp_path, shm_dir, monkeypatch, error):
    _, paths, leaves = save_leaves(tmp_path, 8, size=64 * 1024, seed=2)
    monkeypatch.setattr(ck, "_CHUNK_BYTES", 4096)
    threads_before = set(threading.enumerate())
    started = []

    at_failure = []

    def place(value, sharding, boxes=None, where="", wait=True):
        if leaf_index(where) == 2:
            at_failure.append(len(set(started)))
            raise error
        return FakeTransfer(leaf_index(where), value, [])

    monkeypatch.setattr(ck, "_place", place)
    monkeypatch.setattr(ck, "_is_ready", lambda value: value.done)
    monkeypatch.setattr(ck, "_chunk_hook", lambda path, n: started.append(os.path.basename(path)))
    kind = ck.CheckpointError if isinstance(error, RuntimeError) else KeyboardInterrupt
    with pytest.raises(kind) as info:
        ck.load_tensors(leaves, str(tmp_path), shardings=[object()] * 8, paths=paths, num_workers=2,
                        use_shm=True, shm_dir=shm_dir, max_inflight_bytes=1, progress=False)
    if kind is ck.CheckpointError:
        message = str(info.value)
        assert "tensor00002_000" in message and paths[2] in message and "device lost" in message
    # The workers are gone and nothing is left open in or written to the RAM disk. After
    # Ctrl-C the load returns at once and the workers stop at their next chunk by
    # themselves: give them a moment.
    def clean():
        workers = {t for t in threading.enumerate() if not t.daemon} - threads_before
        return not workers and open_fds_into(shm_dir) == [] and os.listdir(shm_dir) == []

    deadline = time.monotonic() + 2.0
    while not clean() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert clean()
    # No file is started once the failure is known: at most the two workers' files in
    # flight at that moment are read on (which files, the workers' timing decides).
    assert len(set(started)) <= at_failure[0] + 2


def test_restore_onto_a_mesh_through_the_pipeline(tmp_path):
    # The real placement (no fakes): 8 CPU devices, leaves sharded and replicated.
    rng = np.random.default_rng(3)
    params = {"a": {"w": rng.standard_normal((8, 16)).astype(np.float32)},
              "b": {"w": rng.standard_normal((4, 8)).astype(np.float32)}}
    ck.save(params, tmp_path)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    specs = {"a": {"w": P("data", "model")}, "b": {"w": P()}}
    got = ck.restore(tmp_path, shapes, mesh, state_sharding=specs, progress=False, max_inflight_bytes=1)
    assert got["a"]["w"].sharding == NamedSharding(mesh, P("data", "model"))
    assert len({s.device for s in got["a"]["w"].addressable_shards}) == 8
    np.testing.assert_array_equal(np.asarray(got["a"]["w"]), params["a"]["w"])
    np.testing.assert_array_equal(np.asarray(got["b"]["w"]), params["b"]["w"])
