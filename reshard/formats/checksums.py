"""sha256 of the files reshard writes and reads, computed on threads of their own beside the byte work."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from reshard.errors import OutputError

CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class FileRecord:
    """What the manifest records of a file it lists."""

    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, object]:
        return {"bytes": self.bytes, "sha256": self.sha256}


def file_sha256(path: Path, *, stop: threading.Event | None = None) -> str | None:
    """The file's sha256, read front to back in large chunks; None when `stop` is set before the end."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            if stop is not None and stop.is_set():
                return None
            n = os.readv(fd, [view])
            if n == 0:
                return digest.hexdigest()
            digest.update(view[:n])
    finally:
        os.close(fd)


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


def record(path: Path) -> FileRecord:
    """The size and sha256 of a whole file."""
    return FileRecord(path.stat().st_size, file_sha256(path) or "")


class BackgroundHashes:
    """Hash files on two threads while other work goes on; `results()` waits for them.

    Leaving the `with` block early (an error) stops the hashing at its next chunk.
    """

    def __init__(self, paths: Iterable[Path]) -> None:
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="reshard-sha256")
        self._futures: dict[Path, Future[str | None]] = {p: self._pool.submit(file_sha256, p, stop=self._stop) for p in paths}

    def results(self) -> dict[Path, str]:
        return {path: future.result() or "" for path, future in self._futures.items()}

    def __enter__(self) -> BackgroundHashes:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True)


class FollowingHash:
    """sha256 of a file being written out of order: a thread hashes its written prefix as it grows, reading it
    back while it is still in the page cache, so the digest is ready soon after the last write."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._digest = hashlib.sha256()
        self._cond = threading.Condition()
        self._frontier = 0  # every byte before this has been written
        self._ahead: dict[int, int] = {}  # written stretches beyond the frontier: start -> end
        self._hashed = 0
        self._finishing = False
        self._stopped = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="reshard-sha256", daemon=True)
        self._thread.start()

    def written(self, position: int, n: int) -> None:
        with self._cond:
            if position != self._frontier:
                self._ahead[position] = position + n
                return
            self._frontier = position + n
            while self._frontier in self._ahead:
                self._frontier = self._ahead.pop(self._frontier)
            if self._frontier - self._hashed >= CHUNK_BYTES:
                self._cond.notify()

    def hexdigest(self, size: int) -> str:
        """Wait for the hash of the first `size` bytes: the whole file, which must all have been written."""
        with self._cond:
            self._finishing = True
            self._cond.notify()
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._hashed != size:
            raise OutputError(f"hashed {self._hashed} of {size} bytes: a stretch of the file was never written")
        return self._digest.hexdigest()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        buffer = bytearray(CHUNK_BYTES)
        view = memoryview(buffer)
        try:
            while True:
                with self._cond:
                    while not self._stopped and not self._finishing and self._frontier - self._hashed < CHUNK_BYTES:
                        self._cond.wait()
                    if self._stopped or (self._finishing and self._hashed == self._frontier):
                        return
                    upto = self._frontier
                self._hash_to(upto, view)
        except BaseException as e:  # reported by hexdigest()
            self._error = e

    def _hash_to(self, upto: int, view: memoryview) -> None:
        while self._hashed < upto:
            n = os.preadv(self._fd, [view[: min(len(view), upto - self._hashed)]], self._hashed)
            if n == 0:
                raise OSError(f"file ended at byte {self._hashed} while hashing what was written")
            self._digest.update(view[:n])
            self._hashed += n
