"""`split --format vllm`: vLLM's sharded_state names, packing and vocabulary padding on top of the same cuts,
checked slice by slice here (tests_vllm/ proves it with a real vLLM); merge, verify and resplit read it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import reshard
from reshard.cli import app

from helpers import llama_config, llama_shapes, snapshot, synthetic_llama, write_checkpoint

runner = CliRunner()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    # 8 heads, 2 kv heads (replicated at tp 4), vocabulary 100 (padded to 128 as vLLM pads it), float32 values.
    config = llama_config(kv_heads=2, vocab=100)
    gen = torch.Generator().manual_seed(0)
    return write_checkpoint(tmp_path / "model", {n: torch.randn(s, generator=gen) for n, s in llama_shapes(config).items()}, config)


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def split(model: Path, out: Path, tp: int, *flags: object) -> Path:
    result = invoke("split", model, "--tp", tp, "--format", "vllm", "--out", out, "-q", *flags)
    assert result.exit_code == 0, result.stderr
    return out


@pytest.mark.parametrize("tp", [2, 4])
def test_rank_files_hold_what_vllm_registers(model: Path, tmp_path: Path, tp: int) -> None:
    source = load_file(model / "model.safetensors")
    out = split(model, tmp_path / "out", tp)
    heads, kv, head_dim = 8, 2, 4
    for rank in range(tp):
        got = load_file(out / f"model-rank-{rank}-part-0.safetensors")
        p = "model.layers.1"
        assert f"{p}.self_attn.q_proj.weight" not in got and f"{p}.mlp.up_proj.weight" not in got
        q = source[f"{p}.self_attn.q_proj.weight"].chunk(tp)[rank]
        kv_head = rank * kv // tp if tp > kv else None
        k, v = (source[f"{p}.self_attn.{n}_proj.weight"] for n in "kv")
        k, v = (t.chunk(kv)[kv_head] if kv_head is not None else t.chunk(tp)[rank] for t in (k, v))
        assert torch.equal(got[f"{p}.self_attn.qkv_proj.weight"], torch.cat([q, k, v]))
        gate, up = (source[f"{p}.mlp.{n}_proj.weight"].chunk(tp)[rank] for n in ("gate", "up"))
        assert torch.equal(got[f"{p}.mlp.gate_up_proj.weight"], torch.cat([gate, up]))
        assert torch.equal(got[f"{p}.self_attn.o_proj.weight"], source[f"{p}.self_attn.o_proj.weight"].chunk(tp, dim=1)[rank])
        # 100 rows padded to 128 (a multiple of 64), then cut in tp equal parts; rows past 100 are zeros.
        per = 128 // tp
        want = torch.zeros(per, heads * head_dim)
        rows = source["lm_head.weight"][rank * per : (rank + 1) * per]
        want[: rows.shape[0]] = rows
        assert torch.equal(got["lm_head.weight"], want)
        for scale in ("_k_scale", "_v_scale", "_q_scale", "_prob_scale"):
            assert got[f"{p}.self_attn.attn.{scale}"].shape == () and got[f"{p}.self_attn.attn.{scale}"].item() == 1.0
        assert torch.equal(got["model.norm.weight"], source["model.norm.weight"])
    manifest = json.loads((out / "reshard.json").read_text())
    assert manifest["layout"]["format"] == "vllm" and manifest["layout"]["version"] == "0.32"


def test_merge_verify_and_resplit_read_the_vllm_layout(model: Path, tmp_path: Path) -> None:
    out = split(model, tmp_path / "vllm", 4)
    assert invoke("verify", out, "--against", model).exit_code == 0
    assert invoke("verify", out, "--forward", "--device", "cpu").exit_code == 0
    assert invoke("merge", out, "--out", tmp_path / "merged", "-q").exit_code == 0
    assert (tmp_path / "merged" / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    # Resplit: from reshard's layout into vLLM's, and from vLLM's into reshard's, equal to the direct splits.
    own = invoke("split", model, "--tp", 2, "--out", tmp_path / "own", "-q")
    assert own.exit_code == 0
    assert snapshot(split(tmp_path / "own", tmp_path / "own-to-vllm", 4)) == snapshot(out)
    back = invoke("split", out, "--tp", 2, "--out", tmp_path / "vllm-to-own", "-q")
    assert back.exit_code == 0 and snapshot(tmp_path / "vllm-to-own") == snapshot(tmp_path / "own")
    weights = reshard.load_rank(out, 3, device="cpu")
    assert "model.layers.0.self_attn.k_proj.weight" in weights  # by source names, views into the packed tensors


def test_ranks_parts_and_engine_files(model: Path, tmp_path: Path) -> None:
    (model / "tokenizer.json").write_text('{"version": "1.0"}')
    (model / "generation_config.json").write_text('{"do_sample": false}')
    full = split(model, tmp_path / "full", 2, "--max-shard-size", "20KB")
    assert len(list(full.glob("model-rank-0-part-*.safetensors"))) > 1
    assert (full / "tokenizer.json").read_text() == '{"version": "1.0"}' and (full / "generation_config.json").is_file()
    for rank in range(2):
        split(model, tmp_path / "nodes", 2, "--max-shard-size", "20KB", "--rank", rank)
    assert snapshot(tmp_path / "nodes") == snapshot(full)
    assert invoke("merge", full, "--out", tmp_path / "merged", "-q").exit_code == 0
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_tied_embeddings_are_stored_under_the_name_vllm_keeps(tmp_path: Path) -> None:
    model = synthetic_llama(tmp_path / "model", torch.float32, kv_heads=2, vocab=64)
    tensors = load_file(model / "model.safetensors")
    del tensors["lm_head.weight"]
    from safetensors.torch import save_file

    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((model / "config.json").read_text()) | {"tie_word_embeddings": True}
    (model / "config.json").write_text(json.dumps(config))
    out = split(model, tmp_path / "out", 2)
    got = load_file(out / "model-rank-0-part-0.safetensors")
    assert "lm_head.weight" in got and "model.embed_tokens.weight" not in got
    assert invoke("merge", out, "--out", tmp_path / "merged", "-q").exit_code == 0
    assert load_file(tmp_path / "merged" / "model.safetensors").keys() == tensors.keys()


def test_what_the_vllm_layout_cannot_do_is_refused(model: Path, tmp_path: Path) -> None:
    bad_tp = invoke("plan", model, "--tp", 3, "--format", "vllm")
    assert bad_tp.exit_code == 1
    assert "vocab_size (100), padded to 128 (a multiple of 64), is not divisible by --tp 3" in bad_tp.stderr
    unknown = invoke("plan", model, "--tp", 2, "--format", "gguf")
    assert (unknown.exit_code, unknown.stderr) == (2, "Error: --format gguf: unknown; use one of reshard, vllm\n")
    gpt2 = tmp_path / "gpt2"
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=32, n_head=4, n_layer=1, vocab_size=64)).save_pretrained(gpt2)
    refused = invoke("split", gpt2, "--tp", 2, "--format", "vllm", "--out", tmp_path / "out")
    assert refused.exit_code == 1
    assert refused.stderr.startswith(
        "Error: --format vllm: model_type 'gpt2' (gpt2 family) has no vllm 0.32 layout in reshard; model types with one: "
    )
    assert refused.stderr.endswith(", starcoder2 (split with the default format instead)\n") and refused.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_model_type_vllm_was_not_proven_with_is_refused(family_models: dict[str, Path], tmp_path: Path) -> None:
    """The llama family's cuts fit Apertus, but vLLM holds its activation's parameters in another dtype than the
    checkpoint's, which a byte copy cannot give: refused by name."""
    refused = invoke("split", family_models["apertus"], "--tp", 2, "--format", "vllm", "--out", tmp_path / "out")
    assert refused.exit_code == 1
    assert refused.stderr.startswith(
        "Error: --format vllm: model_type 'apertus' (llama family) has no vllm 0.32 layout in reshard; model types with one: arcee, "
    )
    assert not (tmp_path / "out").exists()


def test_a_changed_vllm_layout_is_refused(model: Path, tmp_path: Path) -> None:
    import hashlib

    out = split(model, tmp_path / "out", 2)
    manifest = json.loads((out / "reshard.json").read_text())
    entry = next(e for e in manifest["layout"]["tensors"] if e["name"].endswith("0.self_attn.qkv_proj.weight"))
    entry["from"] = [entry["from"][1], entry["from"][0], entry["from"][2]]  # k before q
    text = json.dumps(manifest)
    (out / "reshard.json").write_text(text)
    for rank in range(2):
        path = out / f"reshard-rank-{rank}.json"
        record = json.loads(path.read_text()) | {"manifest_sha256": hashlib.sha256(text.encode()).hexdigest()}
        path.write_text(json.dumps(record))
    result = invoke("merge", out, "--out", tmp_path / "merged")
    assert result.exit_code == 1
    assert "the vllm layout is not the one reshard makes for this model; the manifest was changed, split again" in result.stderr


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda layout: layout.update(format="sglang"), "layout.format: must be one of vllm, not 'sglang'"),
        (lambda layout: layout["tensors"].pop(0), "layout: must hold every tensor of the manifest exactly once"),
        (lambda layout: layout["tensors"][0].update(stack=-1), "layout.tensors[0].stack: must be a non-negative integer"),
        (
            lambda layout: layout["tensors"][1].update({"from": ["nothing.weight"]}),
            "layout.tensors[1]: holds 'nothing.weight', which is not",
        ),
    ],
)
def test_a_malformed_recorded_layout_is_named(model: Path, tmp_path: Path, damage, says: str) -> None:
    out = split(model, tmp_path / "out", 2)
    manifest = json.loads((out / "reshard.json").read_text())
    damage(manifest["layout"])
    (out / "reshard.json").write_text(json.dumps(manifest))
    result = invoke("verify", out)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {out / 'reshard.json'}: malformed manifest: {says}"), result.stderr


def test_plan_shows_the_vllm_cut(model: Path) -> None:
    shown = invoke("plan", model, "--tp", 4, "--format", "vllm")
    assert shown.exit_code == 0, shown.stderr
    assert 'Layout: vllm 0.32, loaded with load_format="sharded_state": 23 tensors per rank' in shown.stdout
    assert "qkv_proj" not in shown.stdout
    shown = invoke("plan", model, "--tp", 4, "--format", "vllm", "--tensors")
    assert "Rank files (vllm 0.32 names)" in shown.stdout and "model.layers.1.self_attn.qkv_proj.weight" in shown.stdout
    plan = json.loads(invoke("plan", model, "--tp", 4, "--format", "vllm", "--json").stdout)
    lm_head = next(t for t in plan["tensors"] if t["name"] == "lm_head.weight")
    assert (plan["format"], lm_head["rank_shape"], lm_head["padding"]) == ("vllm", [32, 32], 28)
    qkv = next(t for t in plan["layout"] if t["name"] == "model.layers.1.self_attn.qkv_proj.weight")
    # 8 heads of 4 rows: 8 q rows per rank, and the rank's copy of one of the 2 kv heads for k and for v
    assert qkv == {
        "name": qkv["name"],
        "holds": "q_proj.weight | k_proj.weight | v_proj.weight",
        "dtype": "F32",
        "rank_shapes": [[16, 32]] * 4,
    }


@pytest.mark.parametrize("tp", [2, 4])
def test_mixtral_experts_are_stacked_as_vllm_holds_them(tmp_path: Path, tp: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "mixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, num_local_experts=3, num_experts_per_tok=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "moe")
    source = load_file(tmp_path / "moe" / "model.safetensors")
    out = split(tmp_path / "moe", tmp_path / "out", tp)
    p = "model.layers.0.block_sparse_moe.experts"
    for rank in range(tp):
        got = load_file(out / f"model-rank-{rank}-part-0.safetensors")
        w13 = torch.stack([torch.cat([source[f"{p}.{e}.w{i}.weight"].chunk(tp)[rank] for i in (1, 3)]) for e in range(3)])
        w2 = torch.stack([source[f"{p}.{e}.w2.weight"].chunk(tp, dim=1)[rank] for e in range(3)])
        assert torch.equal(got[f"{p}.routed_experts.w13_weight"], w13)
        assert torch.equal(got[f"{p}.routed_experts.w2_weight"], w2)
        assert not any(".w1.weight" in k or ".w2.weight" in k for k in got)
    assert invoke("verify", out, "--against", tmp_path / "moe").exit_code == 0
    assert invoke("merge", out, "--out", tmp_path / "merged", "-q").exit_code == 0
    assert (tmp_path / "merged" / "model.safetensors").read_bytes() == (tmp_path / "moe" / "model.safetensors").read_bytes()


F8 = torch.float8_e4m3fn
COMPRESSED_TENSORS = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True},
        }
    },
    "ignore": ["lm_head"],
    "kv_cache_scheme": None,
}


def quantized_llama(folder: Path, scales: str) -> Path:
    """A Llama whose decoder linear layers are FP8 with `scales`: "channel" (compressed-tensors, [out, 1]), "tensor"
    (quant_method fp8, one scalar, and a static input scale) or "block" (quant_method fp8, weight_scale_inv per 4 x 4 block); the rest bf16."""
    config = llama_config(kv_heads=2, vocab=100)
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for name, shape in llama_shapes(config).items():
        if ".layers." not in name or not name.endswith("proj.weight"):
            tensors[name] = torch.randn(shape, generator=gen).to(torch.bfloat16)
            continue
        tensors[name] = torch.randn(shape, generator=gen).to(F8)
        prefix = name[: -len(".weight")]
        if scales == "channel":
            tensors[f"{prefix}.weight_scale"] = torch.rand(shape[0], 1, generator=gen)
        elif scales == "tensor":  # static activation scales too
            tensors[f"{prefix}.weight_scale"] = torch.rand((), generator=gen)
            tensors[f"{prefix}.input_scale"] = torch.rand((), generator=gen)
        else:
            tensors[f"{prefix}.weight_scale_inv"] = torch.rand(shape[0] // 4, shape[1] // 4, generator=gen)
    if scales == "channel":
        config["quantization_config"] = COMPRESSED_TENSORS
    else:
        config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static" if scales == "tensor" else "dynamic"}
        if scales == "block":
            config["quantization_config"]["weight_block_size"] = [4, 4]
    return write_checkpoint(folder, tensors, config)


def qkv(source: dict[str, torch.Tensor], suffix: str, rank: int, tp: int, kv: int = 2) -> torch.Tensor:
    """q, k and v's `suffix` tensors' rows of the rank, back to back (kv heads replicated past tp = kv)."""
    p = "model.layers.1.self_attn"
    q = source[f"{p}.q_proj.{suffix}"].chunk(tp)[rank]
    k, v = (source[f"{p}.{n}_proj.{suffix}"] for n in "kv")
    k, v = (t.chunk(kv)[rank * kv // tp] if tp > kv else t.chunk(tp)[rank] for t in (k, v))
    return torch.cat([q, k, v])


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("scales", ["channel", "tensor", "block"])
def test_quantized_layers_hold_their_scales_as_vllm_does(tmp_path: Path, scales: str, tp: int) -> None:
    """A fused layer's scales follow its rows: per-channel and per-block scales packed like the weight, per-tensor
    scales held as one per fused part; the attention's quantization buffers added as vLLM registers them."""
    model = quantized_llama(tmp_path / "model", scales)
    source = load_file(model / "model.safetensors")
    out = split(model, tmp_path / "out", tp)
    p = "model.layers.1"
    for rank in range(tp):
        got = load_file(out / f"model-rank-{rank}-part-0.safetensors")
        assert torch.equal(got[f"{p}.self_attn.qkv_proj.weight"].view(torch.uint8), qkv(source, "weight", rank, tp).view(torch.uint8))
        if scales == "channel":
            assert torch.equal(got[f"{p}.self_attn.qkv_proj.weight_scale"], qkv(source, "weight_scale", rank, tp))
            gate_up = torch.cat([source[f"{p}.mlp.{n}_proj.weight_scale"].chunk(tp)[rank] for n in ("gate", "up")])
            assert torch.equal(got[f"{p}.mlp.gate_up_proj.weight_scale"], gate_up)
            assert torch.equal(got[f"{p}.self_attn.o_proj.weight_scale"], source[f"{p}.self_attn.o_proj.weight_scale"])
            for name in ("q_scale", "k_scale", "v_scale", "q_zero_point", "k_zero_point", "v_zero_point"):
                # the scales in float32, the zero points in the model's dtype, as vLLM registers them
                want = torch.zeros(1, dtype=torch.bfloat16) if "zero" in name else torch.ones(1)
                held = got[f"{p}.self_attn.attn.{name}"]
                assert held.dtype == want.dtype and torch.equal(held, want)
        elif scales == "tensor":
            for kind in ("weight_scale", "input_scale"):
                want = torch.stack([source[f"{p}.self_attn.{n}_proj.{kind}"] for n in "qkv"])
                assert torch.equal(got[f"{p}.self_attn.qkv_proj.{kind}"], want)
            assert torch.equal(got[f"{p}.self_attn.o_proj.weight_scale"], source[f"{p}.self_attn.o_proj.weight_scale"].reshape(1))
            for name in ("q_scale", "k_scale", "v_scale", "prob_scale"):
                scale = got[f"{p}.self_attn.attn.{name}"]
                assert (scale.dtype, scale.shape, scale.item()) == (torch.bfloat16, (), -1.0)
        else:
            blocks = qkv({n: t.repeat_interleave(4, 0) for n, t in source.items() if n.endswith("scale_inv")}, "weight_scale_inv", rank, tp)
            assert torch.equal(got[f"{p}.self_attn.qkv_proj.weight_scale_inv"], blocks[::4])
    assert invoke("verify", out, "--against", model).exit_code == 0
    assert invoke("merge", out, "--out", tmp_path / "merged", "-q").exit_code == 0
    assert (tmp_path / "merged" / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("quantization", "says"),
    [
        ({"quant_method": "mxfp4"}, "quantization 'mxfp4' (config.json quantization_config) has no vllm 0.32 layout in reshard; quantizations with one: compressed-tensors, fp8"),
        ({"quant_method": "gptq", "bits": 4}, "quantization 'gptq' (config.json quantization_config) has no vllm 0.32 layout"),
        (dict(COMPRESSED_TENSORS, format="pack-quantized"), "compressed-tensors format 'pack-quantized' has no vllm 0.32 layout in reshard"),
        (dict(COMPRESSED_TENSORS, kv_cache_scheme={"num_bits": 8, "type": "float"}), "quantization_config has a kv_cache_scheme"),
    ],
)  # fmt: skip
def test_other_quantizations_are_refused_by_name(tmp_path: Path, quantization: dict, says: str) -> None:
    model = quantized_llama(tmp_path / "model", "channel")
    config = json.loads((model / "config.json").read_text()) | {"quantization_config": quantization}
    (model / "config.json").write_text(json.dumps(config))
    result = invoke("split", model, "--tp", 2, "--format", "vllm", "--out", tmp_path / "out")
    assert result.exit_code == 1 and says in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_kv_cache_scales_are_refused_by_name(tmp_path: Path) -> None:
    model = quantized_llama(tmp_path / "model", "tensor")
    tensors = load_file(model / "model.safetensors") | {"model.layers.0.self_attn.k_scale": torch.tensor(0.5)}
    from safetensors.torch import save_file

    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    result = invoke("split", model, "--tp", 2, "--format", "vllm", "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: --format vllm: tensor model.layers.0.self_attn.k_scale is a kv-cache scale, and reshard has no vllm 0.32 layout for "
        "quantized kv caches (split with the default format instead)\n"
    )
    assert not (tmp_path / "out").exists()


def test_moe_and_mla_layouts(family_models: dict[str, Path], tmp_path: Path) -> None:
    """DeepSeek-V3: q_a_proj and kv_a_proj_with_mqa fused whole on every rank, MLA's projections under mla_attn,
    the router and its bias under experts.gate, shared experts fused; Qwen3-MoE's router under experts.gate."""
    model = family_models["deepseek_v3"]
    source = load_file(model / "model.safetensors")
    out = split(model, tmp_path / "deepseek", 2)
    p = "model.layers.1"
    for rank in range(2):
        got = load_file(out / f"model-rank-{rank}-part-0.safetensors")
        a = torch.cat([source[f"{p}.self_attn.q_a_proj.weight"], source[f"{p}.self_attn.kv_a_proj_with_mqa.weight"]])
        assert torch.equal(got[f"{p}.self_attn.fused_qkv_a_proj.weight"], a)
        assert torch.equal(got[f"{p}.self_attn.mla_attn.q_b_proj.weight"], source[f"{p}.self_attn.q_b_proj.weight"].chunk(2)[rank])
        assert torch.equal(got[f"{p}.self_attn.kv_b_proj.weight"], source[f"{p}.self_attn.kv_b_proj.weight"].chunk(2)[rank])
        assert torch.equal(got[f"{p}.mlp.experts.gate.e_score_correction_bias"], source[f"{p}.mlp.gate.e_score_correction_bias"])
        shared = torch.cat([source[f"{p}.mlp.shared_experts.{n}_proj.weight"].chunk(2)[rank] for n in ("gate", "up")])
        assert torch.equal(got[f"{p}.mlp.experts._shared_experts._layer.gate_up_proj.weight"], shared)
        assert got[f"{p}.self_attn.mla_attn.mla_attn._k_scale"].item() == 1.0
    assert invoke("merge", out, "--out", tmp_path / "merged", "-q").exit_code == 0
    assert (tmp_path / "merged" / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    qwen = split(family_models["qwen3_moe"], tmp_path / "qwen3_moe", 2)
    got = load_file(qwen / "model-rank-0-part-0.safetensors")
    assert "model.layers.0.mlp.experts.gate.weight" in got and "model.layers.0.mlp.gate.weight" not in got


def test_the_default_folder_names_the_layout(model: Path, tmp_path: Path) -> None:
    assert invoke("split", model, "--tp", 2, "--format", "vllm", "-q").exit_code == 0
    assert (tmp_path / "model-vllm-tp2" / "reshard.json").is_file() and not (tmp_path / "model-tp2").exists()
    # A resplit of it into reshard's own layout drops the engine's name.
    assert invoke("split", tmp_path / "model-vllm-tp2", "--tp", 4, "-q").exit_code == 0
    assert (tmp_path / "model-tp4" / "reshard.json").is_file()


@pytest.mark.parametrize("tp", [2, 4])
def test_experts_vllm_stores_transposed(family_models: dict[str, Path], tmp_path: Path, tp: int) -> None:
    """gpt-oss and Llama 4 keep their experts fused as [experts, hidden, 2 x FFN] and [experts, FFN, hidden]; vLLM
    holds each rank's part transposed (w13_weight [experts, 2 x FFN/tp, hidden]). gpt-oss's down-projection bias
    is on rank 0 alone (zeros elsewhere); Llama 4's q and k rows are held per head as rotary halves. All of it
    merges back bit for bit, verifies, resplits and loads by source names."""
    for kind, p in (("gpt_oss", "model.layers.1.mlp.experts"), ("llama4_text", "model.layers.1.feed_forward.experts")):
        model = family_models[kind]
        source = load_file(model / "model.safetensors")
        out = split(model, tmp_path / f"{kind}-{tp}", tp)
        gate_up, down = source[f"{p}.gate_up_proj"], source[f"{p}.down_proj"]
        for rank in range(tp):
            got = load_file(out / f"model-rank-{rank}-part-0.safetensors")
            if kind == "gpt_oss":  # gate and up interleaved column by column: each rank takes whole pairs
                w13 = gate_up.chunk(tp, dim=2)[rank]
            else:  # gate half, then up half: each rank takes its share of each
                w13 = torch.cat([half.chunk(tp, dim=2)[rank] for half in gate_up.chunk(2, dim=2)], dim=2)
            assert torch.equal(got[f"{p}.routed_experts.w13_weight"], w13.transpose(1, 2))
            assert torch.equal(got[f"{p}.routed_experts.w2_weight"], down.chunk(tp, dim=1)[rank].transpose(1, 2))
            if kind == "gpt_oss":
                bias = source[f"{p}.down_proj_bias"]
                assert torch.equal(got[f"{p}.routed_experts.w2_bias"], bias if rank == 0 else torch.zeros_like(bias))
                assert "model.embedding.weight" in got and "model.embed_tokens.weight" not in got
            else:
                q = source["model.layers.1.self_attn.q_proj.weight"].chunk(tp)[rank]
                head = q.shape[0] // (8 // tp)  # rows of one head
                halves = q.reshape(-1, head // 2, 2, q.shape[1]).transpose(1, 2).reshape(q.shape)
                assert torch.equal(got["model.layers.1.self_attn.qkv_proj.weight"][: q.shape[0]], halves)
        assert invoke("verify", out, "--against", model).exit_code == 0
        forward = invoke("verify", out, "--forward", "--device", "cpu")
        assert forward.exit_code == 0, forward.stderr
        assert invoke("merge", out, "--out", tmp_path / f"{kind}-{tp}-merged", "-q").exit_code == 0
        assert (tmp_path / f"{kind}-{tp}-merged" / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
        own = tmp_path / f"{kind}-{tp}-own"
        assert invoke("split", out, "--tp", 2, "--out", own, "-q").exit_code == 0
        again = snapshot(split(own, tmp_path / f"{kind}-{tp}-again", tp))
        assert {n: b for n, b in again.items() if n.startswith("model-rank-")} == {
            n: b for n, b in snapshot(out).items() if n.startswith("model-rank-")
        }
        weights = reshard.load_rank(out, tp - 1, device="cpu")
        assert torch.equal(weights[f"{p}.down_proj"], down.chunk(tp, dim=1)[tp - 1])


def test_a_changed_transposed_expert_fails_verify(family_models: dict[str, Path], tmp_path: Path) -> None:
    """verify --against reads a transposed tensor in its own order: one changed element is found."""
    model = family_models["gpt_oss"]
    out = split(model, tmp_path / "out", 2, "--checksum", "none")
    path = out / "model-rank-1-part-0.safetensors"
    data = bytearray(path.read_bytes())
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    at = 8 + int.from_bytes(data[:8], "little") + header["model.layers.0.mlp.experts.routed_experts.w13_weight"]["data_offsets"][0] + 101
    data[at] ^= 0x40
    path.write_bytes(bytes(data))
    result = invoke("verify", out, "--against", model)
    assert result.exit_code == 1
    assert "tensor model.layers.0.mlp.experts.gate_up_proj differs from rank 1's slice" in result.stdout + result.stderr
