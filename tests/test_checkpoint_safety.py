"""Safety of checkpoint.py under hostile files and unlucky faults (issue 13, classes 2-4 and
8-10): atomic saves that survive kills, loads that never block or spin, a restricted
unpickler that bounds what it builds and leaks nothing, and clean errors for filesystem
faults.

References are independent of the code under test: hostile pickles are assembled here
opcode by opcode (the builder is checked against numpy on a benign file first), and the
expected values after an interrupted save are the arrays the test itself wrote.
"""

import errno
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time

import jax
import ml_dtypes
import numpy as np
import pytest

import checkpoint as ck
from model import QuantizedWeight8bit

BF16 = ml_dtypes.bfloat16


# ---------------------------------------------------------------------------------------
# A pickle assembler (protocol 4 opcodes, no frames)
# ---------------------------------------------------------------------------------------


def s(text: str) -> bytes:
    """SHORT_BINUNICODE."""
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def glob(module: str, name: str) -> bytes:
    return s(module) + s(name) + b"\x93"  # STACK_GLOBAL


def binint(v: int) -> bytes:
    return b"J" + struct.pack("<i", v)


def long1(v: int) -> bytes:
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def binbytes8(data: bytes) -> bytes:
    return b"\x8e" + struct.pack("<Q", len(data)) + data


DTYPE_F4 = (glob("numpy", "dtype") + s("f4") + b"\x89\x88\x87R"  # dtype('f4', False, True)
            + b"(K\x03" + s("<") + b"NNN" + binint(-1) + binint(-1) + b"K\x00tb")


def array_ops(shape_ops: bytes, data_ops: bytes, dtype_ops: bytes = DTYPE_F4) -> bytes:
    """_reconstruct(ndarray, (0,), b'b') + BUILD((1, shape, dtype, False, data)); shape_ops
    push the shape tuple, data_ops the data."""
    return (glob("numpy._core.multiarray", "_reconstruct") + glob("numpy", "ndarray")
            + b"K\x00\x85" + b"C\x01b" + b"\x87R"
            + b"(K\x01" + shape_ops + dtype_ops + b"\x89" + data_ops + b"tb")


def tuple_of(items: list) -> bytes:
    return b"(" + b"".join(items) + b"t"


def pickle_of(body: bytes) -> bytes:
    return b"\x80\x04" + body + b"."


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_assembler_builds_what_numpy_reads(tmp_path):
    # The builder's benign output is a real numpy pickle: the plain unpickler and ours agree.
    values = np.arange(6, dtype=np.float32) * 1.5
    data = pickle_of(array_ops(tuple_of([binint(2), binint(3)]), binbytes8(values.tobytes())))
    import pickle
    np.testing.assert_array_equal(pickle.loads(data), values.reshape(2, 3))
    got = ck.fast_unpickle(write(tmp_path / "t", data))
    np.testing.assert_array_equal(got, values.reshape(2, 3))
    assert got.dtype == np.float32


# ---------------------------------------------------------------------------------------
# Class 4: everything the unpickler builds is bounded; hostile files fail in milliseconds
# ---------------------------------------------------------------------------------------

MB = 1 << 20


def _hostile_files() -> dict:
    """name -> (about 1 MB of pickle, error class, text the message must contain)."""
    huge = (1 << (8 * 300_000)) - 1  # a 300 KB integer
    long4 = b"\x8b" + struct.pack("<i", 300_001) + huge.to_bytes(300_001, "little", signed=True)
    return {
        "shape_of_huge_integers": (
            pickle_of(array_ops(tuple_of([long4] * 3), binbytes8(b""))),
            ck.UnsafeCheckpointError, "refused an integer of 300001 bytes"),
        "hundreds_of_thousands_of_dims": (
            pickle_of(array_ops(b"(" + b"K\x01" * 500_000 + b"t", binbytes8(b"\0" * 4))),
            ck.UnsafeCheckpointError, "more than 4096 opcodes"),
        "dims_of_64_bit_ints": (  # passes the opcode walk; the shape check refuses it
            pickle_of(array_ops(tuple_of([long1((1 << 62) + 1)] * 2000), binbytes8(b"\0" * MB))),
            ck.CorruptCheckpointError, "expected a tuple of at most 32"),
        "dim_beyond_64_bits": (
            pickle_of(array_ops(tuple_of([long1(1 << 70)]), binbytes8(b"\0" * MB))),
            ck.CorruptCheckpointError, "<int of 71 bits>"),
        "text_LONG_of_a_million_digits": (
            b"L" + b"9" * MB + b"L\n.", ck.UnsafeCheckpointError, "text line of more than 32 bytes in LONG"),
        "text_INT_of_a_million_digits": (
            b"I" + b"1" * MB + b"\n.", ck.UnsafeCheckpointError, "in INT"),
        "text_line_without_newline": (
            b"V" + b"a" * MB, ck.UnsafeCheckpointError, "text line of more than 1024 bytes in UNICODE"),
        "GLOBAL_with_a_megabyte_name": (
            b"c" + b"numpy\n" + b"x" * MB + b"\n.", ck.UnsafeCheckpointError, "in GLOBAL"),
        "memo_index_bomb": (
            pickle_of(b"N" + b"r" + struct.pack("<I", 0x7FFFFFFF) + b"0") + b"\0" * MB,
            ck.UnsafeCheckpointError, "refused memo index 2147483647"),
        "text_PUT_memo_bomb": (
            b"N" + b"p99999999999\n" + b"." + b"\0" * MB, ck.UnsafeCheckpointError, "refused memo index 99999999999"),
        "million_opcodes": (
            pickle_of(b"N0" * (MB // 2)), ck.UnsafeCheckpointError, "more than 4096 opcodes"),
        "a_million_marks": (
            pickle_of(b"(" * MB), ck.UnsafeCheckpointError, "more than 4096 opcodes"),
        "payload_claiming_a_petabyte": (
            pickle_of(array_ops(tuple_of([long1(1 << 48)]), b"\x8e" + struct.pack("<Q", 1 << 50)))
            + b"\0" * MB, ck.CorruptCheckpointError, "BINBYTES8 claims 1125899906842624 bytes"),
        "frame_claiming_an_exabyte": (
            b"\x80\x04\x95" + struct.pack("<Q", 1 << 60) + b"N" * MB + b".",
            ck.CorruptCheckpointError, "FRAME claims 1152921504606846976 bytes"),
        "shape_claiming_petabytes": (  # a well-formed pickle whose data does not match
            pickle_of(array_ops(tuple_of([long1(1 << 40), long1(1 << 20)]), binbytes8(b"\0" * MB))),
            ck.CorruptCheckpointError, "needs 4611686018427387904 bytes of data, the file holds 1048576"),
    }


@pytest.mark.parametrize("name", sorted(_hostile_files()))
def test_hostile_file_is_rejected_in_milliseconds(tmp_path, name):
    data, error, text = _hostile_files()[name]
    assert len(data) >= 16 * 1024 and len(data) < 2 * MB
    path = write(tmp_path / "tensor00000_000", data)
    for skip_data in (False, True):  # restore's path and --inspect's
        start = time.perf_counter()
        with pytest.raises(error) as info:
            ck._unpickle_file(str(path), ck._LoadControl(), use_shm=False, skip_data=skip_data)
        elapsed = time.perf_counter() - start
        assert elapsed < 1.0, f"{name}: took {elapsed:.3f} s"  # the bound; typically < 20 ms
        assert str(info.value).startswith(f"{path}: ") and text in str(info.value)
        assert len(str(info.value)) < 600


def test_old_protocol_lines_still_load_when_short(tmp_path):
    # GLOBAL reads two text lines (protocols 0-3): a bounded readline must still serve them.
    values = np.arange(4, dtype=np.float32)
    body = array_ops(tuple_of([binint(4)]), binbytes8(values.tobytes()))
    body = body.replace(glob("numpy._core.multiarray", "_reconstruct"),
                        b"cnumpy._core.multiarray\n_reconstruct\n")
    np.testing.assert_array_equal(ck.fast_unpickle(write(tmp_path / "t", pickle_of(body))), values)


# ---------------------------------------------------------------------------------------
# Class 8: BUILD cannot turn one stand-in into another; nothing internal escapes
# ---------------------------------------------------------------------------------------

QW = glob("model", "QuantizedWeight8bit")


def _build_attacks() -> dict:
    f4 = array_ops(tuple_of([binint(1)]), binbytes8(b"\0" * 4))
    big = array_ops(tuple_of([binint(MB // 4)]), b"\x8e" + struct.pack("<Q", MB) + b"\x01" * MB + b"\x94")
    again = array_ops(tuple_of([binint(MB // 4)]), b"h\x00")  # BINGET 0: the same bytes object
    return {
        # (None, {'__class__': QuantizedWeight8bit}) as slot state on the ndarray marker.
        "marker_becomes_quantized": (
            glob("numpy", "ndarray") + b"N}" + s("__class__") + QW + b"s\x86b",
            "refused BUILD state (None, <dict of 1 items, keys '__class__'>) on numpy.ndarray"),
        "dtype_function_gets_attributes": (
            glob("numpy", "dtype") + b"}" + s("__defaults__") + b"N" + b"sb",
            "refused BUILD state"),
        "bfloat16_token_gets_state": (
            glob("ml_dtypes", "bfloat16") + b"}b", "on ml_dtypes.bfloat16"),
        "build_on_the_class_itself": (
            QW + b"}(" + s("weight") + f4 + s("scales") + f4 + b"ub",
            "refused BUILD on the class model.QuantizedWeight8bit itself"),
        "quantized_fields_are_markers": (
            QW + b")\x81}(" + s("weight") + glob("numpy", "ndarray") + s("scales")
            + glob("ml_dtypes", "bfloat16") + b"ub",
            "QuantizedWeight8bit.weight is numpy.ndarray, not a numpy array"),
        "quantized_fields_as_slot_state": (
            QW + b")\x81N}" + s("fields") + b"}(" + s("weight") + f4 + s("scales") + f4 + b"us\x86b",
            "refused QuantizedWeight8bit state"),
        "array_rebuilt_into_quantized": (
            f4 + b"N}" + s("__class__") + QW + b"s\x86b", "array state set twice"),
        "dtype_rebuilt": (
            glob("numpy", "dtype") + s("f4") + b"\x89\x88\x87R" + b"N}" + s("__class__")
            + glob("numpy", "ndarray") + b"s\x86b", "refused dtype state"),
        "payload_used_twice": (
            QW + b")\x81}(" + s("weight") + big + s("scales") + again + b"ub",
            "refused an array payload used twice"),
    }


@pytest.mark.parametrize("name", sorted(_build_attacks()))
def test_build_cannot_change_or_leak_internal_objects(tmp_path, name):
    body, text = _build_attacks()[name]
    path = write(tmp_path / "tensor00000_000", pickle_of(body))
    with pytest.raises(ck.UnsafeCheckpointError) as info:
        ck.fast_unpickle(path, use_shm=False)
    assert str(info.value).startswith(f"{path}: ") and text in str(info.value)


def test_fast_unpickle_returns_only_numpy_arrays(tmp_path):
    # A well-formed QuantizedWeight8bit: both fields real numpy arrays of the file's values.
    w = np.arange(-4, 4, dtype=np.int8).reshape(2, 4)
    scales = np.array([[0.5, 1, 2, 4]], dtype=BF16)
    ck.fast_pickle(QuantizedWeight8bit(w, scales), tmp_path / "q")
    got = ck.fast_unpickle(tmp_path / "q")
    assert type(got) is QuantizedWeight8bit
    assert type(got.weight) is np.ndarray and type(got.scales) is np.ndarray
    np.testing.assert_array_equal(got.weight, w)
    assert got.scales.dtype == BF16 and np.array_equal(got.scales.view(np.uint16), scales.view(np.uint16))


# ---------------------------------------------------------------------------------------
# Class 9: --inspect never prints memory that was not read from the file
# ---------------------------------------------------------------------------------------


def test_inspect_never_prints_unread_memory(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    # numpy.dtype(<64 KB bytes>): --inspect skips large payloads without reading them.
    bad_dtype = glob("numpy", "dtype") + binbytes8(b"\xab" * 65536) + b"\x89\x88\x87R" + b"(K\x03" \
        + s("<") + b"NNN" + binint(-1) + binint(-1) + b"K\x00tb"
    write(d / "tensor00000_000", pickle_of(array_ops(tuple_of([binint(1)]), binbytes8(b"\0" * 4), bad_dtype)))
    # A dtype state whose byte order is a large bytes object.
    bad_state = glob("numpy", "dtype") + s("f4") + b"\x89\x88\x87R" + b"(K\x03" \
        + binbytes8(b"\xcd" * 65536) + b"NNN" + binint(-1) + binint(-1) + b"K\x00tb"
    write(d / "tensor00001_000", pickle_of(array_ops(tuple_of([binint(1)]), binbytes8(b"\0" * 4), bad_state)))
    out = io.StringIO()
    assert ck.inspect_checkpoint(str(d), out=out) == 1
    text = out.getvalue()
    assert (f"{d}/tensor00000_000: refused dtype spec <bytes of 65536 bytes>; only numeric dtypes "
            "and ml_dtypes.bfloat16 are allowed") in text
    assert (f"{d}/tensor00001_000: refused dtype state (3, <bytes of 65536 bytes>, None, None, None, "
            "-1, ... (8 items)); only plain numeric dtypes are allowed") in text
    assert "\\x" not in text and "b'" not in text


@pytest.mark.parametrize("state,text", [
    (b"(K\x03" + s("<") + b"NNN" + binint(-1) + binint(-1) + b"K\x00" + b"}" + s("k") + b"Ns" + b"tb",
     "refused dtype state"),  # metadata
    (b"(K\x03" + s("<") + b"NNN" + binint(8) + binint(-1) + b"K\x00tb", "has item size 4, the file says 8"),
    (b"(K\x03" + s("<") + b"NNN" + s("x") + binint(-1) + b"K\x00tb", "refused dtype state"),
    (b"(K\x03" + s("<") + b"NNN" + binint(-1) + binint(-1) + long1(1 << 40) + b"tb", "refused dtype state"),
])
def test_dtype_descriptors_are_validated_strictly(tmp_path, state, text):
    dtype = glob("numpy", "dtype") + s("f4") + b"\x89\x88\x87R" + state
    path = write(tmp_path / "t", pickle_of(array_ops(tuple_of([binint(1)]), binbytes8(b"\0" * 4), dtype)))
    with pytest.raises(ck.CorruptCheckpointError, match=text):
        ck.fast_unpickle(path)


# ---------------------------------------------------------------------------------------
# Class 3: non-regular files never block; Ctrl-C stops a load
# ---------------------------------------------------------------------------------------


def small_params(seed=0, n=4, size=64):
    rng = np.random.default_rng(seed)
    return {f"m{i}": {"w": rng.standard_normal(size + i).astype(np.float32)} for i in range(n)}


def shapes_of(params):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)


def run_with_deadline(fn, seconds: float):
    """Runs fn in a daemon thread: (finished, its exception). A regression that blocks
    fails the test instead of hanging the suite."""
    box = {}

    def target():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive(), box.get("error")


def test_fifo_named_like_a_tensor_file_gives_an_error_within_seconds(tmp_path):
    params = small_params()
    ck.save(params, tmp_path)
    fifo = tmp_path / "tensor00002_000"
    os.unlink(fifo)
    os.mkfifo(fifo)
    try:
        for label, fn in [
            ("restore", lambda: ck.restore(tmp_path, shapes_of(params), None, progress=False, use_shm=True)),
            ("fast_unpickle", lambda: ck.fast_unpickle(fifo)),
            ("inspect", lambda: ck.inspect_checkpoint(str(tmp_path), out=io.StringIO())),
        ]:
            finished, error = run_with_deadline(fn, 5.0)
            assert finished, f"{label} blocked on the FIFO"
            if label == "inspect":
                assert error is None
                continue
            assert isinstance(error, ck.CheckpointAccessError), (label, error)
            assert f"{fifo}: is a FIFO (named pipe), not a regular file" in str(error)
        out = io.StringIO()
        assert ck.inspect_checkpoint(str(tmp_path), out=out) == 1
        assert f"{fifo}: is a FIFO (named pipe), not a regular file" in out.getvalue()
    finally:  # unblocks a reader stuck in open() if the code ever regresses
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def test_ctrl_c_stops_a_load_within_a_second(tmp_path, monkeypatch):
    params = small_params(n=8, size=64 * 1024)  # 8 files of 256 KB
    ck.save(params, tmp_path)
    monkeypatch.setattr(ck, "_CHUNK_BYTES", 4096)  # 64 chunks a file, 20 ms each: ~10 s a file
    main = threading.main_thread().ident
    sent = []

    def slow(path, nbytes):
        if not sent:
            sent.append(time.perf_counter())
            signal.pthread_kill(main, signal.SIGINT)  # Ctrl-C, as the terminal sends it
        time.sleep(0.02)

    monkeypatch.setattr(ck, "_chunk_hook", slow)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    def workers():
        return {t for t in threading.enumerate() if t.name.startswith("ThreadPoolExecutor")}

    before = workers()
    try:
        with pytest.raises(KeyboardInterrupt):
            ck.restore(tmp_path, shapes_of(params), None, num_workers=4, use_shm=False, progress=False)
        stopped = time.perf_counter()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sent and stopped - sent[0] < 1.0  # the whole load would take about 20 s
    # The workers were not waited for; they stop by themselves at their next chunk.
    deadline = time.time() + 5
    while time.time() < deadline and workers() - before:
        time.sleep(0.02)
    assert not workers() - before


# ---------------------------------------------------------------------------------------
# Class 10: filesystem faults are CheckpointErrors naming the file
# ---------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    params = small_params()
    d = tmp_path / "ckpt"
    ck.save(params, d)
    return params, d


def restore(params, d):
    return ck.restore(d, shapes_of(params), None, progress=False)


def test_directory_where_a_tensor_file_should_be(saved):
    params, d = saved
    f = d / "tensor00001_000"
    os.unlink(f)
    f.mkdir()
    with pytest.raises(ck.CheckpointAccessError) as info:
        restore(params, d)
    assert str(info.value) == f"{f}: is a directory, not a regular file (parameter params/m1/w)"
    with pytest.raises(ck.CheckpointAccessError, match=f"^{f}: is a directory, not a regular file"):
        ck.fast_unpickle(f)


def test_symlink_loop(saved):
    params, d = saved
    f = d / "tensor00003_000"
    os.unlink(f)
    os.symlink(f.name, f)  # points at itself
    with pytest.raises(ck.CheckpointAccessError) as info:
        restore(params, d)
    assert str(info.value) == f"{f}: cannot read: Too many levels of symbolic links (parameter params/m3/w)"
    with pytest.raises(ck.CheckpointAccessError, match="Too many levels of symbolic links"):
        ck.fast_unpickle(f)
    loop = d.parent / "loop"
    os.symlink(loop.name, loop)
    with pytest.raises(ck.CheckpointAccessError, match=f"^{loop}: cannot list the checkpoint directory: "
                       "Too many levels of symbolic links$"):
        restore(params, loop)


def test_checkpoint_path_is_a_file(saved):
    params, d = saved
    with pytest.raises(ck.CheckpointAccessError) as info:
        restore(params, d / "tensor00000_000")
    assert str(info.value).startswith(f"{d / 'tensor00000_000'}: is a file, not a checkpoint directory")
    with pytest.raises(ck.CheckpointAccessError, match="x: a directory above it is a file$"):
        ck.save(params, d / "tensor00000_000" / "x")


def test_unreadable_directory(saved, monkeypatch):
    params, d = saved
    if os.geteuid() != 0:
        os.chmod(d, 0)
    else:  # root reads anything: make listing fail as it does for other users
        real = os.listdir

        def listdir(p="."):
            if os.fspath(p) == str(d):
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(p))
            return real(p)

        monkeypatch.setattr(ck.os, "listdir", listdir)
    try:
        with pytest.raises(ck.CheckpointAccessError) as info:
            restore(params, d)
    finally:
        os.chmod(d, 0o755)
    assert str(info.value) == f"{d}: cannot list the checkpoint directory: Permission denied"
    assert isinstance(info.value, OSError)  # callers catching OSError still do


@pytest.mark.parametrize("manifest,text", [
    ("[" * 100_000 + "]" * 100_000, "not valid JSON (nested too deeply)"),
    ('{"format": "grok-1 host shard", "version": 1, "host": 0, "tensors": {"0": {"value": '
     '{"shape": [Infinity], "start": [0], "stop": [4]}}}}', "not valid JSON (non-finite number Infinity)"),
    ('{"format": "grok-1 host shard", "version": 1, "host": 0, "tensors": {"0": {"value": '
     '{"shape": [NaN], "start": [0], "stop": [4]}}}}', "non-finite number NaN"),
    ('{"format": "grok-1 host shard", "version": 1, "host": 0, "tensors": {"0": {"value": '
     '{"shape": [1e400], "start": [0], "stop": [4]}}}}', "expected shape, start and stop lists"),
    ('{"format": "grok-1 host shard", "version": 1, "host": 0, "tensors": {"0": {"value": '
     '{"shape": [4.5], "start": [0], "stop": [4]}}}}', "expected shape, start and stop lists"),
    ('{"format": "grok-1 host shard", "version": 1, "host": 0, "tensors": {"0": {"value": '
     '{"shape": [' + "9" * 5000 + '], "start": [0], "stop": [4]}}}}', "not valid JSON"),
    ('{"format": "grok-1 host shard", "version": 1, "host": 0, "tensors": {"0": {"value": '
     '{"shape": [true], "start": [0], "stop": [1]}}}}', "expected shape, start and stop lists"),
    ('{"format": "grok-1 host shard", "version": 1, "host": 0, "tensors": {"' + "9" * 5000 + '": {}}}',
     "bad entry for tensor"),
    ('{"format": "grok-1 host shard", "version": 1, "host": 0, "tensors": {"0": {"value": '
     '{"shape": [' + ", ".join(["1"] * 100) + '], "start": [0], "stop": [1]}}}}', "at most 32"),
], ids=["deeply_nested", "infinity", "nan", "overflowing_float", "fraction", "5000_digits", "bool",
        "5000_digit_key", "100_dims"])
def test_bad_host_shard_manifest(tmp_path, manifest, text):
    x = np.arange(4, dtype=np.float32)
    ck.save({"x": x}, tmp_path)
    path = tmp_path / "host_shard_000.json"
    path.write_text(manifest)
    with pytest.raises(ck.CorruptCheckpointError) as info:
        ck.load_tensors([jax.ShapeDtypeStruct((4,), np.float32)], str(tmp_path), host_index=0, num_hosts=1)
    assert str(info.value).startswith(f"{path}: ") and text in str(info.value)
    assert len(str(info.value)) < 600


def test_manifest_that_is_a_fifo(tmp_path):
    ck.save({"x": np.arange(4, dtype=np.float32)}, tmp_path)
    os.mkfifo(tmp_path / "host_shard_000.json")
    finished, error = run_with_deadline(lambda: ck.load_tensors(
        [jax.ShapeDtypeStruct((4,), np.float32)], str(tmp_path), host_index=0, num_hosts=1), 5.0)
    assert finished and isinstance(error, ck.CheckpointAccessError)
    assert str(error).startswith(f"{tmp_path / 'host_shard_000.json'}: is a FIFO")


def test_merge_refuses_a_manifest_claiming_petabytes(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    ck.save({"x": np.arange(4, dtype=np.float32)}, src)
    (src / "host_shard_000.json").write_text(json.dumps({
        "format": "grok-1 host shard", "version": 1, "host": 0, "num_hosts": 1,
        "tensors": {"0": {"path": "params/x", "value": {"shape": [1 << 48], "start": [0], "stop": [4]}}}}))
    with pytest.raises(ck.CorruptCheckpointError) as info:
        ck.merge_host_shards(str(src), str(out))
    assert str(info.value) == (f"{src}/tensor00000_000: value is a block of a [281474976710656] leaf "
                               "(281474976710656 elements), but the host shards' blocks hold only 4 elements")


def test_inspect_cli_on_a_missing_path_or_a_file_exits_2_with_one_line(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert ck.main(["--inspect", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"error: {missing}: checkpoint directory not found\n"
    (tmp_path / "f").write_bytes(b"x")
    assert ck.main(["--inspect", str(tmp_path / "f")]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "is a file, not a checkpoint directory" in captured.err


# ---------------------------------------------------------------------------------------
# Class 2: save is atomic as a whole
# ---------------------------------------------------------------------------------------

OLD = small_params(seed=1, n=4)
NEW = small_params(seed=2, n=3)  # fewer files: a mix of old and new would show


def load_all(d, like):
    got = ck.restore(d, shapes_of(like), None, progress=False)
    return {k: np.asarray(v["w"]) for k, v in got.items()}


def assert_equal_params(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k]["w"].dtype
        np.testing.assert_array_equal(got[k], want[k]["w"])


def temporaries(d):
    """Entries that a finished save or load must not leave: temporary names beside the
    checkpoint directory and inside it."""
    beside = [n for n in os.listdir(d.parent) if n.startswith(f".{d.name}.")]
    inside = [n for n in os.listdir(d) if not ck._TENSOR_NAME.match(n)] if d.is_dir() else []
    return beside + inside


KILL_CASES = [  # (atomic exchange?, step of save, nth time, what must survive)
    (True, "file", 1, "old"),
    (True, "file", 3, "old"),
    (True, "written", 1, "old"),
    (True, "swapping", 1, "old"),
    (True, "swapped", 1, "new"),
    (False, "swapping", 1, "old"),
    (False, "aside", 1, "old"),  # between the two renames: the old one is moved back
    (False, "swapped", 1, "new"),
]

# One fresh interpreter (no jax backend, so forking is safe) forks a child per case that
# saves NEW over the case's checkpoint and SIGKILLs itself at the case's step.
KILLER = """
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import checkpoint as ck
with np.load(sys.argv[2]) as z:
    new = {k: {"w": z[k]} for k in z.files}
out = {}
for c in json.loads(sys.argv[3]):
    pid = os.fork()
    if pid == 0:
        try:
            ck._USE_RENAME_EXCHANGE = c["exchange"]
            seen = [0]
            def hook(name):
                if name == c["step"]:
                    seen[0] += 1
                    if seen[0] == c["nth"]:
                        os.kill(os.getpid(), signal.SIGKILL)
            ck._save_hook = hook
            ck.save(new, c["dir"], host_index=0, overwrite=True, num_workers=1)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    out[c["dir"]] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def killed_saves(tmp_path_factory):
    """{case: (checkpoint dir, signal that ended its save)} after the kills."""
    base = tmp_path_factory.mktemp("kills")
    cases, dirs = [], {}
    for k, (exchange, step, nth, _) in enumerate(KILL_CASES):
        d = base / f"case{k}" / "ckpt"
        ck.save(OLD, d)
        dirs[KILL_CASES[k]] = d
        cases.append({"dir": str(d), "exchange": exchange, "step": step, "nth": nth})
    np.savez(base / "new.npz", **{k: v["w"] for k, v in NEW.items()})
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", KILLER, repo, str(base / "new.npz"), json.dumps(cases)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr
    signals = json.loads(run.stdout)
    return {case: (d, signals[str(d)]) for case, d in dirs.items()}


@pytest.mark.parametrize("case", KILL_CASES, ids=[f"{'exchange' if c[0] else 'renames'}-{c[1]}-{c[2]}"
                                                 for c in KILL_CASES])
def test_killed_save_leaves_the_old_checkpoint_or_the_new_one_whole(killed_saves, case):
    d, sig = killed_saves[case]
    _, step, _, survivor = case
    assert sig == signal.SIGKILL  # the save really reached that step and died there
    if step == "aside":
        assert not d.exists()  # the kill hit the window between the renames
    else:
        assert temporaries(d)  # the kill left something behind
    want = OLD if survivor == "old" else NEW
    assert_equal_params(load_all(d, want), want)
    assert temporaries(d) == []  # the load tidied up
    assert sorted(os.listdir(d)) == [f"tensor{i:05d}_000" for i in range(len(want))]
    # A later save replaces it and leaves nothing behind either.
    ck.save(NEW, d, overwrite=True)
    assert temporaries(d) == []
    assert_equal_params(load_all(d, NEW), NEW)


def test_interrupted_or_failing_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    ck.save(OLD, d)
    calls = []

    def ctrl_c(step):
        if step == "file":
            calls.append(step)
            if len(calls) == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(ck, "_save_hook", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        ck.save(NEW, d, overwrite=True, num_workers=1)
    assert len(calls) == 2  # stopped at once: the third file was never written
    monkeypatch.setattr(ck, "_save_hook", None)
    assert temporaries(d) == []
    assert_equal_params(load_all(d, OLD), OLD)
    # A full disk at the second file.
    real = ck.fast_pickle
    count = []

    def full_disk(obj, path):
        count.append(path)
        if len(count) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real(obj, path)

    monkeypatch.setattr(ck, "fast_pickle", full_disk)
    with pytest.raises(ck.CheckpointAccessError) as info:
        ck.save(NEW, d, overwrite=True, num_workers=1)
    assert str(info.value) == (f"{d}/tensor00001_000: cannot write: No space left on device; "
                               "the old checkpoint is unchanged")
    assert temporaries(d) == []
    assert_equal_params(load_all(d, OLD), OLD)


def test_save_keeps_other_host_shards_and_files_and_refuses_subdirectories(tmp_path):
    d = tmp_path / "ckpt"
    a, b = np.arange(4, dtype=np.float32), np.arange(4, 8, dtype=np.float32)
    ck.save({"x": a}, d, host_index=0)
    ck.save({"x": b}, d, host_index=1)
    (d / "NOTES.txt").write_text("mine")
    inode = os.stat(d / "tensor00000_001").st_ino
    ck.save({"x": a + 10}, d, host_index=0, overwrite=True)
    assert sorted(os.listdir(d)) == ["NOTES.txt", "tensor00000_000", "tensor00000_001"]
    assert (d / "NOTES.txt").read_text() == "mine"
    assert os.stat(d / "tensor00000_001").st_ino == inode  # kept by a hard link, not rewritten
    np.testing.assert_array_equal(ck.fast_unpickle(d / "tensor00000_000"), a + 10)
    np.testing.assert_array_equal(ck.fast_unpickle(d / "tensor00000_001"), b)
    assert temporaries(d) == ["NOTES.txt"]
    (d / "sub").mkdir()
    with pytest.raises(ck.CheckpointError, match="holds the subdirectory 'sub'"):
        ck.save({"x": a}, d, host_index=0, overwrite=True)
    np.testing.assert_array_equal(ck.fast_unpickle(d / "tensor00000_000"), a + 10)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_save_through_a_symlinked_directory_replaces_the_target(tmp_path):
    real = tmp_path / "disk" / "ckpt"
    ck.save(OLD, real)
    link = tmp_path / "link"
    os.symlink(real, link)
    files = ck.save(NEW, link, overwrite=True)
    assert os.path.islink(link) and files[0] == f"{link}/tensor00000_000"
    assert_equal_params(load_all(real, NEW), NEW)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftovers_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    d = tmp_path / "ckpt"
    ck.save(OLD, d)
    gone, alive, host = dead_pid(), os.getppid(), ck._HOST
    stale_dir = tmp_path / f".ckpt.grok1-save-{gone}-{host}-0123abcd"
    stale_dir.mkdir()
    (stale_dir / "tensor00000_000").write_bytes(b"x" * 1000)
    stale_file = d / f".tensor00001_000.grok1-tmp-{gone}-{host}-89abcdef"
    stale_file.write_bytes(b"y")
    legacy = d / f".tensor00002_000.{gone}.deadbeef.tmp"
    legacy.write_bytes(b"z")
    live = tmp_path / f".ckpt.grok1-save-{alive}-{host}-00000000"
    live.mkdir()
    other_host = tmp_path / f".ckpt.grok1-save-{gone}-elsewhere-00000000"
    other_host.mkdir()
    assert_equal_params(load_all(d, OLD), OLD)
    assert not stale_dir.exists() and not stale_file.exists() and not legacy.exists()
    assert live.exists() and other_host.exists()
