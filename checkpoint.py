"""Load and save Grok-1 checkpoints in the released on-disk format, safely and fast.

The format (SPEC section 4): a directory of files `tensor{i:05d}_{h:03d}`, one per leaf of
`TrainingState(params=...)` flattened by `jax.tree_util` (dict keys sorted as strings), a
`QuantizedWeight8bit` being one leaf and one file; `h` is the host shard (the release has
only `000`). Each file is one pickle of a numpy array or of a `model.QuantizedWeight8bit`
holding an int8 weight and bfloat16 scales.

Several hosts: a single-shard checkpoint loads on any number of processes (each reads the
`_000` files and keeps what its devices need). `save` from an N-process run writes N host
shards: process h writes `tensor{i:05d}_{h:03d}` holding its host-local part of each leaf
(the block its devices hold; a leaf replicated across hosts is whole in every shard),
plus `host_shard_{h:03d}.json`, which gives each leaf's global shape and the block's
place in it. On restore each process reads only its own shard.

This module reads top to bottom in the order a load runs:
  errors -> safe unpickling (an allowlist; nothing in a file can run code) -> reading a file
  (through /dev/shm without ever leaving a temporary file behind, or directly) -> leaf order
  and file naming -> checking a leaf against what the code expects -> placing it on devices
  -> the threaded loader with a memory budget -> rename/exclude rules -> `restore` ->
  `save` -> the `--inspect` command line.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import errno
import fcntl
import io
import itertools
import json
import logging
import math
import os
import pickle
import pickletools
import queue
import re
import secrets
import shutil
import socket
import stat
import struct
import sys
import tempfile
import threading
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from model import QuantizedWeight8bit, SplitTable, TransposedWeight8bit

logger = logging.getLogger(__name__)

# Where the copy-through-RAM-disk path puts its (always anonymous) temporary files.
SHM_DIR = "/dev/shm"
# Files are read and copied in chunks of this size; between chunks a load checks for
# cancellation and advances the progress bar.
_CHUNK_BYTES = 64 * 1024 * 1024
# Keep this much of the RAM disk free for others when deciding to copy a file through it.
_SHM_MARGIN_BYTES = 256 * 1024 * 1024
# Create RAM-disk files with O_TMPFILE (no name ever exists). Tests turn it off to exercise
# the create-then-unlink fallback used where O_TMPFILE is not supported.
_USE_O_TMPFILE = True
# Array payloads at least this big are read straight into 64-byte-aligned numpy buffers
# owned by this module instead of the unpickler's bytes object (see _Reader.readinto).
_DIVERT_MIN_BYTES = 1 << 20
# Written into each bytes object whose read was diverted, to recognise it reliably later.
_DIVERT_NONCE = secrets.token_bytes(16)
# Test hook: called as hook(file_path, nbytes) after every chunk read or copied.
_chunk_hook: Optional[Callable[[str, int], None]] = None

_TENSOR_NAME = re.compile(r"^tensor(\d{5})_(\d{3})$")


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


class CheckpointError(Exception):
    """Base class of every error this module raises about a checkpoint."""


class MissingCheckpointFileError(CheckpointError, FileNotFoundError):
    """A tensor file (or the checkpoint directory) the load needs does not exist."""


class CorruptCheckpointError(CheckpointError):
    """A file is truncated, garbled, or holds something other than an array / quantized weight."""


class UnsafeCheckpointError(CorruptCheckpointError):
    """A file asks the unpickler for a global or an operation outside the format's allowlist."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint's tensors or parameter names differ from what the code expects."""


class CheckpointAccessError(CheckpointError, OSError):
    """A checkpoint file or directory cannot be read or written: permissions, a symlink loop,
    a directory or FIFO where a file should be, a file where the directory should be, I/O
    errors, a full disk."""


def _reason(e: OSError) -> str:
    """An OSError's reason without the file descriptor number or path it may carry."""
    return e.strerror or type(e).__name__


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return kind
    return "not a regular file"


def _open_regular(path: str) -> tuple[int, os.stat_result]:
    """(read-only fd, its stat) of `path`, which must be a regular file (symlinks followed).

    The type is checked before opening, and the open itself is non-blocking: a FIFO or
    device named like a tensor file can never block a load (the flag is cleared once the fd
    is known to be a regular file). Every failure is a CheckpointError naming `path`.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MissingCheckpointFileError(f"{path}: file not found") from None
    except OSError as e:  # ELOOP, EACCES, ENOTDIR, EIO, ...
        raise CheckpointAccessError(f"{path}: cannot read: {_reason(e)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointAccessError(
            f"{path}: is {_file_kind(st.st_mode)}, not a regular file; a checkpoint file must "
            "be a regular file (or a symbolic link to one)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MissingCheckpointFileError(f"{path}: file not found") from None
    except OSError as e:
        raise CheckpointAccessError(f"{path}: cannot open: {_reason(e)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced between stat and open
            raise CheckpointAccessError(
                f"{path}: is {_file_kind(st.st_mode)}, not a regular file")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


class _Cancelled(Exception):
    """Raised inside workers once another worker has failed."""


class TrainingState(NamedTuple):
    """The released checkpoint's top-level state: only the parameters."""

    params: Any


def _is_qw(x: Any) -> bool:
    return isinstance(x, QuantizedWeight8bit)


def _is_leaf(x: Any) -> bool:
    """A checkpoint leaf: one file. A SplitTable (inference only) is one too, so that save
    refuses it by name instead of writing its halves as two files."""
    return _is_qw(x) or isinstance(x, SplitTable)


# ---------------------------------------------------------------------------------------
# Safe unpickling
#
# A numpy array pickles (protocol 2-4) as
#   numpy._core.multiarray._reconstruct(numpy.ndarray, (0,), b'b')  + BUILD (1, shape,
#   numpy.dtype('f4', False, True) + BUILD (3, '<', None, None, None, -1, -1, 0), fortran, bytes)
# with `numpy.core.multiarray` instead under numpy 1.x, and the dtype spec being the class
# `ml_dtypes.bfloat16` for bfloat16. Protocol 5 uses numpy._core.numeric._frombuffer(buffer,
# dtype, shape, order). A QuantizedWeight8bit dataclass pickles as NEWOBJ of the class with
# no arguments + BUILD of its {'weight': ..., 'scales': ...} dict.
#
# The allowlist never hands the unpickler a real numpy callable or class: every allowed
# global resolves to a small object of this module that accepts exactly the call pattern
# above and validates it, and the real arrays are built afterwards from checked parts.
# Nothing else is reachable, so no byte sequence in a file can run code.
# ---------------------------------------------------------------------------------------

_ARRAY_RECONSTRUCT_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_FROMBUFFER_MODULES = ("numpy.core.numeric", "numpy._core.numeric")
_QW_MODULES = ("model", QuantizedWeight8bit.__module__, "__main__")

# Numeric dtypes a checkpoint may hold (numpy type codes); bfloat16 comes from ml_dtypes.
_ALLOWED_DTYPE_CODES = frozenset(
    "?,b1,i1,i2,i4,i8,u1,u2,u4,u8,f2,f4,f8,c8,c16".split(",")
)
_BF16 = np.dtype(ml_dtypes.bfloat16)

# Bounds on what a tensor file may ask the unpickler to build. The release's files use about
# 60-130 opcodes, lines of a few dozen bytes, integers of at most 64 bits and at most 4 dims.
_MAX_PICKLE_OPS = 4096
_MAX_PICKLE_LINE = 1024  # text lines (old protocols): GLOBAL names, STRING / UNICODE
_MAX_NUMBER_LINE = 32  # text numbers: INT, LONG, FLOAT, PUT, GET
_MAX_INT_BYTES = 9  # LONG1 / LONG4 payloads: a dimension never needs more than 64 bits
_MAX_NDIM = 32
_MAX_DIM = (1 << 63) - 1


def _show(x: Any, depth: int = 0) -> str:
    """A short, safe description of an untrusted unpickled value for error messages: bounded
    in length and nesting, no huge integer's digits, and no contents of a bytes object
    longer than 32 bytes (in --inspect's skip-data mode those were never read from the
    file, so their memory holds whatever was there before)."""
    kind = type(x)
    if x is None or kind in (bool, float):
        return repr(x)
    if kind is int:
        return repr(x) if x.bit_length() <= 64 else f"<int of {x.bit_length()} bits>"
    if kind is str:
        return repr(x[:80]) + ("..." if len(x) > 80 else "")
    if kind in (bytes, bytearray):
        return repr(x) if len(x) <= 32 else f"<{kind.__name__} of {len(x)} bytes>"
    if kind in (tuple, list):
        if depth >= 3:
            return f"<{kind.__name__} of {len(x)} items>"
        inner = ", ".join(_show(v, depth + 1) for v in x[:6])
        if len(x) > 6:
            inner += f", ... ({len(x)} items)"
        return f"({inner})" if kind is tuple else f"[{inner}]"
    if kind is dict:
        keys = ", ".join(_show(k, depth + 1) for k in itertools.islice(x, 6))
        return f"<dict of {len(x)} items, keys {keys}{', ...' if len(x) > 6 else ''}>"
    if isinstance(x, _StandIn):
        return x._label
    if isinstance(x, type) and issubclass(x, _StandIn):
        return f"the class {x._label}"
    return f"<{kind.__name__}>"


# ---- bounding the opcode stream before unpickling ---------------------------------------

def _opcode_table() -> dict[int, tuple[str, int, str]]:
    """opcode byte -> (name, argument size, argument type name); the size is pickletools'
    count of bytes, or one of its markers (a text line, or a length-prefixed argument)."""
    return {op.code.encode("latin-1")[0]: (op.name, op.arg.n if op.arg else 0,
                                           op.arg.name if op.arg else "")
            for op in pickletools.opcodes}


_OPCODES = _opcode_table()
_LENGTH_PREFIX = {  # argument-size marker -> (bytes of the length, struct format)
    pickletools.TAKEN_FROM_ARGUMENT1: (1, "<B"),
    pickletools.TAKEN_FROM_ARGUMENT4: (4, "<i"),
    pickletools.TAKEN_FROM_ARGUMENT4U: (4, "<I"),
    pickletools.TAKEN_FROM_ARGUMENT8U: (8, "<Q"),
}
_NUMBER_LINE_OPS = frozenset(("INT", "LONG", "FLOAT", "PUT", "GET"))


class _Window:
    """Reads small pieces of a file by offset (pread), 64 KB at a time, never moving the
    file position that the unpickler reads from afterwards."""

    def __init__(self, fd: int):
        self._fd, self._start, self._buf = fd, 0, b""

    def get(self, pos: int, n: int) -> bytes:
        end = pos + n
        if not (self._start <= pos and end <= self._start + len(self._buf)):
            parts, want, at = [], max(n, 65536), pos
            while want > 0:
                piece = os.pread(self._fd, want, at)
                if not piece:
                    break
                parts.append(piece)
                want -= len(piece)
                at += len(piece)
            self._start, self._buf = pos, b"".join(parts)
        return self._buf[pos - self._start: end - self._start]


def _check_pickle_bounds(fd: int, size: int, file: str) -> None:
    """Walks the pickle's opcodes (without building anything) and refuses a file that would
    make the unpickler build something unbounded: more than _MAX_PICKLE_OPS opcodes, text
    lines (old protocols) longer than _MAX_PICKLE_LINE (numbers: _MAX_NUMBER_LINE), integers
    of more than _MAX_INT_BYTES bytes, memo indices beyond the opcodes seen (the unpickler
    sizes its memo table by the index), or lengths beyond the end of the file. Array
    payloads are skipped, not read. Costs a few small reads per file."""
    win = _Window(fd)
    pos = ops = 0

    def truncated(what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{file}: truncated pickle ({what}) at byte {size} of {size}")

    while True:
        if pos >= size:
            raise truncated("no STOP opcode")
        start = pos
        code = win.get(pos, 1)[0]
        if code not in _OPCODES:
            raise CorruptCheckpointError(
                f"{file}: corrupt pickle (unknown opcode 0x{code:02x}) at byte {pos} of {size}")
        name, n, argtype = _OPCODES[code]
        ops += 1
        if ops > _MAX_PICKLE_OPS:
            raise UnsafeCheckpointError(
                f"{file}: refused a pickle of more than {_MAX_PICKLE_OPS} opcodes (at byte {pos} "
                f"of {size}); a tensor file holds one array or one quantized weight")
        pos += 1
        value = None
        if n >= 0:  # fixed-size argument
            arg = win.get(pos, n)
            if len(arg) < n:
                raise truncated(f"it ends inside {name}")
            pos += n
            value = int.from_bytes(arg, "little")
        elif n == pickletools.UP_TO_NEWLINE:
            limit = _MAX_NUMBER_LINE if name in _NUMBER_LINE_OPS else _MAX_PICKLE_LINE
            for _ in range(2 if argtype == "stringnl_noescape_pair" else 1):
                chunk = win.get(pos, limit + 1)
                end = chunk.find(b"\n")
                if end < 0:
                    if len(chunk) <= limit:
                        raise truncated(f"it ends inside {name}")
                    raise UnsafeCheckpointError(
                        f"{file}: refused a text line of more than {limit} bytes in {name} at "
                        f"byte {start} of {size}")
                value = chunk[:end]
                pos += end + 1
        else:  # length-prefixed argument: only the length is read
            width, fmt = _LENGTH_PREFIX[n]
            head = win.get(pos, width)
            if len(head) < width:
                raise truncated(f"it ends inside {name}")
            length = struct.unpack(fmt, head)[0]
            pos += width
            if length < 0:
                raise CorruptCheckpointError(
                    f"{file}: corrupt pickle ({name} of negative length) at byte {start} of {size}")
            if length > size - pos:
                raise truncated(f"{name} claims {length} bytes, {size - pos} remain")
            if name in ("LONG1", "LONG4") and length > _MAX_INT_BYTES:
                raise UnsafeCheckpointError(
                    f"{file}: refused an integer of {length} bytes at byte {start} of {size}; "
                    f"the format needs at most {_MAX_INT_BYTES}")
            pos += length
        if name == "FRAME" and value > size - pos:
            raise truncated(f"FRAME claims {value} bytes, {size - pos} remain")
        if name == "PUT":
            value = int(value) if value.isdigit() else 0  # not a number: the unpickler says so
        if name in ("PUT", "BINPUT", "LONG_BINPUT") and value > ops:
            raise UnsafeCheckpointError(
                f"{file}: refused memo index {value} at byte {start} of {size} (only {ops} "
                "opcodes so far); the unpickler would size its memo table by it")
        if name == "STOP":
            break
    if pos != size:
        raise CorruptCheckpointError(f"{file}: {size - pos} unexpected bytes after the end of the pickle")


# ---- stand-ins for the allowed globals ----------------------------------------------------


class _StandIn:
    """Base of every object the restricted unpickler hands to a pickle.

    Each one has its own __setstate__ (by default refusing), so BUILD never falls back to
    pickle's default, which assigns attributes (__class__ included) and could turn one
    stand-in into another."""

    _file = "?"
    _label = "an internal object"

    def __setstate__(self, state):
        raise UnsafeCheckpointError(
            f"{self._file}: refused BUILD state {_show(state)} on {self._label}; the format "
            "sets state only on arrays, dtypes and QuantizedWeight8bit")

    def __reduce__(self):  # never re-pickle a stand-in
        raise TypeError("not picklable")


class _InstanceOnly:
    """A method that exists only on instances: looked up on the class object itself (BUILD
    applied to the class a pickle got from find_class) it refuses instead of running with
    the wrong `self`."""

    def __init__(self, fn: Callable):
        self._fn = fn

    def __get__(self, obj: Any, owner: Any = None) -> Callable:
        if obj is None:
            def refuse(*args, **kwargs):
                raise UnsafeCheckpointError(
                    f"{owner._file}: refused BUILD on the class {owner._label} itself")
            return refuse
        return self._fn.__get__(obj, owner)


class _Refused(_StandIn):
    """Stands for an allowed global that may only appear as an argument, never be called."""

    def __init__(self, label: str, file: str):
        self._label, self._file = label, file

    def __call__(self, *args, **kwargs):
        raise UnsafeCheckpointError(
            f"{self._file}: refused a call to {self._label}; the format only passes it as an "
            "argument to numpy's array reconstruction"
        )


class _Callable(_StandIn):
    """Stands for an allowed numpy function: calls our checking replacement `fn`."""

    def __init__(self, fn: Callable, label: str, file: str):
        self._fn, self._label, self._file = fn, label, file

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)


class _BF16Token(_StandIn):
    """The class ml_dtypes.bfloat16 as the unpickler sees it (one per load)."""

    _label = "ml_dtypes.bfloat16"

    def __init__(self, file: str):
        self._file = file


class _DtypeSpec(_StandIn):
    """What `numpy.dtype(spec, align, copy)` + BUILD(state) build: a checked numeric dtype."""

    _label = "a numpy.dtype"

    def __init__(self, dtype: np.dtype, file: str):
        self.dtype, self._file, self._built = dtype, file, False

    def __setstate__(self, state):
        if self._built:
            raise UnsafeCheckpointError(f"{self._file}: dtype state set twice")
        self._built = True
        size = self.dtype.itemsize
        # numpy writes (3, byte order, None, None, None, elsize, alignment, flags[, metadata]),
        # elsize / alignment being -1 for builtin types (bfloat16: 2, 2, flags 64).
        ok = (
            type(state) is tuple
            and len(state) in (8, 9)
            and type(state[0]) is int and state[0] in (3, 4)
            and type(state[1]) is str and state[1] in ("<", ">", "|", "=")
            and state[2] is None  # no sub-array
            and state[3] is None  # no field names (structured dtypes can hide objects)
            and state[4] is None  # no fields
            and all(type(v) is int for v in state[5:8])
            and -1 <= state[5] <= 64 and -1 <= state[6] <= 64 and 0 <= state[7] < 1 << 16
            and (len(state) == 8 or state[8] is None or (type(state[8]) is dict and not state[8]))
        )
        if not ok:
            raise UnsafeCheckpointError(
                f"{self._file}: refused dtype state {_show(state)}; only plain numeric "
                "dtypes are allowed"
            )
        if state[5] > 0 and state[5] != size:
            raise CorruptCheckpointError(
                f"{self._file}: dtype {self.dtype} has item size {size}, the file says {state[5]}"
            )
        if state[1] in ("<", ">") and size > 1:
            ordered = self.dtype.newbyteorder(state[1])
            self.dtype = self.dtype if ordered.isnative else ordered


def _make_dtype(file: str) -> Callable:
    def numpy_dtype(spec, align=False, copy=True):
        if isinstance(spec, _BF16Token):
            dtype = _BF16
        elif type(spec) is str and spec in _ALLOWED_DTYPE_CODES:
            dtype = np.dtype(spec)
        else:
            what = ("an object dtype" if type(spec) is str and spec in ("O", "O8", "O4")
                    else f"dtype spec {_show(spec)}")
            raise UnsafeCheckpointError(
                f"{file}: refused {what}; only numeric dtypes and ml_dtypes.bfloat16 are allowed"
            )
        if align not in (False, 0) or copy not in (True, 1) or type(align) not in (bool, int) \
                or type(copy) not in (bool, int):
            raise UnsafeCheckpointError(
                f"{file}: refused numpy.dtype arguments {_show(align)}, {_show(copy)}")
        return _DtypeSpec(dtype, file)

    return numpy_dtype


def _address(buf) -> int:
    return np.frombuffer(buf, np.uint8).ctypes.data if len(buf) else 0


def _aligned_empty(nbytes: int) -> np.ndarray:
    """uint8[nbytes] starting on a 64-byte boundary (jax on CPU then aliases, no copy)."""
    base = np.empty(nbytes + 64, np.uint8)
    start = (-base.ctypes.data) % 64
    return base[start: start + nbytes]


class _Diverted(dict):
    """{address in an unpickler-owned bytes object: our aligned buffer holding its data},
    plus the addresses already handed to an array (`consumed`)."""

    def __init__(self):
        super().__init__()
        self.consumed: set[int] = set()


def _payload(data, diverted: dict[int, np.ndarray], file: str = "?") -> Any:
    """The real bytes of an array payload: the aligned buffer its read was diverted to,
    or `data` itself (small payloads), or both merged if the unpickler had already taken
    a prefix from its own buffer. A diverted payload used a second time (the unpickler's
    own buffer holds no data, only our nonce) is refused."""
    if len(data) < _DIVERT_MIN_BYTES:
        return data
    start = _address(data)
    end = start + len(data)
    consumed = getattr(diverted, "consumed", ())
    for a in consumed:
        if start <= a <= end - 16 and a not in diverted \
                and bytes(data[a - start: a - start + 16]) == _DIVERT_NONCE:
            raise UnsafeCheckpointError(
                f"{file}: refused an array payload used twice (by reference); each array of "
                "the format has its own data")
    if not diverted:
        return data
    inside = [a for a, v in diverted.items() if start <= a and a + len(v) <= end
              and bytes(data[a - start: a - start + 16]) == _DIVERT_NONCE]
    if isinstance(consumed, set):
        consumed.update(inside)
    if inside == [start] and len(diverted[start]) == len(data):
        return diverted.pop(start)
    if not inside:
        return data
    merged = _aligned_empty(len(data))
    merged[:] = np.frombuffer(data, np.uint8)
    for a in inside:
        v = diverted.pop(a)
        merged[a - start: a - start + len(v)] = v
    return merged


def _array_from_parts(file: str, shape, dtype, fortran, data,
                      diverted: Optional[dict] = None) -> np.ndarray:
    """Builds the array a pickle describes, after checking every part. No copy of `data`."""
    if not isinstance(dtype, _DtypeSpec):
        raise UnsafeCheckpointError(f"{file}: array dtype is {_show(dtype)}, not a dtype")
    if type(data) is list:
        raise UnsafeCheckpointError(f"{file}: refused an object array (its data is a list)")
    if type(data) not in (bytes, bytearray):
        raise UnsafeCheckpointError(f"{file}: array data is {_show(data)}, not bytes")
    # Bounded before any arithmetic: a shape of huge integers or of thousands of dimensions
    # would otherwise cost minutes of big-number multiplication.
    if not (type(shape) is tuple and len(shape) <= _MAX_NDIM
            and all(type(d) is int and 0 <= d <= _MAX_DIM for d in shape)):
        raise CorruptCheckpointError(
            f"{file}: bad array shape {_show(shape)}; expected a tuple of at most {_MAX_NDIM} "
            "non-negative 64-bit integers")
    count = math.prod(shape)
    if len(data) != count * dtype.dtype.itemsize:
        raise CorruptCheckpointError(
            f"{file}: array {dtype.dtype}{list(shape)} needs {count * dtype.dtype.itemsize} "
            f"bytes of data, the file holds {len(data)}"
        )
    array = np.frombuffer(_payload(data, {} if diverted is None else diverted, file), dtype=dtype.dtype, count=count)
    return array.reshape(shape, order="F" if fortran else "C")


class _ArraySpec(_StandIn):
    """What `_reconstruct(ndarray, (0,), b'b')` + BUILD(state) build."""

    _label = "a numpy array"

    def __init__(self, file: str, diverted: Optional[dict] = None):
        self._file, self.array, self._diverted = file, None, diverted

    def __setstate__(self, state):
        if self.array is not None:
            raise UnsafeCheckpointError(f"{self._file}: array state set twice")
        if type(state) is not tuple or len(state) not in (4, 5):
            raise UnsafeCheckpointError(f"{self._file}: refused array state {_show(state)}")
        if len(state) == 5:
            if type(state[0]) is not int or state[0] != 1:
                raise CorruptCheckpointError(
                    f"{self._file}: array state version {_show(state[0])}")
            state = state[1:]
        shape, dtype, fortran, data = state
        if type(fortran) not in (bool, int) or fortran not in (True, False):
            raise CorruptCheckpointError(f"{self._file}: bad fortran flag {_show(fortran)}")
        self.array = _array_from_parts(self._file, shape, dtype, bool(fortran), data,
                                       self._diverted)


def _make_reconstruct(file: str, ndarray_marker: _Refused, diverted: dict) -> Callable:
    def reconstruct(subtype, shape, typecode):
        if subtype is not ndarray_marker or type(shape) is not tuple or shape != (0,) \
                or typecode not in (b"b", "b"):
            raise UnsafeCheckpointError(
                f"{file}: refused _reconstruct({_show(subtype)}, {_show(shape)}, "
                f"{_show(typecode)}); only plain numpy.ndarray reconstruction is allowed"
            )
        return _ArraySpec(file, diverted)

    return reconstruct


def _make_frombuffer(file: str, diverted: dict) -> Callable:
    def frombuffer(buffer, dtype, shape, order):
        if type(order) is not str or order not in ("C", "F"):
            raise CorruptCheckpointError(f"{file}: bad array order {_show(order)}")
        spec = _ArraySpec(file)
        spec.array = _array_from_parts(file, shape, dtype, order == "F", buffer, diverted)
        return spec

    return frombuffer


class _QuantizedSpec(_StandIn):
    """What NEWOBJ(model.QuantizedWeight8bit) + BUILD({'weight', 'scales'}) build."""

    _file = "?"  # set on the per-load subclass
    _label = "model.QuantizedWeight8bit"

    def __new__(cls, *args, **kwargs):
        if args or kwargs:
            raise UnsafeCheckpointError(
                f"{cls._file}: refused model.QuantizedWeight8bit called with arguments "
                f"{_show(args)}; the format only rebuilds it from its field state"
            )
        obj = super().__new__(cls)
        obj.fields = None
        return obj

    @_InstanceOnly
    def __setstate__(self, state):
        if self.fields is not None:
            raise UnsafeCheckpointError(f"{self._file}: QuantizedWeight8bit state set twice")
        if not (type(state) is dict and len(state) == 2
                and all(type(k) is str for k in state) and set(state) == {"weight", "scales"}):
            raise UnsafeCheckpointError(
                f"{self._file}: refused QuantizedWeight8bit state {_show(state)}; "
                "expected exactly the fields 'weight' and 'scales'"
            )
        for key, value in state.items():
            if type(value) is not _ArraySpec or type(value.array) is not np.ndarray:
                raise UnsafeCheckpointError(
                    f"{self._file}: QuantizedWeight8bit.{key} is {_show(value)}, not a numpy array"
                )
        self.fields = {k: v.array for k, v in state.items()}


class _SafeUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only the format's globals, to checked stand-ins."""

    def __init__(self, stream, file: str):
        super().__init__(stream)
        self._file = file
        self._diverted = getattr(stream, "diverted", _Diverted())
        self._ndarray = _Refused("numpy.ndarray", file)
        self._bf16 = _BF16Token(file)
        self._qw_class = type("QuantizedWeight8bit", (_QuantizedSpec,), {"_file": file})

    def find_class(self, module: str, name: str):
        if module in _ARRAY_RECONSTRUCT_MODULES and name == "_reconstruct":
            return _Callable(_make_reconstruct(self._file, self._ndarray, self._diverted),
                             f"{module}._reconstruct", self._file)
        if module in _FROMBUFFER_MODULES and name == "_frombuffer":
            return _Callable(_make_frombuffer(self._file, self._diverted),
                             f"{module}._frombuffer", self._file)
        if module == "numpy" and name == "ndarray":
            return self._ndarray
        if module == "numpy" and name == "dtype":
            return _Callable(_make_dtype(self._file), "numpy.dtype", self._file)
        if (module == "ml_dtypes" or module.startswith("ml_dtypes.")) and name == "bfloat16":
            return self._bf16
        if module in _QW_MODULES and name == "QuantizedWeight8bit":
            return self._qw_class
        raise UnsafeCheckpointError(
            f"{self._file}: refused global '{repr(module[:100])[1:-1]}.{repr(name[:100])[1:-1]}'. A "
            "checkpoint file may only use numpy array reconstruction, numpy.dtype, "
            "numpy.ndarray, ml_dtypes.bfloat16 and model.QuantizedWeight8bit; this file is "
            "not a Grok-1 tensor file or was tampered with"
        )

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"{self._file}: refused a persistent id {_show(pid)}")


def _finish(obj: Any, file: str) -> Any:
    """Turns the unpickled stand-in into a numpy array or a QuantizedWeight8bit of arrays;
    nothing else (no stand-in, no internal object) ever leaves this module."""

    def native(a: Any) -> np.ndarray:
        if type(a) is not np.ndarray:  # unreachable through the stand-ins; checked anyway
            raise UnsafeCheckpointError(f"{file}: holds {_show(a)} where an array belongs")
        return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))

    if type(obj) is _ArraySpec and obj.array is not None:
        return native(obj.array)
    if isinstance(obj, _QuantizedSpec) and type(obj.fields) is dict:
        return QuantizedWeight8bit(
            weight=native(obj.fields.get("weight")), scales=native(obj.fields.get("scales"))
        )
    kind = obj._label if isinstance(obj, _StandIn) else f"a {type(obj).__name__}"
    raise CorruptCheckpointError(
        f"{file}: holds {kind}, expected a numpy array or a QuantizedWeight8bit"
    )


# ---------------------------------------------------------------------------------------
# Reading one file: directly, or copied through the RAM disk
# ---------------------------------------------------------------------------------------


class _LoadControl:
    """Shared by the workers of one load: cancellation, progress, first error."""

    def __init__(self, progress_update: Optional[Callable[[int], None]] = None):
        self.cancelled = threading.Event()
        self._update = progress_update
        self._lock = threading.Lock()
        self.first_error: Optional[BaseException] = None

    def check(self) -> None:
        if self.cancelled.is_set():
            raise _Cancelled()

    def advance(self, nbytes: int, file: str) -> None:
        if self._update is not None and nbytes:
            with self._lock:
                self._update(nbytes)
        if _chunk_hook is not None:
            _chunk_hook(file, nbytes)

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if self.first_error is None:
                self.first_error = error
        self.cancelled.set()


class _Reader:
    """The unpickler's view of a file: exact reads, big ones in chunks (progress, cancel).

    Large reads are array payloads (the pickler writes them outside frames, and the C
    unpickler reads each with one readinto into a bytes object it just allocated). They
    are diverted into a 64-byte-aligned numpy buffer of ours, keyed by the address of the
    unpickler's buffer, which stays untouched but for a nonce in its first 16 bytes (so it
    costs no resident memory). The arrays are then built on our buffers: writable, and
    placed on CPU devices without a copy.

    With skip_data, large reads seek instead of reading: `--inspect` uses it to learn
    dtypes and shapes without reading the data.
    """

    def __init__(self, raw: io.RawIOBase, size: int, file: str, control: _LoadControl,
                 count_progress: bool, skip_data: bool = False):
        self._raw, self._size, self._file = raw, size, file
        self._control, self._count, self._skip = control, count_progress, skip_data
        self.diverted = _Diverted()

    def _exact(self, view: memoryview) -> int:
        done = 0
        while done < len(view):
            self._control.check()
            n = self._raw.readinto(view[done: done + _CHUNK_BYTES])
            if not n:
                break
            done += n
            if self._count:
                self._control.advance(n, self._file)
        return done

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        if self._skip and len(view) >= 4096:
            pos = self._raw.tell()
            n = max(0, min(len(view), self._size - pos))
            self._raw.seek(pos + n)
            return n
        if len(view) >= _DIVERT_MIN_BYTES and not self._skip:
            target = _aligned_empty(len(view))
            got = self._exact(memoryview(target))
            if got < len(view):  # truncated file: hand over what there is, the unpickler fails
                view[:got] = target[:got]
                return got
            view[:16] = _DIVERT_NONCE
            self.diverted[_address(view)] = target
            return got
        return self._exact(view)

    def read(self, n: int = -1) -> bytes:
        # Never allocate more than the file still holds: a damaged frame length must not
        # make us zero-fill gigabytes.
        left = max(0, self._size - self._raw.tell())
        n = left if n is None or n < 0 else min(n, left)
        buf = bytearray(n)
        got = self._exact(memoryview(buf))
        del buf[got:]
        return bytes(buf)

    def readline(self) -> bytes:  # text opcodes outside frames (old protocols) use it
        start = self._raw.tell()
        chunk = self._raw.read(_MAX_PICKLE_LINE + 1) or b""
        end = chunk.find(b"\n")
        if end < 0:  # the last line (longer ones: refused by _check_pickle_bounds)
            return chunk
        self._raw.seek(start + end + 1)
        return chunk[: end + 1]


_shm_lock = threading.Lock()
_shm_reserved = [0]  # bytes of RAM disk this process is about to fill


# Filesystems on which the release's copy-through-RAM-disk path pays off ("auto" mode).
_NETWORK_FS = frozenset((
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs", "9p",
    "beegfs", "panfs", "afs", "ncpfs", "orangefs", "wekafs", "cvmfs",
))
_MOUNTINFO = "/proc/self/mountinfo"


def filesystem_type(path: str) -> str:
    """The type of the filesystem holding `path` ('ext4', 'nfs4', 'fuse.gcsfuse', ...),
    from the mount with the longest matching mount point; 'unknown' if not found."""
    real = os.path.realpath(path)
    try:
        with open(_MOUNTINFO) as f:
            lines = f.read().splitlines()
    except OSError:
        return "unknown"
    best, fstype = None, "unknown"
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and (best is None or len(mount) >= len(best)):
            best, fstype = mount, right.split()[0]
    return fstype


def _resolve_use_shm(use_shm: Any, directory: str) -> bool:
    """use_shm "auto": copy through the RAM disk only from network / FUSE filesystems, where
    one large sequential copy helps; on local disks it only adds a memory pass."""
    if use_shm == "auto":
        fstype = filesystem_type(directory)
        return fstype in _NETWORK_FS or fstype.startswith("fuse")
    if isinstance(use_shm, bool):
        return use_shm
    raise ValueError(f"use_shm must be True, False or 'auto', not {use_shm!r}")


def _shm_has_room(shm_dir: str, size: int) -> bool:
    try:
        st = os.statvfs(shm_dir)
    except OSError:
        return False
    with _shm_lock:
        free = st.f_bavail * st.f_frsize - _shm_reserved[0]
    return free >= size + _SHM_MARGIN_BYTES


def _anonymous_shm_file(shm_dir: str) -> int:
    """A read-write fd on a RAM-disk file that has no name, so nothing can outlive us."""
    if _USE_O_TMPFILE and hasattr(os, "O_TMPFILE"):
        try:
            return os.open(shm_dir, os.O_TMPFILE | os.O_RDWR, 0o600)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                raise
    fd, path = tempfile.mkstemp(prefix=".grok1-ckpt-", dir=shm_dir)
    os.unlink(path)  # unlinked at once: the data lives only as long as the descriptor
    return fd


def _copy_fd(src: int, dst: int, size: int, file: str, control: _LoadControl,
             copied: list[int]) -> None:
    """Copies `size` bytes src -> dst in chunks; copied[0] counts the progress reported."""
    offset = 0
    use_sendfile = True
    while offset < size:
        control.check()
        n = min(_CHUNK_BYTES, size - offset)
        if use_sendfile:
            try:
                sent = os.sendfile(dst, src, offset, n)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                use_sendfile = False
                continue
        else:
            chunk = os.pread(src, n, offset)
            sent = os.write(dst, chunk) if chunk else 0
        if sent <= 0:
            raise CorruptCheckpointError(f"{file}: file shrank while being read")
        offset += sent
        copied[0] += sent
        control.advance(sent, file)


def _open_tensor_file(path: str, control: _LoadControl, use_shm: bool,
                      shm_dir: Optional[str]) -> tuple[io.FileIO, int, bool]:
    """Opens `path` for unpickling; returns (raw file, size, whether progress was counted).

    Through the RAM disk when asked and it has room: the file is copied into an anonymous
    RAM-disk file (this is the release's method, which helps on network filesystems), then
    read from there. Any failure of that path falls back to reading the file directly.
    """
    src, st = _open_regular(path)
    try:
        size = st.st_size
        shm_dir = shm_dir or SHM_DIR
        if (
            use_shm
            and os.path.isdir(shm_dir)
            and not os.path.abspath(path).startswith(os.path.abspath(shm_dir) + os.sep)
            and _shm_has_room(shm_dir, size)
        ):
            with _shm_lock:
                _shm_reserved[0] += size
            tmp = -1
            copied = False
            progressed = [0]
            try:
                tmp = _anonymous_shm_file(shm_dir)
                _copy_fd(src, tmp, size, path, control, progressed)
                os.lseek(tmp, 0, os.SEEK_SET)
                copied = True
            except OSError as e:  # e.g. the RAM disk filled up meanwhile (ENOSPC)
                logger.debug("%s: RAM-disk copy failed (%s); reading directly", path, e)
            finally:
                with _shm_lock:
                    _shm_reserved[0] -= size
                if not copied and tmp >= 0:
                    os.close(tmp)
            if copied:
                os.close(src)
                src = -1
                return io.FileIO(tmp, "rb", closefd=True), size, True
            control.advance(-progressed[0], path)  # the direct read counts the bytes again
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(src, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        raw = io.FileIO(src, "rb", closefd=True)
        src = -1
        return raw, size, False
    finally:
        if src >= 0:
            os.close(src)


def _unpickle_file(path: str, control: _LoadControl, use_shm: bool = True,
                   shm_dir: Optional[str] = None, skip_data: bool = False) -> tuple[Any, int]:
    """Reads one tensor file; returns (numpy array or QuantizedWeight8bit, file size)."""
    try:
        raw, size, counted = _open_tensor_file(path, control, use_shm and not skip_data, shm_dir)
    except (CheckpointError, _Cancelled):
        raise
    except OSError as e:  # an I/O error while copying through the RAM disk
        raise CheckpointAccessError(f"{path}: cannot read: {_reason(e)}") from None
    with raw:
        reader = _Reader(raw, size, path, control, count_progress=not counted,
                         skip_data=skip_data)
        try:
            _check_pickle_bounds(raw.fileno(), size, path)
            obj = _SafeUnpickler(reader, path).load()
        except (CheckpointError, _Cancelled):
            raise
        except OSError as e:
            raise CheckpointAccessError(f"{path}: cannot read: {_reason(e)}") from None
        except RecursionError:
            raise CorruptCheckpointError(f"{path}: corrupt pickle (nested too deeply)") from None
        except MemoryError:
            raise CorruptCheckpointError(
                f"{path}: out of memory while unpickling (a damaged length field, or too "
                "little RAM for this tensor)"
            ) from None
        except Exception as e:  # truncated / garbled pickle streams raise many types
            at = raw.tell()
            what = "truncated" if at >= size else "corrupt"
            raise CorruptCheckpointError(
                f"{path}: {what} pickle ({type(e).__name__}: {str(e)[:200]}) at byte {at} of {size}"
            ) from None
    return _finish(obj, path), size  # (bytes after the pickle: refused by _check_pickle_bounds)


def fast_unpickle(path: str, *, use_shm: Any = "auto", shm_dir: Optional[str] = None) -> Any:
    """Safely unpickles one checkpoint file: a numpy array or a QuantizedWeight8bit of arrays.

    use_shm: True copies the file through the RAM disk first (the release's method), False
    reads it directly, "auto" does the former only on network / FUSE filesystems.

    Arrays of 1 MB and more are writable and 64-byte aligned; smaller ones are read-only.
    Raises CorruptCheckpointError / UnsafeCheckpointError / MissingCheckpointFileError.
    """
    path = os.fspath(path)
    use_shm = _resolve_use_shm(use_shm, os.path.dirname(os.path.abspath(path)))
    return _unpickle_file(path, _LoadControl(), use_shm, shm_dir)[0]


# ---------------------------------------------------------------------------------------
# Temporary names, and tidying up after killed saves
#
# Every temporary file or directory this module creates is named
#   .{final name}.grok1-{kind}-{pid}-{host}-{8 hex digits}
# kind "tmp": a file being written; "save": a checkpoint being written beside the old one;
# "old": the old checkpoint moved aside (where the filesystem cannot swap two directories
# atomically). A later save or load removes those whose process is gone (same host, pid no
# longer running), and moves an "old" one back if the checkpoint itself is missing.
# ---------------------------------------------------------------------------------------

_HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"
_TEMP_NAME = re.compile(
    r"^\.(?P<name>.+)\.grok1-(?P<kind>tmp|save|old)-(?P<pid>[0-9]{1,10})-(?P<host>.+)-[0-9a-f]{8}$")
# Temporary files of earlier versions of this module: .{name}.{pid}.{hex}.tmp (tensor
# files) and {manifest}.{pid}.{hex}.tmp.
_LEGACY_TEMP_NAME = re.compile(
    r"^(\.tensor[0-9]{5}_[0-9]{3}|host_shard_[0-9]{3}\.json)\.(?P<pid>[0-9]{1,10})\.[0-9a-f]{8}\.tmp$")


def _token() -> str:
    return f"{os.getpid()}-{_HOST}-{secrets.token_hex(4)}"


def _temp_name(name: str, kind: str, token: Optional[str] = None) -> str:
    return f".{name}.grok1-{kind}-{token or _token()}"


def _pid_gone(pid: int) -> bool:
    """Whether no process `pid` runs on this host (a zombie counts as gone)."""
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # EPERM: it exists, owned by someone else
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def _owner_gone(m: re.Match) -> bool:
    return m.group("host") == _HOST and _pid_gone(int(m.group("pid")))


def _remove(path: str) -> None:
    """Removes a file or a directory tree; best effort."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


def _tidy_leftovers(directory: str) -> None:
    """Cleans up after saves of `directory` that were killed: removes their temporary
    directories beside it and temporary files inside it, and moves the old checkpoint back
    if a kill left it moved aside with `directory` missing. Best effort and silent where the
    place is read-only; things of live processes (or of other hosts) are left alone."""
    directory = os.path.abspath(directory)
    parent, name = os.path.split(directory)
    try:
        siblings = os.listdir(parent)
    except OSError:
        siblings = []
    done, aside = [], []
    for entry in siblings:
        m = _TEMP_NAME.match(entry)
        if not (m and m.group("name") == name and m.group("kind") != "tmp" and _owner_gone(m)):
            continue
        if m.group("kind") == "old":
            aside.append(os.path.join(parent, entry))
        else:
            _remove(os.path.join(parent, entry))
            done.append(entry)
    if aside and not os.path.lexists(directory):
        newest = max(aside, key=lambda p: os.stat(p).st_mtime if os.path.exists(p) else 0)
        try:
            os.rename(newest, directory)
            aside.remove(newest)
            logger.warning("%s: restored the checkpoint that an interrupted save had moved to %s",
                           directory, newest)
        except OSError:
            aside = []
    for path in aside:
        _remove(path)
        done.append(os.path.basename(path))
    try:
        inside = os.listdir(directory)
    except OSError:
        inside = []
    for entry in inside:
        m = _TEMP_NAME.match(entry)
        legacy = _LEGACY_TEMP_NAME.match(entry)
        if (m and m.group("kind") == "tmp" and _owner_gone(m)) or (
                legacy and _pid_gone(int(legacy.group("pid")))):
            _remove(os.path.join(directory, entry))
            done.append(entry)
    if done:
        logger.info("%s: removed %d leftover(s) of interrupted saves: %s", directory, len(done),
                    ", ".join(done[:5]))


def _fsync_dir(path: str) -> None:
    """Makes a directory's entries durable; best effort (some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fast_pickle(obj: Any, path: str) -> None:
    """Writes `obj` as one pickle (protocol 4, like the release) atomically at `path`.

    The data goes to a temporary file in the same directory, is fsynced, then renamed, so a
    crash never leaves a half-written tensor file under the final name.
    """
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, _temp_name(name, "tmp"))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)  # mode as umask allows
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(obj, f, protocol=4)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ---------------------------------------------------------------------------------------
# Leaf order, parameter paths and file names
# ---------------------------------------------------------------------------------------


def path_tuple_to_string(path: tuple) -> str:
    """'params/transformer/decoder_layer_0/moe/linear/w' for a jax key path (release style:
    dict keys and attribute names joined by '/', sequence indices dropped)."""
    pieces = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            pieces.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            pieces.append(key.name)
    return "/".join(pieces)


def _is_state(tree: Any) -> bool:
    """A TrainingState: this module's, or any NamedTuple whose one field is `params` (the
    release defines its own in runners.py)."""
    return isinstance(tree, tuple) and getattr(tree, "_fields", None) == ("params",)


def _as_state(tree: Any) -> TrainingState:
    return TrainingState(params=tree.params if _is_state(tree) else tree)


def checkpoint_leaves(state_or_params: Any) -> tuple[list[str], list[Any], Any]:
    """(paths, leaves, treedef) of TrainingState(params=...) in checkpoint file order.

    Leaf i is stored in file tensor{i:05d}_{h:03d}. A QuantizedWeight8bit is one leaf.
    """
    with_path, treedef = jax.tree_util.tree_flatten_with_path(
        _as_state(state_or_params), is_leaf=_is_leaf
    )
    return [path_tuple_to_string(p) for p, _ in with_path], [x for _, x in with_path], treedef


def checkpoint_leaves_of(tree: Any) -> tuple[list[str], list[Any], Any]:
    """Like checkpoint_leaves, but for a tree as given (not wrapped in TrainingState)."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
    return [path_tuple_to_string(p) for p, _ in with_path], [x for _, x in with_path], treedef


def tensor_filename(index: int, host: int = 0) -> str:
    return f"tensor{index:05d}_{host:03d}"


def _scan_directory(directory: str) -> dict[int, set[int]]:
    """{host shard: set of tensor indices} of the tensor files in `directory`."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        raise MissingCheckpointFileError(f"{directory}: checkpoint directory not found") from None
    except NotADirectoryError:
        raise CheckpointAccessError(
            f"{directory}: is a file, not a checkpoint directory; pass the directory that "
            "holds the tensor files (tensor#####_###)") from None
    except OSError as e:  # EACCES, ELOOP, EIO, ...
        raise CheckpointAccessError(
            f"{directory}: cannot list the checkpoint directory: {_reason(e)}") from None
    shards: dict[int, set[int]] = {}
    for name in names:
        m = _TENSOR_NAME.match(name)
        if m:
            shards.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    return shards


def _pick_host_shard(directory: str, shards: dict[int, set[int]], host_index: int,
                     num_hosts: int) -> int:
    """The host shard this process reads: its own index if the checkpoint has one, else 000
    when that is the only shard (every process then reads the same files)."""
    if host_index in shards:
        return host_index
    if set(shards) == {0}:
        return 0
    if not shards:
        raise MissingCheckpointFileError(
            f"{directory}: no tensor files (tensor#####_###) in this directory"
        )
    raise MissingCheckpointFileError(
        f"{directory}: process {host_index} of {num_hosts} has no host shard "
        f"_{host_index:03d}; the checkpoint holds shards {sorted(shards)}"
    )


# ---------------------------------------------------------------------------------------
# Host shards of a multi-process save: which block of each leaf a shard holds
# ---------------------------------------------------------------------------------------

MANIFEST_FORMAT = "grok-1 host shard"
_MAX_MANIFEST_BYTES = 64 * 1024 * 1024


def manifest_filename(host: int) -> str:
    return f"host_shard_{host:03d}.json"


class _Box(NamedTuple):
    """The block [start, stop) of a leaf of global `shape` that one host shard holds."""

    shape: tuple
    start: tuple
    stop: tuple

    @property
    def local_shape(self) -> tuple:
        return tuple(b - a for a, b in zip(self.start, self.stop))

    @property
    def whole(self) -> bool:
        return self.local_shape == tuple(self.shape)

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "start": list(self.start), "stop": list(self.stop)}


def _box_from_json(entry: Any, where: str) -> _Box:
    def dims(v: Any) -> tuple:
        if not (type(v) is list and len(v) <= _MAX_NDIM
                and all(type(d) is int and 0 <= d <= _MAX_DIM for d in v)):
            raise ValueError
        return tuple(v)

    try:
        if type(entry) is not dict:
            raise ValueError
        shape, start, stop = (dims(entry[k]) for k in ("shape", "start", "stop"))
    except (KeyError, ValueError):
        raise CorruptCheckpointError(
            f"{where}: expected shape, start and stop lists of at most {_MAX_NDIM} non-negative "
            f"64-bit integers, found {_show(entry)}") from None
    if not (len(shape) == len(start) == len(stop)
            and all(0 <= a <= b <= n for a, b, n in zip(start, stop, shape))):
        raise CorruptCheckpointError(f"{where}: block {start}..{stop} does not lie inside shape {shape}")
    return _Box(shape, start, stop)


def _read_manifest(directory: str, host: int) -> Optional[dict[int, dict[str, _Box]]]:
    """{tensor index: {'value' | 'weight' | 'scales': _Box}} of host shard `host`, or None
    when the shard has no manifest (its files hold whole leaves, as the release's do)."""
    path = os.path.join(directory, manifest_filename(host))
    if not os.path.lexists(path):
        return None
    fd, st = _open_regular(path)
    try:
        if st.st_size > _MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(
                f"{path}: {st.st_size} bytes, more than a host shard manifest ever needs "
                f"({_MAX_MANIFEST_BYTES})")
        with io.FileIO(fd, "rb", closefd=False) as f:
            raw = f.read(_MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise CheckpointAccessError(f"{path}: cannot read: {_reason(e)}") from None
    finally:
        os.close(fd)

    def no_constants(name: str) -> Any:
        raise ValueError(f"non-finite number {name}")

    try:
        doc = json.loads(raw, parse_constant=no_constants)
        ok = isinstance(doc, dict) and doc.get("format") == MANIFEST_FORMAT and doc.get("version") == 1
    except ValueError as e:  # also UnicodeDecodeError and too-long integer literals
        raise CorruptCheckpointError(f"{path}: not valid JSON ({str(e)[:200]})") from None
    except RecursionError:
        raise CorruptCheckpointError(f"{path}: not valid JSON (nested too deeply)") from None
    if not ok or not isinstance(doc.get("tensors"), dict):
        raise CorruptCheckpointError(f"{path}: not a host shard manifest (format {MANIFEST_FORMAT!r}, version 1)")
    if doc.get("host") != host:
        raise CorruptCheckpointError(f"{path}: describes host {doc.get('host')!r}, expected {host}")
    out: dict[int, dict[str, _Box]] = {}
    for key, entry in doc["tensors"].items():
        if not (isinstance(entry, dict) and re.fullmatch(r"[0-9]{1,9}", key)
                and set(entry) - {"path"} in ({"value"}, {"weight", "scales"})):
            raise CorruptCheckpointError(
                f"{path}: bad entry for tensor {_show(key)}: {_show(entry)}")
        out[int(key)] = {k: _box_from_json(v, f"{path}: tensor {key} {k}")
                         for k, v in entry.items() if k != "path"}
    return out


def _write_manifest(directory: str, host: int, num_hosts: int, paths: Sequence[str],
                    boxes: Sequence[dict[str, _Box]]) -> str:
    doc = {"format": MANIFEST_FORMAT, "version": 1, "host": host, "num_hosts": num_hosts,
           "tensors": {str(i): {"path": p, **{k: b.to_json() for k, b in bx.items()}}
                       for i, (p, bx) in enumerate(zip(paths, boxes))}}
    path = os.path.join(directory, manifest_filename(host))
    tmp = os.path.join(directory, _temp_name(manifest_filename(host), "tmp"))
    try:
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _check_host_part(found: Any, boxes: dict[str, _Box], expected: Any, file: str, path: str) -> None:
    """Like _check_leaf for a host shard's block: the block has the manifest's shape, and the
    whole leaf (global shape, the file's dtypes) is what `expected` describes."""
    def whole(a: np.ndarray, box: _Box, what: str) -> np.ndarray:
        if tuple(a.shape) != box.local_shape:
            raise CorruptCheckpointError(
                f"{file}: parameter {path}: the {what} block is {list(a.shape)}, its manifest "
                f"says {list(box.local_shape)} (rows {list(box.start)}..{list(box.stop)})")
        return np.broadcast_to(np.zeros((), a.dtype), box.shape)  # shape and dtype only, no memory

    if "value" in boxes and not _is_qw(found):
        stand_in = whole(found, boxes["value"], "value")
    elif "weight" in boxes and _is_qw(found):
        stand_in = QuantizedWeight8bit(weight=whole(found.weight, boxes["weight"], "weight"),
                                       scales=whole(found.scales, boxes["scales"], "scales"))
    else:
        raise CorruptCheckpointError(
            f"{file}: parameter {path}: holds {_describe(found)}, its manifest describes "
            f"{sorted(boxes)}")
    _check_leaf(stand_in, expected, file, path)


# ---------------------------------------------------------------------------------------
# Checking a loaded leaf against the expected one
# ---------------------------------------------------------------------------------------


def _describe(x: Any) -> str:
    if _is_qw(x):
        return f"QuantizedWeight8bit(weight {_describe(x.weight)}, scales {_describe(x.scales)})"
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{np.dtype(x.dtype).name}{list(x.shape)}"
    return type(x).__name__


def _same(a: Any, b: Any) -> bool:
    return tuple(a.shape) == tuple(b.shape) and np.dtype(a.dtype) == np.dtype(b.dtype)


def _check_leaf(found: Any, expected: Any, file: str, path: str) -> None:
    """Raises CheckpointMismatchError unless `found` is what `expected` describes.

    expected: ShapeDtypeStruct / array, or a QuantizedWeight8bit of them. A float-shaped
    expected leaf also accepts a QuantizedWeight8bit of that weight shape: the release's
    code describes quantized weights by their float32 shape.
    """
    ok = False
    if _is_qw(expected):
        ok = _is_qw(found) and _same(found.weight, expected.weight) and _same(
            found.scales, expected.scales)
    elif _is_qw(found):
        w, s = found.weight, found.scales
        ok = (
            tuple(w.shape) == tuple(expected.shape)
            and np.issubdtype(np.dtype(expected.dtype), np.floating)
            and w.ndim >= 2 and s.ndim == w.ndim
            and tuple(s.shape[:-2]) == tuple(w.shape[:-2]) and s.shape[-1] == w.shape[-1]
            and s.shape[-2] > 0 and w.shape[-2] % s.shape[-2] == 0
        )
    else:
        ok = isinstance(found, np.ndarray) and _same(found, expected)
    if not ok:
        raise CheckpointMismatchError(
            f"{file}: parameter {path}: expected {_describe(expected)}, found {_describe(found)}"
        )


# ---------------------------------------------------------------------------------------
# Placing a host value on devices
# ---------------------------------------------------------------------------------------


def _scales_sharding(sharding: jax.sharding.Sharding, scales_shape: tuple) -> Any:
    """The weight's NamedSharding adapted to the scales: mesh axes that do not divide a
    scales dimension (e.g. the size-1 input dimension of column scales) are dropped."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = list(sharding.spec) + [None] * (len(scales_shape) - len(sharding.spec))
    out = []
    for dim, axes in zip(scales_shape, spec[: len(scales_shape)]):
        names = axes if isinstance(axes, tuple) else (axes,) if axes is not None else ()
        size = math.prod(sharding.mesh.shape[a] for a in names)
        out.append(axes if size > 0 and dim % size == 0 else None)
    return NamedSharding(sharding.mesh, PartitionSpec(*out))


def _block_index(idx: tuple, box: _Box, where: str) -> tuple:
    """A device's index into the whole leaf -> the same slice of a host shard's block."""
    out = []
    for d, (sl, n, a, b) in enumerate(zip(idx, box.shape, box.start, box.stop)):
        lo, hi, _ = sl.indices(n)
        if lo < a or hi > b:
            raise CheckpointMismatchError(
                f"{where}: this process's devices need [{lo}, {hi}) of dimension {d}, but its host "
                f"shard holds only [{a}, {b}). A checkpoint saved by several processes loads only "
                "with the same number of processes, host layout (between_hosts_config) and local "
                "mesh; otherwise load a single-shard (_000) copy of it (merge_host_shards).")
        out.append(slice(lo - a, hi - a))
    return tuple(out)


def _place(value: Any, sharding: Any, boxes: Optional[dict[str, _Box]] = None,
           where: str = "", wait: bool = True) -> Any:
    """Host value -> global jax array(s); each device receives only its own slice.

    Only this process's devices call back, so with several processes each one supplies
    its devices' slices. boxes: the value is a host shard's block of a larger leaf.
    wait=False returns as soon as the transfers are queued (jax keeps the host buffer
    alive until they are done); the caller waits for the result (see _PlacementPipeline).
    """

    def put(a: np.ndarray, s: jax.sharding.Sharding, box: Optional[_Box]) -> jax.Array:
        if box is None or box.whole:
            return jax.make_array_from_callback(a.shape, s, lambda idx: a[idx])
        return jax.make_array_from_callback(box.shape, s, lambda idx: a[_block_index(idx, box, where)])

    boxes = boxes or {}
    if _is_qw(value):
        wbox, sbox = boxes.get("weight"), boxes.get("scales")
        if _is_qw(sharding):
            ws, ss = sharding.weight, sharding.scales
        else:
            scales_shape = sbox.shape if sbox is not None else value.scales.shape
            ws, ss = sharding, _scales_sharding(sharding, scales_shape)
        out = QuantizedWeight8bit(weight=put(value.weight, ws, wbox), scales=put(value.scales, ss, sbox))
    else:
        s = sharding.weight if _is_qw(sharding) else sharding
        out = put(value, s, boxes.get("value"))
    if wait:
        jax.block_until_ready(out)  # the host buffer may be dropped once this returns
    return out


# ---------------------------------------------------------------------------------------
# The threaded loader
# ---------------------------------------------------------------------------------------


class _ByteBudget:
    """Bounds the bytes held in flight (host buffers and RAM-disk copies) across workers.

    One job is always admitted when nothing else is in flight, so a file larger than the
    budget still loads.
    """

    def __init__(self, limit: int, control: _LoadControl):
        self.limit, self.in_use, self.peak = limit, 0, 0
        self._cond = threading.Condition()
        self._control = control

    def acquire(self, n: int) -> None:
        with self._cond:
            while self.in_use and self.in_use + n > self.limit:
                self._control.check()
                self._cond.wait(0.05)
            self._control.check()
            self.in_use += n
            self.peak = max(self.peak, self.in_use)

    def release(self, n: int) -> None:
        with self._cond:
            self.in_use -= n
            self._cond.notify_all()


def _is_ready(value: Any) -> bool:
    """Whether every transfer behind a placed value (jax arrays) has completed."""
    arrays = (value.weight, value.scales) if _is_qw(value) else (value,)
    return all(getattr(a, "is_ready", lambda: False)() for a in arrays)


class _PlacementPipeline:
    """Overlaps file reads with host->device transfers (restore onto devices).

    Reader threads hand over checked host leaves (`put`); the loading thread (`run`)
    queues each leaf's transfers as it arrives, without waiting for them, and gives its
    host bytes back to the byte budget once its transfers are done: so the readers keep
    the disk busy while earlier leaves are copied, and host memory stays within the
    budget. Everything is waited for at the end.
    """

    def __init__(self, n: int, place: Callable[[int, Any], Any], budget: _ByteBudget,
                 control: _LoadControl):
        self._n, self._place, self._budget, self._control = n, place, budget, control
        self._ready: "queue.SimpleQueue[tuple[int, Any, int]]" = queue.SimpleQueue()
        # Seconds the loading thread spent queueing transfers, waiting for transfers to
        # finish (the budget was needed back, or the end), and waiting for the readers.
        self.stats = {"queue_s": 0.0, "wait_transfers_s": 0.0, "wait_reads_s": 0.0}

    def put(self, k: int, value: Any, host_bytes: int) -> None:
        """From a reader: leaf k is read and checked; `host_bytes` of the budget go with it."""
        self._ready.put((k, value, host_bytes))

    def _retire(self, pending: "collections.deque[tuple[Any, int]]", wait_for_oldest: bool) -> None:
        """Release the budget of finished transfers, oldest first; optionally wait for one."""
        while pending:
            value, nbytes = pending[0]
            if not _is_ready(value):
                if not wait_for_oldest:
                    return
                start = time.perf_counter()
                jax.block_until_ready(value)
                self.stats["wait_transfers_s"] += time.perf_counter() - start
            wait_for_oldest = False
            pending.popleft()
            self._budget.release(nbytes)

    def run(self) -> list[Any]:
        """Place all n leaves as they arrive; returns them in leaf order once all are on
        their devices. Raises _Cancelled as soon as a reader has failed (the caller raises
        the reader's error), or the placing error itself."""
        results: list[Any] = [None] * self._n
        pending: collections.deque = collections.deque()  # (placed value, host bytes), in order
        placed = 0
        while placed < self._n:
            self._control.check()
            start = time.perf_counter()
            try:
                # Short waits: the loop re-checks for a failed reader between them.
                k, value, nbytes = self._ready.get(timeout=0.01 if pending else 0.1)
            except queue.Empty:
                self.stats["wait_reads_s"] += time.perf_counter() - start
                # Nothing read yet: the readers may be waiting for budget, so wait for the
                # oldest transfer (the copy engine finishes them in order anyway).
                self._retire(pending, wait_for_oldest=True)
                continue
            self.stats["wait_reads_s"] += time.perf_counter() - start
            start = time.perf_counter()
            results[k] = self._place(k, value)
            del value  # jax holds the host buffer until its transfer is done
            self.stats["queue_s"] += time.perf_counter() - start
            pending.append((results[k], nbytes))
            placed += 1
            self._retire(pending, wait_for_oldest=False)
        start = time.perf_counter()
        jax.block_until_ready(results)
        self.stats["wait_transfers_s"] += time.perf_counter() - start
        while pending:
            self._budget.release(pending.popleft()[1])
        return results

    def drop(self) -> None:
        """After a failure: forget leaves read but not placed (their host buffers go)."""
        while True:
            try:
                self._ready.get_nowait()
            except queue.Empty:
                return


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="checkpoint",
        disable=not (enabled and sys.stderr.isatty()), leave=False, file=sys.stderr,
    )


def load_tensors(
    shaped_arrays: Sequence[Any],
    directory: str,
    mesh_config: Any = None,
    tensor_indices: Optional[Sequence[int]] = None,
    *,
    shardings: Optional[Sequence[Any]] = None,
    paths: Optional[Sequence[str]] = None,
    host_index: Optional[int] = None,
    num_hosts: Optional[int] = None,
    num_workers: int = 32,
    use_shm: Any = "auto",
    shm_dir: Optional[str] = None,
    max_inflight_bytes: Optional[int] = None,
    progress: bool = True,
    _stats: Optional[dict] = None,
) -> list[Any]:
    """Loads the tensor files for `shaped_arrays` (a flat list) from `directory`.

    Leaf k is read from tensor{tensor_indices[k] (default k):05d}_{h:03d} where h is this
    process's host shard (its process index, or 000 when that is the checkpoint's only
    shard), checked against shaped_arrays[k] (shape and dtype; a QuantizedWeight8bit of
    them, or a float leaf that the file may hold quantized) and, when `shardings` is given,
    placed on devices with shardings[k] (a Sharding, or a QuantizedWeight8bit of two).
    Returns numpy values (QuantizedWeight8bit of numpy) without shardings, jax arrays with.
    A shard with a manifest (host_shard_{h:03d}.json, from a multi-process save) holds
    blocks: each is checked against the manifest and the expected whole leaf, and placed
    as that block of the leaf (shardings are then required).

    use_shm: True copies each file through the RAM disk (`shm_dir`, default /dev/shm)
    before unpickling, as the release does, whenever it exists and has room (an anonymous
    file: nothing can outlive the process); False reads directly; "auto" (default) copies
    only from network / FUSE filesystems, where it helps, and reads local disks directly.

    Memory: host buffers and RAM-disk copies in flight stay under `max_inflight_bytes`
    (default 10% of the total, at least one file), each freed as soon as its leaf is placed.
    With shardings, reads and host->device transfers overlap (_PlacementPipeline): the
    workers only read, and this thread queues each leaf's transfers as it arrives; a host
    buffer counts against the budget until its transfer is done.
    On any error all workers stop, nothing is returned, and the first error is raised.
    mesh_config is accepted for compatibility with the release and not needed.
    """
    del mesh_config
    directory = os.fspath(directory)
    n = len(shaped_arrays)
    indices = list(range(n)) if tensor_indices is None else [int(i) for i in tensor_indices]
    if len(indices) != n or (shardings is not None and len(shardings) != n):
        raise ValueError("shaped_arrays, tensor_indices and shardings must have equal lengths")
    paths = list(paths) if paths is not None else [f"leaf {i}" for i in indices]
    host_index = jax.process_index() if host_index is None else host_index
    num_hosts = jax.process_count() if num_hosts is None else num_hosts

    _tidy_leftovers(directory)
    shard = _pick_host_shard(directory, _scan_directory(directory), host_index, num_hosts)
    files = [os.path.join(directory, tensor_filename(i, shard)) for i in indices]
    manifest = _read_manifest(directory, shard) or {}
    sizes, missing = [], []
    for f, p in zip(files, paths):
        try:
            st = os.stat(f)
        except FileNotFoundError:
            missing.append(f"{os.path.basename(f)} ({p})")
            continue
        except OSError as e:  # a symlink loop, no permission, ...
            raise CheckpointAccessError(f"{f}: cannot read: {_reason(e)} (parameter {p})") from None
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointAccessError(
                f"{f}: is {_file_kind(st.st_mode)}, not a regular file (parameter {p})")
        sizes.append(st.st_size)
    if missing:
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        shown = ", ".join(missing[:10]) + more
        raise MissingCheckpointFileError(
            f"{directory}: {len(missing)} tensor file(s) missing: {shown}"
        )

    total = sum(sizes)
    use_shm = _resolve_use_shm(use_shm, directory)
    per_byte = 2 if use_shm else 1  # a RAM-disk copy and the host buffer coexist briefly
    largest = max(sizes, default=0) * per_byte
    limit = max(int(0.1 * total), largest) if max_inflight_bytes is None else max(
        int(max_inflight_bytes), 1)
    bar = _progress_bar(total, progress)
    control = _LoadControl(bar.update)
    budget = _ByteBudget(limit, control)
    results: list[Any] = [None] * n

    def place(k: int, value: Any) -> Any:
        """Queue leaf k's transfers to its devices (the pipeline waits for them)."""
        try:
            return _place(value, shardings[k], manifest.get(indices[k]),
                          f"{files[k]}: parameter {paths[k]}", wait=False)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(
                f"{files[k]}: parameter {paths[k]}: placing {_describe(value)} "
                f"with {shardings[k]} failed: {e}"
            ) from e

    # Onto devices, reads and transfers overlap: the workers only read and check.
    pipeline = None if shardings is None else _PlacementPipeline(n, place, budget, control)

    def work(k: int) -> None:
        try:
            control.check()
            cost = sizes[k] * per_byte
            budget.acquire(cost)
            handed_over = 0  # budget bytes that travel with the leaf to the pipeline
            try:
                value, _ = _unpickle_file(files[k], control, use_shm, shm_dir)
                boxes = manifest.get(indices[k])
                if boxes is None:
                    _check_leaf(value, shaped_arrays[k], files[k], paths[k])
                else:
                    _check_host_part(value, boxes, shaped_arrays[k], files[k], paths[k])
                    if shardings is None and not all(b.whole for b in boxes.values()):
                        raise CheckpointError(
                            f"{files[k]}: parameter {paths[k]}: holds only host {shard}'s block of "
                            "the leaf; pass shardings (restore does) to place it")
                if pipeline is None:
                    results[k] = value
                else:  # the RAM-disk copy is gone; the host buffer lives until transferred
                    handed_over = min(cost, sizes[k])
                    pipeline.put(k, value, handed_over)
            finally:
                budget.release(cost - handed_over)
        except _Cancelled:
            raise
        except CheckpointError as e:
            if paths[k] not in str(e):
                e = type(e)(f"{e} (parameter {paths[k]})")
            control.fail(e)
            raise e from None
        except BaseException as e:
            control.fail(e)
            raise

    start = time.perf_counter()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(num_workers, n)))
    interrupted = False  # set on Ctrl-C: then the workers are not waited for
    try:
        futures = [pool.submit(work, k) for k in range(n)]
        if pipeline is None:
            pending = set(futures)
            while pending:  # short waits: a KeyboardInterrupt lands at once
                done, pending = concurrent.futures.wait(
                    pending, timeout=0.25, return_when=concurrent.futures.FIRST_EXCEPTION)
                if any(fut.exception() is not None for fut in done):
                    break
        else:
            try:
                results = pipeline.run()
            except _Cancelled:
                pass  # a reader failed: its error is raised below
            except CheckpointError as e:  # placing failed
                control.fail(e)
                raise
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        # Stops the other workers at their next chunk if anything failed or the caller was
        # interrupted; after a success every job is done and this changes nothing. On Ctrl-C
        # the caller does not wait for them: each stops at its next chunk by itself.
        control.cancelled.set()
        pool.shutdown(wait=not interrupted, cancel_futures=True)
        if pipeline is not None:
            pipeline.drop()
        bar.close()
    if control.first_error is not None:
        results.clear()
        raise control.first_error
    seconds = time.perf_counter() - start
    placing = "" if pipeline is None else (
        "; placing: %.2f s queueing transfers, %.2f s waiting for them, %.2f s for reads" % (
            pipeline.stats["queue_s"], pipeline.stats["wait_transfers_s"], pipeline.stats["wait_reads_s"]))
    logger.info(
        "Loaded %d tensors, %.2f GB in %.2f s (%.2f GB/s) from %s%s%s",
        n, total / 1e9, seconds, total / 1e9 / max(seconds, 1e-9), directory,
        " through the RAM disk" if use_shm else "", placing,
    )
    if _stats is not None:
        _stats.update(bytes=total, seconds=seconds, peak_inflight=budget.peak, limit=limit,
                      use_shm=use_shm, **(pipeline.stats if pipeline is not None else {}))
    return results


# ---------------------------------------------------------------------------------------
# Rename / exclude rules
# ---------------------------------------------------------------------------------------


def get_load_path_str(init_path_str: str, load_rename_rules=None,
                      load_exclude_rules=None) -> Optional[str]:
    """The checkpoint path to load the code's parameter `init_path_str` from.

    None when an exclude rule (regex, re.search) matches; otherwise the path after the first
    rename rule (pattern, replacement) whose pattern matches, or unchanged.
    """
    for pattern in load_exclude_rules or ():
        if re.search(pattern, init_path_str):
            return None
    for pattern, replacement in load_rename_rules or ():
        if re.search(pattern, init_path_str):
            return re.sub(pattern, replacement, init_path_str)
    return init_path_str


def _leaf_shape(x: Any) -> tuple:
    return tuple(x.weight.shape) if _is_qw(x) else tuple(getattr(x, "shape", ()))


def _merge(init_state: Any, load_map: dict[str, Any], rename, exclude) -> Any:
    paths, leaves, treedef = checkpoint_leaves_of(init_state)
    out = []
    for path, init_leaf in zip(paths, leaves):
        src = get_load_path_str(path, rename, exclude)
        if src is None:
            logger.info("Excluded from restore: %s", path)
            out.append(init_leaf)
        elif src in load_map:
            value = load_map[src]
            if _leaf_shape(value) != _leaf_shape(init_leaf):
                raise CheckpointMismatchError(
                    f"parameter {path} (loaded from {src}): expected {_describe(init_leaf)}, "
                    f"found {_describe(value)}"
                )
            out.append(value)
        else:
            logger.warning("Not found in checkpoint, keeping the initial value: %s", path)
            out.append(init_leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def replace_with_load_state(init_state: Any, load_state: Any, load_rename_rules=None,
                            load_exclude_rules=None, mesh_config: Any = None) -> Any:
    """init_state with each leaf replaced by the load_state leaf at its (renamed) path.

    Paths are strings like 'params/transformer/decoder_layer_0/router/w'. Excluded leaves
    and leaves the load state lacks keep their init value (the latter logged as a warning).
    A replaced leaf whose shape differs raises CheckpointMismatchError.
    """
    del mesh_config
    load_paths, load_leaves, _ = checkpoint_leaves_of(load_state)
    return _merge(init_state, dict(zip(load_paths, load_leaves)), load_rename_rules,
                  load_exclude_rules)


# ---------------------------------------------------------------------------------------
# restore
# ---------------------------------------------------------------------------------------


def _resolve_sharding(s: Any, mesh: Optional[jax.sharding.Mesh]) -> Any:
    if _is_qw(s):
        return QuantizedWeight8bit(weight=_resolve_sharding(s.weight, mesh),
                                   scales=_resolve_sharding(s.scales, mesh))
    if isinstance(s, jax.sharding.Sharding):
        return s
    if s is None or isinstance(s, PartitionSpec):
        if mesh is None:
            if s is None or s == PartitionSpec():
                return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            raise ValueError(f"a PartitionSpec {s} needs a mesh")
        return NamedSharding(mesh, s if s is not None else PartitionSpec())
    raise TypeError(f"not a sharding: {s!r}")


def _sharding_leaves(state_sharding: Any, treedef: Any, paths: list[str],
                     mesh: Optional[jax.sharding.Mesh]) -> list[Any]:
    """One resolved sharding per leaf of the tree `treedef` describes."""
    if state_sharding is None:
        return [_resolve_sharding(None, mesh)] * len(paths)
    state_sharding = _as_state(state_sharding)
    try:
        flat = treedef.flatten_up_to(state_sharding)
    except (ValueError, TypeError) as e:
        is_leaf = lambda x: x is None or isinstance(  # noqa: E731
            x, (jax.sharding.Sharding, PartitionSpec, QuantizedWeight8bit))
        with_path, _ = jax.tree_util.tree_flatten_with_path(state_sharding, is_leaf=is_leaf)
        have = {path_tuple_to_string(p) for p, _ in with_path}
        want = set(paths)
        raise CheckpointMismatchError(
            "Parameters in the code do not match the checkpoint's parameters.\n"
            f"Missing in the shardings (code): {sorted(want - have)}\n"
            f"Missing in the checkpoint shapes: {sorted(have - want)}\n({e})"
        ) from None
    return [_resolve_sharding(s, mesh) for s in flat]


def resolve_checkpoint_dir(checkpoint_path: str) -> str:
    """`checkpoint_path/ckpt-0` when it exists (the release's layout), else the path itself.

    A directory that is missing because a killed save left it moved aside is moved back
    first (_tidy_leftovers); the rest of the tidying is the loader's (load_tensors)."""
    sub = os.path.join(checkpoint_path, "ckpt-0")
    for directory in (sub, checkpoint_path):
        if not os.path.isdir(directory):
            _tidy_leftovers(directory)
    return sub if os.path.isdir(sub) else checkpoint_path


def restore(
    checkpoint_path: str,
    state_shapes: Any,
    mesh: Optional[jax.sharding.Mesh],
    between_hosts_config: Any = None,
    params_only: bool = True,
    state_sharding: Any = None,
    init_state: Any = None,
    *,
    rename_rules: Sequence[tuple[str, str]] = (),
    exclude_rules: Sequence[str] = (),
    num_workers: int = 32,
    use_shm: Any = "auto",
    progress: bool = True,
    shm_dir: Optional[str] = None,
    max_inflight_bytes: Optional[int] = None,
) -> Any:
    """Restores a checkpoint as global jax arrays placed with the given shardings.

    checkpoint_path: the tensor directory, or its parent holding `ckpt-0` (release layout).
    state_shapes: the checkpoint's tree, TrainingState(params=tree) or the bare params tree;
      leaves are jax.ShapeDtypeStruct / arrays, quantized weights a QuantizedWeight8bit of
      them (or, as in the release, a float32 leaf of the weight's shape).
    mesh: used for PartitionSpec / None shardings (None: replicated over the mesh).
    between_hosts_config: the release's host mesh shape; its product must equal the number
      of processes. Each process reads its own host shard, or _000 if it is the only one
      (the released form: every process reads it and places only its devices' slices). A
      shard written by a multi-process save holds blocks (host_shard_{h:03d}.json); it
      loads only where this process's devices need no more than its block.
    state_sharding: Shardings / PartitionSpecs matching state_shapes (or init_state when
      given); a QuantizedWeight8bit leaf takes a QuantizedWeight8bit of two, or one used for
      the weight and adapted to the scales. None replicates everything over `mesh`.
    init_state: the code's tree when it differs from the checkpoint's: its leaves are
      loaded from the checkpoint path given by rename_rules / exclude_rules (see
      get_load_path_str); excluded and absent ones keep their init value. Checkpoint
      tensors nobody uses are not read.
    use_shm / num_workers / max_inflight_bytes / progress: see load_tensors.
    Returns the params tree when params_only (the release's default use), else the state.
    """
    if between_hosts_config is not None and math.prod(between_hosts_config) != jax.process_count():
        raise ValueError(
            f"between_hosts_config {tuple(between_hosts_config)} implies "
            f"{math.prod(between_hosts_config)} processes, but jax runs {jax.process_count()}"
        )
    directory = resolve_checkpoint_dir(os.fspath(checkpoint_path))
    paths, leaves, treedef = checkpoint_leaves(state_shapes)

    shards = _scan_directory(directory)
    host = _pick_host_shard(directory, shards, jax.process_index(), jax.process_count())
    extra = sorted(i for i in shards.get(host, ()) if i >= len(leaves))
    if extra:
        raise CheckpointMismatchError(
            f"{directory}: the checkpoint holds {len(shards[host])} tensors for host {host:03d} "
            f"but the code's parameter tree has {len(leaves)} leaves (extra files from "
            f"{tensor_filename(extra[0], host)}); the code's and the checkpoint's parameters differ"
        )
    common = dict(host_index=jax.process_index(), num_hosts=jax.process_count(),
                  num_workers=num_workers, use_shm=use_shm, shm_dir=shm_dir,
                  max_inflight_bytes=max_inflight_bytes, progress=progress)

    if init_state is None:
        if rename_rules or exclude_rules:
            raise ValueError("rename_rules / exclude_rules need init_state (the code's tree)")
        shardings = _sharding_leaves(state_sharding, treedef, paths, mesh)
        values = load_tensors(leaves, directory, shardings=shardings, paths=paths, **common)
        params = jax.tree_util.tree_unflatten(treedef, values).params
        return _result(params, state_shapes, params_only)

    # The code's tree differs: load only what init_state's leaves map to.
    init = _as_state(init_state)
    init_paths, init_leaves, init_def = checkpoint_leaves_of(init)
    init_shardings = _sharding_leaves(state_sharding, init_def, init_paths, mesh)
    index_of = {p: i for i, p in enumerate(paths)}
    wanted: dict[int, Any] = {}
    for ipath, ileaf, isharding in zip(init_paths, init_leaves, init_shardings):
        src = get_load_path_str(ipath, rename_rules, exclude_rules)
        if src is None or src not in index_of:
            continue
        k = index_of[src]
        if _leaf_shape(leaves[k]) != _leaf_shape(ileaf):
            raise CheckpointMismatchError(
                f"parameter {ipath} (checkpoint {src}, {tensor_filename(k, host)}): the code "
                f"expects {_describe(ileaf)}, the checkpoint tree says {_describe(leaves[k])}"
            )
        wanted.setdefault(k, isharding)
    order = sorted(wanted)
    values = load_tensors([leaves[k] for k in order], directory, tensor_indices=order,
                          shardings=[wanted[k] for k in order],
                          paths=[paths[k] for k in order], **common)
    merged = _merge(init, {paths[k]: v for k, v in zip(order, values)}, rename_rules,
                    exclude_rules)
    # Leaves kept from init_state go to devices too, so the whole result is placed.
    merged_leaves = [_place_kept(x, s) for x, s in zip(checkpoint_leaves_of(merged)[1],
                                                       init_shardings)]
    params = jax.tree_util.tree_unflatten(init_def, merged_leaves).params
    return _result(params, init_state, params_only)


def _result(params: Any, like: Any, params_only: bool) -> Any:
    """The params, or a state of the caller's own TrainingState class around them."""
    return type(like)(params=params) if _is_state(like) and not params_only else params


def _place_kept(x: Any, sharding: Any) -> Any:
    """An init_state leaf kept by restore: placed with its sharding unless already placed."""
    if isinstance(x.weight if _is_qw(x) else x, jax.Array):
        return x
    if _is_qw(x):
        return _place(QuantizedWeight8bit(np.asarray(x.weight), np.asarray(x.scales)), sharding)
    return _place(np.asarray(x), sharding)


# ---------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------


def _host_block(x: jax.Array, path: str) -> tuple[np.ndarray, _Box]:
    """The block of a global array that this process's devices hold, as one host array.

    Replicas are read once. The devices' slices must tile a box (the hybrid mesh gives
    each process a contiguous block of the mesh, hence of every sharded dimension).
    """
    shape = tuple(x.shape)
    pieces: dict[tuple, Any] = {}
    for shard in x.addressable_shards:
        key = tuple(sl.indices(n)[:2] for sl, n in zip(shard.index, shape))
        pieces.setdefault(key, shard)
    start = tuple(min(k[d][0] for k in pieces) for d in range(len(shape)))
    stop = tuple(max(k[d][1] for k in pieces) for d in range(len(shape)))
    box = _Box(shape, start, stop)
    if sum(math.prod(b - a for a, b in k) for k in pieces) != math.prod(box.local_shape):
        raise ValueError(
            f"{path}: the slices on process {jax.process_index()}'s devices do not form one block "
            f"of the {list(shape)} array ({x.sharding}); save needs each process to hold a "
            "rectangular block, as runners.make_mesh's hybrid mesh gives")
    out = np.empty(box.local_shape, x.dtype)
    for key, shard in pieces.items():
        out[tuple(slice(a - s0, b - s0) for (a, b), s0 in zip(key, start))] = np.asarray(shard.data)
    return out, box


def _whole_box(a: Any) -> _Box:
    return _Box(tuple(a.shape), (0,) * len(a.shape), tuple(a.shape))


def _to_host(x: Any, path: str) -> tuple[Any, dict[str, _Box]]:
    """(host value to pickle, {field: _Box} of the parts that are blocks of a global array
    spanning several processes; empty when the value is whole)."""
    if isinstance(x, TransposedWeight8bit):
        raise ValueError(f"{path}: an int8 weight stored transposed for inference (model.prepare_for_inference); "
                         "checkpoints keep the released layout: save the parameters as loaded or created.")
    if isinstance(x, SplitTable):
        raise ValueError(f"{path}: an embedding table split into bf16 hi + lo for inference "
                         "(model.prepare_for_inference); checkpoints keep the released float32 table: "
                         "save the parameters as loaded or created.")
    if _is_qw(x):
        w, wbox = _to_host(x.weight, path + " (weight)")
        s, sbox = _to_host(x.scales, path + " (scales)")
        boxes = {}
        if wbox or sbox:  # a manifest entry of a quantized weight names both fields
            boxes = {"weight": wbox.get("value") or _whole_box(w), "scales": sbox.get("value") or _whole_box(s)}
        return QuantizedWeight8bit(weight=w, scales=s), boxes
    boxes: dict[str, _Box] = {}
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        a, box = _host_block(x, path)
        boxes = {"value": box}
    else:
        a = np.asarray(x)
    if a.dtype.hasobject or a.dtype.kind not in "biufc" and a.dtype != _BF16:
        raise ValueError(f"{path}: dtype {a.dtype} cannot be stored in a checkpoint")
    return a, boxes


_barrier_ids = itertools.count()


def _coordination_client() -> Any:
    """jax.distributed's coordination client (no public barrier or key-value store with a
    timeout), or None for a single process."""
    from jax._src import distributed

    client = distributed.global_state.client
    return None if client is None or jax.process_count() == 1 else client


def _barrier(name: str, timeout_s: float) -> None:
    """Wait until every process reaches this point (jax's coordination service), at most
    timeout_s; a no-op in a one-process run."""
    client = _coordination_client()
    if client is None:
        return
    try:
        client.wait_at_barrier(f"grok1-{name}-{next(_barrier_ids)}", int(timeout_s * 1000))
    except Exception as e:  # jax raises its runtime error type
        raise CheckpointError(
            f"process {jax.process_index()} of {jax.process_count()}: not every process reached "
            f"'{name}' within {timeout_s:g} s ({e}). Every process must call save with its part; "
            "one may have failed or died") from None


# Test hook: called as hook(step) during save: "file" after each file written, "written"
# once all are, "swapping" just before the new checkpoint is swapped in, "aside" between
# the two renames of the fallback swap, "swapped" once the new checkpoint is in place.
_save_hook: Optional[Callable[[str], None]] = None
# Swap directories with renameat2(RENAME_EXCHANGE) where the filesystem supports it; tests
# turn it off to exercise the two-rename fallback.
_USE_RENAME_EXCHANGE = True
_renameat2: list = []  # [the libc function, or None where there is none]


def _step(name: str) -> None:
    if _save_hook is not None:
        _save_hook(name)


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps the directories at paths a and b (renameat2 RENAME_EXCHANGE: Linux
    3.15+, glibc 2.28+); False where unavailable or the filesystem refuses (e.g. NFS)."""
    if not _USE_RENAME_EXCHANGE:
        return False
    if not _renameat2:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            fn = None
        _renameat2.append(fn)
    fn = _renameat2[0]
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


@contextlib.contextmanager
def _dir_lock(path: str):
    """An exclusive flock on directory `path` (serialises swaps of checkpoints in it by
    processes saving concurrently); a no-op where the filesystem has no such locks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


def _host_of(name: str) -> Optional[int]:
    """The host shard a tensor file or manifest name belongs to, else None."""
    m = _TENSOR_NAME.match(name) or re.fullmatch(r"host_shard_([0-9]{3})\.json", name)
    return int(m.groups()[-1]) if m else None


def _kept_entries(directory: str, entries: Sequence[str], replaced: set) -> list[str]:
    """The entries of the old checkpoint directory that a save replacing host shards
    `replaced` keeps: everything but those shards and temporary files. Only files (and
    links) can be kept: a subdirectory is refused, since the directory is swapped whole."""
    kept = []
    for n in entries:
        if _host_of(n) in replaced or _TEMP_NAME.match(n) or _LEGACY_TEMP_NAME.match(n):
            continue
        try:
            is_dir = stat.S_ISDIR(os.lstat(os.path.join(directory, n)).st_mode)
        except FileNotFoundError:
            continue
        if is_dir:
            raise CheckpointError(
                f"{directory}: holds the subdirectory '{n}'; save replaces a checkpoint directory "
                "as a whole and keeps only files in it. Move the subdirectory elsewhere, or save "
                "into a directory of its own")
        kept.append(n)
    return kept


def _keep(src: str, dst: str) -> None:
    """Puts an entry of the old checkpoint directory into the new one: a hard link (no copy,
    and the old directory stays intact until the swap), else a copy."""
    try:
        os.link(src, dst, follow_symlinks=False)
        return
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP,
                           errno.EACCES):
            raise
    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISREG(st.st_mode):
        shutil.copy2(src, dst)
    else:
        raise CheckpointAccessError(
            f"{src}: is {_file_kind(st.st_mode)} and cannot be hard-linked here; save cannot keep it")


def _check_before_save(directory: str, host: int, overwrite: bool) -> None:
    """Refuses early what the swap would refuse after all the writing."""
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        what = ("is a file, not a checkpoint directory" if os.path.isfile(directory)
                else "a directory above it is a file")
        raise CheckpointAccessError(f"{directory}: {what}") from None
    except OSError as e:
        raise CheckpointAccessError(f"{directory}: cannot list: {_reason(e)}") from None
    _refuse_existing(directory, entries, host, overwrite)
    _kept_entries(directory, entries, {host})


def _refuse_existing(directory: str, entries: list[str], host: int, overwrite: bool) -> None:
    """FileExistsError if `entries` of `directory` hold tensor files of `host` and not overwrite."""
    old = [n for n in entries if _TENSOR_NAME.match(n) and _host_of(n) == host]
    if old and not overwrite:
        raise FileExistsError(
            f"{directory}: already holds {len(old)} tensor files for host {host:03d}; "
            "pass overwrite=True to replace them"
        )


def _swap_in(staging: str, directory: str, replaced: set, host: int, overwrite: bool) -> None:
    """Makes the complete checkpoint in `staging` (beside `directory`, same filesystem) the
    one at `directory`, keeping the old directory's other host shards and files. One atomic
    exchange where supported; else two renames, the old one moved aside in between (a kill
    there leaves it for _tidy_leftovers to move back). The old one is deleted last."""
    parent, name = os.path.split(directory)
    old = None
    with _dir_lock(parent):
        if not os.path.lexists(directory):
            os.rename(staging, directory)
        else:
            try:
                entries = os.listdir(directory)
            except NotADirectoryError:
                raise CheckpointAccessError(f"{directory}: is a file, not a checkpoint directory") from None
            _refuse_existing(directory, entries, host, overwrite)  # written meanwhile by another process
            for n in _kept_entries(directory, entries, replaced):
                if not os.path.lexists(os.path.join(staging, n)):
                    _keep(os.path.join(directory, n), os.path.join(staging, n))
            _fsync_dir(staging)
            _step("swapping")
            if _exchange(staging, directory):
                old = staging
            else:
                old = os.path.join(parent, _temp_name(name, "old"))
                os.rename(directory, old)
                try:
                    _step("aside")
                    os.rename(staging, directory)
                except BaseException:
                    os.rename(old, directory)
                    raise
        _fsync_dir(parent)
    _step("swapped")
    if old is not None:
        _remove(old)


def _spans_processes(leaves: Sequence[Any]) -> bool:
    parts = [p for x in leaves for p in ((x.weight, x.scales) if _is_qw(x) else (x,))]
    return any(isinstance(p, jax.Array) and not p.is_fully_addressable for p in parts)


def _staging_dir(parent: str, name: str, collective: bool, timeout_s: float) -> str:
    """Creates the directory the new checkpoint is written into, beside the old one. In a
    collective save, process 0 names it and every process that can see it (a shared
    filesystem) writes its shard there too; the others make their own."""
    if collective:
        shared = os.path.join(parent, _temp_name(name, "save", _agree_token(timeout_s)))
        if jax.process_index() == 0:
            _make_dir(shared, parent)
        _barrier("checkpoint-staging", timeout_s)
        if os.path.isdir(shared):
            return shared
    path = os.path.join(parent, _temp_name(name, "save"))
    _make_dir(path, parent)
    return path


def _make_dir(path: str, parent: str) -> None:
    try:
        os.makedirs(parent, exist_ok=True)
        os.mkdir(path, 0o777)  # as umask allows, like the tensor files
    except OSError as e:
        raise CheckpointAccessError(
            f"{path}: cannot create the temporary directory beside the checkpoint: {_reason(e)}. "
            f"save writes the new checkpoint there and then swaps it in, so it needs write "
            f"access to {parent}") from None


def _agree_token(timeout_s: float) -> str:
    """Process 0's temporary-name token, shared through jax's coordination service."""
    client = _coordination_client()
    if client is None:
        return _token()
    key = f"grok1-save-staging-{next(_barrier_ids)}"
    try:
        if jax.process_index() == 0:
            token = _token()
            client.key_value_set(key, token)
            return token
        return client.blocking_key_value_get(key, int(timeout_s * 1000))
    except Exception as e:  # jax raises its runtime error type
        raise CheckpointError(
            f"process {jax.process_index()}: could not agree on the save's temporary directory "
            f"with process 0 within {timeout_s:g} s ({e})") from None


def save(state_or_params: Any, directory: str, host_index: Optional[int] = None, *,
         num_workers: int = 8, overwrite: bool = False, sync_timeout_s: float = 600.0) -> list[str]:
    """Writes a params tree (or TrainingState) in the released format; returns the files.

    Leaves: numpy / jax arrays and QuantizedWeight8bit of them. File i holds leaf i of the
    flattened TrainingState(params=...) as a protocol-4 pickle, named tensor{i:05d}_{h:03d}
    with h = host_index (default: this process's index, 0 in a one-process run). An
    existing checkpoint for this host is refused unless overwrite. To produce the release's
    layout pass `<dir>/ckpt-0`.

    Atomic as a whole: the new checkpoint is written (and fsynced) into a temporary
    directory beside `directory`, then swapped in with renames; the old host shard is
    deleted only after that. A kill, a full disk or an error at any point leaves the old
    checkpoint (or none, if there was none) and never a half-written one under `directory`;
    leftovers of killed saves are removed by the next save or load. Other hosts' shards and
    other files in `directory` are kept (hard links); a subdirectory in it is refused. Needs
    write access to the parent directory.

    Several processes: when leaves are global arrays spanning processes, every process
    calls save (collectively, same directory or each its own disk): process h writes host
    shard h, its host-local block of each leaf, and host_shard_{h:03d}.json describing the
    blocks; then all wait (at most sync_timeout_s) until every shard is written, and the
    shards on one filesystem are swapped in together. Restore such a checkpoint with the
    same processes and mesh layout; each reads only its shard. A tree of whole values
    (numpy, or arrays this process can see entirely) is written whole, exactly as the
    one-host format, with no manifest.
    """
    given = os.fspath(directory)
    directory = os.path.realpath(given)  # a symlinked checkpoint is replaced where it lies
    paths, leaves, _ = checkpoint_leaves(state_or_params)
    collective = _spans_processes(leaves)
    host_index = jax.process_index() if host_index is None else int(host_index)
    parent, name = os.path.split(directory)
    _tidy_leftovers(directory)
    _check_before_save(directory, host_index, overwrite)
    staging = _staging_dir(parent, name, collective, sync_timeout_s)
    owns_staging = True  # whether a failure here must delete it
    boxes: list[dict[str, _Box]] = [{}] * len(leaves)
    stop = threading.Event()  # after a failure or Ctrl-C, queued files are not written

    def write(i: int) -> None:
        if stop.is_set():
            return
        try:
            value, boxes[i] = _to_host(leaves[i], paths[i])
            try:
                fast_pickle(value, os.path.join(staging, tensor_filename(i, host_index)))
            except OSError as e:
                raise CheckpointAccessError(
                    f"{os.path.join(given, tensor_filename(i, host_index))}: cannot write: "
                    f"{_reason(e)}; the old checkpoint is unchanged") from None
            _step("file")
        except BaseException:
            stop.set()
            raise

    try:
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, num_workers))
        try:
            for fut in [pool.submit(write, i) for i in range(len(leaves))]:
                fut.result()
        except BaseException:
            stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if collective:
            full = [b or ({"weight": _whole_box(x.weight), "scales": _whole_box(x.scales)} if _is_qw(x)
                          else {"value": _whole_box(x)}) for b, x in zip(boxes, leaves)]
            try:
                _write_manifest(staging, host_index, jax.process_count(), paths, full)
            except OSError as e:
                raise CheckpointAccessError(
                    f"{os.path.join(given, manifest_filename(host_index))}: cannot write: "
                    f"{_reason(e)}; the old checkpoint is unchanged") from None
        _fsync_dir(staging)
        _step("written")
        replaced = {host_index}
        if collective:
            _barrier("checkpoint-written", sync_timeout_s)
            replaced |= {h for h in map(_host_of, os.listdir(staging)) if h is not None}
            _barrier("checkpoint-listed", sync_timeout_s)
        if min(replaced) == host_index:  # the one process that swaps this directory
            try:
                _swap_in(staging, directory, replaced, host_index, overwrite)
            except OSError as e:
                if isinstance(e, (CheckpointError, FileExistsError)):
                    raise
                raise CheckpointAccessError(
                    f"{given}: cannot swap in the new checkpoint: {_reason(e)}; the old "
                    "checkpoint is unchanged") from None
        else:  # the shard is in the shared directory that process min(replaced) swaps in
            owns_staging = False
        if collective:
            _barrier("checkpoint-save", sync_timeout_s)
    except BaseException:
        if owns_staging:
            _remove(staging)
        raise
    return [os.path.join(given, tensor_filename(i, host_index)) for i in range(len(leaves))]


def merge_host_shards(directory: str, out_directory: str, *, overwrite: bool = False) -> list[str]:
    """Join the host shards of a multi-process save into one single-shard (_000) checkpoint
    in `out_directory`, loadable on any number of processes. One leaf in memory at a time.

    Every tensor index must be covered: each host shard with a manifest contributes its
    blocks; a shard without one holds whole leaves.
    """
    directory = resolve_checkpoint_dir(os.fspath(directory))
    shards = _scan_directory(directory)
    if not shards:
        raise MissingCheckpointFileError(f"{directory}: no tensor files (tensor#####_###) in this directory")
    manifests = {h: _read_manifest(directory, h) for h in sorted(shards)}
    count = max(max(ix) for ix in shards.values()) + 1
    os.makedirs(out_directory, exist_ok=True)
    if any(_TENSOR_NAME.match(n) for n in os.listdir(out_directory)) and not overwrite:
        raise FileExistsError(f"{out_directory}: already holds tensor files; pass overwrite=True")
    control = _LoadControl()
    files = []
    for i in range(count):
        joined: dict[str, np.ndarray] = {}
        covered: dict[str, np.ndarray] = {}  # which elements some shard supplied
        for h, manifest in manifests.items():
            f = os.path.join(directory, tensor_filename(i, h))
            if i not in shards[h]:
                raise MissingCheckpointFileError(f"{f}: file not found (host shard {h} is incomplete)")
            value, _ = _unpickle_file(f, control, use_shm=False)
            parts = {"weight": value.weight, "scales": value.scales} if _is_qw(value) else {"value": value}
            boxes = (manifest or {}).get(i) or {k: _whole_box(a) for k, a in parts.items()}
            if set(boxes) != set(parts):
                raise CorruptCheckpointError(f"{f}: holds {sorted(parts)}, its manifest says {sorted(boxes)}")
            for k, a in parts.items():
                box = boxes[k]
                if tuple(a.shape) != box.local_shape:
                    raise CorruptCheckpointError(f"{f}: {k} block is {list(a.shape)}, manifest says {list(box.local_shape)}")
                if k not in joined:
                    # A manifest's claimed whole shape must be coverable by the blocks the
                    # shards hold: never allocate what no file can fill (e.g. petabytes).
                    need = math.prod(box.shape)
                    have = sum(math.prod(m[i][k].local_shape) if m and k in m.get(i, {}) else need
                               for m in manifests.values())
                    if need > have:
                        raise CorruptCheckpointError(
                            f"{f}: {k} is a block of a {list(box.shape)} leaf ({need} elements), "
                            f"but the host shards' blocks hold only {have} elements")
                    try:
                        joined[k], covered[k] = np.zeros(box.shape, a.dtype), np.zeros(box.shape, bool)
                    except MemoryError:
                        raise CorruptCheckpointError(
                            f"{f}: {k}: no memory for the whole {list(box.shape)} {a.dtype} leaf") from None
                elif joined[k].shape != tuple(box.shape) or joined[k].dtype != a.dtype:
                    raise CorruptCheckpointError(f"{f}: {k} is a block of {list(box.shape)} {a.dtype}; other "
                                                 f"hosts say {list(joined[k].shape)} {joined[k].dtype}")
                region = tuple(slice(lo, hi) for lo, hi in zip(box.start, box.stop))
                joined[k][region] = a
                covered[k][region] = True
        for k, a in joined.items():
            if not covered[k].all():
                raise CorruptCheckpointError(f"{directory}: tensor {i} ({k}): the host shards cover only "
                                             f"{int(covered[k].sum())} of {a.size} elements")
        value = QuantizedWeight8bit(**joined) if "weight" in joined else joined["value"]
        out = os.path.join(out_directory, tensor_filename(i, 0))
        fast_pickle(value, out)
        files.append(out)
    return files


# ---------------------------------------------------------------------------------------
# Command line: --inspect
# ---------------------------------------------------------------------------------------


def _config_shapes(name: str) -> Any:
    import model

    if name == "grok-1":
        config = model.grok_1_config()
    elif name == "tiny":
        config = model.tiny_config()
    else:
        raise ValueError(f"unknown config {name!r}")
    return model.param_shapes(config)


def inspect_checkpoint(directory: str, config: Optional[str] = None, host: Optional[int] = None,
                       out=sys.stdout) -> int:
    """Prints every tensor of a checkpoint and checks completeness; returns 0 if complete."""
    directory = resolve_checkpoint_dir(directory)
    shards = _scan_directory(directory)
    problems: list[str] = []
    expected_paths: Optional[list[str]] = None
    expected_leaves: list[Any] = []
    if config:
        expected_paths, expected_leaves, _ = checkpoint_leaves(_config_shapes(config))
    if not shards:
        print(f"{directory}: no tensor files", file=out)
        return 1
    counts = {h: len(ix) for h, ix in shards.items()}
    if len(set(counts.values())) > 1:
        problems.append(f"host shards hold different numbers of tensors: {counts}")
    for h in sorted(shards) if host is None else [host]:
        present = shards.get(h, set())
        n = max(present, default=-1) + 1
        if expected_paths is not None:
            n = max(n, len(expected_paths))
        missing = [i for i in range(n) if i not in present]
        if missing:
            problems.append(f"host {h:03d}: missing {len(missing)} file(s): "
                            + ", ".join(tensor_filename(i, h) for i in missing[:10]))
        if expected_paths is not None and n > len(expected_paths):
            problems.append(f"host {h:03d}: {n - len(expected_paths)} file(s) beyond the "
                            f"{len(expected_paths)} parameters of config {config}")
        try:
            manifest = _read_manifest(directory, h) or {}
        except CheckpointError as e:
            problems.append(str(e))
            manifest = {}
        print(f"host {h:03d}: {len(present)} tensor files in {directory}"
              + (f" (blocks of the leaves: {manifest_filename(h)})" if manifest else ""), file=out)
        print(f"{'index':>5}  {'parameter':<56} {'dtype':<9} {'shape':<22} {'scales':<22} bytes",
              file=out)
        total = 0
        for i in sorted(present):
            f = os.path.join(directory, tensor_filename(i, h))
            path = expected_paths[i] if expected_paths and i < len(expected_paths) else "-"
            try:
                value, size = _unpickle_file(f, _LoadControl(), use_shm=False, skip_data=True)
            except CheckpointError as e:
                problems.append(str(e))
                print(f"{i:>5}  {path:<56} ERROR: {e}", file=out)
                continue
            total += size
            if _is_qw(value):
                dtype, shape = value.weight.dtype.name, list(value.weight.shape)
                scales = f"{value.scales.dtype.name}{list(value.scales.shape)}"
            else:
                dtype, shape, scales = value.dtype.name, list(value.shape), "-"
            print(f"{i:>5}  {path:<56} {dtype:<9} {str(shape):<22} {scales:<22} {size}", file=out)
            if expected_paths is not None and i < len(expected_paths):
                try:
                    if i in manifest:
                        _check_host_part(value, manifest[i], expected_leaves[i], f, path)
                    else:
                        _check_leaf(value, expected_leaves[i], f, path)
                except CheckpointError as e:
                    problems.append(str(e))
        print(f"host {h:03d}: {total / 1e9:.3f} GB", file=out)
    if problems:
        print(f"INCOMPLETE or MISMATCHED checkpoint ({len(problems)} problem(s)):", file=out)
        for p in problems:
            print(f"  - {p}", file=out)
        return 1
    print("checkpoint complete", file=out)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Grok-1 checkpoint tools")
    parser.add_argument("--inspect", metavar="DIR", required=True,
                        help="list a checkpoint's tensors and check that it is complete")
    parser.add_argument("--config", choices=("grok-1", "tiny"),
                        help="infer parameter paths and check shapes against this config")
    parser.add_argument("--host", type=int, help="only this host shard")
    args = parser.parse_args(argv)
    try:
        return inspect_checkpoint(args.inspect, args.config, args.host)
    except CheckpointError as e:  # nothing could be listed: a usage error, one line
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
