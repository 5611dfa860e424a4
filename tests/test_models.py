"""Checkpoints saved by transformers (Llama, Mistral, Qwen2, Qwen3; one file and sharded with an index)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reshard import PlanError, merge, split
from reshard.formats.checkpoint import open_checkpoint

from helpers import raw_bytes, reference_slice, snapshot

CASES = [(name, layout, tp) for name in ("llama", "mistral", "qwen2", "qwen3") for layout in ("", "-sharded") for tp in (2, 4)]


def source_tensors(model: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in open_checkpoint(model).paths:
        tensors.update(load_file(str(path)))
    return tensors


@pytest.mark.parametrize(("name", "layout", "tp"), CASES)
def test_split_and_merge_transformers_checkpoint(hf_models: dict[str, Path], tmp_path: Path, name: str, layout: str, tp: int) -> None:
    model = hf_models[name + layout]
    before = snapshot(model)
    source = source_tensors(model)
    if layout:
        assert len(open_checkpoint(model).paths) > 2
    if name == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in source
    if name == "qwen3":
        assert "model.layers.0.self_attn.q_norm.weight" in source

    out = split(model, tp=tp, out=tmp_path / "split").out
    manifest = json.loads((out / "reshard.json").read_text())
    kv_heads = manifest["source"]["config"]["num_key_value_heads"]
    assert manifest["source"]["config"]["model_type"] == name
    for rank in range(tp):
        got = load_file(str(out / manifest["ranks"][rank]["files"][0]))
        assert set(got) == set(source)
        for tensor_name, tensor in source.items():
            assert raw_bytes(got[tensor_name]) == raw_bytes(reference_slice(tensor, tensor_name, rank, tp, kv_heads)), tensor_name

    merged = merge(out, out=tmp_path / "merged").out
    back = source_tensors(merged)
    assert set(back) == set(source)
    assert all(raw_bytes(back[k]) == raw_bytes(source[k]) and back[k].dtype == source[k].dtype for k in source)
    # The source's own files again, byte for byte: one model.safetensors, or the parts and their index.
    names = sorted(p.name for p in model.iterdir() if p.name.startswith("model"))
    assert sorted(p.name for p in merged.iterdir() if p.name.startswith("model")) == names
    assert all((merged / n).read_bytes() == (model / n).read_bytes() for n in names)
    assert snapshot(model) == before


def test_merged_checkpoint_loads_in_transformers_with_same_logits(hf_models: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = hf_models["qwen2-sharded"]
    merged = merge(split(model_dir, tp=4, out=tmp_path / "split").out, out=tmp_path / "merged").out
    tokens = torch.tensor([[1, 5, 9, 200, 3]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(model_dir).eval()(tokens).logits
        got = AutoModelForCausalLM.from_pretrained(merged).eval()(tokens).logits
    assert torch.equal(want, got)


def test_mistral_refuses_tp_that_neither_divides_nor_is_a_multiple_of_kv_heads(hf_models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(PlanError) as e:
        split(hf_models["mistral"], tp=3, out=tmp_path / "out")
    assert e.value.lines == [
        "num_attention_heads (8) is not divisible by --tp 3; valid --tp: 1, 2, 4, 8",
        "num_key_value_heads (2) is not divisible by --tp 3, nor --tp a multiple of it; valid --tp: 1, 2, 4, 8",
        "intermediate_size (128) is not divisible by --tp 3; valid --tp: 1, 2, 4, 8",
    ]
    assert not (tmp_path / "out").exists()
