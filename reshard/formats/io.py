"""Plain file I/O the engines share: positioned reads into reused buffers, and small files made durable."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reshard.errors import InputError
from reshard.timing import clock, spent

# The most bytes an engine reads or gathers in one go: memory stays near a few of these whatever the checkpoint.
BLOCK_BYTES = 32 << 20

# Called with the number of bytes just processed (from several threads: the callee locks if it must).
Progress = Callable[[int], object]  # the engines' callback: bytes just processed
Watch = Callable[[int, int], object]  # the API's: bytes just processed, and the total to process


def counting(watch: Watch | None, total: int) -> Progress | None:
    """The engines' callback for an API caller's `progress`, which is told the total with every step."""
    return None if watch is None else lambda n: watch(n, total)


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


_local = threading.local()


def thread_buffers() -> Buffers:
    """This thread's scratch buffers: each worker reuses its own."""
    if not hasattr(_local, "buffers"):
        _local.buffers = Buffers()
    buffers: Buffers = _local.buffers
    return buffers


@dataclass(frozen=True)
class Reorder:
    """How an engine stores a tensor's bytes in another order, chunk by chunk: each chunk a [rows, cols] matrix of
    `itemsize`-byte items, stored transposed ("transpose"), or with its rows by parity, even rows first ("halves":
    a head's rows of q or k as a rotary embedding that rotates halves wants them)."""

    kind: str
    rows: int
    cols: int
    itemsize: int

    @property
    def chunk_bytes(self) -> int:
        return self.rows * self.cols * self.itemsize

    def store(self, chunk: np.ndarray) -> np.ndarray:
        """The stored order of one chunk given in its logical order (flat uint8 arrays)."""
        if self.kind == "transpose":
            return np.ascontiguousarray(chunk.reshape(self.rows, self.cols, self.itemsize).transpose(1, 0, 2)).reshape(-1)
        return np.ascontiguousarray(chunk.reshape(self.rows // 2, 2, -1).transpose(1, 0, 2)).reshape(-1)

    def load(self, chunk: np.ndarray) -> np.ndarray:
        """The logical order of one chunk given in its stored order."""
        if self.kind == "transpose":
            return np.ascontiguousarray(chunk.reshape(self.cols, self.rows, self.itemsize).transpose(1, 0, 2)).reshape(-1)
        return np.ascontiguousarray(chunk.reshape(2, self.rows // 2, -1).transpose(1, 0, 2)).reshape(-1)

    def load_all(self, data: np.ndarray) -> np.ndarray:
        return np.concatenate([self.load(c) for c in data.reshape(-1, self.chunk_bytes)]) if data.size else data


class ByteReader:
    """Positioned reads from one read-only file."""

    copyable = True  # its bytes may be copied inside the kernel as they lie

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)

    @property
    def fd(self) -> int:
        return self._fd

    def read_into(self, offset: int, out: np.ndarray) -> np.ndarray:
        """Fill `out` (a uint8 array) from the file at `offset`; reusing `out` spares the page faults of a new buffer."""
        view = out.data.cast("B")
        got, start = 0, clock()
        while got < len(view):
            n = os.preadv(self._fd, [view[got:]], offset + got)
            if n == 0:
                raise InputError(
                    f"{self.path}: file ended at byte {offset + got}, expected {offset + len(view)}; it was truncated while being read"
                )
            got += n
        spent("read", start, got)
        return out

    def read(self, offset: int, out: np.ndarray) -> np.ndarray:
        """The bytes at `offset`, shaped like `out`: here read into `out` itself."""
        return self.read_into(offset, out)

    def copied(self, offset: int, n: int) -> None:
        """n bytes at `offset` were copied out of the file inside the kernel (copy_file_range)."""

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> ByteReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReorderedReader(ByteReader):
    """A tensor an engine stores reordered, read in its logical order at the same offsets: each stored chunk is read
    once, whole (in order, through the file's own reader, which may hash what it reads), and put back in order."""

    copyable = False

    def __init__(self, reader: ByteReader, base: int, reorder: Reorder) -> None:  # the file stays the reader's
        self._reader, self._base, self._reorder = reader, base, reorder
        self.path = reader.path
        self._index, self._chunk = -1, np.empty(0, dtype=np.uint8)
        self._stored = np.empty((1, reorder.chunk_bytes), dtype=np.uint8)

    def close(self) -> None:
        """The file is the underlying reader's to close."""

    @property
    def fd(self) -> int:
        return self._reader.fd

    def read_into(self, offset: int, out: np.ndarray) -> np.ndarray:
        flat, size = out.reshape(-1), self._reorder.chunk_bytes
        at = offset - self._base
        done = 0
        while done < flat.size:
            index, within = divmod(at + done, size)
            chunk = self._load(index)
            n = min(size - within, flat.size - done)
            flat[done : done + n] = chunk[within : within + n]
            done += n
        return out

    def read(self, offset: int, out: np.ndarray) -> np.ndarray:
        return self.read_into(offset, out)

    def copied(self, offset: int, n: int) -> None:
        """Never copied inside the kernel."""

    def _load(self, index: int) -> np.ndarray:
        if index != self._index:
            stored = self._reader.read(self._base + index * self._reorder.chunk_bytes, self._stored)
            self._chunk, self._index = self._reorder.load(stored.reshape(-1)), index
        return self._chunk


def write_durably(path: Path, data: bytes) -> None:
    """A small output file, on disk before the folder is renamed into place; a failure names it."""
    try:
        with open(path, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e


def copy_durably(source: Path, target: Path) -> None:
    try:
        shutil.copyfile(source, target)
        with open(target, "rb+") as f:
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(e.errno, e.strerror, e.filename or str(target)) from e


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
