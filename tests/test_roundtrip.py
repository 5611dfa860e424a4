"""Split then merge, bit for bit, over dtypes and tp degrees; each rank's slice checked against torch.chunk."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from reshard import merge, split

from helpers import DTYPES, raw_bytes, reference_slice, snapshot, synthetic_llama

# The package exports the functions split and merge, which hide the engine modules of the same names.
split_module = importlib.import_module("reshard.engine.split")


def load_rank(folder: Path, rank: int) -> dict[str, torch.Tensor]:
    manifest = json.loads((folder / "reshard.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for name in manifest["ranks"][rank]["files"]:
        tensors.update(load_file(str(folder / name)))
    return tensors


def assert_ranks_match_reference(source: dict[str, torch.Tensor], split_dir: Path, tp: int) -> None:
    for rank in range(tp):
        got = load_rank(split_dir, rank)
        assert set(got) == set(source)
        for name, tensor in source.items():
            want = reference_slice(tensor, name, rank, tp)
            assert got[name].dtype == want.dtype, name
            assert got[name].shape == want.shape, name
            assert raw_bytes(got[name]) == raw_bytes(want), f"rank {rank} {name}"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_round_trip_is_bit_exact(tmp_path: Path, dtype: str, tp: int) -> None:
    model = synthetic_llama(tmp_path / "model", DTYPES[dtype])
    before = snapshot(model)
    out = split(model, tp=tp).out
    assert out == tmp_path / f"model-tp{tp}"
    source = load_file(str(model / "model.safetensors"))
    assert_ranks_match_reference(source, out, tp)

    merged = merge(out).out
    assert merged == tmp_path / f"model-tp{tp}-merged"
    # Same tensors, same order, same header: the whole file comes back byte for byte.
    assert (merged / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    assert (merged / "config.json").read_bytes() == (model / "config.json").read_bytes()
    assert snapshot(model) == before


def test_rank_files_carry_rank_tp_device_and_format(tmp_path: Path) -> None:
    model = synthetic_llama(tmp_path / "model", torch.bfloat16)
    out = split(model, tp=2, device_ids=[3, 5]).out
    manifest = json.loads((out / "reshard.json").read_text())
    assert manifest["device_ids"] == [3, 5]
    assert [r["device"] for r in manifest["ranks"]] == ["cuda:3", "cuda:5"]
    for rank, device in enumerate(["cuda:3", "cuda:5"]):
        with safe_open(str(out / f"model-rank-{rank}-part-0.safetensors"), framework="pt") as f:
            assert f.metadata() == {"format": "pt", "rank": str(rank), "tp": "2", "device": device}
    assert manifest["tensors"]["model.layers.0.self_attn.o_proj.weight"] == {
        "shape": [32, 32],
        "dtype": "BF16",
        "style": "rowwise",
        "dim": 1,
        "rule": "o_proj",
        "slices": [[[0, 16]], [[16, 32]]],
    }
    assert manifest["tensors"]["model.norm.weight"]["style"] == "replicate"
    assert (out / "config.json").read_bytes() == (model / "config.json").read_bytes()


def test_large_tensors_stream_in_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 300-byte block runs every path of the streaming code: several rows per block with a partial last block
    (o_proj, down_proj rows of 128 and 96 bytes), and rows longer than a block read in windows that straddle
    rank boundaries (embeddings, q/k/v, norms)."""
    monkeypatch.setattr(split_module, "BLOCK_BYTES", 300)  # merge runs the same engine
    model = synthetic_llama(tmp_path / "model", torch.float32, vocab=96, ffn=24)
    out = split(model, tp=4).out
    assert_ranks_match_reference(load_file(str(model / "model.safetensors")), out, 4)
    merged = merge(out).out
    assert (merged / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()


def test_failure_midway_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = synthetic_llama(tmp_path / "model", torch.bfloat16)
    before = snapshot(model)
    calls = []

    real = split_module.split_tensor

    def failing(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        real(*args, **kwargs)

    monkeypatch.setattr(split_module, "split_tensor", failing)
    with pytest.raises(OSError):
        split(model, tp=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert snapshot(model) == before


def test_force_replaces_an_earlier_output_of_reshard(tmp_path: Path) -> None:
    model = synthetic_llama(tmp_path / "model", torch.bfloat16)
    out = split(model, tp=2, out=tmp_path / "out").out
    split(model, tp=4, out=out, force=True)
    assert json.loads((out / "reshard.json").read_text())["tp"] == 4
    assert not (out / "model-rank-0-part-0.safetensors").exists() or (out / "reshard-rank-3.json").exists()
    merged = merge(out, out=tmp_path / "merged").out
    merge(out, out=merged, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "model", "out"]


def test_max_shard_size_cuts_rank_files_into_parts(tmp_path: Path) -> None:
    model = synthetic_llama(tmp_path / "model", torch.float32)
    source = load_file(str(model / "model.safetensors"))
    out = split(model, tp=2, max_shard_size=5000).out
    manifest = json.loads((out / "reshard.json").read_text())
    for rank in range(2):
        files = manifest["ranks"][rank]["files"]
        assert len(files) > 3
        assert files == [f"model-rank-{rank}-part-{p}.safetensors" for p in range(len(files))]
        sizes = []
        for name in files:
            with safe_open(str(out / name), framework="pt") as f:
                sizes.append(sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()))
                assert f.metadata()["rank"] == str(rank)
        # No part holds more than 5000 bytes of tensors unless one tensor alone is larger (the embeddings: 4096).
        assert all(size <= 5000 for size in sizes)
    assert_ranks_match_reference(source, out, 2)
    merged = merge(out).out
    assert (merged / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()


def test_merge_with_max_shard_size_writes_an_index_transformers_reads(hf_models: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = hf_models["llama"]
    merged = merge(split(model_dir, tp=2, out=tmp_path / "split").out, out=tmp_path / "merged", max_shard_size=60_000).out
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(p.name for p in merged.glob("*.safetensors")) == files
    source = load_file(str(model_dir / "model.safetensors"))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in source.values())
    back = {}
    for name in files:
        back.update(load_file(str(merged / name)))
    assert all(raw_bytes(back[k]) == raw_bytes(source[k]) for k in source) and set(back) == set(source)
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(model_dir)(tokens).logits
        got = AutoModelForCausalLM.from_pretrained(merged)(tokens).logits
    assert torch.equal(want, got)


def test_merge_gives_back_a_sharded_checkpoint_in_its_own_files(hf_models: dict[str, Path], tmp_path: Path) -> None:
    """A checkpoint transformers saved in several files comes back as those files and that index, byte for byte,
    through a split, and through a resplit of the split."""
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(hf_models["llama"]).save_pretrained(sharded, max_shard_size="60KB")
    names = sorted(p.name for p in sharded.iterdir() if p.name.startswith("model"))
    assert len(names) > 3 and "model.safetensors.index.json" in names
    first = merge(split(sharded, tp=2, out=tmp_path / "tp2").out, out=tmp_path / "merged").out
    second = merge(split(tmp_path / "tp2", tp=4, out=tmp_path / "tp4").out, out=tmp_path / "merged4").out
    for merged in (first, second):
        assert sorted(p.name for p in merged.iterdir() if p.name.startswith("model")) == names
        for name in names:
            assert (merged / name).read_bytes() == (sharded / name).read_bytes(), name
