"""Quantized checkpoints: FP8 weights with their scales are cut consistently; packed formats are refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reshard import PlanError, merge, split

from helpers import llama_config, llama_shapes, write_checkpoint

F8 = torch.float8_e4m3fn


def fp8_llama(folder: Path, block: int = 4) -> Path:
    """A Llama in FP8 with every kind of scale: per-tensor, per-output-channel, per-input-channel, per-block."""
    config = llama_config(heads=8, kv_heads=4, head_dim=4, ffn=48, vocab=64, layers=1)
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for name, shape in llama_shapes(config).items():
        if name.endswith("proj.weight"):
            tensors[name] = torch.randn(shape, generator=gen).to(F8)
            prefix = name[: -len(".weight")]
            tensors[f"{prefix}.input_scale"] = torch.rand((), generator=gen)
            if ".q_proj." in name or ".gate_proj." in name:
                tensors[f"{prefix}.weight_scale"] = torch.rand(shape[0], 1, generator=gen)  # per output channel
            elif ".k_proj." in name:
                tensors[f"{prefix}.weight_scale_inv"] = torch.rand(shape[0] // block, shape[1] // block, generator=gen)
            elif ".o_proj." in name:
                tensors[f"{prefix}.weight_scale"] = torch.rand(1, shape[1], generator=gen)  # per input channel
            elif ".down_proj." in name:
                tensors[f"{prefix}.weight_scale"] = torch.rand(shape[0], generator=gen)  # per output channel, 1-D
            else:
                tensors[f"{prefix}.weight_scale"] = torch.rand(1, generator=gen)  # per tensor
        else:
            tensors[name] = torch.randn(shape, generator=gen).to(torch.bfloat16)
    return write_checkpoint(folder, tensors, config)


@pytest.mark.parametrize("tp", [2, 4])
def test_fp8_scales_follow_their_weights(tmp_path: Path, tp: int) -> None:
    model = fp8_llama(tmp_path / "fp8")
    source = load_file(str(model / "model.safetensors"))
    out = split(model, tp=tp).out
    cuts = json.loads((out / "reshard.json").read_text())["tensors"]
    p = "model.layers.0"
    assert (cuts[f"{p}.self_attn.q_proj.weight_scale"]["style"], cuts[f"{p}.self_attn.q_proj.weight_scale"]["rule"]) == (
        "colwise",
        "scale of q_proj",
    )
    assert cuts[f"{p}.self_attn.o_proj.weight_scale"]["style"] == "rowwise"
    assert cuts[f"{p}.mlp.down_proj.weight_scale"]["style"] == "replicate"
    assert cuts[f"{p}.self_attn.v_proj.weight_scale"]["style"] == "replicate"
    assert cuts[f"{p}.self_attn.q_proj.input_scale"]["style"] == "replicate"

    expected_dims = {
        "self_attn.q_proj.weight_scale": 0,  # rows, with q_proj's rows
        "mlp.gate_proj.weight_scale": 0,
        "self_attn.k_proj.weight_scale_inv": 0,  # block rows, with k_proj's rows
        "self_attn.o_proj.weight_scale": 1,  # columns, with o_proj's columns
    }
    for rank in range(tp):
        got = load_file(str(out / f"model-rank-{rank}-part-0.safetensors"))
        for name, tensor in source.items():
            short = name[len(p) + 1 :]
            if short in expected_dims:
                want = tensor.chunk(tp, dim=expected_dims[short])[rank]
            elif name.endswith(("_scale", "_scale_inv")):
                want = tensor  # per tensor, or per output channel of a row-parallel weight
            elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
                want = tensor.chunk(tp, dim=0)[rank]
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                want = tensor.chunk(tp, dim=1)[rank]
            elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
                want = tensor.chunk(tp, dim=0)[rank]
            else:
                want = tensor
            assert torch.equal(got[name].view(torch.uint8) if got[name].dtype == F8 else got[name],
                               want.view(torch.uint8) if want.dtype == F8 else want), (rank, name)  # fmt: skip
    merged = merge(out).out
    assert (merged / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()


def test_block_scales_refuse_a_cut_inside_a_block(tmp_path: Path) -> None:
    model = fp8_llama(tmp_path / "fp8", block=8)  # k_proj: 16 rows, 4 kv heads of 4 rows, scale blocks of 8 rows
    with pytest.raises(PlanError) as e:
        split(model, tp=4, out=tmp_path / "out")
    assert (
        "tensor model.layers.0.self_attn.k_proj.weight_scale_inv: blocks of 8 along dim 0 would be split between ranks; choose another --tp"
    ) in e.value.lines
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("suffixes", "first"),
    [
        ((".qweight", ".qzeros", ".scales", ".g_idx"), "g_idx"),  # GPTQ / AWQ
        ((".weight", ".weight.absmax", ".weight.quant_map", ".weight.quant_state.bitsandbytes__nf4"), "weight.absmax"),  # bitsandbytes
    ],
)
def test_packed_quantized_formats_are_refused(tmp_path: Path, suffixes: tuple[str, ...], first: str) -> None:
    config = llama_config(layers=1)
    tensors = {name: torch.zeros(shape, dtype=torch.bfloat16) for name, shape in llama_shapes(config).items()}
    prefix = "model.layers.0.self_attn.q_proj"
    del tensors[f"{prefix}.weight"]
    for suffix in suffixes:
        tensors[prefix + suffix] = torch.zeros(4, 8, dtype=torch.int32)
    model = write_checkpoint(tmp_path / "quant", tensors, config)
    with pytest.raises(PlanError) as e:
        split(model, tp=2)
    assert e.value.lines[0] == (
        f"tensor {prefix}.{first} is in a packed quantized format (GPTQ, AWQ or bitsandbytes), whose elements hold "
        "several values and cannot be cut by rows or columns; dequantize the checkpoint first, or give a rule for it with --rules"
    )


def test_the_vllm_layout_refuses_scales_without_a_quantization_config(tmp_path: Path) -> None:
    from reshard import InputError

    model = fp8_llama(tmp_path / "fp8")
    with pytest.raises(
        InputError, match=r"--format vllm: tensor model.layers.0.\S+ is a quantization scale, but config.json has no quantization_config"
    ):
        split(model, tp=2, out=tmp_path / "out", output_format="vllm")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tp", [2, 4])
def test_deepseek_fp8_block_scales_are_cut_with_their_blocks(family_models: dict[str, Path], tmp_path: Path, tp: int) -> None:
    """DeepSeek-V3 ships FP8 weights with `weight_scale_inv` per block (128 x 128 there, 8 x 8 at this size):
    MLA's q_b_proj and kv_b_proj, o_proj, the experts and the shared experts are cut by heads or FFN columns,
    and each rank's scales are exactly the blocks of the rows or columns it holds."""
    block = 8
    source = load_file(str(family_models["deepseek_v3"] / "model.safetensors"))
    tensors = {}
    for name, tensor in source.items():
        if name.endswith("proj.weight") and tensor.dim() == 2 and "_a_proj" not in name:
            tensors[name] = tensor.to(F8)
            tensors[name.replace(".weight", ".weight_scale_inv")] = torch.rand(tensor.shape[0] // block, tensor.shape[1] // block)
        else:
            tensors[name] = tensor
    config = json.loads((family_models["deepseek_v3"] / "config.json").read_text())
    model = write_checkpoint(tmp_path / "fp8", tensors, config)
    out = split(model, tp=tp).out
    cuts = json.loads((out / "reshard.json").read_text())["tensors"]
    scales = [n for n in cuts if n.endswith("weight_scale_inv")]
    assert {cuts[n.replace("_scale_inv", "")]["rule"] for n in scales} >= {"mla_q", "mla_kv_b", "mla_o", "expert_gate_up", "shared_down"}
    for name in scales:
        weight = cuts[name.replace("_scale_inv", "")]
        assert cuts[name]["style"] == weight["style"] and cuts[name].get("dim") == weight.get("dim"), name
        assert cuts[name]["slices"] == [[[a // block, b // block] for a, b in ranges] for ranges in weight["slices"]], name
    merged = merge(out).out
    assert (merged / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
