"""Where the time of a run goes: seconds and bytes per kind of work (read, write, copy, gather, hash, fsync),
summed over the threads that did it. Collected only when RESHARD_PROFILE names a file, which the run writes as
JSON when it ends; otherwise every call here costs a test of one global."""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
from pathlib import Path

PROFILE_ENV = "RESHARD_PROFILE"


class Profile:
    def __init__(self) -> None:
        self.started = time.perf_counter()
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}
        self.bytes: dict[str, int] = {}

    def add(self, kind: str, seconds: float, nbytes: int) -> None:
        with self._lock:
            self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds
            self.bytes[kind] = self.bytes.get(kind, 0) + nbytes

    def to_dict(self) -> dict[str, object]:
        with self._lock:
            kinds = {k: {"seconds": round(s, 4), "bytes": self.bytes[k]} for k, s in sorted(self.seconds.items())}
        return {"wall_seconds": round(time.perf_counter() - self.started, 4), "kinds": kinds}

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


_active: Profile | None = None
if os.environ.get(PROFILE_ENV):
    _active = Profile()
    atexit.register(_active.write, Path(os.environ[PROFILE_ENV]))


def clock() -> float:
    """The start of a piece of work to pass to `spent`: 0 when nothing is collected."""
    return time.perf_counter() if _active is not None else 0.0


def spent(kind: str, start: float, nbytes: int) -> None:
    """Count the time since `start` (from `clock`) and `nbytes` as work of this kind."""
    if _active is not None:
        _active.add(kind, time.perf_counter() - start, nbytes)
