"""Paths the ordinary runs do not take: the copy fallback, the fsyncs before a rename, writeback, the rank-file
header check, a resplit along another dim, load_rank's checks, sizes, and which errors say nothing was written."""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

import pytest
import torch
import typer
import xxhash

import reshard
from reshard import InputError, UsageError
from reshard.cli import _run
from reshard.engine import staging as staging_module
from reshard.formats import writer
from reshard.model.config import parse_size

from helpers import invoke, snapshot, split, synthetic_llama


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return synthetic_llama(tmp_path / "model", torch.bfloat16, kv_heads=2, layers=2)


def no_copy_file_range(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """copy_file_range as on a kernel or filesystem without it; returns the calls made."""
    calls: list[int] = []

    def unavailable(*args: object, **kwargs: object) -> int:
        calls.append(1)
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(os, "copy_file_range", unavailable)
    return calls


def test_the_copy_fallback_writes_the_same_bytes(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    direct = split(model, tmp_path / "direct", 4)
    merged = invoke("merge", direct, "--out", tmp_path / "merged", "-q")
    assert merged.exit_code == 0
    calls = no_copy_file_range(monkeypatch)
    fallback = split(model, tmp_path / "fallback", 4)
    assert calls  # copy_file_range was tried and refused, so the fallback ran
    assert snapshot(fallback) == snapshot(direct)
    assert invoke("merge", fallback, "--out", tmp_path / "merged-fallback", "-q").exit_code == 0
    assert snapshot(tmp_path / "merged-fallback") == snapshot(tmp_path / "merged")


def test_the_copy_fallback_refuses_a_short_read(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A source that ends early while it is copied (changed under the split) fails the run; the short data is
    never written and hashed as if it were the tensor."""
    no_copy_file_range(monkeypatch)
    real_preadv, seen = os.preadv, []
    source = model / "model.safetensors"

    def shrinking(fd: int, buffers: list[memoryview], offset: int) -> int:
        if Path(os.readlink(f"/proc/self/fd/{fd}")) == source:
            seen.append(offset)
            if len(seen) == 3:
                return 0
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", shrinking)
    out = tmp_path / "out"
    result = invoke("split", model, "--tp", 2, "--out", out)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {source}: file ended at byte ")
    assert result.stderr.rstrip().endswith("it was truncated while being read")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_the_copy_fallback_still_checks_the_rank_files(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = split(model, tmp_path / "before", 2)
    rank1 = before / "model-rank-1-part-0.safetensors"
    data = bytearray(rank1.read_bytes())
    data[-5] ^= 0x20
    rank1.write_bytes(bytes(data))
    no_copy_file_range(monkeypatch)
    for args in (["merge", before], ["split", before, "--tp", 4]):
        result = invoke(*args, "--out", tmp_path / "out")
        assert (result.exit_code, result.stderr) == (
            1,
            f"Error: {rank1}: xxh128 differs from reshard-rank-1.json; the file is corrupt, split again\n",
        )
        assert not (tmp_path / "out").exists()


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.mark.parametrize("command", ["split", "merge", "ranks"])
def test_every_staged_file_and_its_folder_are_fsynced_before_the_rename(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    source = split(model, tmp_path / "source", 2) if command == "merge" else model
    events: list[tuple[str, str]] = []  # ("fsync", path) or ("rename", from path)
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", fd_path(fd))) or real_fsync(fd))
    monkeypatch.setattr(os, "rename", lambda a, b: events.append(("rename", os.fspath(a))) or real_rename(a, b))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", os.fspath(a))) or real_replace(a, b))
    real_noreplace = staging_module.rename_noreplace
    monkeypatch.setattr(staging_module, "rename_noreplace", lambda a, b: events.append(("rename", os.fspath(a))) or real_noreplace(a, b))
    out = tmp_path / "out"
    args = {"split": ["split", model, "--tp", 2], "merge": ["merge", source], "ranks": ["split", model, "--tp", 2, "--ranks", "0,1"]}[
        command
    ]
    assert invoke(*args, "--out", out, "-q").exit_code == 0

    def first(event: str, test) -> int:
        return next(i for i, (e, path) in enumerate(events) if e == event and test(path))

    names = sorted(p.name for p in out.iterdir())
    assert len(names) >= (2 if command == "merge" else 6)
    if command == "ranks":  # each file moved into OUT on its own, then OUT itself synced
        for name in names:
            moved = first("rename", lambda p: p.endswith("/" + name))
            assert first("fsync", lambda p: p.endswith("/" + name) and ".partial/" in p) < moved, name
        assert events[-1] == ("fsync", str(out))
        return
    moved = first("rename", lambda p: p.endswith(".partial"))  # the staging folder becomes OUT
    staging = events[moved][1]
    for name in names:
        assert first("fsync", lambda p: p == f"{staging}/{name}") < moved, name
    assert first("fsync", lambda p: p == staging) < moved
    assert events[-1] == ("fsync", str(tmp_path))  # the rename itself made durable


def test_writeback_starts_with_sync_file_range_as_data_is_written(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert writer._sync_file_range() is not None  # Linux has it
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(writer, "WRITEBACK_BYTES", 4096)
    monkeypatch.setattr(writer, "_sync_file_range", lambda: lambda fd, pos, n, flags: calls.append((pos, n, flags)) or 0)
    out = split(model, tmp_path / "out", 2)
    assert calls and {flags for _, _, flags in calls} == {writer.SYNC_FILE_RANGE_WRITE}
    size = (out / "model-rank-0-part-0.safetensors").stat().st_size
    assert sum(n for _, n, _ in calls) > size  # most of both ranks' bytes, in stretches as written
    assert all(0 <= pos and n > 0 for pos, n, _ in calls)


def test_writes_go_to_the_kernel_in_pieces_and_give_the_same_files(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gathered (column-cut) data is handed to write(2) at most WRITE_BYTES at a time; an odd piece size changes
    no byte of the split or of the merge."""
    direct = split(model, tmp_path / "direct", 4)
    sizes: list[int] = []
    real_pwrite = os.pwrite
    monkeypatch.setattr(writer, "WRITE_BYTES", 1000)
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: sizes.append(len(data)) or real_pwrite(fd, data, offset))
    pieces = split(model, tmp_path / "pieces", 4)
    assert sizes and max(sizes) == 1000
    assert snapshot(pieces) == snapshot(direct)
    assert invoke("merge", pieces, "--out", tmp_path / "merged", "-q").exit_code == 0
    assert (tmp_path / "merged" / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()


def rewrite_header(path: Path, change) -> None:
    """Change a rank file's header (same length) and its rank record, so only the header check can tell."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    change(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    data = raw[:8] + text + b" " * (n - len(text)) + raw[8 + n :]
    path.write_bytes(data)
    rank = int(path.name.split("-")[2])
    record_path = path.parent / f"reshard-rank-{rank}.json"
    record = json.loads(record_path.read_text())
    record["files"][path.name] = {"bytes": len(data), "xxh128": xxhash.xxh3_128(data).hexdigest()}
    record_path.write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("change", "found"),
    [
        (lambda h: h["model.norm.weight"].update(dtype="F16"), "F16 [32]"),
        (lambda h: h["model.layers.0.self_attn.q_proj.weight"].update(shape=[32, 16]), "BF16 [32, 16]"),
    ],
)
def test_a_rank_file_whose_dtype_or_shape_differs_is_refused(model: Path, tmp_path: Path, change, found: str) -> None:
    out = split(model, tmp_path / "split", 2)
    rank1 = out / "model-rank-1-part-0.safetensors"
    rewrite_header(rank1, change)
    name, want = ("model.norm.weight", "[32]") if found.startswith("F16") else ("model.layers.0.self_attn.q_proj.weight", "[16, 32]")
    message = f"{rank1}: tensor {name} is {found}, the manifest expects BF16 {want}; the rank file does not belong to this manifest"
    for args in (["merge", out], ["split", out, "--tp", 4], ["verify", out]):
        result = invoke(*args, "--out", tmp_path / "out") if args[0] != "verify" else invoke(*args)
        assert (result.exit_code, result.stderr) == (1, f"Error: {message}\n"), args
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="the rank file does not belong to this manifest"):
        reshard.load_rank(out, 1, device="cpu")


def test_resplit_refuses_a_plan_that_cuts_another_dim(model: Path, tmp_path: Path) -> None:
    before = split(model, tmp_path / "before", 2)
    rules = tmp_path / "rules.json"
    rules.write_text(
        json.dumps({"rules": [{"name": "o_rows", "match": "model.layers.*.self_attn.o_proj.weight", "style": "colwise", "dim": 0}]})
    )
    inputs = snapshot(before)
    result = invoke("split", before, "--tp", 4, "--rules", rules, "--out", tmp_path / "after")
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {before / 'reshard.json'}: tensor model.layers.0.self_attn.o_proj.weight was cut along dim 1 and the new "
        "plan cuts dim 0; split the original checkpoint instead\n"
    )
    assert not (tmp_path / "after").exists() and snapshot(before) == inputs
    # From the checkpoint itself, the same rules work.
    assert invoke("split", model, "--tp", 4, "--rules", rules, "--out", tmp_path / "after", "-q").exit_code == 0


def test_load_rank_checks_checksums_unless_asked_not_to(model: Path, tmp_path: Path) -> None:
    out = split(model, tmp_path / "split", 2)
    rank0 = out / "model-rank-0-part-0.safetensors"
    data = bytearray(rank0.read_bytes())
    data[-3] ^= 0x01
    rank0.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"model-rank-0-part-0.safetensors: xxh128 differs from reshard-rank-0.json"):
        reshard.load_rank(out, 0, device="cpu")
    unchecked = reshard.load_rank(out, 0, device="cpu", check_checksums=False)
    assert set(unchecked) == {t for t in json.loads((out / "reshard.json").read_text())["tensors"]}
    assert reshard.load_rank(out, 1, device="cpu")  # the other rank is intact


def test_load_rank_refuses_a_rank_the_folder_does_not_hold(model: Path, tmp_path: Path) -> None:
    out = split(model, tmp_path / "split", 4, "--rank", "2")
    with pytest.raises(InputError, match=r"holds ranks 2 of 0..3, not rank 1; loading rank 1 needs it"):
        reshard.load_rank(out, 1, device="cpu")
    assert reshard.load_rank(out, 2, device="cpu")


@pytest.mark.parametrize(("text", "size"), [("1.5GB", 1_500_000_000), ("0.5KiB", 512), ("2GiB", 2 << 30), ("17", 17), ("3 MB", 3_000_000)])
def test_sizes_parse_exactly(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["0.5B", "0.3KiB", "0", "0.0GB", "1e9", "-1GB", "5XB"])
def test_sizes_that_are_not_whole_bytes_are_refused(text: str) -> None:
    with pytest.raises(UsageError, match=rf"--max-shard-size '{text}' is not"):
        parse_size(text)


@pytest.mark.parametrize(
    ("writes", "line"),
    [(True, "Error: out/x: No space left on device; nothing was written"), (False, "Error: out/x: No space left on device")],
)
def test_only_a_command_that_writes_says_nothing_was_written(capsys: pytest.CaptureFixture[str], writes: bool, line: str) -> None:
    def failing() -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "out/x")

    with pytest.raises(typer.Exit) as e:
        _run(failing, writes=writes)
    assert e.value.exit_code == 1
    assert capsys.readouterr().err == line + "\n"


@pytest.mark.parametrize("which", ["config.json", "reshard.json", "reshard-rank-0.json", "rules", "tp.json"])
@pytest.mark.parametrize("content", ["fifo", "deep"])
def test_json_inputs_that_would_hang_or_overflow_are_one_line_errors(model: Path, tmp_path: Path, which: str, content: str) -> None:
    """A FIFO in place of a JSON file (reading it would block forever) and nesting deep enough to overflow the
    parser: each is told in one line naming the file, never a hang or a traceback."""
    folder = split(model, tmp_path / "split", 2) if which.startswith("reshard") else model
    path = {"rules": tmp_path / "rules.json", "tp.json": tmp_path / "tp.json"}.get(which, folder / which)
    path.unlink(missing_ok=True)
    if content == "fifo":
        os.mkfifo(path)
    else:
        path.write_text("[" * 100_000 + "]" * 100_000)
    args = {
        "config.json": ["plan", model, "--tp", 2],
        "reshard.json": ["merge", folder, "--out", tmp_path / "out"],
        "reshard-rank-0.json": ["verify", folder],
        "rules": ["plan", model, "--tp", 2, "--rules", path],
        "tp.json": ["plan", model, "--tp", 2, "--config", path],
    }[which]
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {path}: "), result.stderr
    assert ("not a regular file" if content == "fifo" else "as JSON") in lines[0]
