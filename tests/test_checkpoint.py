"""Tests for checkpoint.py: the released file format, safety, errors, RAM-disk hygiene.

References are independent of the code under test: expected file orders are written out
literally from SPEC section 4, expected values are the arrays the test itself saved, and
hostile payloads are first shown to be live with the plain pickle module.
"""

import io
import logging
import os
import pickle
import pickletools
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import checkpoint as ck
import model
from model import QuantizedWeight8bit

BF16 = ml_dtypes.bfloat16
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def mesh_of(shape):
    devices = np.array(jax.devices()[: shape[0] * shape[1]]).reshape(shape)
    return Mesh(devices, ("data", "model"))


def random_qw(rng, shape, blocks):
    w = rng.integers(-128, 128, shape, dtype=np.int8)
    s = rng.standard_normal((*shape[:-2], blocks, shape[-1])).astype(BF16)
    return QuantizedWeight8bit(weight=w, scales=s)


def small_tree(rng, num_layers=2, d=16, f=32, e=4):
    """A layer-like params tree (real module paths, small shapes)."""
    params = {
        "language_model/in_out_embed": {"embeddings": rng.standard_normal((64, d)).astype(np.float32)},
        "language_model/rms_norm": {"scale": rng.standard_normal(d).astype(np.float32)},
    }
    for i in range(num_layers):
        p = f"transformer/decoder_layer_{i}"
        params[f"{p}/moe/linear"] = {"w": random_qw(rng, (e, d, f), 1)}
        params[f"{p}/moe/linear_v"] = {"w": random_qw(rng, (e, d, f), 1)}
        params[f"{p}/moe/linear_1"] = {"w": random_qw(rng, (e, f, d), 8)}
        params[f"{p}/multi_head_attention/query"] = {"w": random_qw(rng, (d, d), 1)}
        params[f"{p}/multi_head_attention/key"] = {"w": random_qw(rng, (d, 8), 1)}
        params[f"{p}/multi_head_attention/value"] = {"w": random_qw(rng, (d, 8), 1)}
        params[f"{p}/multi_head_attention/linear"] = {"w": random_qw(rng, (d, d), 8)}
        params[f"{p}/router"] = {"w": rng.standard_normal((d, e)).astype(np.float32)}
        for n in ("rms_norm", "rms_norm_1", "rms_norm_2", "rms_norm_3"):
            params[f"{p}/{n}"] = {"scale": rng.standard_normal(d).astype(np.float32)}
    return params


def random_values(shapes, seed=0):
    """Random numpy values for a tree of ShapeDtypeStructs (QuantizedWeight8bit leaves)."""
    rng = np.random.default_rng(seed)

    def leaf(s):
        if isinstance(s, QuantizedWeight8bit):
            return QuantizedWeight8bit(weight=leaf(s.weight), scales=leaf(s.scales))
        if np.dtype(s.dtype) == np.int8:
            return rng.integers(-128, 128, s.shape, dtype=np.int8)
        return rng.standard_normal(s.shape).astype(s.dtype)

    return jax.tree_util.tree_map(leaf, shapes, is_leaf=lambda x: isinstance(x, QuantizedWeight8bit))


def shapes_of(tree):
    def leaf(x):
        if isinstance(x, QuantizedWeight8bit):
            return QuantizedWeight8bit(leaf(x.weight), leaf(x.scales))
        return jax.ShapeDtypeStruct(x.shape, x.dtype)

    return jax.tree_util.tree_map(leaf, tree, is_leaf=lambda x: isinstance(x, QuantizedWeight8bit))


def flat(tree):
    return jax.tree_util.tree_leaves(tree)


def assert_bit_exact(expected, got):
    e, g = flat(expected), flat(got)
    assert len(e) == len(g)
    for a, b in zip(e, g):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8))


def rewrite_strings(data: bytes, mapping: dict) -> bytes:
    """Re-emits a pickle with some string arguments replaced (frames dropped: optional)."""
    ops = list(pickletools.genops(data))
    out = bytearray()
    for k, (op, arg, pos) in enumerate(ops):
        end = ops[k + 1][2] if k + 1 < len(ops) else len(data)
        if op.name == "FRAME":
            continue
        if op.name == "SHORT_BINUNICODE" and arg in mapping:
            new = mapping[arg].encode()
            out += b"\x8c" + bytes([len(new)]) + new
        else:
            out += data[pos:end]
    return bytes(out)


def pickle_globals(data: bytes) -> set:
    """The 'module.name' globals a protocol-2+ pickle names (STACK_GLOBAL after two strings)."""
    names, pushed, memo = set(), [], {}
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            pushed.append(arg)
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            pushed.append(memo.get(arg))
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = pushed[-1] if pushed else None
        elif op.name == "STACK_GLOBAL":
            names.add(f"{pushed[-2]}.{pushed[-1]}")
            pushed.append(None)
        elif op.name == "GLOBAL":
            names.add(arg.replace(" ", "."))
            pushed.append(None)
        elif op.stack_after:
            pushed.append(None)  # something else was pushed
    return names


@pytest.fixture
def shm_dir():
    """A private directory on the RAM disk (or on disk where /dev/shm is absent)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    d = tempfile.mkdtemp(prefix="ckpt-test-", dir=base)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def open_fds_into(directory: str, pid="self") -> list:
    out = []
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith(directory + "/"):
            out.append(target)
    return out


# ---------------------------------------------------------------------------------------
# Order rule and format
# ---------------------------------------------------------------------------------------

LAYER_LEAVES = [  # SPEC section 4: inside a layer, string order of module paths
    "moe/linear/w", "moe/linear_1/w", "moe/linear_v/w",
    "multi_head_attention/key/w", "multi_head_attention/linear/w",
    "multi_head_attention/query/w", "multi_head_attention/value/w",
    "rms_norm/scale", "rms_norm_1/scale", "rms_norm_2/scale", "rms_norm_3/scale", "router/w",
]
LAYER_ORDER_12 = [0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9]


def expected_order(layer_order):
    paths = ["params/language_model/in_out_embed/embeddings", "params/language_model/rms_norm/scale"]
    for i in layer_order:
        paths += [f"params/transformer/decoder_layer_{i}/{leaf}" for leaf in LAYER_LEAVES]
    return paths


def test_order_rule_12_layers_model_tree():
    shapes = model.param_shapes(model.tiny_config(num_layers=12))
    paths, leaves, _ = ck.checkpoint_leaves(ck.TrainingState(params=shapes))
    assert paths == expected_order(LAYER_ORDER_12)
    assert len(leaves) == 2 + 12 * 12
    first = {i: paths.index(f"params/transformer/decoder_layer_{i}/moe/linear/w") for i in (2, 10)}
    assert first[10] < first[2]
    assert isinstance(leaves[paths.index("params/transformer/decoder_layer_3/moe/linear_1/w")],
                      QuantizedWeight8bit)


def test_order_rule_on_disk(tmp_path):
    # The router of layer i holds the value i: file tensor{k} must hold the k-th path's leaf.
    rng = np.random.default_rng(0)
    params = small_tree(rng, num_layers=12, d=8, f=16, e=2)
    for i in range(12):
        params[f"transformer/decoder_layer_{i}/router"]["w"] = np.full((8, 2), i, np.float32)
    ck.save(params, tmp_path)
    order = expected_order(LAYER_ORDER_12)
    for i in (2, 10, 11):
        k = order.index(f"params/transformer/decoder_layer_{i}/router/w")
        assert (ck.fast_unpickle(tmp_path / f"tensor{k:05d}_000") == i).all()
    k_embed = order.index("params/language_model/in_out_embed/embeddings")
    np.testing.assert_array_equal(ck.fast_unpickle(tmp_path / f"tensor{k_embed:05d}_000"),
                                  params["language_model/in_out_embed"]["embeddings"])
    assert sorted(os.listdir(tmp_path)) == [f"tensor{k:05d}_000" for k in range(len(order))]


def test_saved_files_use_exactly_the_release_globals(tmp_path):
    rng = np.random.default_rng(1)
    ck.save(small_tree(rng, num_layers=1), tmp_path)
    arr = (tmp_path / "tensor00000_000").read_bytes()
    qw = (tmp_path / "tensor00002_000").read_bytes()
    assert arr[:2] == b"\x80\x04"  # protocol 4, as the release writes
    assert pickle_globals(arr) == {"numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype"}
    assert pickle_globals(qw) == {"model.QuantizedWeight8bit", "numpy._core.multiarray._reconstruct",
                                  "numpy.ndarray", "numpy.dtype", "ml_dtypes.bfloat16"}


def test_fast_pickle_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    value = random_qw(rng, (3, 16, 8), 8)
    ck.fast_pickle(value, tmp_path / "x")
    got = ck.fast_unpickle(tmp_path / "x")
    assert isinstance(got, QuantizedWeight8bit)
    assert got.scales.dtype == BF16 and got.weight.dtype == np.int8
    assert_bit_exact(value, got)
    f = rng.standard_normal((5, 7)).astype(np.float32)
    ck.fast_pickle(np.asfortranarray(f), tmp_path / "y")
    np.testing.assert_array_equal(ck.fast_unpickle(tmp_path / "y"), f)
    assert sorted(os.listdir(tmp_path)) == ["x", "y"]  # no temporary files left behind


# ---------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    config = model.tiny_config()
    shapes = model.param_shapes(config)
    values = random_values(shapes, seed=3)
    directory = tmp_path_factory.mktemp("tiny") / "ckpt-0"
    ck.save(values, directory)
    return config, shapes, values, directory.parent


@pytest.mark.parametrize("mesh_shape", [(1, 1), (1, 8), (2, 4)])
def test_round_trip_model_tree(tiny_checkpoint, mesh_shape):
    config, shapes, values, root = tiny_checkpoint
    mesh = mesh_of(mesh_shape)
    shardings = model.param_shardings(config, mesh)
    # The release passes the parent directory; restore finds ckpt-0 inside it.
    got = ck.restore(root, ck.TrainingState(params=shapes), mesh,
                     state_sharding=ck.TrainingState(params=shardings), progress=False)
    assert set(got) == set(values)
    assert_bit_exact(values, got)
    for path_leaf, want in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(shardings)):
        assert path_leaf.sharding == want
    # Each device holds exactly its own slice of the saved array.
    for arr, host in zip(flat(got), flat(values)):
        for shard in arr.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(host)[shard.index])


def test_round_trip_release_style_specs_and_float_shapes(tmp_path):
    # The release describes quantized weights by float32 shapes and gives PartitionSpecs
    # (None meaning replicated). Scales take the weight's spec minus non-dividing axes.
    rng = np.random.default_rng(4)
    params = small_tree(rng, num_layers=1)
    ck.save(params, tmp_path)
    float_shapes = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.weight.shape if isinstance(x, QuantizedWeight8bit) else x.shape,
                                       np.float32),
        params, is_leaf=lambda x: isinstance(x, QuantizedWeight8bit))
    specs = jax.tree_util.tree_map(lambda _: None, float_shapes)
    specs["transformer/decoder_layer_0/moe/linear_1"]["w"] = P(None, "model", "data")
    specs["transformer/decoder_layer_0/multi_head_attention/query"]["w"] = P("data", "model")
    mesh = mesh_of((2, 4))
    got = ck.restore(tmp_path, ck.TrainingState(params=float_shapes), mesh, (1, 1), True, specs,
                     progress=False)
    assert_bit_exact(params, got)
    w1 = got["transformer/decoder_layer_0/moe/linear_1"]["w"]
    assert w1.weight.sharding.spec == P(None, "model", "data")
    assert w1.scales.sharding.spec == P(None, "model", "data")  # scales [4, 8, 16]
    q = got["transformer/decoder_layer_0/multi_head_attention/query"]["w"]
    assert q.scales.sharding.spec == P(None, "model")  # scales [1, 16]: no data split
    assert got["language_model/rms_norm"]["scale"].sharding.spec == P()


def test_numpy1_module_names_load(tmp_path):
    rng = np.random.default_rng(5)
    params = small_tree(rng, num_layers=1)
    ck.save(params, tmp_path)
    mapping = {"numpy._core.multiarray": "numpy.core.multiarray"}
    for name in os.listdir(tmp_path):
        p = tmp_path / name
        data = rewrite_strings(p.read_bytes(), mapping)
        assert b"numpy._core" not in data and b"numpy.core.multiarray" in data
        p.write_bytes(data)
    qw_globals = pickle_globals((tmp_path / "tensor00002_000").read_bytes())
    assert "numpy.core.multiarray._reconstruct" in qw_globals
    assert "model.QuantizedWeight8bit" in qw_globals
    got = ck.restore(tmp_path, shapes_of(params), mesh_of((1, 1)), progress=False)
    assert_bit_exact(params, got)


def test_bfloat16_from_other_ml_dtypes_module_and_protocol5(tmp_path):
    rng = np.random.default_rng(6)
    value = random_qw(rng, (16, 8), 8)
    data = pickle.dumps(value, protocol=4)
    data = rewrite_strings(data, {"ml_dtypes": "ml_dtypes._ml_dtypes_ext"})
    assert "ml_dtypes._ml_dtypes_ext.bfloat16" in pickle_globals(data)
    (tmp_path / "a").write_bytes(data)
    assert_bit_exact(value, ck.fast_unpickle(tmp_path / "a"))
    (tmp_path / "b").write_bytes(pickle.dumps(value, protocol=5))  # numpy._core.numeric._frombuffer
    assert_bit_exact(value, ck.fast_unpickle(tmp_path / "b"))


# ---------------------------------------------------------------------------------------
# Hostile files
# ---------------------------------------------------------------------------------------


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: str) -> dict:
    """name -> (pickle bytes, text the error must name, whether plain pickle runs it)."""
    import builtins

    touch = f"open({marker!r}, 'w').close()"
    getattr_chain = (  # getattr(__import__('os'), 'system')('touch marker'), protocol 0
        b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V"
        + f"touch {marker}".encode() + b"\ntR."
    )
    fake_qw = type("QuantizedWeight8bit", (), {
        "__module__": "model",
        "__reduce__": lambda self: (os.system, (f"touch {marker}",)),
    })
    qw_with_args = pickle.dumps(_Reduce(QuantizedWeight8bit, (1, 2)), protocol=4)
    foreign_subtype = pickle.dumps(
        _Reduce(np._core.multiarray._reconstruct, (QuantizedWeight8bit, (0,), b"b")), protocol=4)
    ndarray_call = pickle.dumps(_Reduce(np.ndarray, ((2,), np.dtype("f4"))), protocol=4)
    hidden = pickle.dumps(_Reduce(os.system, (f"touch {marker}",)), protocol=4)
    obj_array = np.array([_Reduce(os.system, (f"touch {marker}",)), hidden], dtype=object)
    qw_object_weight = QuantizedWeight8bit(np.array([1, "x"], dtype=object), np.zeros((1, 2), BF16))
    return {
        "os.system": (pickle.dumps(_Reduce(os.system, (f"touch {marker}",))), "posix.system", True),
        "subprocess": (pickle.dumps(_Reduce(subprocess.check_call, (["touch", marker],))),
                       "subprocess.check_call", True),
        "eval": (pickle.dumps(_Reduce(builtins.eval, (touch,))), "builtins.eval", True),
        "exec": (pickle.dumps(_Reduce(builtins.exec, (touch,))), "builtins.exec", True),
        "getattr": (getattr_chain, "builtins.getattr", True),
        "reduce_on_allowed_class_name": (pickle.dumps(fake_qw(), protocol=4), "posix.system", True),
        "allowed_class_called_with_args": (qw_with_args, "called with arguments", False),
        "reconstruct_foreign_subtype": (foreign_subtype, "refused _reconstruct", False),
        "ndarray_called_directly": (ndarray_call, "numpy.ndarray", False),
        "object_array_hiding_pickle": (pickle.dumps(obj_array, protocol=4), "object dtype", True),
        "quantized_with_object_weight": (pickle.dumps(qw_object_weight, protocol=4), "object dtype", False),
        "structured_dtype": (pickle.dumps(np.zeros(2, dtype=[("a", "O"), ("b", "f4")]), protocol=4),
                             "dtype spec", False),
    }


@pytest.mark.parametrize("name", sorted(_payloads("/x")))
def test_hostile_file_is_refused_without_side_effect(tmp_path, name):
    marker = str(tmp_path / "pwned")
    data, must_name, live = _payloads(marker)[name]
    path = tmp_path / "tensor00000_000"
    path.write_bytes(data)
    with pytest.raises(ck.UnsafeCheckpointError) as info:
        ck.fast_unpickle(path)
    message = str(info.value)
    assert str(path) in message and must_name in message
    assert not os.path.exists(marker)
    if live:  # control: the plain pickle module really runs this payload
        try:
            pickle.loads(data)
        except Exception:
            pass
        assert os.path.exists(marker)


def test_hostile_file_in_restore_names_file_and_parameter(tmp_path):
    rng = np.random.default_rng(7)
    params = small_tree(rng, num_layers=1)
    ck.save(params, tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "tensor00003_000").write_bytes(pickle.dumps(_Reduce(os.system, (f"touch {marker}",))))
    with pytest.raises(ck.UnsafeCheckpointError) as info:
        ck.restore(tmp_path, shapes_of(params), mesh_of((1, 1)), progress=False)
    message = str(info.value)
    assert "tensor00003_000" in message and "posix.system" in message
    assert expected_order([0])[3] in message  # leaf 3 in SPEC order
    assert expected_order([0])[3] == "params/transformer/decoder_layer_0/moe/linear_1/w"
    assert not marker.exists()


# ---------------------------------------------------------------------------------------
# Damaged and mismatched checkpoints
# ---------------------------------------------------------------------------------------


@pytest.fixture
def saved_small(tmp_path):
    rng = np.random.default_rng(8)
    params = small_tree(rng, num_layers=1)
    ck.save(params, tmp_path)
    return params, tmp_path


def _restore(params, directory, **kw):
    kw.setdefault("progress", False)
    return ck.restore(directory, shapes_of(params), mesh_of((1, 1)), **kw)


def test_truncated_file(saved_small):
    params, d = saved_small
    f = d / "tensor00002_000"  # decoder_layer_0/moe/linear/w
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CorruptCheckpointError) as info:
        _restore(params, d)
    message = str(info.value)
    assert "tensor00002_000" in message and "truncated pickle" in message
    assert "params/transformer/decoder_layer_0/moe/linear/w" in message
    assert not isinstance(info.value, ck.UnsafeCheckpointError)


@pytest.mark.parametrize("damage,expected", [
    (lambda b: b"", "truncated pickle"),
    (lambda b: bytes(range(256)) * 4, "corrupt pickle"),
    (lambda b: b + b"\x00junk", "5 unexpected bytes after the end of the pickle"),
    (lambda b: pickle.dumps({"w": 1}, protocol=4), "holds a dict"),
])
def test_corrupt_file(saved_small, damage, expected):
    params, d = saved_small
    f = d / "tensor00001_000"  # language_model/rms_norm/scale
    f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(ck.CorruptCheckpointError) as info:
        _restore(params, d)
    assert "tensor00001_000" in str(info.value) and expected in str(info.value)
    assert "params/language_model/rms_norm/scale" in str(info.value)


def test_missing_file(saved_small):
    params, d = saved_small
    os.unlink(d / "tensor00005_000")
    with pytest.raises(ck.MissingCheckpointFileError) as info:
        _restore(params, d)
    assert str(info.value) == (
        f"{d}: 1 tensor file(s) missing: tensor00005_000 "
        "(params/transformer/decoder_layer_0/multi_head_attention/key/w)")
    assert expected_order([0])[5] == "params/transformer/decoder_layer_0/multi_head_attention/key/w"
    with pytest.raises(ck.MissingCheckpointFileError, match="checkpoint directory not found"):
        _restore(params, d / "nope")


def test_shape_and_dtype_mismatch(saved_small):
    params, d = saved_small
    shapes = shapes_of(params)
    shapes["language_model/rms_norm"]["scale"] = jax.ShapeDtypeStruct((17,), np.float32)
    with pytest.raises(ck.CheckpointMismatchError) as info:
        ck.restore(d, shapes, mesh_of((1, 1)), progress=False)
    assert str(info.value) == (f"{d}/tensor00001_000: parameter params/language_model/rms_norm/scale: "
                               "expected float32[17], found float32[16]")
    shapes = shapes_of(params)
    shapes["language_model/rms_norm"]["scale"] = jax.ShapeDtypeStruct((16,), BF16)
    with pytest.raises(ck.CheckpointMismatchError, match=r"expected bfloat16\[16\], found float32\[16\]"):
        ck.restore(d, shapes, mesh_of((1, 1)), progress=False)
    shapes = shapes_of(params)
    q = shapes["transformer/decoder_layer_0/multi_head_attention/query"]
    q["w"] = QuantizedWeight8bit(q["w"].weight, jax.ShapeDtypeStruct((8, 16), BF16))
    with pytest.raises(ck.CheckpointMismatchError) as info:
        ck.restore(d, shapes, mesh_of((1, 1)), progress=False)
    assert ("expected QuantizedWeight8bit(weight int8[16, 16], scales bfloat16[8, 16]), "
            "found QuantizedWeight8bit(weight int8[16, 16], scales bfloat16[1, 16])") in str(info.value)


def test_extra_tensor_files_and_name_mismatch(saved_small):
    params, d = saved_small
    shapes = shapes_of(params)
    del shapes["transformer/decoder_layer_0/router"]
    with pytest.raises(ck.CheckpointMismatchError, match="holds 14 tensors for host 000 but the code's "
                       "parameter tree has 13 leaves"):
        ck.restore(d, shapes, mesh_of((1, 1)), progress=False)
    # Shardings naming other parameters than the checkpoint tree: both sides listed.
    mesh = mesh_of((1, 1))
    specs = jax.tree_util.tree_map(lambda _: P(), shapes_of(params),
                                   is_leaf=lambda x: isinstance(x, QuantizedWeight8bit))
    specs["transformer/decoder_layer_0/routerX"] = specs.pop("transformer/decoder_layer_0/router")
    with pytest.raises(ck.CheckpointMismatchError) as info:
        ck.restore(d, shapes_of(params), mesh, state_sharding=specs, progress=False)
    message = str(info.value)
    assert "Missing in the shardings (code): ['params/transformer/decoder_layer_0/router/w']" in message
    assert "Missing in the checkpoint shapes: ['params/transformer/decoder_layer_0/routerX/w']" in message


def test_failing_worker_cancels_the_rest(tmp_path, monkeypatch):
    rng = np.random.default_rng(9)
    params = {f"m{i}": {"w": rng.standard_normal(64 * 1024).astype(np.float32)} for i in range(8)}
    ck.save(params, tmp_path)
    (tmp_path / "tensor00000_000").write_bytes(b"\x80\x04garbage")
    touched = set()

    def slow(path, nbytes):
        touched.add(os.path.basename(path))
        time.sleep(0.01)

    monkeypatch.setattr(ck, "_CHUNK_BYTES", 4096)
    monkeypatch.setattr(ck, "_chunk_hook", slow)
    with pytest.raises(ck.CorruptCheckpointError, match="tensor00000_000"):
        ck.restore(tmp_path, shapes_of(params), mesh_of((1, 1)), num_workers=2, use_shm=False,
                   progress=False)
    # Worker 1 was mid-file (256 KB at 4 KB a chunk) and stopped; files 2..7 never opened.
    assert touched <= {"tensor00000_000", "tensor00001_000"}


def test_memory_budget_bounds_bytes_in_flight(tmp_path):
    rng = np.random.default_rng(10)
    params = {f"m{i}": {"w": rng.standard_normal(1000 * (i + 1)).astype(np.float32)} for i in range(10)}
    ck.save(params, tmp_path)
    paths, leaves, _ = ck.checkpoint_leaves(shapes_of(params))
    sizes = [os.path.getsize(tmp_path / f"tensor{i:05d}_000") for i in range(10)]
    stats = {}
    mesh = mesh_of((1, 1))
    out = ck.load_tensors(leaves, str(tmp_path), shardings=[NamedSharding(mesh, P())] * 10,
                          paths=paths, num_workers=8, use_shm=True, progress=False, _stats=stats)
    assert stats["limit"] == 2 * max(sizes)  # 10% of the total is smaller than one file
    assert 0 < stats["peak_inflight"] <= stats["limit"]
    assert stats["bytes"] == sum(sizes)
    assert_bit_exact([params[f"m{i}"]["w"] for i in range(10)], out)


def test_load_logs_throughput(saved_small, caplog):
    params, d = saved_small
    with caplog.at_level(logging.INFO, logger="checkpoint"):
        _restore(params, d)
    assert any("Loaded 14 tensors" in r.message and "GB/s" in r.message for r in caplog.records)


# ---------------------------------------------------------------------------------------
# /dev/shm hygiene and fallbacks
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("o_tmpfile", [True, False])
def test_shm_is_used_and_nothing_outlives_a_load(saved_small, shm_dir, monkeypatch, o_tmpfile):
    params, d = saved_small
    monkeypatch.setattr(ck, "_USE_O_TMPFILE", o_tmpfile)
    monkeypatch.setattr(ck, "_SHM_MARGIN_BYTES", 0)
    seen = []
    monkeypatch.setattr(ck, "_chunk_hook", lambda path, n: seen.extend(open_fds_into(shm_dir)))
    # One worker: with several, the create-then-unlink fallback has a microsecond window
    # in which another thread's scan could see the name.
    got = _restore(params, d, shm_dir=shm_dir, num_workers=1, use_shm=True)
    assert_bit_exact(params, got)
    assert seen and all(t.endswith("(deleted)") for t in seen)  # used, and nameless
    assert os.listdir(shm_dir) == [] and open_fds_into(shm_dir) == []


@pytest.mark.parametrize("o_tmpfile", [True, False])
def test_failed_load_leaves_nothing_in_shm(saved_small, shm_dir, monkeypatch, o_tmpfile):
    params, d = saved_small
    monkeypatch.setattr(ck, "_USE_O_TMPFILE", o_tmpfile)
    monkeypatch.setattr(ck, "_SHM_MARGIN_BYTES", 0)
    f = d / "tensor00009_000"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(ck.CorruptCheckpointError, match="tensor00009_000"):
        _restore(params, d, shm_dir=shm_dir, num_workers=3, use_shm=True)
    assert os.listdir(shm_dir) == [] and open_fds_into(shm_dir) == []


CHILD = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r})
    import checkpoint as ck
    ck._USE_O_TMPFILE = {o_tmpfile!r}
    ck._SHM_MARGIN_BYTES = 0
    ck._CHUNK_BYTES = 64 * 1024
    def hook(path, n):
        print("CHUNK", flush=True)
        time.sleep(0.02)
    ck._chunk_hook = hook
    ck.fast_unpickle({file!r}, use_shm=True, shm_dir={shm!r})
    print("DONE", flush=True)
""")


@pytest.mark.parametrize("o_tmpfile", [True, False])
def test_killed_child_leaves_nothing_in_shm(tmp_path, shm_dir, o_tmpfile):
    f = tmp_path / "tensor00000_000"
    ck.fast_pickle(np.zeros(8 * 1024 * 1024, np.uint8), f)  # 8 MB = 128 chunks, ~3 s
    script = CHILD.format(repo=REPO, o_tmpfile=o_tmpfile, file=str(f), shm=shm_dir)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        assert child.stdout.readline().strip() == "CHUNK"  # mid-copy now
        held = open_fds_into(shm_dir, pid=child.pid)
        assert len(held) == 1 and held[0].endswith("(deleted)")
        assert os.listdir(shm_dir) == []
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert os.listdir(shm_dir) == []


def test_direct_read_when_shm_missing_small_or_off(saved_small, shm_dir, monkeypatch):
    params, d = saved_small
    seen = []
    monkeypatch.setattr(ck, "_chunk_hook", lambda path, n: seen.extend(open_fds_into(shm_dir)))
    assert_bit_exact(params, _restore(params, d, shm_dir=shm_dir, use_shm=False))
    assert_bit_exact(params, _restore(params, d, shm_dir=os.path.join(shm_dir, "absent"),
                                      use_shm=True))
    monkeypatch.setattr(ck, "_SHM_MARGIN_BYTES", 1 << 60)  # "too small"
    assert_bit_exact(params, _restore(params, d, shm_dir=shm_dir, use_shm=True))
    assert seen == []


def test_copy_failure_falls_back_and_progress_stays_exact(saved_small, shm_dir, monkeypatch):
    params, d = saved_small
    monkeypatch.setattr(ck, "_SHM_MARGIN_BYTES", 0)
    monkeypatch.setattr(ck, "_CHUNK_BYTES", 256)
    real_sendfile = os.sendfile
    calls = []

    def sendfile(out_fd, in_fd, offset, count):
        calls.append(offset)
        if offset > 0:  # the RAM disk "fills up" after the first chunk
            raise OSError(28, "No space left on device")
        return real_sendfile(out_fd, in_fd, offset, count)

    monkeypatch.setattr(ck.os, "sendfile", sendfile)
    counted = []
    monkeypatch.setattr(ck, "_chunk_hook", lambda path, n: counted.append(n))
    assert_bit_exact(params, _restore(params, d, shm_dir=shm_dir, use_shm=True))
    total = sum(os.path.getsize(d / n) for n in os.listdir(d))
    assert any(offset > 0 for offset in calls) and any(n < 0 for n in counted)
    assert sum(counted) == total
    assert os.listdir(shm_dir) == [] and open_fds_into(shm_dir) == []


# ---------------------------------------------------------------------------------------
# Rename / exclude rules, init_state, host shards
# ---------------------------------------------------------------------------------------


def test_replace_with_load_state_rules():
    init = {"new/a": {"w": np.zeros(2)}, "new/b": {"w": np.zeros(3)}, "keep": {"w": np.zeros(1)},
            "absent": {"w": np.full(1, 7.0)}}
    load = {"old/a": {"w": np.ones(2)}, "old/b": {"w": np.full(3, 2.0)}, "keep": {"w": np.full(1, 5.0)}}
    out = ck.replace_with_load_state(init, load, [(r"^new/(.*)$", r"old/\1")], [r"^keep/"])
    np.testing.assert_array_equal(out["new/a"]["w"], [1, 1])
    np.testing.assert_array_equal(out["new/b"]["w"], [2, 2, 2])
    np.testing.assert_array_equal(out["keep"]["w"], [0])      # excluded: init value
    np.testing.assert_array_equal(out["absent"]["w"], [7])    # not in checkpoint: init value
    assert ck.get_load_path_str("x/y", [("x", "a"), ("y", "b")]) == "a/y"  # first match wins
    with pytest.raises(ck.CheckpointMismatchError, match="parameter new/a/w"):
        ck.replace_with_load_state({"new/a": {"w": np.zeros(5)}}, load, [(r"^new/", "old/")])


def test_restore_with_init_state_renames_and_skips_excluded_files(saved_small):
    params, d = saved_small
    shapes = shapes_of(params)
    rng = np.random.default_rng(11)
    init = {k.replace("decoder_layer_0", "block_0"): v for k, v in params.items()}
    init = jax.tree_util.tree_map(lambda x: np.zeros_like(x), init)
    init["transformer/block_0/router"]["w"] = rng.standard_normal((16, 4)).astype(np.float32)
    # The excluded router's file may be absent: excluded tensors are never read.
    os.unlink(d / "tensor00013_000")
    got = ck.restore(d, shapes, mesh_of((1, 8)), init_state=ck.TrainingState(params=init),
                     rename_rules=[(r"/block_0/", "/decoder_layer_0/")], exclude_rules=[r"/router/"],
                     progress=False)
    expected = {k.replace("decoder_layer_0", "block_0"): dict(v) for k, v in params.items()}
    expected["transformer/block_0/router"]["w"] = init["transformer/block_0/router"]["w"]
    assert set(got) == set(expected)
    assert_bit_exact(expected, got)
    assert all(isinstance(x, jax.Array) for x in flat(got))


def test_host_shards(tmp_path):
    a, b = np.arange(4, dtype=np.float32), np.arange(4, 8, dtype=np.float32)
    ck.save({"x": a}, tmp_path, host_index=0)
    ck.save({"x": b}, tmp_path, host_index=1)
    shape = [jax.ShapeDtypeStruct((4,), np.float32)]
    np.testing.assert_array_equal(ck.load_tensors(shape, str(tmp_path), host_index=1, num_hosts=2)[0], b)
    np.testing.assert_array_equal(ck.load_tensors(shape, str(tmp_path), host_index=0, num_hosts=2)[0], a)
    with pytest.raises(ck.MissingCheckpointFileError, match=r"no host shard _002.*shards \[0, 1\]"):
        ck.load_tensors(shape, str(tmp_path), host_index=2, num_hosts=3)
    os.unlink(tmp_path / "tensor00000_001")
    # Only _000 left: every process reads it.
    np.testing.assert_array_equal(ck.load_tensors(shape, str(tmp_path), host_index=1, num_hosts=2)[0], a)


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    ck.save({"a": {"w": np.ones(2, np.float32)}, "b": {"w": np.ones(2, np.float32)}}, tmp_path)
    with pytest.raises(FileExistsError, match="already holds 2 tensor files"):
        ck.save({"a": {"w": np.zeros(2, np.float32)}}, tmp_path)
    ck.save({"a": {"w": np.zeros(2, np.float32)}}, tmp_path, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["tensor00000_000"]  # the stale second file is gone
    with pytest.raises(ValueError, match="cannot be stored"):
        ck.save({"a": np.array([object()])}, tmp_path / "o")


# ---------------------------------------------------------------------------------------
# --inspect
# ---------------------------------------------------------------------------------------


def test_inspect_cli(tiny_checkpoint, tmp_path):
    config, shapes, values, root = tiny_checkpoint
    out = io.StringIO()
    assert ck.inspect_checkpoint(str(root), "tiny", out=out) == 0
    text = out.getvalue()
    assert "checkpoint complete" in text
    line = next(l for l in text.splitlines() if "decoder_layer_0/moe/linear_1/w" in l)
    assert line.split()[:5] == ["3", "params/transformer/decoder_layer_0/moe/linear_1/w", "int8",
                                "[8,", "88,"]
    assert "bfloat16[8, 8, 64]" in line
    copy = tmp_path / "c"
    shutil.copytree(root / "ckpt-0", copy)
    os.unlink(copy / "tensor00003_000")
    n_leaves = len(ck.checkpoint_leaves(shapes)[1])
    shutil.copy(copy / "tensor00000_000", copy / f"tensor{n_leaves:05d}_000")
    out = io.StringIO()
    assert ck.inspect_checkpoint(str(copy), "tiny", out=out) == 1
    text = out.getvalue()
    assert "missing 1 file(s): tensor00003_000" in text
    assert "1 file(s) beyond the" in text
    # The real command line, as a user runs it.
    run = subprocess.run([sys.executable, os.path.join(REPO, "checkpoint.py"), "--inspect", str(copy)],
                         capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 1 and "missing 1 file(s): tensor00003_000" in run.stdout


# ---------------------------------------------------------------------------------------
# Large payloads: read into aligned buffers of ours
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_shm", [True, False])
def test_large_arrays_round_trip_aligned_and_writable(tmp_path, shm_dir, monkeypatch, use_shm):
    monkeypatch.setattr(ck, "_SHM_MARGIN_BYTES", 0)
    rng = np.random.default_rng(12)
    params = {"big": {"w": rng.standard_normal((1024, 700)).astype(np.float32)},     # 2.8 MB
              "q": {"w": random_qw(rng, (4, 512, 640), 8)}}                          # 1.3 MB int8
    ck.save(params, tmp_path)
    for i in range(2):
        got = ck.fast_unpickle(tmp_path / f"tensor{i:05d}_000", use_shm=use_shm, shm_dir=shm_dir)
        a = got.weight if isinstance(got, QuantizedWeight8bit) else got
        assert a.ctypes.data % 64 == 0 and a.flags.writeable
    got = ck.restore(tmp_path, shapes_of(params), mesh_of((2, 4)), use_shm=use_shm,
                     shm_dir=shm_dir, progress=False)
    assert_bit_exact(params, got)
    (tmp_path / "p5").write_bytes(pickle.dumps(params["big"]["w"], protocol=5))
    p5 = ck.fast_unpickle(tmp_path / "p5", use_shm=use_shm, shm_dir=shm_dir)
    assert p5.ctypes.data % 64 == 0
    np.testing.assert_array_equal(p5, params["big"]["w"])
    f = tmp_path / "tensor00000_000"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ck.CorruptCheckpointError, match="tensor00000_000: truncated pickle"):
        ck.fast_unpickle(f, use_shm=use_shm, shm_dir=shm_dir)


def test_payload_merges_prefix_and_ignores_stale_entries():
    n = 2 * ck._DIVERT_MIN_BYTES
    real = np.random.default_rng(13).integers(0, 256, n, dtype=np.uint8)
    # The unpickler holds the first 100 bytes itself; our buffer got the rest.
    data = bytearray(n)
    data[:100] = real[:100].tobytes()
    data[100:116] = ck._DIVERT_NONCE
    base = ck._address(data)
    diverted = {base + 100: real[100:].copy()}
    np.testing.assert_array_equal(np.frombuffer(ck._payload(data, diverted), np.uint8), real)
    assert diverted == {}
    # An entry at this address whose nonce is not there (memory reused): data is used as is.
    plain = bytearray(real.tobytes())
    stale = {ck._address(plain): np.zeros(n, np.uint8)}
    assert ck._payload(plain, stale) is plain


def test_auto_mode_copies_through_shm_only_from_network_filesystems(saved_small, shm_dir, monkeypatch):
    params, d = saved_small
    monkeypatch.setattr(ck, "_SHM_MARGIN_BYTES", 0)
    for fstype, expect_shm in [("nfs4", True), ("fuse.gcsfuse", True), ("ext4", False), ("xfs", False)]:
        monkeypatch.setattr(ck, "filesystem_type", lambda path, t=fstype: t)
        seen = []
        monkeypatch.setattr(ck, "_chunk_hook", lambda path, n: seen.extend(open_fds_into(shm_dir)))
        assert_bit_exact(params, _restore(params, d, shm_dir=shm_dir, num_workers=1))
        assert bool(seen) == expect_shm, fstype
    with pytest.raises(ValueError, match="use_shm must be"):
        _restore(params, d, use_shm="yes")


def test_filesystem_type_from_mountinfo(tmp_path, monkeypatch):
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "40 22 0:50 / /mnt/data rw shared:2 - nfs4 server:/export rw\n"
        "41 40 0:51 / /mnt/data/local\\040disk rw shared:3 - xfs /dev/sdb rw\n"
        "42 22 0:52 / /mnt/gcs rw shared:4 - fuse.gcsfuse bucket rw\n"
    )
    monkeypatch.setattr(ck, "_MOUNTINFO", str(info))
    assert ck.filesystem_type("/home/user/ckpt") == "ext4"
    assert ck.filesystem_type("/mnt/data/ckpt-0") == "nfs4"
    assert ck.filesystem_type("/mnt/data/local disk/ckpt-0") == "xfs"   # longest mount wins
    assert ck.filesystem_type("/mnt/database") == "ext4"                # not a prefix match
    assert ck.filesystem_type("/mnt/gcs/x") == "fuse.gcsfuse"
    monkeypatch.setattr(ck, "_MOUNTINFO", str(tmp_path / "absent"))
    assert ck.filesystem_type("/") == "unknown"


def test_release_style_training_state_class(saved_small):
    # The release's runners.py defines its own TrainingState; restore takes any NamedTuple
    # whose one field is `params`, for the shapes and for the shardings.
    from typing import Any, NamedTuple

    class ReleaseTrainingState(NamedTuple):
        params: Any

    params, d = saved_small
    shapes = ReleaseTrainingState(params=shapes_of(params))
    mesh = mesh_of((1, 8))
    specs = ReleaseTrainingState(params=jax.tree_util.tree_map(
        lambda _: P(), shapes_of(params), is_leaf=lambda x: isinstance(x, QuantizedWeight8bit)))
    got = ck.restore(d, shapes, mesh, (1, 1), True, specs, progress=False)
    assert isinstance(got, dict)
    assert_bit_exact(params, got)
    state = ck.restore(d, shapes, mesh, (1, 1), False, specs, progress=False)
    assert type(state) is ReleaseTrainingState
    assert_bit_exact(params, state.params)


def test_save_refuses_weights_transposed_for_inference(tmp_path):
    """Checkpoints keep the released layout: a tree from model.prepare_for_inference (int8
    stored transposed, the embedding table split into bf16 hi + lo) is refused with the
    parameter's path, and nothing is written."""
    cfg = model.tiny_config(num_layers=1)
    raw = model.init_random_params(cfg, 0)
    prepared = model.prepare_for_inference(raw, cfg)
    embed = "language_model/in_out_embed"
    with pytest.raises(ValueError, match="in_out_embed.*split into bf16 hi"):
        ck.save(prepared, str(tmp_path / "ckpt"))
    prepared[embed] = raw[embed]
    with pytest.raises(ValueError, match="decoder_layer_0.*transposed for inference"):
        ck.save(prepared, str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt").exists() or not any(
        name.startswith("tensor") for name in os.listdir(tmp_path / "ckpt"))
