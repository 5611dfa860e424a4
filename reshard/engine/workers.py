"""A few threads for the byte work: copies, reads, writes and numpy gathers all release the GIL."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

WORKERS = max(1, min(4, os.cpu_count() or 1))


def run_all(tasks: Iterable[Callable[[], None]], *, workers: int = WORKERS) -> None:
    """Run the tasks, started in order, on `workers` threads; the first error cancels those not started and is raised."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reshard") as pool:
        futures = [pool.submit(task) for task in tasks]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
