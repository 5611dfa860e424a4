"""A user's data is never lost: outputs are placed by file identity, --force replaces only what reshard wrote,
one run at a time per output, nothing half-written survives a kill, and outputs are no more readable than inputs.
Every case runs the real command and checks that nothing outside the output changed."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from reshard.cli import app

from helpers import forge, snapshot, synthetic_llama

runner = CliRunner()
FAULTS = Path(__file__).parent / "faults"


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return synthetic_llama(tmp_path / "m" / "model", torch.bfloat16, kv_heads=2, layers=4)


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def split(model: Path, out: Path, *flags: object) -> Path:
    result = invoke("split", model, "--tp", 2, "--out", out, "-q", *flags)
    assert result.exit_code == 0, result.stderr
    return out


def twice(path: Path) -> str:
    """The same folder spelled with a leading `//`."""
    return "/" + str(path)


def refused(args: list[object], message: str, before: dict[str, bytes], root: Path) -> None:
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert lines and lines[0].startswith("Error: ") and message in lines[0], result.stderr
    assert len(lines) == 1 or args[0] == "verify"  # verify names every problem it finds
    assert snapshot(root) == before


def test_the_input_by_another_spelling_is_never_the_output(model: Path, tmp_path: Path) -> None:
    folder = split(model, tmp_path / "m" / "split")
    (tmp_path / "alias").symlink_to(tmp_path / "m")
    before = snapshot(tmp_path)
    replaces, inside = "output would replace the input", "output would be written inside the input folder"
    cases = [
        (["split", model, "--tp", 2, "--out", twice(model), "--force"], replaces),
        (["split", model, "--tp", 2, "--out", tmp_path / "alias" / "model", "--force"], replaces),
        (["split", model, "--tp", 2, "--out", tmp_path / "m", "--force"], replaces),  # a folder holding the input
        (["merge", folder, "--out", twice(folder), "--force"], replaces),
        (["split", folder, "--tp", 4, "--out", tmp_path / "alias" / "split", "--force"], replaces),
        (["split", model, "--tp", 2, "--out", twice(model / "sub")], inside),
        (["split", model, "--tp", 2, "--rank", 0, "--out", twice(model)], replaces),
        (["split", model, "--tp", 2, "--rank", 0, "--out", tmp_path / "alias" / "model" / "sub"], inside),
    ]
    for args, message in cases:
        refused(args, message, before, tmp_path)


def test_force_replaces_only_what_reshard_wrote(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("four years of work")
    before = snapshot(tmp_path)
    message = f"{out}: holds thesis.tex, which reshard did not write; --force replaces only a folder written by reshard"
    refused(["split", model, "--tp", 2, "--out", out, "--force"], message, before, tmp_path)
    (out / "thesis.tex").unlink()
    split(model, out, "--force")  # an empty folder holds nothing to lose
    (out / "notes.txt").write_text("mine")  # a split folder the user added to
    before = snapshot(tmp_path)
    refused(["split", model, "--tp", 2, "--out", out, "--force"], "holds notes.txt, which reshard did not write", before, tmp_path)
    (out / "notes.txt").unlink()
    split(model, out, "--force")
    merged = invoke("merge", out, "--out", tmp_path / "merged", "-q")
    assert merged.exit_code == 0
    assert invoke("merge", out, "--out", tmp_path / "merged", "-q", "--force").exit_code == 0
    (tmp_path / "file").write_text("x")
    before = snapshot(tmp_path)
    refused(["split", model, "--tp", 2, "--out", tmp_path / "file", "--force"], "exists and is not a folder", before, tmp_path)


def slow_split(model: Path, out: Path, marker: Path, *flags: str) -> subprocess.Popen[str]:
    """A split in its own process whose writes are slowed, so that something can happen while it writes."""
    env = {**os.environ, "PYTHONPATH": f"{FAULTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "RESHARD_TEST_SLOW_WRITES": str(marker)}
    process = subprocess.Popen(
        [sys.executable, "-m", "reshard", "split", str(model), "--tp", "2", "--out", str(out), "-q", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline, "the split never started writing"
        time.sleep(0.01)
    return process


def test_a_second_run_on_the_same_output_is_refused_at_once(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = slow_split(model, out, tmp_path / "writing")
    second = invoke("split", model, "--tp", 2, "--out", out, "-q")
    assert (second.exit_code, second.stderr) == (
        1,
        f"Error: {out}: another reshard run is writing it; wait for it to finish or choose another --out\n",
    )
    assert first.wait(timeout=120) == 0, first.stderr.read() if first.stderr else ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out", "writing"]
    assert invoke("verify", out).exit_code == 0


def test_an_output_that_appears_meanwhile_is_not_replaced(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    process = slow_split(model, out, tmp_path / "writing", "--force")
    out.mkdir()
    (out / "thesis.tex").write_text("written while reshard ran")
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert stderr == f"Error: {out}: appeared or changed while reshard was writing; nothing was replaced; choose another --out\n"
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out", "writing"]


def test_a_run_killed_with_sigkill_leaves_nothing_the_next_run_keeps(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    process = slow_split(model, out, tmp_path / "writing")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert any(name.endswith(".partial") for name in left) and ".out.reshard-lock" in left
    split(model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out", "writing"]


def test_the_old_output_comes_back_when_a_run_died_between_its_renames(model: Path, tmp_path: Path) -> None:
    out = split(model, tmp_path / "out")
    kept = snapshot(out)
    aside = tmp_path / ".out.reshard-abcd1234.old"
    aside.mkdir()
    out.rename(aside / "out")  # where a --force run moved it before it died
    result = invoke("split", model, "--tp", 4, "--out", out)
    assert (result.exit_code, result.stderr) == (1, f"Error: {out}: already exists; pass --force to replace it or choose another --out\n")
    assert snapshot(out) == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]


def test_stale_rank_staging_is_removed_and_a_failed_rank_run_leaves_no_empty_folder(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = split(model, tmp_path / "out", "--rank", 0)
    stale = out / ".ranks-abcd1234.partial"
    stale.mkdir()
    (stale / "model-rank-1-part-0.safetensors").write_bytes(b"half")
    split(model, out, "--rank", 1)
    assert not stale.exists() and invoke("verify", out).exit_code == 0

    def full(*args: object) -> int:
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(os, "pwrite", full)
    monkeypatch.setattr(os, "copy_file_range", full)
    fresh = tmp_path / "fresh"
    result = invoke("split", model, "--tp", 2, "--rank", 0, "--out", fresh)
    assert result.exit_code == 1 and "No space left on device" in result.stderr and "nothing was written" in result.stderr
    assert not fresh.exists()


def modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.iterdir()]}


@pytest.mark.parametrize("flags", [[], ["--rank", "0"]])
def test_outputs_are_no_more_readable_than_the_inputs(model: Path, tmp_path: Path, flags: list[str]) -> None:
    for path in model.iterdir():
        path.chmod(0o600)
    out = split(model, tmp_path / "out", *flags)
    found = modes(out)
    assert found.pop("out") == 0o700 or flags  # a folder --rank created beside others keeps the usual mode
    assert found and set(found.values()) == {0o600}, found
    if not flags:
        merged = invoke("merge", out, "--out", tmp_path / "merged", "-q")
        assert merged.exit_code == 0
        assert modes(tmp_path / "merged") == {"merged": 0o700, "model.safetensors": 0o600, "config.json": 0o600}


Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda m: m["tensors"][Q].update(slices=[[[16, 32]], [[0, 16]]]),
            f"tensor {Q} is recorded colwise on dim 0 with slices [[[16, 32]], [[0, 16]]], but the llama rules cut it colwise on dim 0 with slices [[[0, 16]], [[16, 32]]]; the manifest was changed, split again",
        ),
        (
            lambda m: m["tensors"][Q].update(slices=[[[16, 0]], [[16, 32]]]),
            "slices: must be a list per rank of [start, stop) ranges with 0 <= start < stop",
        ),
        (lambda m: m["ranks"][1].update(files=m["ranks"][0]["files"]), "a rank file is listed twice"),
        (
            lambda m: m["tensors"]["model.norm.weight"].update(style="colwise", dim=0, slices=[[[0, 16]], [[16, 32]]]),
            "tensor model.norm.weight is recorded colwise on dim 0",
        ),
    ],
)
def test_a_forged_manifest_is_refused_by_every_reader(model: Path, tmp_path: Path, change, message: str) -> None:
    import reshard

    folder = split(model, tmp_path / "split")
    forge(folder, change)
    before = snapshot(tmp_path)
    for args in (["merge", folder, "--out", tmp_path / "out"], ["split", folder, "--tp", 4, "--out", tmp_path / "out"], ["verify", folder]):
        refused(args, message, before, tmp_path)
    with pytest.raises(reshard.InputError, match=re.escape(message)):
        reshard.load_rank(folder, 0, device="cpu")


def test_a_rank_from_another_split_is_refused(model: Path, tmp_path: Path) -> None:
    """Another model with the same shapes: its rank 1 file and record, copied in, belong to another manifest."""
    import reshard

    folder = split(model, tmp_path / "split")
    other = split(synthetic_llama(tmp_path / "other", torch.bfloat16, seed=1, kv_heads=2, layers=4), tmp_path / "other-split")
    for name in ("model-rank-1-part-0.safetensors", "reshard-rank-1.json"):
        (folder / name).write_bytes((other / name).read_bytes())
    before = snapshot(tmp_path)
    message = f"{folder / 'reshard-rank-1.json'}: belongs to another split (its manifest_sha256 is not this reshard.json's); split again"
    for args in (["merge", folder, "--out", tmp_path / "out"], ["verify", folder]):
        refused(args, message, before, tmp_path)
    with pytest.raises(reshard.InputError, match="belongs to another split"):
        reshard.load_rank(folder, 1, device="cpu")


def test_links_are_not_followed_out_of_a_split_folder(model: Path, tmp_path: Path) -> None:
    import reshard

    folder = split(model, tmp_path / "split")
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    secret.chmod(0o600)
    (folder / "config.json").rename(tmp_path / "config.json")
    (folder / "config.json").symlink_to(secret)
    before = snapshot(tmp_path)
    message = f"{folder / 'config.json'}: links to {secret}, outside the split folder"
    refused(["merge", folder, "--out", tmp_path / "out"], message, before, tmp_path)
    # A manifest that lists no config.json: the folder's config.json is never read.
    forge(folder, lambda m: m["files"].clear())
    assert invoke("merge", folder, "--out", tmp_path / "out", "-q").exit_code == 0
    assert "PRIVATE KEY" not in (tmp_path / "out" / "config.json").read_text()
    # Rank 0 a link to rank 1: the same file under two names, or a file whose sha256 is not rank 0's.
    rank0 = folder / "model-rank-0-part-0.safetensors"
    rank0.unlink()
    rank0.symlink_to("model-rank-1-part-0.safetensors")
    result = invoke("merge", folder, "--out", tmp_path / "out2")
    assert result.exit_code == 1 and "is the same file as" in result.stderr
    with pytest.raises(reshard.InputError, match="xxh128 differs from reshard-rank-0.json"):
        reshard.load_rank(folder, 0, device="cpu")


def test_inputs_that_would_hang_or_exhaust_memory_are_refused(model: Path, tmp_path: Path) -> None:
    import struct

    before = snapshot(tmp_path)
    many = invoke("plan", model, "--tp", 100_000_000)
    assert (many.exit_code, many.stderr) == (2, "Error: --tp 100000000 is more ranks than reshard cuts a model into; at most 65536\n")
    refused(["plan", model, "--tp", 2, "--config", "/dev/zero"], "/dev/zero: the model config is not a regular file", before, tmp_path)
    fifo_folder = tmp_path / "fifo"
    fifo_folder.mkdir()
    os.mkfifo(fifo_folder / "model.safetensors")
    (fifo_folder / "config.json").write_bytes((model / "config.json").read_bytes())
    before = snapshot(tmp_path / "m")
    for args in (["plan", fifo_folder, "--tp", 2], ["split", fifo_folder, "--tp", 2, "--out", tmp_path / "out"]):
        result = invoke(*args)
        assert result.exit_code == 1
        assert (
            result.stderr
            == f"Error: {fifo_folder / 'model.safetensors'}: not a regular file (a pipe or a device is never read); pass the checkpoint's files\n"
        )
    huge = tmp_path / "huge"
    huge.mkdir()
    header = json.dumps({"a": {"dtype": "F32", "shape": [0, 2**64 + 1], "data_offsets": [0, 0]}}).encode()
    (huge / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    (huge / "config.json").write_bytes((model / "config.json").read_bytes())
    result = invoke("split", huge, "--tp", 2, "--out", tmp_path / "out")
    assert result.exit_code == 1 and "shape must be a list of non-negative integers below 2^63" in result.stderr
    assert not (tmp_path / "out").exists() and snapshot(tmp_path / "m") == before


def test_a_name_with_a_line_break_stays_on_its_error_line(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from helpers import llama_config

    folder = tmp_path / "odd"
    folder.mkdir()
    save_file({"model.layers.0.mlp.strange\nError: fake": torch.zeros(4, 4)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(llama_config()))
    result = invoke("plan", folder, "--tp", 2)
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and '"model.layers.0.mlp.strange\\nError: fake"' in lines[0], result.stderr


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real file system that fills: a tmpfs of 48 KiB (root may mount one; elsewhere the test cannot run)."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


@pytest.mark.parametrize("command", ["split", "ranks", "merge"])
def test_a_disk_that_fills_leaves_nothing_behind(model: Path, tmp_path: Path, small_disk: Path, command: str) -> None:
    source = split(model, tmp_path / "split") if command == "merge" else model
    sentinel = small_disk / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep.txt").write_text("outside the output")
    inputs, around = snapshot(tmp_path / "m"), snapshot(sentinel)
    out = small_disk / "out"
    args = {
        "split": ["split", model, "--tp", 2, "--out", out],
        "ranks": ["split", model, "--tp", 2, "--rank", 1, "--out", out],
        "merge": ["merge", source, "--out", out],
    }[command]
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {out}/") and "No space left on device" in lines[0], result.stderr
    assert lines[0].endswith("free some space or choose another --out; nothing was written")
    assert sorted(p.name for p in small_disk.iterdir()) == ["sentinel"]
    assert snapshot(sentinel) == around and snapshot(tmp_path / "m") == inputs


def test_a_rank_run_stopped_by_sigterm_leaves_no_folder(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    process = slow_split(model, out, tmp_path / "writing", "--rank", "0")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert (process.returncode, stderr) == (143, "Error: terminated; nothing was written\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "writing"]


def test_load_rank_refuses_an_unfinished_or_padded_rank(model: Path, tmp_path: Path) -> None:
    import reshard

    folder = split(model, tmp_path / "split")
    (folder / "reshard-rank-1.json").unlink()
    with pytest.raises(reshard.InputError, match=r"reshard-rank-1.json: missing, so rank 1's files were never finished"):
        reshard.load_rank(folder, 1, device="cpu")
    rank0 = folder / "model-rank-0-part-0.safetensors"
    with open(rank0, "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(reshard.InputError, match=r"model-rank-0-part-0.safetensors: \d+ bytes, but reshard-rank-0.json records"):
        reshard.load_rank(folder, 0, device="cpu")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("tp.toml", "a = " + "[" * 5000 + "]" * 5000 + "\n", "cannot read the TP config as TOML"),
        ("rules.json", '{"model_types": 5, "rules": []}', "model_types: must be a list of non-empty strings"),
        ("rules.json", '{"extends": ["llama"], "family": "x"}', "extends: must be a non-empty string"),
        (
            "rules.json",
            '{"rules": [{"name": "q", "match": 7, "style": "colwise", "dim": 0}]}',
            "rules[0].match: must be a non-empty string or a list of non-empty strings",
        ),
    ],
)
def test_bad_option_files_are_one_line_errors(model: Path, tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    flag = "--config" if name.endswith(".toml") else "--rules"
    result = invoke("plan", model, "--tp", 2, flag, path)
    assert result.exit_code == 1, result.output
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(f"Error: {path}") and message in result.stderr


def test_a_manifest_naming_a_path_instead_of_a_file_is_refused(model: Path, tmp_path: Path) -> None:
    folder = split(model, tmp_path / "split")
    forge(folder, lambda m: m.update(files={"./config.json": m["files"]["config.json"]}))
    before = snapshot(tmp_path)
    refused(["verify", folder], "file './config.json' must be a plain file name inside the split folder", before, tmp_path)
