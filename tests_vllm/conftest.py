"""The session's vLLM starts, summed up at its end: how many, how long in all, the slowest."""

from __future__ import annotations

from typing import Any

from models import HOST


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "core: one case of each kind of vLLM layout and the controls (what CI runs)")


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
