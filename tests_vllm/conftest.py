"""The session's vLLM starts, summed up at its end: how many, how long in all, the slowest. A test that runs past
TEST_LIMIT seconds fails there, with its traceback, and the session goes on."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import pytest

from models import HOST


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "core: one case of each kind of vLLM layout and the controls (what CI runs)")


TEST_LIMIT = 900  # the slowest test starts vLLM five times, about a minute here; one start may take 600 (models.py)


class TestTooSlow(Exception):
    pass


def _too_slow(signum: int, frame: Any) -> None:
    raise TestTooSlow(f"the test ran past {TEST_LIMIT} s")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    previous = signal.signal(signal.SIGALRM, _too_slow)
    signal.alarm(TEST_LIMIT)
    try:
        return (yield)
    except TestTooSlow:
        HOST.stop()  # it may be busy with the test's job still: the next test starts a new one
        raise
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    starts = HOST.starts
    if not starts:
        return
    total = sum(seconds for _, seconds in starts)
    slowest = sorted(starts, key=lambda s: -s[1])[:3]
    terminalreporter.write_line(
        f"vLLM: {len(starts)} starts in {total:.0f} s (mean {total / len(starts):.1f} s); slowest: "
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in slowest)
    )
