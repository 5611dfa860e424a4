"""Loaded by the test subprocesses that put this folder on PYTHONPATH: slows reshard's writes so that a signal
can be sent while a split or merge is in the middle of writing."""

import os

_marker = os.environ.get("RESHARD_TEST_SLOW_WRITES")
if _marker:
    import time
    from pathlib import Path

    import reshard.formats.writer as io

    def _slowed(method):
        def wrapper(self, *args, **kwargs):
            Path(_marker).touch()
            time.sleep(0.05)
            return method(self, *args, **kwargs)

        return wrapper

    io.Region.write = _slowed(io.Region.write)
    io.Region.copy_from = _slowed(io.Region.copy_from)
