"""Faults while writing: a full disk, SIGTERM and Ctrl-C mid-split, damaged rank files before a merge."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from reshard.cli import app

from helpers import snapshot, synthetic_llama

runner = CliRunner()
FAULTS = Path(__file__).parent / "faults"


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return synthetic_llama(tmp_path / "model", torch.bfloat16, kv_heads=2, layers=4)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("command", ["split", "merge"])
def test_disk_full_midway_leaves_nothing(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    split_dir = tmp_path / "split"
    assert runner.invoke(app, ["split", str(model), "--tp", "2", "--out", str(split_dir), "-q"]).exit_code == 0
    before = snapshot(tmp_path)
    budget = {"bytes": 20_000}
    real_pwrite, real_copy = os.pwrite, os.copy_file_range

    def spend(n: int) -> None:
        budget["bytes"] -= n
        if budget["bytes"] < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def pwrite(fd: int, data, offset: int) -> int:
        spend(len(data))
        return real_pwrite(fd, data, offset)

    def copy_file_range(src: int, dst: int, count: int, offset_src=None, offset_dst=None) -> int:
        spend(count)
        return real_copy(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    out = tmp_path / "out"
    args = ["split", str(model), "--tp", "2"] if command == "split" else ["merge", str(split_dir)]
    result = runner.invoke(app, [*args, "--out", str(out), "-q"])
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"Error: {out}/") and "No space left on device" in lines[0]
    assert "free some space or choose another --out; nothing was written" in lines[0]
    assert not out.exists() and leftovers(tmp_path) == []
    assert snapshot(tmp_path) == before


def default_signals() -> None:
    """In the child, before Python starts: SIGINT as a terminal delivers it. A test run started in the background
    (`&` in a script, some CI runners) hands its children SIGINT ignored, and Python then installs no handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("inherited", ["default", "ignored"])
@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_signal_mid_split_leaves_nothing(model: Path, tmp_path: Path, sig: int, code: int, word: str, inherited: str) -> None:
    before = snapshot(tmp_path)
    out, marker = tmp_path / "out", tmp_path.parent / f"{tmp_path.name}.writing"
    env = {**os.environ, "PYTHONPATH": f"{FAULTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "RESHARD_TEST_SLOW_WRITES": str(marker)}
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN if inherited == "ignored" else signal.default_int_handler)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "reshard", "split", str(model), "--tp", "2", "--out", str(out), "-q"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=default_signals,
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the split never started writing"
        time.sleep(0.01)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=60)
    marker.unlink()
    assert process.returncode == code
    assert stderr == f"Error: {word}; nothing was written\n"
    assert stdout == ""
    assert not out.exists() and leftovers(tmp_path) == []
    assert snapshot(tmp_path) == before


def split_folder(model: Path, tmp_path: Path) -> Path:
    out = tmp_path / "split"
    assert runner.invoke(app, ["split", str(model), "--tp", "2", "--out", str(out), "-q"]).exit_code == 0
    return out


def test_merge_refuses_a_truncated_rank_file(model: Path, tmp_path: Path) -> None:
    out = split_folder(model, tmp_path)
    rank1 = out / "model-rank-1-part-0.safetensors"
    size = rank1.stat().st_size
    os.truncate(rank1, size - 100)
    result = runner.invoke(app, ["merge", str(out)])
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {rank1}: {size - 100} bytes, but reshard-rank-1.json records {size}; the file is truncated or was changed, split again\n"
    )
    assert not (tmp_path / "split-merged").exists() and leftovers(tmp_path) == []


def test_merge_refuses_a_corrupted_rank_file(model: Path, tmp_path: Path) -> None:
    out = split_folder(model, tmp_path)
    rank0 = out / "model-rank-0-part-0.safetensors"
    data = bytearray(rank0.read_bytes())
    data[-7] ^= 0x40  # one bit of the last tensor
    rank0.write_bytes(bytes(data))
    before = snapshot(tmp_path)
    result = runner.invoke(app, ["merge", str(out)])
    assert result.exit_code == 1
    assert result.stderr == f"Error: {rank0}: xxh128 differs from reshard-rank-0.json; the file is corrupt, split again\n"
    assert not (tmp_path / "split-merged").exists() and leftovers(tmp_path) == []
    assert snapshot(tmp_path) == before


def test_merge_refuses_a_changed_config(model: Path, tmp_path: Path) -> None:
    out = split_folder(model, tmp_path)
    text = (out / "config.json").read_text()
    assert '"vocab_size": 64' in text
    (out / "config.json").write_text(text.replace('"vocab_size": 64', '"vocab_size": 65'))
    result = runner.invoke(app, ["merge", str(out)])
    assert result.exit_code == 1
    assert result.stderr == f"Error: {out / 'config.json'}: xxh128 differs from reshard.json; the file is corrupt, split again\n"
