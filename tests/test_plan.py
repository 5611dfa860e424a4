"""The plan is a pure function of header, config and tp: checked on a Llama-2-7B-shaped header, no weights needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from reshard import ModelConfig, PlanError, TPConfig, UsageError, build_plan
from reshard.errors import InputError
from reshard.formats.safetensors import TensorInfo
from reshard.model.rules import builtin_families, detect_family

from helpers import llama_config, llama_shapes

LLAMA = builtin_families()["llama"]


def header(config: dict, extra: dict[str, tuple[int, ...]] | None = None) -> list[TensorInfo]:
    shapes = {**llama_shapes(config), **(extra or {})}
    infos, offset = [], 0
    for name, shape in shapes.items():
        nbytes = 2
        for d in shape:
            nbytes *= d
        infos.append(TensorInfo(name, "BF16", shape, Path("model.safetensors"), offset, nbytes))
        offset += nbytes
    return infos


LLAMA2_7B = llama_config(heads=32, kv_heads=8, head_dim=128, ffn=11008, vocab=32000, layers=2)


def plan_for(config: dict, tp: int, extra: dict | None = None, **kwargs: object):
    return build_plan(header(config, extra), ModelConfig(config), TPConfig.create(tp), LLAMA, **kwargs)


def problems(config: dict, tp: int, extra: dict | None = None, **kwargs: object) -> list[str]:
    with pytest.raises(PlanError) as e:
        plan_for(config, tp, extra, **kwargs)
    return e.value.lines


def test_llama2_7b_cuts() -> None:
    plan = plan_for(LLAMA2_7B, 4)
    cuts = {t.name: t for t in plan.tensors}
    q = cuts["model.layers.0.self_attn.q_proj.weight"]
    assert (q.style, q.dim, q.rank_shape(0)) == ("colwise", 0, (1024, 4096))
    k = cuts["model.layers.1.self_attn.k_proj.weight"]
    assert (k.style, k.dim, k.rank_shape(3), k.slices[3]) == ("colwise", 0, (256, 4096), ((768, 1024),))
    o = cuts["model.layers.0.self_attn.o_proj.weight"]
    assert (o.style, o.dim, o.rank_shape(1), o.slices[1]) == ("rowwise", 1, (4096, 1024), ((1024, 2048),))
    down = cuts["model.layers.0.mlp.down_proj.weight"]
    assert (down.style, down.dim, down.rank_shape(0)) == ("rowwise", 1, (4096, 2752))
    assert cuts["model.embed_tokens.weight"].rank_shape(2) == (8000, 4096)
    assert cuts["lm_head.weight"].style == "vocab"
    norm = cuts["model.norm.weight"]
    assert (norm.style, norm.dim, norm.rank_shape(0)) == ("replicate", None, (4096,))
    assert sum(plan.rank_nbytes(r) for r in range(4)) == plan.nbytes + 3 * 2 * 4096 * (2 * 2 + 1)


@pytest.mark.parametrize("tp", [1, 2, 4, 8, 16, 32])
def test_query_heads_use_their_ranks_kv_heads(tp: int) -> None:
    """Heads stay whole, and every query head on rank r belongs to a kv group whose k/v rows are on rank r."""
    heads, kv, head_dim = 32, 8, 128
    cuts = {t.name: t for t in plan_for(LLAMA2_7B, tp).tensors}
    q, k = cuts["model.layers.0.self_attn.q_proj.weight"], cuts["model.layers.0.self_attn.k_proj.weight"]
    for rank in range(tp):
        ((q0, q1),), ((k0, k1),) = q.slices[rank], k.slices[rank]
        assert q0 % head_dim == 0 and q1 % head_dim == 0 and k0 % head_dim == 0 and k1 % head_dim == 0
        kv_heads_here = set(range(k0 // head_dim, k1 // head_dim))
        kv_heads_needed = {h // (heads // kv) for h in range(q0 // head_dim, q1 // head_dim)}
        assert kv_heads_needed == kv_heads_here


def test_kv_heads_not_divisible_names_valid_tp() -> None:
    config = llama_config(heads=24, kv_heads=8, head_dim=128, ffn=12288, vocab=32016)
    assert problems(config, 3) == [
        "num_key_value_heads (8) is not divisible by --tp 3, nor --tp a multiple of it; valid --tp: 1, 2, 4, 8, 24"
    ]


def test_every_problem_is_listed_once() -> None:
    # valid --tp: divides heads and FFN, divides the kv heads or is a multiple of them; the vocabulary is padded.
    assert problems(LLAMA2_7B, 3) == [
        "num_attention_heads (32) is not divisible by --tp 3; valid --tp: 1, 2, 4, 8, 16, 32",
        "num_key_value_heads (8) is not divisible by --tp 3, nor --tp a multiple of it; valid --tp: 1, 2, 4, 8, 16, 32",
        "intermediate_size (11008) is not divisible by --tp 3; valid --tp: 1, 2, 4, 8, 16, 32",
    ]


def test_missing_kv_heads_defaults_to_attention_heads() -> None:
    config = dict(LLAMA2_7B, num_key_value_heads=32)
    config_without = {k: v for k, v in config.items() if k != "num_key_value_heads"}
    plan = build_plan(header(config), ModelConfig(config_without), TPConfig.create(16), LLAMA)
    k = next(t for t in plan.tensors if t.name.endswith("k_proj.weight"))
    assert k.rank_shape(0) == (256, 4096)


def test_missing_config_key() -> None:
    config = {k: v for k, v in LLAMA2_7B.items() if k != "intermediate_size"}
    with pytest.raises(PlanError) as e:
        build_plan(header(LLAMA2_7B), ModelConfig(config), TPConfig.create(2), LLAMA)
    assert e.value.lines == ["the model config: intermediate_size is missing or not a positive integer; the llama rules need it"]
    assert e.value.problems[0].tensor is None  # the config as a whole, not a tensor


def test_config_that_disagrees_with_weights() -> None:
    weights = llama_config(heads=8, kv_heads=8, head_dim=4)
    config = dict(weights, num_attention_heads=6, num_key_value_heads=6, head_dim=4)
    with pytest.raises(PlanError) as e:
        build_plan(header(weights), ModelConfig(config), TPConfig.create(2), LLAMA)
    # One line for the one wrong key, however many tensors it sizes.
    assert e.value.lines == [
        "tensor model.layers.0.self_attn.q_proj.weight: dim 0 is 32, but num_attention_heads (6) x head_dim (4) = 24; "
        "the model config does not match the weights (nor do 7 other tensors)"
    ]
    assert [p.tensor for p in e.value.problems] == ["model.layers.0.self_attn.q_proj.weight"]
    # Without head_dim or hidden_size the size of a head is unknown: the dim must still divide into heads.
    config = {k: v for k, v in config.items() if k not in ("head_dim", "hidden_size")}
    with pytest.raises(PlanError) as e:
        build_plan(header(weights), ModelConfig(config), TPConfig.create(2), LLAMA)
    assert e.value.lines[0] == (
        "tensor model.layers.0.self_attn.q_proj.weight: dim 0 is 32, not a multiple of num_attention_heads (6); "
        "the model config does not match the weights (nor do 7 other tensors)"
    )


def test_head_dim_from_the_config_or_the_hidden_size() -> None:
    # Gemma-style: head_dim is not hidden_size / heads.
    weights = dict(llama_config(heads=4, kv_heads=2, head_dim=8), hidden_size=16)
    assert plan_for(weights, 2).tensors
    without = {k: v for k, v in weights.items() if k != "head_dim"}  # 16 / 4 = 4, but q_proj has 32 rows
    with pytest.raises(PlanError) as e:
        build_plan(header(weights), ModelConfig(without), TPConfig.create(2), LLAMA)
    assert "dim 0 is 32, but num_attention_heads (4) x hidden_size/num_attention_heads (4) = 16" in e.value.lines[0]
    bad = dict(weights, head_dim=0)
    with pytest.raises(InputError, match=r"the model config: head_dim must be a positive integer, got 0; fix the model config"):
        build_plan(header(weights), ModelConfig(bad), TPConfig.create(2), LLAMA)


def test_unknown_matrix_is_refused_unless_replicate_unknown() -> None:
    extra = {"model.layers.0.mlp.extra_proj.weight": (16, 32), "model.rotary.inv_freq": (8,)}
    assert problems(LLAMA2_7B, 2, extra) == [
        "1 tensor(s) match no llama rule and are not 1-D: model.layers.0.mlp.extra_proj.weight; "
        "give a rule for them with --rules FILE, or pass --replicate-unknown to copy them whole to every rank"
    ]
    plan = plan_for(LLAMA2_7B, 2, extra, replicate_unknown=True)
    cuts = {t.name: t for t in plan.tensors}
    assert cuts["model.layers.0.mlp.extra_proj.weight"].style == "replicate"
    assert (cuts["model.rotary.inv_freq"].style, cuts["model.rotary.inv_freq"].rule) == ("replicate", None)


@pytest.mark.parametrize(
    ("tp", "devices", "message"),
    [
        (0, None, "--tp must be at least 1, got 0"),
        (2, [0, 1, 2], "--devices lists 3 ids but --tp is 2; give one device id per rank"),
        (2, [1, 1], "--devices ids must be distinct, got 1,1"),
        (2, [0, -1], "--devices ids must be non-negative, got 0,-1"),
    ],
)
def test_tp_config_validation(tp: int, devices: list[int] | None, message: str) -> None:
    with pytest.raises(UsageError, match="^" + message.replace("-", "\\-") + "$"):
        TPConfig.create(tp, device_ids=devices)


def test_tp_config_devices() -> None:
    config = TPConfig.create(4, device_ids=[4, 5, 6, 7])
    assert (config.num_devices, config.device(0), config.device(3)) == (4, "cuda:4", "cuda:7")
    assert TPConfig.create(2).device_ids == (0, 1)


@pytest.mark.parametrize(
    ("raw", "family"),
    [
        ({"model_type": "mistral"}, "llama"),
        ({"model_type": "qwen3"}, "llama"),
        ({"model_type": "custom", "architectures": ["Qwen2ForCausalLM"]}, "llama"),
    ],
)
def test_family_detection(raw: dict, family: str) -> None:
    assert detect_family(ModelConfig(raw)).name == family


def test_a_model_type_no_family_knows_is_refused_naming_it() -> None:
    from reshard import InputError

    with pytest.raises(
        InputError, match=r"model_type 'doge' is not supported \(`reshard families` lists the \d+ that are\); pass --arch NAME"
    ):
        detect_family(ModelConfig({"model_type": "doge"}))


def test_unsupported_model_type() -> None:
    from reshard import InputError

    with pytest.raises(
        InputError,
        match=r"model_type 'jamba' is not supported: its Mamba mixers are not cut by reshard yet \(`reshard families` lists the \d+ that are\); pass --arch NAME",
    ):
        detect_family(ModelConfig({"model_type": "jamba"}))


def test_the_tensor_names_decide_when_architectures_lie() -> None:
    """An EXAONE config that says LlamaForCausalLM over GPT-2-style tensor names is read as exaone; the same
    architectures over llama's names stay llama."""
    config = ModelConfig({"model_type": "exaone_custom", "architectures": ["LlamaForCausalLM"]})
    exaone = [
        "transformer.wte.weight",
        "transformer.h.0.attn.attention.q_proj.weight",
        "transformer.h.0.mlp.c_fc_0.weight",
        "lm_head.weight",
    ]
    assert detect_family(config, names=exaone).name == "exaone"
    assert detect_family(config, names=["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]).name == "llama"
    assert detect_family(config).name == "llama"


def test_sizes_given_per_layer_cut_each_layer_by_its_own() -> None:
    """An FFN width per layer (a list under intermediate_size) and a layer-1 head size from per_layer_config:
    each layer is cut and checked by its own sizes, and a tensor that disagrees with its layer's is named."""
    config = llama_config(heads=8, kv_heads=2, head_dim=16, ffn=64, vocab=64, layers=2)
    hidden = config["hidden_size"]
    shapes = {f"model.layers.1.mlp.{p}_proj.weight": (96, hidden) for p in ("gate", "up")} | {
        "model.layers.1.mlp.down_proj.weight": (hidden, 96)
    }
    shapes |= {"model.layers.1.self_attn.q_proj.weight": (256, hidden), "model.layers.1.self_attn.o_proj.weight": (hidden, 256)}
    shapes |= {f"model.layers.1.self_attn.{p}_proj.weight": (64, hidden) for p in ("k", "v")}
    layered = config | {"intermediate_size": [64, 96], "per_layer_config": {"1": {"head_dim": 32}}}
    infos = header(config, shapes)
    cuts = {t.name: t for t in build_plan(infos, ModelConfig(layered), TPConfig.create(2), LLAMA).tensors}
    assert cuts["model.layers.0.mlp.up_proj.weight"].slices[1] == ((32, 64),)
    assert cuts["model.layers.1.mlp.up_proj.weight"].slices[1] == ((48, 96),)
    assert cuts["model.layers.1.self_attn.q_proj.weight"].slices[1] == ((128, 256),)
    assert cuts["model.layers.1.self_attn.k_proj.weight"].slices[1] == ((32, 64),)
    with pytest.raises(PlanError) as e:
        build_plan(infos, ModelConfig(layered | {"intermediate_size": [64, 80]}), TPConfig.create(2), LLAMA)
    assert e.value.lines[0].startswith("tensor model.layers.1.mlp.gate_proj.weight: dim 0 is 96, but intermediate_size is 80")
