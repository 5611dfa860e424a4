"""Changing the TP degree straight from rank files: the result is the direct split of the original, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from reshard.cli import app

from helpers import snapshot, synthetic_llama

runner = CliRunner()


def split(source: Path, out: Path, tp: int, *flags: str) -> Path:
    result = runner.invoke(app, ["split", str(source), "--tp", str(tp), "--out", str(out), "-q", *flags])
    assert result.exit_code == 0, result.stderr
    return out


@pytest.mark.parametrize(
    ("first", "then", "config"),
    [
        (4, 2, dict(kv_heads=2)),  # fewer ranks
        (2, 4, dict(kv_heads=2)),  # more ranks than kv heads: replicated kv heads appear
        (8, 2, dict(kv_heads=2)),  # replicated kv heads go away
        (8, 4, dict(kv_heads=8, vocab=62)),  # the padded vocabulary changes: 62 -> 8 x 8 and 4 x 16
        (3, 2, dict(heads=6, kv_heads=6, ffn=48, vocab=61)),  # padding appears, then goes away below
        (4, 1, dict(kv_heads=4, vocab=62)),
    ],
)
def test_resplit_equals_the_direct_split(tmp_path: Path, first: int, then: int, config: dict) -> None:
    model = synthetic_llama(tmp_path / "model", torch.bfloat16, **config)
    direct = split(model, tmp_path / "direct", then)
    before = split(model, tmp_path / "before", first)
    inputs = snapshot(before)
    after = split(before, tmp_path / "after", then)
    assert snapshot(after) == snapshot(direct)  # rank files, config.json and reshard.json, byte for byte
    assert snapshot(before) == inputs


def test_resplit_with_parts_and_from_parts(tmp_path: Path) -> None:
    model = synthetic_llama(tmp_path / "model", torch.float32, kv_heads=2)
    direct = split(model, tmp_path / "direct", 4, "--max-shard-size", "30KB")
    before = split(model, tmp_path / "before", 2, "--max-shard-size", "20KB")
    assert len(list(before.glob("model-rank-0-part-*.safetensors"))) > 1
    after = split(before, tmp_path / "after", 4, "--max-shard-size", "30KB")
    assert snapshot(after) == snapshot(direct)


def test_resplit_default_folder_name(tmp_path: Path) -> None:
    model = synthetic_llama(tmp_path / "model", torch.bfloat16, kv_heads=2)
    split(model, tmp_path / "model-tp4", 4)
    result = runner.invoke(app, ["split", str(tmp_path / "model-tp4"), "--tp", "2", "-q"])
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "model-tp2" / "reshard.json").is_file()


def test_resplit_refuses_a_damaged_rank_file(tmp_path: Path) -> None:
    model = synthetic_llama(tmp_path / "model", torch.bfloat16, kv_heads=2)
    before = split(model, tmp_path / "before", 2)
    rank1 = before / "model-rank-1-part-0.safetensors"
    data = bytearray(rank1.read_bytes())
    data[-3] ^= 0x10
    rank1.write_bytes(bytes(data))
    result = runner.invoke(app, ["split", str(before), "--tp", "4", "--out", str(tmp_path / "after")])
    assert result.exit_code == 1
    assert result.stderr == f"Error: {rank1}: sha256 differs from reshard-rank-1.json; the file is corrupt, split again\n"
    assert not (tmp_path / "after").exists()


def test_plan_of_a_split_folder(tmp_path: Path) -> None:
    model = synthetic_llama(tmp_path / "model", torch.bfloat16, kv_heads=2)
    direct = runner.invoke(app, ["plan", str(model), "--tp", "4", "--json"])
    before = split(model, tmp_path / "before", 2)
    again = runner.invoke(app, ["plan", str(before), "--tp", "4", "--json"])
    assert again.exit_code == 0, again.stderr
    assert again.stdout == direct.stdout
