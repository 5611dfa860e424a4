"""Every built-in family cuts what transformers' own tensor-parallel plan cuts, along the same dim.

transformers ships a plan (module pattern -> colwise, rowwise, embedding_rowwise, ...) for each model type; for
every tensor of the tiny checkpoint that a plan entry names, reshard's cut dim must be the one that style implies.
Experts stored one tensor each are compared with the plan's entry for the fused tensor they load into. The
accepted differences are where transformers keeps a tensor whole that engines cut (no entry to compare), and
what the plan says of whole modules (moe_tp_experts) rather than tensors.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from reshard import make_plan

from families import model_types

# Styles that name a tensor's cut; the rest (moe_tp_experts, ep_router, ...) describe whole modules.
COLWISE = {"colwise", "colwise_gather_output", "packed_colwise", "local_colwise", "embedding_rowwise", "colwise_rep"}
ROWWISE = {"rowwise", "rowwise_split_input", "packed_rowwise", "local_rowwise", "rowwise_rep"}
WHOLE = {"replicated_with_grad_allreduce", "replicate", "local"}


# Checkpoints store experts one tensor each; transformers' plans name them fused, as they are in memory.
PER_EXPERT = re.compile(r"(.*)\.(mlp|block_sparse_moe|feed_forward)\.experts\.\d+\.(gate_proj|up_proj|w1|w3|down_proj|w2)\.weight")
FUSED = {
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
    "w1": "gate_up_proj",
    "w3": "gate_up_proj",
    "down_proj": "down_proj",
    "w2": "down_proj",
}


# Where reshard cuts as engines run a layer and transformers does otherwise (documented in docs/rules.md).
ACCEPTED = {
    # transformers gathers every gated-delta-net projection and runs the recurrence whole on each rank; vLLM runs
    # it by value heads, so out_proj is row-parallel
    "linear_attn.out_proj.weight": "rowwise",
}


def plan_name(name: str) -> str:
    found = PER_EXPERT.fullmatch(name)
    if found is None:
        return name
    layer, block, weight = found.groups()
    return f"{layer}.{'mlp' if block == 'block_sparse_moe' else block}.experts.{FUSED[weight]}"


def transformers_plan(model_type: str) -> tuple[str, dict[str, str]]:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.for_model(model_type)
    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    prefix = cls.base_model_prefix
    plan = {f"{prefix}.{k}": v for k, v in (config.base_model_tp_plan or {}).items()}
    plan |= dict(getattr(cls, "_tp_plan", None) or {})
    return prefix, plan


def expected_dim(style: str, ndim: int) -> int | None | str:
    """The dim a plan style cuts a tensor of `ndim` dims along; None when whole; "skip" for module styles."""
    if style in WHOLE:
        return None
    if style == "embedding_rowwise":
        return 0
    if style in COLWISE:
        return max(ndim - 2, 0)
    if style in ROWWISE:
        return ndim - 1 if ndim > 1 else None  # a row-parallel bias is added once, whole
    return "skip"


@pytest.mark.parametrize("model_type", [t for t in model_types() if t != "gpt2"])
def test_cuts_agree_with_transformers_plan(family_models: dict[str, Path], model_type: str) -> None:
    _, plan = transformers_plan(model_type)
    patterns = [(re.compile(re.escape(k).replace(r"\*", r"\d+") + r"(\.weight|\.bias)?"), v) for k, v in plan.items()]
    reshard_plan = make_plan(family_models[model_type], tp=2).plan
    compared, differ = 0, []
    for cut in reshard_plan.tensors:
        style = next((v for p, v in patterns if p.fullmatch(plan_name(cut.name))), None)
        if style is None or (want := expected_dim(style, len(cut.shape))) == "skip":
            continue
        compared += 1
        if cut.dim != want and ACCEPTED.get(cut.name.split(".", 3)[-1]) != cut.style:
            differ.append(f"{cut.name}: transformers {style} (dim {want}), reshard {cut.style} (dim {cut.dim})")
    assert not differ, "\n".join(differ)
    assert compared or not plan, f"no tensor of {model_type} is named by its transformers plan {sorted(plan)}"
