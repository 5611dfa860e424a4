"""Reading a source's headers and config and planning its split: what `plan` shows and `split` does."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from reshard.engine.sources import Source, open_source
from reshard.errors import UsageError
from reshard.formats.export import FORMATS, Layout, build_layout, vocab_multiple
from reshard.model.config import ModelConfig, TPConfig
from reshard.model.rules import detect_family
from reshard.plan.build import build_plan
from reshard.plan.cut import Plan


@dataclass(frozen=True)
class Planned:
    """A checkpoint planned for a split: the opened source, its model config, each tensor's cut, and the tensors
    each rank file holds in the chosen format (`layout`)."""

    source: Source
    model_config: ModelConfig
    plan: Plan
    layout: Layout


def make_plan(
    model: Path | str,
    *,
    revision: str | None = None,
    tp: int,
    device_ids: Sequence[int] | None = None,
    config: Path | None = None,
    arch: str | None = None,
    replicate_unknown: bool = False,
    rules: Path | None = None,
    output_format: str = "reshard",
) -> Planned:
    """Read a checkpoint's headers and config and plan its split.

    Args:
        model: a .safetensors file, a model.safetensors.index.json, or a folder holding either; or a folder
            written by `reshard split`, read as the checkpoint it was split from; or a Hugging Face Hub repo id
            (`org/name`), read from the local cache or downloaded into it.
        revision: the repo id's branch, tag or commit.
        tp: number of ranks.
        device_ids: GPU id per rank; defaults to 0..tp-1.
        config: the model's config.json when it is not beside the weights.
        arch: force a rules family instead of detecting it from the config.
        replicate_unknown: copy tensors that match no rule whole to every rank instead of refusing.
        rules: a rules file whose rules are tried before the family's.
        output_format: the layout the plan is for: "reshard", or "vllm" (whose vocabulary is padded to 64 rows first).

    Returns:
        The opened source (checkpoint or split folder), its model config, the plan and the rank files' layout; a
        family the format has no layout for is refused.

    Example:
        >>> planned = make_plan(Path("examples/tiny-llama"), tp=2)
        >>> planned.plan.rank_nbytes(0) < planned.plan.nbytes
        True
    """
    tp_config = TPConfig.create(tp, device_ids=device_ids)
    source = open_source(model, revision=revision)
    model_config = source.model_config(config)
    family = detect_family(model_config, arch=arch, rules=rules, names=[t.name for t in source.tensors])
    if output_format not in FORMATS:
        raise UsageError(f"--format {output_format}: unknown; use one of {', '.join(FORMATS)}")
    multiple = vocab_multiple(output_format)
    plan = build_plan(source.tensors, model_config, tp_config, family, replicate_unknown=replicate_unknown, vocab_multiple=multiple)
    return Planned(source, model_config, plan, build_layout(plan, model_config, output_format=output_format))
