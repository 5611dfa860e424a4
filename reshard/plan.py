"""The sharding plan: for every tensor, which rows or columns each rank gets. `plan`, `split` and `merge`
all work from the same Plan, so the dry run is exactly what split does."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reshard.checkpoint import Checkpoint, open_checkpoint
from reshard.config import ModelConfig, TPConfig
from reshard.errors import PlanError
from reshard.rules import Family, detect_family
from reshard.safetensors_io import DTYPE_SIZES, TensorInfo

Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class TensorCut:
    """How one tensor is cut: per rank, the [start, stop) ranges along `dim` it receives, in order.

    A replicated tensor has dim None and is treated as one unit that every rank receives whole, so split and
    merge need no special case for it.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    style: str
    dim: int | None
    rule: str | None
    slices: tuple[Ranges, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]

    @property
    def layout(self) -> tuple[int, int, int]:
        """The tensor seen as [outer, length, inner bytes] around the cut dim."""
        itemsize = DTYPE_SIZES[self.dtype]
        if self.dim is None:
            return 1, 1, self.nbytes
        outer = math.prod(self.shape[: self.dim])
        inner = math.prod(self.shape[self.dim + 1 :]) * itemsize
        return outer, self.shape[self.dim], inner

    def rank_shape(self, rank: int) -> tuple[int, ...]:
        if self.dim is None:
            return self.shape
        length = sum(b - a for a, b in self.slices[rank])
        return self.shape[: self.dim] + (length,) + self.shape[self.dim + 1 :]

    def rank_nbytes(self, rank: int) -> int:
        return math.prod(self.rank_shape(rank)) * DTYPE_SIZES[self.dtype]


def replicated(info: TensorInfo, tp: int, rule: str | None) -> TensorCut:
    return TensorCut(info.name, info.dtype, info.shape, "replicate", None, rule, tuple(((0, 1),) for _ in range(tp)))


def even_cut(info: TensorInfo, tp: int, style: str, dim: int, rule: str | None) -> TensorCut:
    step = info.shape[dim] // tp
    slices = tuple(((r * step, (r + 1) * step),) for r in range(tp))
    return TensorCut(info.name, info.dtype, info.shape, style, dim, rule, slices)


@dataclass(frozen=True)
class Plan:
    family: str
    tp_config: TPConfig
    tensors: tuple[TensorCut, ...]  # in the source's data order

    @property
    def tp(self) -> int:
        return self.tp_config.num_devices

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def rank_nbytes(self, rank: int) -> int:
        return sum(t.rank_nbytes(rank) for t in self.tensors)

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "tp": self.tp,
            "device_ids": list(self.tp_config.device_ids),
            "tensors": [
                {
                    "name": t.name,
                    "dtype": t.dtype,
                    "rule": t.rule,
                    "style": t.style,
                    "dim": t.dim,
                    "shape": list(t.shape),
                    "rank_shape": list(t.rank_shape(0)),
                    "bytes": t.nbytes,
                    "rank_bytes": t.rank_nbytes(0),
                }
                for t in self.tensors
            ],
            "ranks": [
                {"rank": r, "device": self.tp_config.device(r), "bytes": self.rank_nbytes(r)} for r in range(self.tp)
            ],
        }


def build_plan(
    tensors: Sequence[TensorInfo],
    config: ModelConfig,
    tp_config: TPConfig,
    family: Family,
    replicate_unknown: bool = False,
) -> Plan:
    """Decide every tensor's cut, or raise PlanError listing every problem found. Does no I/O."""
    tp = tp_config.num_devices
    matched = [(t, family.match(t.name)) for t in tensors]
    used = {rule.units for _, rule in matched if rule is not None}
    used_units = [unit for unit in family.units if unit in used]
    problems: list[str] = []
    counts: dict[str, tuple[str, int]] = {}
    for unit in used_units:
        key, value = family.count(unit, config)
        if value is None:
            problems.append(f"{config.name}: {key} is missing or not a positive integer; the {family.name} rules need it")
        else:
            counts[unit] = (key, value)
    valid = valid_tp([value for _, value in counts.values()])
    bad_units = {unit for unit, (_, value) in counts.items() if value % tp}
    for unit in sorted(bad_units, key=lambda u: used_units.index(u)):
        key, value = counts[unit]
        problems.append(f"{key} ({value}) is not divisible by --tp {tp}; valid --tp: {', '.join(map(str, valid))}")

    cuts: list[TensorCut] = []
    unknown: list[str] = []
    for info, rule in matched:
        if rule is None:
            if len(info.shape) <= 1 or replicate_unknown:
                cuts.append(replicated(info, tp, None))
            else:
                unknown.append(info.name)
            continue
        if rule.style == "replicate":
            cuts.append(replicated(info, tp, rule.name))
            continue
        problem = _cut_problem(info, rule.name, rule.dim, rule.units, counts, bad_units, tp)
        if problem:
            problems.append(problem)
        elif rule.units not in bad_units:
            cuts.append(even_cut(info, tp, rule.style, rule.dim, rule.name))
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        problems.append(
            f"{len(unknown)} tensor(s) match no {family.name} rule and are not 1-D: {shown}; "
            "pass --replicate-unknown to copy them whole to every rank"
        )
    if problems:
        raise PlanError(problems)
    return Plan(family=family.name, tp_config=tp_config, tensors=tuple(cuts))


def _cut_problem(
    info: TensorInfo,
    rule: str,
    dim: int,
    unit: str | None,
    counts: dict[str, tuple[str, int]],
    bad_units: set[str],
    tp: int,
) -> str | None:
    if dim >= len(info.shape):
        return f"tensor {info.name} has shape {list(info.shape)}; rule {rule} cuts dim {dim}, which it does not have"
    size = info.shape[dim]
    if unit in counts:
        key, count = counts[unit]
        if size % count:
            return f"tensor {info.name}: dim {dim} is {size}, not a multiple of {key} ({count}); the config does not match the weights"
    if unit not in bad_units and size % tp:
        return f"tensor {info.name}: dim {dim} ({size}) is not divisible by --tp {tp}; valid --tp: {', '.join(map(str, valid_tp([size])))}"
    return None


def valid_tp(counts: Sequence[int]) -> list[int]:
    """Every tp that divides all the counts."""
    g = math.gcd(*counts) if counts else 1
    return [d for d in range(1, g + 1) if g % d == 0]


def make_plan(
    model: Path,
    tp: int,
    device_ids: Sequence[int] | None = None,
    config: Path | None = None,
    arch: str | None = None,
    replicate_unknown: bool = False,
) -> tuple[Checkpoint, ModelConfig, Plan]:
    """Read a checkpoint's headers and config and plan its split.

    Args:
        model: a .safetensors file, a model.safetensors.index.json, or a folder holding either.
        tp: number of ranks.
        device_ids: GPU id per rank; defaults to 0..tp-1.
        config: the model's config.json when it is not beside the weights.
        arch: force a rules family instead of detecting it from the config.
        replicate_unknown: copy tensors that match no rule whole to every rank instead of refusing.

    Returns:
        The opened checkpoint, its model config, and the plan.

    Example:
        >>> ckpt, cfg, plan = make_plan(Path("examples/tiny-llama"), tp=2)
        >>> plan.rank_nbytes(0) < plan.nbytes
        True
    """
    tp_config = TPConfig.create(tp, device_ids)
    ckpt = open_checkpoint(model)
    model_config = ModelConfig.load(config or ckpt.config_path)
    family = detect_family(model_config, arch)
    plan = build_plan(ckpt.tensors, model_config, tp_config, family, replicate_unknown)
    return ckpt, model_config, plan
