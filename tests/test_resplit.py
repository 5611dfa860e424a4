"""Changing the TP degree straight from rank files: the result is the direct split of the original, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from reshard.cli import app

from helpers import snapshot, split, synthetic_llama

runner = CliRunner()


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
    assert result.stderr == f"Error: {rank1}: xxh128 differs from reshard-rank-1.json; the file is corrupt, split again\n"
    assert not (tmp_path / "after").exists()


def test_plan_of_a_split_folder(tmp_path: Path) -> None:
    model = synthetic_llama(tmp_path / "model", torch.bfloat16, kv_heads=2)
    direct = runner.invoke(app, ["plan", str(model), "--tp", "4", "--json"])
    before = split(model, tmp_path / "before", 2)
    again = runner.invoke(app, ["plan", str(before), "--tp", "4", "--json"])
    assert again.exit_code == 0, again.stderr
    assert again.stdout == direct.stdout


def test_rank_extraction_equals_that_rank_of_the_full_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = synthetic_llama(tmp_path / "model", torch.bfloat16, kv_heads=2, vocab=62)
    full = split(model, tmp_path / "full", 4)
    for rank in range(4):
        monkeypatch.setenv("RANK", str(rank))
        node = split(model, tmp_path / f"node{rank}", 4, "--rank", "auto")
        mine = {"config.json", "reshard.json", f"reshard-rank-{rank}.json", f"model-rank-{rank}-part-0.safetensors"}
        assert set(snapshot(node)) == mine
        assert snapshot(node) == {name: data for name, data in snapshot(full).items() if name in mine}
    union = {}
    for rank in range(4):
        union |= snapshot(tmp_path / f"node{rank}")
    assert union == snapshot(full)


def test_ranks_from_a_split_folder_and_srun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = synthetic_llama(tmp_path / "model", torch.bfloat16, kv_heads=2)
    full = split(model, tmp_path / "full", 4)
    before = split(model, tmp_path / "before", 2)
    some = split(before, tmp_path / "some", 4, "--ranks", "2,0")
    expected = {n: d for n, d in snapshot(full).items() if "rank-1" not in n and "rank-3" not in n}
    assert snapshot(some) == expected
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    split(before, tmp_path / "some", 4, "--rank", "auto")  # added beside ranks 0 and 2
    assert snapshot(tmp_path / "some") == {n: d for n, d in snapshot(full).items() if "rank-1" not in n}


def test_processes_adding_ranks_to_one_folder_at_once(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    model = synthetic_llama(tmp_path / "model", torch.bfloat16, kv_heads=2)
    full = split(model, tmp_path / "full", 4)
    out = tmp_path / "shared"
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "reshard", "split", str(model), "--tp", "4", "--rank", "auto", "--out", str(out), "-q"],
            env={**os.environ, "RANK": str(rank)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in range(4)
    ]
    for process in processes:
        assert process.wait(timeout=120) == 0, process.stderr.read()
    assert snapshot(out) == snapshot(full)
    assert runner.invoke(app, ["merge", str(out), "--out", str(tmp_path / "merged"), "-q"]).exit_code == 0


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        (["--rank", "4"], {}, "Error: --rank: rank 4 is outside 0..3 for tp 4"),
        (["--rank", "-1"], {}, "Error: --rank: rank -1 is outside 0..3 for tp 4"),
        (["--ranks", "0,x"], {}, "Error: --ranks: '0,x' is not a rank number list, e.g. 0,2"),
        (["--ranks", "1,1"], {}, "Error: --ranks: 1,1 names a rank twice"),
        (["--rank", "1", "--ranks", "2"], {}, "Error: pass --rank or --ranks, not both"),
        (["--rank", "auto"], {}, "Error: --rank auto: neither RANK (torchrun) nor SLURM_PROCID (srun) is set; pass --rank N"),
        (["--rank", "auto"], {"RANK": "7"}, "Error: --rank auto (RANK=7): rank 7 is outside 0..3 for tp 4"),
    ],
)
def test_bad_rank_choices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str], env: dict, message: str) -> None:
    model = synthetic_llama(tmp_path / "model", torch.bfloat16, kv_heads=2)
    for key in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = runner.invoke(app, ["split", str(model), "--tp", "4", "--out", str(tmp_path / "out"), *flags])
    assert (result.exit_code, result.stderr) == (2, message + "\n")
    assert not (tmp_path / "out").exists()


def test_adding_ranks_is_refused_when_it_would_clash(tmp_path: Path) -> None:
    model = synthetic_llama(tmp_path / "model", torch.bfloat16, kv_heads=2)
    out = split(model, tmp_path / "out", 4, "--rank", "1")
    before = snapshot(out)
    again = runner.invoke(app, ["split", str(model), "--tp", "4", "--rank", "1", "--out", str(out)])
    assert (again.exit_code, again.stderr) == (1, f"Error: {out}: already holds rank 1; pass --force to replace it\n")
    other = runner.invoke(app, ["split", str(model), "--tp", "2", "--rank", "0", "--out", str(out)])
    assert other.exit_code == 1
    assert other.stderr == f"Error: {out}: holds another split (its reshard.json differs from this one); choose another --out\n"
    assert snapshot(out) == before
    assert runner.invoke(app, ["split", str(model), "--tp", "4", "--rank", "1", "--out", str(out), "--force", "-q"]).exit_code == 0
    assert snapshot(out) == before
    merged = runner.invoke(app, ["merge", str(out)])
    assert merged.exit_code == 1
    assert merged.stderr.startswith(f"Error: {out}: holds ranks 1 of 0..3; merge needs every rank")
    checked = runner.invoke(app, ["verify", str(out)])
    assert checked.exit_code == 0 and "(ranks 1 of 0..3)" in checked.stdout


def test_a_rank_reads_less_than_the_whole_model(tmp_path: Path) -> None:
    from reshard import make_plan
    from reshard.engine.split import read_nbytes

    model = synthetic_llama(tmp_path / "model", torch.bfloat16, kv_heads=2)
    plan = make_plan(model, tp=4).plan
    assert read_nbytes(plan) == plan.nbytes
    # Row cuts and replicated tensors: only the rank's bytes; column cuts (o_proj, down_proj): whole rows.
    column = sum(t.nbytes for t in plan.tensors if t.style == "rowwise")
    assert read_nbytes(plan, ranks=[0]) == sum(t.rank_nbytes(0) for t in plan.tensors if t.style != "rowwise") + column
    assert read_nbytes(plan, ranks=[0]) < plan.nbytes
