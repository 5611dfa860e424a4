"""`reshard verify`: checksums against the manifest, and every rank tensor against its slice of the source."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import xxhash
from typer.testing import CliRunner

from reshard import verify
from reshard.cli import app

from helpers import llama_config, llama_shapes, snapshot, synthetic_llama, write_checkpoint

runner = CliRunner()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    # 8 heads, 2 kv heads (replicated at tp 4), vocabulary 62 (padded at tp 4).
    return synthetic_llama(tmp_path / "model", torch.bfloat16, kv_heads=2, vocab=62)


def split(model: Path, out: Path, tp: int, *flags: str) -> Path:
    result = runner.invoke(app, ["split", str(model), "--tp", str(tp), "--out", str(out), "-q", *flags])
    assert result.exit_code == 0, result.stderr
    return out


def tensor_span(path: Path, name: str) -> tuple[int, int]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8 : 8 + n])[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


@pytest.mark.parametrize(("tp", "flags"), [(1, []), (2, []), (4, []), (4, ["--max-shard-size", "20KB"])])
def test_a_fresh_split_verifies(model: Path, tmp_path: Path, tp: int, flags: list[str]) -> None:
    out = split(model, tmp_path / "split", tp, *flags)
    before = snapshot(tmp_path)
    result = runner.invoke(app, ["verify", str(out), "--against", str(model)])
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((out / "reshard.json").read_text())
    files = 1 + sum(len(r["files"]) for r in manifest["ranks"])  # config.json and the rank files
    assert result.stdout.splitlines()[0].startswith(f"{files} files (")
    assert result.stdout.splitlines()[1].startswith(f"{len(manifest['tensors'])} tensors (")
    assert result.stderr == ""
    assert snapshot(tmp_path) == before


def test_checksums_catch_a_flipped_bit(model: Path, tmp_path: Path) -> None:
    out = split(model, tmp_path / "split", 2)
    rank1 = out / "model-rank-1-part-0.safetensors"
    data = bytearray(rank1.read_bytes())
    data[len(data) // 2] ^= 1
    rank1.write_bytes(bytes(data))
    result = runner.invoke(app, ["verify", str(out)])
    assert result.exit_code == 1
    assert result.stderr == f"Error: {rank1}: xxh128 differs from reshard-rank-1.json; the file is corrupt, split again\n"


def test_missing_and_resized_files_are_each_named(model: Path, tmp_path: Path) -> None:
    out = split(model, tmp_path / "split", 2)
    (out / "config.json").unlink()
    rank0 = out / "model-rank-0-part-0.safetensors"
    with open(rank0, "ab") as f:
        f.write(b"\0")
    result = runner.invoke(app, ["verify", str(out)])
    assert result.exit_code == 1
    size = rank0.stat().st_size
    assert result.stderr.splitlines() == [
        f"Error: {out / 'config.json'}: missing; the split folder is incomplete, split again",
        f"Error: {rank0}: {size} bytes, but reshard-rank-0.json records {size - 1}; the file is truncated or was changed, split again",
    ]


def recut(out: Path, name: str, fix) -> None:
    """Rewrite one tensor's bytes in a rank file and the manifest's checksums to match: a split whose files are
    intact but whose content is wrong, as a bug in the engine would leave it."""

    manifest = json.loads((out / "reshard.json").read_text())
    for rank in range(manifest["tp"]):
        path = out / f"model-rank-{rank}-part-0.safetensors"
        begin, end = tensor_span(path, name)
        data = bytearray(path.read_bytes())
        data[begin:end] = fix(rank, bytes(data[begin:end]))
        path.write_bytes(bytes(data))
        record = json.loads((out / f"reshard-rank-{rank}.json").read_text())
        record["files"][path.name] = {"bytes": len(data), "xxh128": xxhash.xxh3_128(data).hexdigest()}
        (out / f"reshard-rank-{rank}.json").write_text(json.dumps(record))


def test_against_catches_a_wrong_cut_that_checksums_miss(model: Path, tmp_path: Path) -> None:
    """o_proj cut into row blocks instead of column blocks: same shapes and bytes per rank, wrong values."""
    out = split(model, tmp_path / "split", 2)
    name = "model.layers.1.self_attn.o_proj.weight"
    source = tensor_span(model / "model.safetensors", name)
    full = (model / "model.safetensors").read_bytes()[source[0] : source[1]]
    half = len(full) // 2
    recut(out, name, lambda rank, _: full[rank * half : (rank + 1) * half])
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0  # the files are what the manifest says
    result = runner.invoke(app, ["verify", str(out), "--against", str(model)])
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {out / 'model-rank-0-part-0.safetensors'}: tensor {name} differs from rank 0's slice of "
        f"{model / 'model.safetensors'}; split again\n"
    )


def test_against_checks_the_vocabulary_padding(model: Path, tmp_path: Path) -> None:
    out = split(model, tmp_path / "split", 4)
    name = "lm_head.weight"
    # The last rank's slice ends in zero rows: 62 rows over 4 ranks is 16 each, 2 of them padding.
    recut(out, name, lambda rank, data: data[:-1] + b"\x01" if rank == 3 else data)
    report = verify(out, against=model)
    assert report.problems == [
        f"{out / 'model-rank-3-part-0.safetensors'}: tensor {name} differs from rank 3's slice of {model / 'model.safetensors'}; split again"
    ]


def test_against_refuses_another_checkpoint(model: Path, tmp_path: Path) -> None:
    out = split(model, tmp_path / "split", 2)
    other = synthetic_llama(tmp_path / "other", torch.bfloat16, seed=1, kv_heads=2, vocab=62)
    same_header = runner.invoke(app, ["verify", str(out), "--against", str(other)])
    # Same shapes, other values: the headers agree, the sampled data does not.
    assert same_header.exit_code == 1
    assert same_header.stderr.startswith(f"Error: {other}: model.safetensors differs from the one split (reshard.json records ")
    assert ", data sample sha256 " in same_header.stderr
    bigger = synthetic_llama(tmp_path / "bigger", torch.bfloat16, kv_heads=2, vocab=64)
    result = runner.invoke(app, ["verify", str(out), "--against", str(bigger)])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {bigger}: model.safetensors differs from the one split (reshard.json records ")
    assert result.stderr.rstrip().endswith("pass the checkpoint this folder was split from")


def test_many_problems_are_named_ten_then_counted(model: Path, tmp_path: Path) -> None:
    out = split(model, tmp_path / "split", 2)
    names = list(json.loads((out / "reshard.json").read_text())["tensors"])
    for name in names:
        recut(out, name, lambda rank, data: bytes(reversed(data)) if rank == 0 else data)
    result = runner.invoke(app, ["verify", str(out), "--against", str(model)])
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 11 and all("differs from rank 0's slice" in line for line in lines[:10])
    assert lines[-1] == f"Error: {len(names) - 10} more problems"


def test_verify_bad_folder(tmp_path: Path) -> None:
    result = runner.invoke(app, ["verify", str(tmp_path)])
    assert (result.exit_code, result.stderr) == (1, f"Error: {tmp_path}: no reshard.json here; pass a folder written by `reshard split`\n")


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    """Like `model`, with values a trained model could hold (the other fixture has random bit patterns, NaN included)."""
    config = llama_config(kv_heads=2, vocab=62)
    gen = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(shape, generator=gen).to(torch.bfloat16) for n, shape in llama_shapes(config).items()}
    return write_checkpoint(tmp_path / "weights", tensors, config)


def test_forward_passes_a_good_split_with_replicas_and_padding(weights: Path, model: Path, tmp_path: Path) -> None:
    out = split(weights, tmp_path / "split", 4)
    result = runner.invoke(app, ["verify", str(out), "--forward", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    assert "masked lookup" in result.stdout and "all-reduce" in result.stdout and "all-gather" in result.stdout
    assert "tensor-parallel products match the weights rebuilt from the rank files" in result.stdout
    # Random bit patterns (NaN, infinities, huge values) agree where they are non-finite on both sides.
    assert runner.invoke(app, ["verify", str(split(model, tmp_path / "bits", 2)), "--forward"]).exit_code == 0


def test_forward_catches_a_replica_that_differs(weights: Path, tmp_path: Path) -> None:
    """At tp 4 with 2 kv heads, ranks 0 and 1 both hold kv head 0: one of them altered (checksums rewritten)."""
    out = split(weights, tmp_path / "split", 4)
    name = "model.layers.0.self_attn.k_proj.weight"
    recut(out, name, lambda rank, data: bytes(reversed(data)) if rank == 1 else data)
    result = runner.invoke(app, ["verify", str(out), "--forward"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: kv_proj: relative error ")
    assert f"in {name} is above --tolerance 1e-05; the tensor is cut wrongly, split again" in result.stderr
    assert "FAIL" in result.stdout


def test_forward_against_the_source_catches_a_mis_cut(weights: Path, tmp_path: Path) -> None:
    model = weights
    out = split(model, tmp_path / "split", 2)
    name = "model.layers.1.self_attn.o_proj.weight"
    source = tensor_span(model / "model.safetensors", name)
    full = (model / "model.safetensors").read_bytes()[source[0] : source[1]]
    half = len(full) // 2
    recut(out, name, lambda rank, _: full[rank * half : (rank + 1) * half])  # row blocks for column blocks
    alone = runner.invoke(app, ["verify", str(out), "--forward"])
    assert alone.exit_code == 0  # consistent with itself: only the source can tell
    result = runner.invoke(app, ["verify", str(out), "--forward", "--against", str(model)])
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0].endswith(f"tensor {name} differs from rank 0's slice of {model / 'model.safetensors'}; split again")
    assert any(line.startswith("Error: o_proj: relative error ") and name in line for line in lines)


def test_forward_under_torchrun(weights: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = split(weights, tmp_path / "split", 2)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "reshard", "verify", str(out), "--forward"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    # One process reports.
    assert run.stdout.count("tensor-parallel products match the weights rebuilt from the rank files") == 1
    assert run.stdout.count("Tensor-parallel products") == 1


def test_forward_without_torch_says_how_to_get_it(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    out = split(model, tmp_path / "split", 2)
    monkeypatch.setitem(sys.modules, "torch", None)  # as on a machine where torch is not installed
    result = runner.invoke(app, ["verify", str(out), "--forward"])
    assert result.exit_code == 2
    assert result.stderr == "Error: verify --forward needs torch; install the torch extra: pip install -e '.[torch]' in reshard's folder\n"
