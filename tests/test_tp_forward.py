"""Every family's split, run as real tensor-parallel shards, computes what the whole model computes; and merges back."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reshard import merge, split

from families import model_types
from tp_forward import run_tensor_parallel

# Every model type a built-in family claims (a family not proven here is not registered); gpt2, whose attention
# cannot take rank-local sizes, is checked slice by slice below.
FAMILIES = [t for t in model_types() if t != "gpt2"]
TPS = (2, 4)


# The silent failure users report: fused q|k|v cut into plain row chunks, as if it were one projection.
NAIVE_QKV = {"rules": [{"name": "qkv_naive", "match": "model.layers.*.self_attn.qkv_proj.weight", "style": "colwise", "dim": 0}]}


class Splits:
    """Each family's split at each tp, made the first time a test asks for it. A split that failed is that
    family's tests' failure, with the reason, not every test's."""

    def __init__(self, models: Mapping[str, Path], root: Path) -> None:
        self.models, self.root = models, root
        self.attempts: dict[tuple[str, int], Path | str] = {}

    def attempt(self, key: tuple[str, int]) -> Path | str:
        """The split folder, or why it failed (building the model included)."""
        if key not in self.attempts:
            name, tp = key
            out = self.root / f"{name}-tp{tp}"
            try:
                if name == "phi3-naive":
                    (self.root / "naive.json").write_text(json.dumps(NAIVE_QKV))
                    self.attempts[key] = split(self.models["phi3"], tp=tp, out=out, rules=self.root / "naive.json").out
                else:
                    self.attempts[key] = split(self.models[name], tp=tp, out=out).out
            except Exception as e:
                self.attempts[key] = f"{type(e).__name__}: {e}"
        return self.attempts[key]

    def __getitem__(self, key: tuple[str, int]) -> Path:
        found = self.attempt(key)
        if isinstance(found, str):
            pytest.fail(f"split of {key[0]} at tp {key[1]} failed: {found}")
        return found


@pytest.fixture(scope="session")
def splits(family_models: Mapping[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Splits:
    return Splits(family_models, tmp_path_factory.mktemp("splits"))


def selected_forwards(session: pytest.Session) -> set[tuple[str, int]]:
    """The (family, tp) pairs whose tensor-parallel forward the session's selected tests read."""
    pairs = set()
    for item in session.items:
        name, callspec = getattr(item, "originalname", None), getattr(item, "callspec", None)
        if name == test_tensor_parallel_logits_equal_the_full_models.__name__ and callspec is not None:
            pairs.add((callspec.params["family"], callspec.params["tp"]))
        elif name == test_a_naive_cut_of_fused_qkv_is_caught.__name__:
            pairs.add(("phi3-naive", 2))
    return pairs


@pytest.fixture(scope="session")
def tp_errors(
    request: pytest.FixtureRequest, family_models: Mapping[str, Path], splits: Splits, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, int], object]:
    """Each selected family's relative error at each tp, or the reason it has none (its split or its processes
    failed). The families of one tp run in one set of rank processes, which start once."""
    errors: dict[tuple[str, int], object] = {}
    jobs: dict[int, list[tuple[str, Path, Path]]] = {tp: [] for tp in TPS}
    for name, tp in sorted(selected_forwards(request.session)):
        found = splits.attempt((name, tp))
        if isinstance(found, str):
            errors[(name, tp)] = f"the split failed: {found}"
        else:
            jobs[tp].append((name, family_models[name.removesuffix("-naive")], found))
    work = tmp_path_factory.mktemp("dist")
    for tp, todo in jobs.items():
        errors |= {(name, tp): error for name, error in run_tensor_parallel(tp, todo, work).items()} if todo else {}
    return errors


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_parallel_logits_equal_the_full_models(tp_errors: dict[tuple[str, int], object], family: str, tp: int) -> None:
    error = tp_errors[(family, tp)]
    assert isinstance(error, float), error
    assert error <= 1e-5


def test_a_naive_cut_of_fused_qkv_is_caught(tp_errors: dict[tuple[str, int], object], splits: Splits) -> None:
    """The same harness fails a split that loads fine but cuts q|k|v as one block: the proof can fail."""
    manifest = json.loads((splits[("phi3-naive", 2)] / "reshard.json").read_text())
    assert manifest["tensors"]["model.layers.0.self_attn.qkv_proj.weight"]["rule"] == "qkv_naive"
    error = tp_errors[("phi3-naive", 2)]
    assert isinstance(error, float), error
    assert error > 1e-2


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("family", [*FAMILIES, "gpt2"])
def test_merge_gives_back_every_family_bit_for_bit(
    family_models: Mapping[str, Path], splits: Splits, tmp_path: Path, family: str, tp: int
) -> None:
    merged = merge(splits[(family, tp)], out=tmp_path / "merged").out
    assert (merged / "model.safetensors").read_bytes() == (family_models[family] / "model.safetensors").read_bytes()


def test_the_layouts_under_test_are_really_there(splits: Splits) -> None:
    """The forward test proves what it claims only if these cuts happened."""

    def tensors(name: str, tp: int) -> dict:
        return json.loads((splits[(name, tp)] / "reshard.json").read_text())["tensors"]

    k = tensors("llama", 4)["model.layers.0.self_attn.k_proj.weight"]
    assert k["slices"] == [[[0, 8]], [[0, 8]], [[8, 16]], [[8, 16]]]  # 2 kv heads of 8 rows, each on two ranks
    assert tensors("llama", 4)["lm_head.weight"]["padding"] == 2
    gemma = tensors("gemma", 4)
    assert "lm_head.weight" not in gemma and gemma["model.embed_tokens.weight"]["padding"] == 1
    assert gemma["model.layers.0.self_attn.v_proj.weight"]["slices"] == [[[0, 16]]] * 4
    qkv = tensors("phi3", 4)["model.layers.0.self_attn.qkv_proj.weight"]
    assert qkv["parts"] == [64, 16, 16]
    assert qkv["slices"][3] == [[48, 64], [72, 80], [88, 96]]  # q heads 6-7, then kv head 1 of k and of v
    assert tensors("phi3", 2)["model.layers.0.mlp.gate_up_proj.weight"]["slices"][1] == [[64, 128], [192, 256]]
    moe = tensors("mixtral", 2)
    assert moe["model.layers.0.block_sparse_moe.experts.3.w2.weight"]["style"] == "rowwise"
    assert moe["model.layers.0.block_sparse_moe.gate.weight"]["style"] == "replicate"
    qmoe = tensors("qwen2_moe", 4)
    assert qmoe["model.layers.1.mlp.experts.2.up_proj.weight"]["slices"][1] == [[8, 16]]
    assert qmoe["model.layers.1.mlp.shared_expert.down_proj.weight"]["slices"][3] == [[48, 64]]


@pytest.mark.parametrize("tp", TPS)
def test_gpt2_slices_are_the_expected_cut(family_models: Mapping[str, Path], splits: Splits, tp: int) -> None:
    """GPT-2's attention cannot take rank-local sizes, so its cut is checked slice by slice: Conv1D stores
    [in, out], c_attn packs q|k|v along dim 1, and the 50257-style vocabulary is padded with zero rows."""
    source = load_file(str(family_models["gpt2"] / "model.safetensors"))
    hidden = 64

    def expected(name: str, rank: int) -> torch.Tensor:
        w = source[name]
        if name.endswith("attn.c_attn.weight") or name.endswith("attn.c_attn.bias"):
            dim = w.dim() - 1
            return torch.cat([part.chunk(tp, dim=dim)[rank] for part in w.split(hidden, dim=dim)], dim=dim)
        if name.endswith("mlp.c_fc.weight"):
            return w.chunk(tp, dim=1)[rank]
        if name.endswith(("mlp.c_fc.bias", "attn.c_proj.weight", "mlp.c_proj.weight")):
            return w.chunk(tp, dim=0)[rank]
        if name == "transformer.wte.weight":
            rows = -(-w.shape[0] // tp)
            padded = torch.cat([w, torch.zeros(rows * tp - w.shape[0], w.shape[1])])
            return padded[rank * rows : (rank + 1) * rows]
        return w

    manifest = json.loads((splits[("gpt2", tp)] / "reshard.json").read_text())
    assert manifest["tensors"]["transformer.wte.weight"]["padding"] == (-257) % tp
    for rank in range(tp):
        got = load_file(str(splits[("gpt2", tp)] / f"model-rank-{rank}-part-0.safetensors"))
        assert set(got) == set(source)
        for name in source:
            assert torch.equal(got[name], expected(name, rank)), (rank, name)


@pytest.mark.parametrize(("family", "tp"), [("phi3", 4), ("gpt2", 4), ("mixtral", 2)])
def test_verify_forward_on_real_models(family_models: Mapping[str, Path], splits: Splits, family: str, tp: int) -> None:
    """`reshard verify --forward` on packed q|k|v with replicated kv heads, Conv1D with a padded vocabulary, MoE."""
    from reshard.runtime.forward import run_forward

    errors = run_forward(splits[(family, tp)], source=family_models[family])
    kinds = {e.kind: e for e in errors}
    assert all(e.worst <= 1e-5 for e in errors), errors
    expected = {
        "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
        "gpt2": {"c_attn_weight", "c_attn_bias", "attn_c_proj", "mlp_c_proj", "wte"},
        "mixtral": {"expert_w1_w3", "expert_w2"},
    }
    assert expected[family] <= set(kinds), sorted(kinds)


def test_verify_forward_derives_the_cuts_again(family_models: Mapping[str, Path], tmp_path: Path) -> None:
    """A split made with a wrong rule (gpt2's c_fc.bias replicated instead of cut with c_fc's columns) is
    consistent with its own manifest, so products taken from the manifest's cuts would pass; the forward check
    derives the cuts from the config and the rules again and names the tensor."""
    from reshard import InputError
    from reshard.runtime.forward import run_forward

    rules = tmp_path / "wrong.json"
    rules.write_text(json.dumps({"rules": [{"name": "c_fc_bias", "match": "transformer.h.*.mlp.c_fc.bias", "style": "replicate"}]}))
    out = split(family_models["gpt2"], tp=2, out=tmp_path / "wrong", rules=rules).out
    assert json.loads((out / "reshard.json").read_text())["tensors"]["transformer.h.0.mlp.c_fc.bias"]["style"] == "replicate"
    with pytest.raises(InputError) as e:
        run_forward(out, source=family_models["gpt2"])
    assert str(e.value).startswith(
        f"{out / 'reshard.json'}: tensor transformer.h.0.mlp.c_fc.bias is replicated, but the gpt2 rules cut it colwise on dim 0"
    )
    # Given the rules it was split with, the check runs the products the manifest describes.
    assert all(k.worst <= 1e-5 for k in run_forward(out, source=family_models["gpt2"], rules=rules))
