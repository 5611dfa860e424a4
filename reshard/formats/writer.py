"""Streaming safetensors writers: every tensor's place in every output is known from its header, so tensors are
written at once from several threads, each into its own region, while a thread hashes what is written and
writeback to disk starts in the background."""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import numpy as np

from reshard.errors import OutputError
from reshard.formats.checksums import FileHash, FileRecord
from reshard.formats.io import BLOCK_BYTES, ByteReader, Reorder, thread_buffers
from reshard.formats.names import NONE
from reshard.formats.safetensors import Entry, encode_header, entry_nbytes
from reshard.timing import clock, spent

# Writeback of written data starts every this many bytes, so the fsync at the end has little left to do.
WRITEBACK_BYTES = 64 << 20


@cache
def _writeback_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="reshard-writeback")


class _Output(ABC):
    """An output that is closed (finished, flushed) when its block ends well, and aborted when it does not."""

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def abort(self) -> None: ...

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
    at the same time from different threads. Unless `checksum` is none, the file's digest follows the writes.
    """

    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str], *, checksum: str) -> None:
        self.path = path
        header = encode_header(entries, metadata)
        self.expected = len(header) + sum(entry_nbytes(e) for e in entries)
        self._starts: dict[str, tuple[int, int]] = {}
        position = len(header)
        for entry in entries:
            self._starts[entry[0]] = (position, entry_nbytes(entry))
            position += entry_nbytes(entry)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        self._checksum = checksum
        self._hash = FileHash(self._fd, checksum) if checksum != NONE else None
        self.record: FileRecord | None = None  # size and digest, once closed
        self._lock = threading.Lock()
        self.written = 0
        self._unflushed: list[tuple[int, int]] = []  # written stretches whose writeback has not been started
        self._unflushed_bytes = 0
        self._pending: list[Future[None]] = []
        self._copy_file_range = hasattr(os, "copy_file_range")
        Region(self, 0, len(header)).write(header)

    def region(self, name: str, *, offset: int = 0, size: int | None = None, reorder: Reorder | None = None, zeros: bool = False) -> Region:
        """The tensor's bytes, or `size` of them from `offset` (one piece of a tensor several are packed in); see
        Region for `reorder` and `zeros`."""
        start, whole = self._starts[name]
        return Region(self, start + offset, whole - offset if size is None else size, reorder=reorder, zeros=zeros)

    def write_at(self, position: int, view: memoryview) -> int:
        """Write up to WRITE_BYTES of `view` at `position`; how many were written. (What a Region writes with.)"""
        start = clock()
        try:
            n = os.pwrite(self._fd, view[:WRITE_BYTES], position)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from e
        spent("write", start, n)
        self._note_written(position, n)
        return n

    def copy_at(self, position: int, reader: ByteReader, offset: int, n: int) -> int:
        """Copy up to n bytes of `reader` from `offset` to `position` inside the kernel, as cp does; how many were
        copied: 0 where the kernel cannot copy between these files (the caller then reads and writes them)."""
        if not (self._copy_file_range and reader.copyable):
            return 0
        start = clock()
        try:
            copied = os.copy_file_range(reader.fd, self._fd, min(n, 1 << 30), offset, position)
        except OSError as e:
            if e.errno not in _NO_COPY_FILE_RANGE:
                raise OSError(e.errno, e.strerror, str(self.path)) from e
            self._copy_file_range = False  # another filesystem or an old kernel: plain reads from now on
            return 0
        spent("copy", start, copied)
        self._note_written(position, copied)
        return copied

    def _note_written(self, position: int, n: int) -> None:
        if self._hash is not None:
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
            if self._hash is not None and self._hash.frontier != self.expected:
                raise OutputError(f"{self.path}: bytes {self._hash.frontier} on were not all written; the file is incomplete")
            digest = self._hash.hexdigest(self.expected) if self._hash is not None else ""
            start = clock()
            try:
                os.fsync(self._fd)
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(self.path)) from e
            spent("fsync", start, 0)
            self.record = FileRecord(self.expected, self._checksum, digest)
        finally:
            self._stop_hash()
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        if self._fd >= 0:
            self._stop_hash()
            self._drain()
            os.close(self._fd)
            self._fd = -1

    def _stop_hash(self) -> None:
        if self._hash is not None:
            self._hash.stop()

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
    begin, started = _sync_file_range(), clock()
    for position, n in stretches:
        if begin is not None:
            begin(fd, position, n, SYNC_FILE_RANGE_WRITE)
        elif hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, position, n, os.POSIX_FADV_DONTNEED)
    spent("writeback", started, sum(n for _, n in stretches))


# The most bytes one write(2) hands the kernel. Larger writes get the page cache to allocate large folios for
# them, and on the machines measured a write of 2 MiB or more went five to eight times slower than the same
# bytes in pieces of 256 KiB (as copy_file_range and cp move them).
WRITE_BYTES = 256 << 10

# copy_file_range errors that mean "not here" (across filesystems, unsupported), not a failed write.
_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM, errno.ETXTBSY}


class Region:
    """One tensor's bytes in an output file, written front to back by one thread.

    With `reorder`, the bytes it is given in their logical order are written in the order an engine stores them,
    one chunk at a time; with `zeros`, zeros are written in their place (a tensor an engine keeps on one rank)."""

    def __init__(self, writer: SafetensorsWriter, start: int, size: int, *, reorder: Reorder | None = None, zeros: bool = False) -> None:
        self._writer, self._position, self._end = writer, start, start + size
        self._reorder, self._zeros = reorder, zeros
        self._chunk = np.empty(reorder.chunk_bytes if reorder is not None else 0, dtype=np.uint8)
        self._filled = 0

    def write(self, data: memoryview | bytes) -> None:
        if self._zeros:
            self.write_zeros(len(memoryview(data).cast("B")))
        elif self._reorder is not None:
            self._collect(np.frombuffer(data, dtype=np.uint8), self._reorder)
        else:
            self._put(memoryview(data).cast("B"))

    def _collect(self, view: np.ndarray, reorder: Reorder) -> None:
        """Fill the chunk being reordered; each full chunk goes out in the engine's order."""
        while view.size:
            n = min(view.size, self._chunk.size - self._filled)
            self._chunk[self._filled : self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
            if self._filled == self._chunk.size:
                self._put(reorder.store(self._chunk).data.cast("B"))
                self._filled = 0

    def _put(self, view: memoryview) -> None:
        self._check(len(view))
        while view:
            n = self._writer.write_at(self._position, view)
            self._position += n
            view = view[n:]

    def copy_from(self, reader: ByteReader, offset: int, n: int) -> None:
        """n bytes of another file, copied inside the kernel where it can (as cp does)."""
        if self._zeros:  # nothing of the file is needed
            self.write_zeros(n)
            return
        self._check(n)
        while n > 0:
            copied = self._writer.copy_at(self._position, reader, offset, n) if self._reorder is None else 0
            if copied:
                self._position += copied
            else:
                data = reader.read_into(offset, thread_buffers().get("copy", (1, min(n, BLOCK_BYTES))))
                self.write(data.data)
                copied = data.size
            reader.copied(offset, copied)
            offset += copied
            n -= copied

    def write_zeros(self, n: int) -> None:
        zeros = bytes(min(n, BLOCK_BYTES))
        while n > 0:
            step = min(n, len(zeros))
            if self._reorder is not None:
                self._collect(np.frombuffer(zeros[:step], dtype=np.uint8), self._reorder)
            else:
                self._put(memoryview(zeros[:step]))
            n -= step

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

    def __init__(
        self, paths: list[Path], groups: list[list[Entry]], metadata: dict[str, str] | list[dict[str, str]], *, checksum: str
    ) -> None:
        """`metadata`: every file's __metadata__, or one for each file."""
        self._writers: list[SafetensorsWriter] = []
        each = metadata if isinstance(metadata, list) else [metadata] * len(paths)
        try:
            for path, group, meta in zip(paths, groups, each, strict=True):
                self._writers.append(SafetensorsWriter(path, group, meta, checksum=checksum))
        except BaseException:
            self.abort()
            raise
        self._part_of = {name: i for i, group in enumerate(groups) for name, _, _ in group}

    def region(self, name: str, *, offset: int = 0, size: int | None = None, reorder: Reorder | None = None, zeros: bool = False) -> Region:
        return self._writers[self._part_of[name]].region(name, offset=offset, size=size, reorder=reorder, zeros=zeros)

    def close(self) -> None:
        """Finish every file; one that did not get all its bytes raises."""
        for writer in self._writers:
            writer.close()

    def records(self) -> dict[str, FileRecord]:
        """Each file's name, size and digest, once closed."""
        return {w.path.name: w.record for w in self._writers if w.record is not None}

    def abort(self) -> None:
        for writer in self._writers:
            writer.abort()
