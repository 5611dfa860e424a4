"""Reading and writing safetensors files as headers plus byte ranges.

Everything above this module sees a tensor as (name, dtype name, shape, file, byte range); only this module
touches file bytes, so no dtype is ever decoded and every dtype round-trips bit for bit.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

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


def parse_header(path: Path, raw: bytes, file_size: int) -> SafetensorsFile:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: header is not UTF-8 JSON ({e}); the file is corrupt") from e
    if not isinstance(header, dict):
        raise InputError(f"{path}: header is not a JSON object; the file is corrupt")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InputError(f"{path}: __metadata__ must map strings to strings; the file is corrupt")
    data_start = 8 + len(raw)
    tensors = [_tensor_info(path, name, entry, data_start) for name, entry in header.items()]
    tensors.sort(key=lambda t: t.offset)
    pos = data_start
    for t in tensors:
        if t.offset != pos:
            what = "overlaps the previous tensor" if t.offset < pos else f"leaves a hole of {t.offset - pos} bytes"
            raise InputError(f"{path}: tensor {t.name} {what}; the file is corrupt")
        pos += t.nbytes
    if pos != file_size:
        problem = "is truncated" if pos > file_size else f"has {file_size - pos} bytes after the last tensor"
        raise InputError(f"{path}: the file {problem} (header describes {pos} bytes, file has {file_size})")
    return SafetensorsFile(path=path, metadata=dict(metadata), tensors=tuple(tensors))


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise InputError(f"{path}: tensor {name}: entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype in SUB_BYTE_DTYPES:
        raise InputError(f"{path}: tensor {name} has dtype {dtype}, which packs values below a byte and cannot be cut safely")
    if dtype not in DTYPE_SIZES:
        raise InputError(f"{path}: tensor {name} has unknown dtype {dtype!r}; known: {', '.join(DTYPE_SIZES)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InputError(f"{path}: tensor {name}: shape must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise InputError(f"{path}: tensor {name}: data_offsets must be two non-negative integers, got {offsets!r}")
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != nbytes:
        raise InputError(
            f"{path}: tensor {name}: data_offsets span {end - begin} bytes but {dtype} {shape} needs {nbytes}; the file is corrupt"
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


class SafetensorsWriter:
    """Writes a safetensors file whose header is known up front and whose data arrives in order."""

    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str]) -> None:
        self.path = path
        header = encode_header(entries, metadata)
        self.expected = len(header) + sum(entry_nbytes(e) for e in entries)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self.written = 0
        self._flushed = 0
        self._pending: list[Future[None]] = []
        self._copy_file_range = hasattr(os, "copy_file_range")
        self.write(header)

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
            self._advance(n)

    def copy_from(self, src_fd: int, offset: int, n: int) -> None:
        """Append n bytes of another file, copied inside the kernel where it can (as cp does)."""
        while n > 0:
            copied = 0
            if self._copy_file_range:
                try:
                    copied = os.copy_file_range(src_fd, self._fd, min(n, 1 << 30), offset)
                except OSError:
                    self._copy_file_range = False  # another filesystem or an old kernel: plain reads
            if not copied:
                data = os.pread(src_fd, min(n, 32 << 20), offset)
                if not data:
                    raise InputError(f"file ended {n} bytes early while copying into {self.path}; it changed while being read")
                self.write(data)
                copied = len(data)
            else:
                self._advance(copied)
            offset += copied
            n -= copied

    def write_zeros(self, n: int) -> None:
        zeros = bytes(min(n, 32 << 20))
        while n > 0:
            self.write(zeros[: min(n, len(zeros))])
            n -= min(n, len(zeros))

    def _advance(self, n: int) -> None:
        self.written += n
        if self.written - self._flushed >= WRITEBACK_BYTES:
            # Start writing this stretch to disk now rather than all at once in close(); a background thread
            # submits it, since submitting can block while the disk is busy.
            self._pending.append(
                _writeback_pool().submit(os.posix_fadvise, self._fd, self._flushed, self.written - self._flushed, os.POSIX_FADV_DONTNEED)
            )
            self._flushed = self.written

    def close(self) -> None:
        """Flush to disk; a short file means the caller's arithmetic is wrong, never a silent success."""
        if self._fd < 0:
            return
        try:
            self._drain()
            if self.written != self.expected:
                raise OutputError(f"{self.path}: wrote {self.written} bytes, expected {self.expected}")
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1

    def _drain(self) -> None:
        for future in self._pending:
            future.result()
        self._pending.clear()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        elif self._fd >= 0:
            self._drain()
            os.close(self._fd)
            self._fd = -1


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


class PartedWriter:
    """Writes tensors in order into consecutive safetensors files, one group of tensors per file."""

    def __init__(self, paths: list[Path], groups: list[list[Entry]], metadata: dict[str, str]) -> None:
        self._paths, self._groups, self._metadata = paths, groups, metadata
        self._part_of = {name: i for i, group in enumerate(groups) for name, _, _ in group}
        self._index = -1
        self._current: SafetensorsWriter | None = None

    def begin(self, name: str) -> SafetensorsWriter:
        """The file the tensor `name` goes to; the files before it are finished and closed."""
        index = self._part_of[name]
        while self._index < index:
            self._open_next()
        assert self._current is not None
        return self._current

    def close(self) -> None:
        """Finish every file; one that did not get all its bytes raises, as SafetensorsWriter.close does."""
        while self._index < len(self._groups) - 1:
            self._open_next()
        if self._current is not None:
            self._current.close()

    def _open_next(self) -> None:
        if self._current is not None:
            self._current.close()
        self._index += 1
        self._current = SafetensorsWriter(self._paths[self._index], self._groups[self._index], self._metadata)

    def __enter__(self) -> PartedWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._current is not None:
            self._current.__exit__(exc_type, exc, tb)


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

    def read(self, offset: int, n: int) -> bytes:
        data = os.pread(self._fd, n, offset)
        if len(data) == n:
            return data
        chunks = [data]
        got = len(data)
        while got < n:
            more = os.pread(self._fd, n - got, offset + got)
            if not more:
                raise InputError(f"{self.path}: file ended at byte {offset + got}, expected {offset + n}; it was truncated while being read")
            chunks.append(more)
            got += len(more)
        return b"".join(chunks)

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
