"""Plain file I/O the engines share: positioned reads into reused buffers, and small files made durable."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from reshard.errors import InputError
from reshard.timing import clock, spent

# The most bytes an engine reads or gathers in one go: memory stays near a few of these whatever the checkpoint.
BLOCK_BYTES = 32 << 20

# Called with the number of bytes just processed (from several threads: the callee locks if it must).
Progress = Callable[[int], object]


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
