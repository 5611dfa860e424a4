"""Checksums of the files reshard writes and reads: xxh128 (the default; XXH3-128, the digest `xxh128sum` prints),
sha256 (the digest `sha256sum` prints: many times slower) or none.

Every digest of a file being written or read comes from one pipeline, FileHash: a thread per file that hashes it
in file order as its bytes become ready, from the page cache right behind a writer's writes (split, merge and
resplit writing rank or checkpoint files, writer.py) and from the very reads an engine makes of a file it reads
(merge, resplit and load_rank reading rank files, HashedReader), so that no byte is read from storage twice. A
file nothing reads is hashed whole (file_digest; verify hashes several on two threads, BackgroundHashes)."""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeGuard

import numpy as np
import xxhash

from reshard.errors import InputError
from reshard.formats.io import ByteReader
from reshard.formats.names import DEFAULT_CHECKSUM, NONE
from reshard.timing import clock, spent

# A hash thread wakes for this many newly written bytes, and reads a file to hash it this many at a time (small,
# since a split or merge has one such thread per file: 64 of them at tp 64).
CHUNK_BYTES = 8 << 20
READ_BYTES = 1 << 20


class Digest(Protocol):
    def update(self, data: memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


# name -> (new digest, length of its hex digest)
ALGORITHMS: dict[str, tuple[Callable[[], Digest], int]] = {
    "sha256": (hashlib.sha256, 64),
    "xxh128": (xxhash.xxh3_128, 32),
}


def new_digest(checksum: str) -> Digest:
    return ALGORITHMS[checksum][0]()


def is_digest(value: object, checksum: str) -> TypeGuard[str]:
    """A hex digest of this algorithm's length."""
    length = ALGORITHMS[checksum][1]
    return isinstance(value, str) and len(value) == length and all(c in "0123456789abcdef" for c in value)


@dataclass(frozen=True)
class FileRecord:
    """What the manifest records of a file it lists: its size and, unless the checksum is none, its digest."""

    bytes: int
    checksum: str = DEFAULT_CHECKSUM
    digest: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"bytes": self.bytes} | ({self.checksum: self.digest} if self.checksum != NONE else {})


def _update(digest: Digest, view: memoryview) -> None:
    start = clock()
    digest.update(view)
    spent("hash", start, len(view))


def file_digest(path: Path, checksum: str, *, stop: threading.Event | None = None) -> str | None:
    """The file's digest, read front to back; None when `stop` is set before the end."""
    digest = new_digest(checksum)
    fd = os.open(path, os.O_RDONLY)
    try:
        _hash_range(fd, digest, 0, os.fstat(fd).st_size, memoryview(bytearray(READ_BYTES)), stop=stop)
        return None if stop is not None and stop.is_set() else digest.hexdigest()
    finally:
        os.close(fd)


def _hash_range(fd: int, digest: Digest, start: int, end: int, view: memoryview, *, stop: threading.Event | None = None) -> int:
    """Read [start, end) of the file into `view` chunk by chunk and hash it (until `stop` is set); where it
    stopped: `end`, or `start` when `end` is not past it."""
    while start < end and not (stop is not None and stop.is_set()):
        began = clock()
        n = os.preadv(fd, [view[: min(len(view), end - start)]], start)
        spent("hash read", began, n)
        if n == 0:
            raise OSError(f"file ended at byte {start} while hashing it")
        _update(digest, view[:n])
        start += n
    return start


SAMPLE_BLOCKS = 64
SAMPLE_BYTES = 4096


def sampled_sha256(path: Path, *, start: int = 0) -> str:
    """sha256 of 64 blocks of 4 KiB spread evenly over the file from `start`: a fingerprint of its data that costs
    a few reads, so two checkpoints with the same header but other weights (a fine-tune) tell apart."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        span = max(0, os.fstat(f.fileno()).st_size - start - SAMPLE_BYTES)
        for i in range(SAMPLE_BLOCKS):
            f.seek(start + span * i // (SAMPLE_BLOCKS - 1))
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def record(path: Path, checksum: str) -> FileRecord:
    """The size and digest of a whole file."""
    digest = "" if checksum == NONE else file_digest(path, checksum) or ""
    return FileRecord(path.stat().st_size, checksum, digest)


class BackgroundHashes:
    """Hash files on two threads while other work goes on; `results()` waits for them.

    Leaving the `with` block early (an error) stops the hashing at its next chunk.
    """

    def __init__(self, paths: Iterable[Path], checksum: str) -> None:
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="reshard-hash")
        self._futures: dict[Path, Future[str | None]] = {p: self._pool.submit(file_digest, p, checksum, stop=self._stop) for p in paths}

    def results(self) -> dict[Path, str]:
        return {path: future.result() or "" for path, future in self._futures.items()}

    def __enter__(self) -> BackgroundHashes:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True)


class FileHash:
    """The digest of one file, computed on a thread of its own, in file order, as the file's bytes become ready.

    Bytes are ready when they are handed over in memory (`submit`: a reader's reads, hashed from that memory), or
    when they are known to be in the file and so in the page cache (`written`: a writer's stretches, in any order;
    `follow`: a reader's kernel copies and skipped bytes), and are then read back from there right behind the work.
    `hexdigest(size)` hashes what remains up to `size` and returns the digest. So a file is read from storage at
    most once, whoever wrote or read it, and hashing runs beside the work. What was hashed is never hashed again (a
    read behind the hashed prefix, out of order, is skipped)."""

    def __init__(self, fd: int, checksum: str) -> None:
        self._fd = fd
        self._digest = new_digest(checksum)
        self._hashed = 0  # every byte before this is in the digest (the hash thread's own)
        self._queue: queue.SimpleQueue[tuple[int, int, memoryview | None, threading.Event | None] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._scratch: memoryview | None = None
        self._lock = threading.Lock()
        self.frontier = 0  # every byte before this has been written (`written`)
        self._ahead: dict[int, int] = {}  # written stretches beyond the frontier: start -> end
        self._posted = 0  # the frontier last handed to the hash thread
        self._thread = threading.Thread(target=self._run, name="reshard-hash", daemon=True)
        self._thread.start()

    def written(self, position: int, n: int) -> None:
        """A writer wrote [position, position + n); the hash thread reads the written prefix back once it has
        grown by CHUNK_BYTES. Thread-safe."""
        with self._lock:
            if position != self.frontier:
                self._ahead[position] = position + n
                return
            self.frontier = position + n
            while self.frontier in self._ahead:
                self.frontier = self._ahead.pop(self.frontier)
            if self.frontier - self._posted >= CHUNK_BYTES:
                self._posted = self.frontier
                self.follow(0, self.frontier)

    def submit(self, offset: int, view: memoryview) -> threading.Event:
        """Hash `view`, the file's bytes at `offset`; the event is set once the view is no longer needed."""
        done = threading.Event()
        if self._error is not None:
            done.set()
        else:
            self._queue.put((offset, len(view), view, done))
        return done

    def follow(self, offset: int, n: int) -> None:
        """Hash the file up to `offset + n`, reading what was not handed over."""
        self._queue.put((offset, n, None, None))

    def hexdigest(self, size: int) -> str:
        """Once the work is done: hash the rest of the file up to `size` and return the digest."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        self._hashed = self._fill(size)
        return self._digest.hexdigest()

    def stop(self) -> None:
        self._error = self._error or InputError("stopped")
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            offset, n, view, done = item
            try:
                if self._error is None:
                    self._take(offset, n, view)
            except BaseException as e:  # reported by hexdigest()
                self._error = e
            finally:
                if done is not None:
                    done.set()

    def _take(self, offset: int, n: int, view: memoryview | None) -> None:
        if view is None:
            self._hashed = self._fill(offset + n)
            return
        if offset > self._hashed:
            self._hashed = self._fill(offset)
        skip = self._hashed - offset
        if skip < n:
            _update(self._digest, view[max(0, skip) :])
            self._hashed = offset + n

    def _fill(self, upto: int) -> int:
        """Read [hashed, upto) of the file back (from the page cache) and hash it."""
        if self._scratch is None:
            self._scratch = memoryview(bytearray(READ_BYTES))
        return _hash_range(self._fd, self._digest, self._hashed, upto, self._scratch)


class HashedReader(ByteReader):
    """A rank file read by one engine thread, whose digest comes from those very reads (see FileHash).

    `read` returns the bytes in memory of the reader's own, valid until SLOTS - 1 more reads: a read waits only
    for the hash of the read whose memory it reuses, so hashing runs beside the engine."""

    SLOTS = 3

    def __init__(self, path: Path, checksum: str) -> None:
        super().__init__(path)
        self._size = os.fstat(self.fd).st_size
        self._hash = FileHash(self.fd, checksum)
        self._slots = [np.empty(0, dtype=np.uint8) for _ in range(self.SLOTS)]
        self._pending: list[threading.Event | None] = [None] * self.SLOTS
        self._next = 0

    def read(self, offset: int, out: np.ndarray) -> np.ndarray:
        i, self._next = self._next, (self._next + 1) % self.SLOTS
        pending = self._pending[i]
        if pending is not None:
            pending.wait()
        if self._slots[i].size < out.size:
            self._slots[i] = np.empty(out.size, dtype=np.uint8)
        view = self.read_into(offset, self._slots[i][: out.size])
        self._pending[i] = self._hash.submit(offset, view.data)
        return view.reshape(out.shape)

    def copied(self, offset: int, n: int) -> None:
        self._hash.follow(offset, n)

    def hexdigest(self) -> str:
        """The digest of the whole file, once the engine is done reading it."""
        try:
            return self._hash.hexdigest(self._size)
        except OSError as e:
            raise InputError(f"{self.path}: {e.strerror or e}; the file changed while being read, split again") from e

    def close(self) -> None:
        self._hash.stop()
        super().close()
