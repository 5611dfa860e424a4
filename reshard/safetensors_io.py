"""Reading and writing safetensors files as headers plus byte ranges.

Everything above this module sees a tensor as (name, dtype name, shape, file, byte range); only this module
touches file bytes, so no dtype is ever decoded and every dtype round-trips bit for bit.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

import numpy as np

from reshard.checksums import FileRecord, FollowingHash
from reshard.errors import InputError, OutputError

# Bytes per element of every whole-byte safetensors dtype.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
    "C64": 8,
}
# Dtypes that pack several values into a byte: a cut may fall inside a byte, so they are refused.
SUB_BYTE_DTYPES = {"F4", "F6_E2M3", "F6_E3M2"}

MAX_HEADER_BYTES = 100_000_000
HEADER_ALIGN = 8


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: where its bytes are, never the bytes themselves."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute position of the first byte in the file
    nbytes: int

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class SafetensorsFile:
    path: Path
    metadata: dict[str, str]
    tensors: tuple[TensorInfo, ...]  # in data order
    size: int  # of the whole file
    header_sha256: str  # of the length prefix and the header: what the manifest records of a source file


def read_header(path: Path) -> SafetensorsFile:
    """Read and validate the header of a safetensors file; the tensor data is not read."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise InputError(f"{path}: file is {size} bytes, too short to be safetensors; re-download or re-save it")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise InputError(
                    f"{path}: header length {header_len} exceeds {MAX_HEADER_BYTES} bytes; the file is not safetensors or is corrupt"
                )
            if 8 + header_len > size:
                raise InputError(
                    f"{path}: header says {header_len} bytes but the file has {size - 8} after the length; the file is truncated"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}") from e
    return parse_header(path, raw, size)


class DuplicateKey(ValueError):
    """A JSON object with a key given twice."""


def strict_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object that refuses a key given twice (json.loads would keep the last silently)."""
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKey(key)
        result[key] = value
    return result


def parse_header(path: Path, raw: bytes, file_size: int) -> SafetensorsFile:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=strict_object)
    except DuplicateKey as e:
        raise InputError(f"{path}: {shown(str(e))} appears twice in the header; the file is corrupt") from e
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InputError(f"{path}: header is not UTF-8 JSON ({e}); the file is corrupt") from e
    if not isinstance(header, dict):
        raise InputError(f"{path}: header is not a JSON object; the file is corrupt")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InputError(f"{path}: __metadata__ must map strings to strings; the file is corrupt")
    data_start = 8 + len(raw)
    tensors = [_tensor_info(path, name, entry, data_start) for name, entry in header.items()]
    tensors.sort(key=lambda t: t.offset)
    pos = data_start
    for t in tensors:
        if t.offset != pos:
            what = "overlaps the previous tensor" if t.offset < pos else f"leaves a hole of {t.offset - pos} bytes"
            raise InputError(f"{path}: tensor {shown(t.name)} {what}; the file is corrupt")
        pos += t.nbytes
    if pos != file_size:
        problem = "is truncated" if pos > file_size else f"has {file_size - pos} bytes after the last tensor"
        raise InputError(f"{path}: the file {problem} (header describes {pos} bytes, file has {file_size})")
    digest = hashlib.sha256(struct.pack("<Q", len(raw)) + raw).hexdigest()
    return SafetensorsFile(path=path, metadata=dict(metadata), tensors=tuple(tensors), size=file_size, header_sha256=digest)


def shown(name: str) -> str:
    """A name as an error line shows it: quoted when it holds line breaks or other unprintable characters."""
    return name if name.isprintable() else json.dumps(name)


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    where = f"{path}: tensor {shown(name)}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise InputError(f"{where}: entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise InputError(f"{where}: dtype must be a string, got {dtype!r}")
    if dtype in SUB_BYTE_DTYPES:
        raise InputError(f"{where} has dtype {dtype}, which packs values below a byte and cannot be cut safely")
    if dtype not in DTYPE_SIZES:
        raise InputError(f"{where} has unknown dtype {dtype!r}; known: {', '.join(DTYPE_SIZES)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InputError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise InputError(f"{where}: data_offsets must be two non-negative integers, got {offsets!r}")
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != nbytes:
        raise InputError(
            f"{where}: data_offsets span {end - begin} bytes but {dtype} {shape} needs {nbytes}; the file is corrupt"
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), path=path, offset=data_start + begin, nbytes=nbytes)


def encode_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The header bytes (length prefix included) for tensors stored back to back in the given order.

    Written as the safetensors library writes it (compact JSON, __metadata__ first, padded with spaces to
    8 bytes), so a merged file can come back byte-identical to a source that library wrote.
    """
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    pos = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % HEADER_ALIGN)
    return struct.pack("<Q", len(raw)) + raw


Entry = tuple[str, str, tuple[int, ...]]  # name, dtype, shape

# Writeback of written data starts every this many bytes, so the fsync at the end has little left to do.
WRITEBACK_BYTES = 64 << 20


@cache
def _writeback_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="reshard-writeback")


def entry_nbytes(entry: Entry) -> int:
    return math.prod(entry[2]) * DTYPE_SIZES[entry[1]]


class _Output:
    """An output that is closed (finished, flushed) when its block ends well, and aborted when it does not."""

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self: _O) -> _O:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


_O = TypeVar("_O", bound=_Output)


class SafetensorsWriter(_Output):
    """Writes a safetensors file whose header, and so every tensor's place, is known up front.

    Each tensor is written through its own Region, front to back; regions of different tensors may be written
    at the same time from different threads.
    """

    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str]) -> None:
        self.path = path
        header = encode_header(entries, metadata)
        self.expected = len(header) + sum(entry_nbytes(e) for e in entries)
        self._starts: dict[str, tuple[int, int]] = {}
        position = len(header)
        for entry in entries:
            self._starts[entry[0]] = (position, entry_nbytes(entry))
            position += entry_nbytes(entry)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        self._hash = FollowingHash(self._fd)
        self.record: FileRecord | None = None  # size and sha256, once closed
        self._lock = threading.Lock()
        self.written = 0
        self._unflushed: list[tuple[int, int]] = []  # written stretches whose writeback has not been started
        self._unflushed_bytes = 0
        self._pending: list[Future[None]] = []
        self._copy_file_range = hasattr(os, "copy_file_range")
        Region(self, 0, len(header)).write(header)

    def region(self, name: str) -> Region:
        start, size = self._starts[name]
        return Region(self, start, size)

    def note_written(self, position: int, n: int) -> None:
        self._hash.written(position, n)
        with self._lock:
            self.written += n
            self._unflushed.append((position, n))
            self._unflushed_bytes += n
            if self._unflushed_bytes < WRITEBACK_BYTES:
                return
            stretches, self._unflushed, self._unflushed_bytes = self._unflushed, [], 0
        # Start writing these stretches to disk now rather than all at once in close(); a background thread
        # submits them, since submitting can block while the disk is busy.
        self._pending.append(_writeback_pool().submit(_start_writeback, self._fd, stretches))

    def close(self) -> None:
        """Flush to disk; a short file means the caller's arithmetic is wrong, never a silent success."""
        if self._fd < 0:
            return
        try:
            self._drain()
            if self.written != self.expected:
                raise OutputError(f"{self.path}: wrote {self.written} bytes, expected {self.expected}")
            digest = self._hash.hexdigest(self.expected)
            try:
                os.fsync(self._fd)
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(self.path)) from e
            self.record = FileRecord(self.expected, digest)
        finally:
            self._hash.stop()
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        if self._fd >= 0:
            self._hash.stop()
            self._drain()
            os.close(self._fd)
            self._fd = -1

    def _drain(self) -> None:
        for future in self._pending:
            future.result()
        self._pending.clear()



SYNC_FILE_RANGE_WRITE = 2


@cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range, which os does not expose: it starts writeback and, unlike fadvise(DONTNEED),
    keeps the pages cached, so a merge right after a split reads the rank files from memory."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _start_writeback(fd: int, stretches: list[tuple[int, int]]) -> None:
    start = _sync_file_range()
    for position, n in stretches:
        if start is not None:
            start(fd, position, n, SYNC_FILE_RANGE_WRITE)
        elif hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, position, n, os.POSIX_FADV_DONTNEED)


# copy_file_range errors that mean "not here" (across filesystems, unsupported), not a failed write.
_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM, errno.ETXTBSY}


class Region:
    """One tensor's bytes in an output file, written front to back by one thread."""

    def __init__(self, writer: SafetensorsWriter, start: int, size: int) -> None:
        self._writer, self._position, self._end = writer, start, start + size

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        self._check(len(view))
        while view:
            try:
                n = os.pwrite(self._writer._fd, view, self._position)
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(self._writer.path)) from e
            self._writer.note_written(self._position, n)
            self._position += n
            view = view[n:]

    def copy_from(self, src_fd: int, offset: int, n: int) -> None:
        """n bytes of another file, copied inside the kernel where it can (as cp does)."""
        self._check(n)
        writer = self._writer
        while n > 0:
            copied = 0
            if writer._copy_file_range:
                try:
                    copied = os.copy_file_range(src_fd, writer._fd, min(n, 1 << 30), offset, self._position)
                except OSError as e:
                    if e.errno not in _NO_COPY_FILE_RANGE:
                        raise OSError(e.errno, e.strerror, str(writer.path)) from e
                    writer._copy_file_range = False  # another filesystem or an old kernel: plain reads
            if copied:
                writer.note_written(self._position, copied)
                self._position += copied
            else:
                data = os.pread(src_fd, min(n, 32 << 20), offset)
                if not data:
                    raise InputError(f"file ended {n} bytes early while copying into {writer.path}; it changed while being read")
                self.write(data)
                copied = len(data)
            offset += copied
            n -= copied

    def write_zeros(self, n: int) -> None:
        zeros = bytes(min(n, 32 << 20))
        while n > 0:
            self.write(zeros[: min(n, len(zeros))])
            n -= min(n, len(zeros))

    def _check(self, n: int) -> None:
        if self._position + n > self._end:
            raise OutputError(f"{self._writer.path}: a tensor's data overruns its {self._end - self._position} remaining bytes")


def partition(entries: list[Entry], max_bytes: int | None) -> list[list[Entry]]:
    """Consecutive groups of at most max_bytes of tensor data; a larger tensor makes a group of its own."""
    groups: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        n = entry_nbytes(entry)
        if max_bytes is not None and groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += n
    return groups


class PartedWriter(_Output):
    """One output cut into consecutive safetensors files, one group of tensors per file, all open at once."""

    def __init__(self, paths: list[Path], groups: list[list[Entry]], metadata: dict[str, str]) -> None:
        self._writers: list[SafetensorsWriter] = []
        try:
            for path, group in zip(paths, groups):
                self._writers.append(SafetensorsWriter(path, group, metadata))
        except BaseException:
            self.abort()
            raise
        self._part_of = {name: i for i, group in enumerate(groups) for name, _, _ in group}

    def region(self, name: str) -> Region:
        return self._writers[self._part_of[name]].region(name)

    def close(self) -> None:
        """Finish every file; one that did not get all its bytes raises."""
        for writer in self._writers:
            writer.close()

    def records(self) -> dict[str, FileRecord]:
        """Each file's name, size and sha256, once closed."""
        return {w.path.name: w.record for w in self._writers if w.record is not None}

    def abort(self) -> None:
        for writer in self._writers:
            writer.abort()



class Buffers:
    """Scratch uint8 arrays kept between blocks, so the engines allocate (and fault in) their memory once."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        size = shape[0] * shape[1]
        array = self._arrays.get(name)
        if array is None or array.size < size:
            array = self._arrays[name] = np.empty(size, dtype=np.uint8)
        return array[:size].reshape(shape)


class ByteReader:
    """Positioned reads from one read-only file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)

    @property
    def fd(self) -> int:
        return self._fd

    def read_into(self, offset: int, out: np.ndarray) -> np.ndarray:
        """Fill `out` (a uint8 array) from the file at `offset`; reusing `out` spares the page faults of a new buffer."""
        view = memoryview(out).cast("B")
        got = 0
        while got < len(view):
            n = os.preadv(self._fd, [view[got:]], offset + got)
            if n == 0:
                raise InputError(f"{self.path}: file ended at byte {offset + got}, expected {offset + len(view)}; it was truncated while being read")
            got += n
        return out

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> ByteReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
