"""The sharding plan: for every tensor, which rows or columns each rank gets. `plan`, `split` and `merge`
all work from the same Plan, so the dry run is exactly what split does."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reshard.config import ModelConfig, TPConfig
from reshard.errors import PlanError
from reshard.rules import Family, Rule, detect_family
from reshard.safetensors_io import DTYPE_SIZES, TensorInfo

if TYPE_CHECKING:
    from reshard.sources import Source

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
    parts: tuple[int, ...] = ()  # lengths along dim of the tensors packed in this one (q|k|v), when packed

    @property
    def padding(self) -> int:
        """Zero rows or columns appended along dim so that every rank gets as many (vocabulary padding)."""
        if self.dim is None:
            return 0
        return max(0, max(b for ranges in self.slices for _, b in ranges) - self.shape[self.dim])

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

    @property
    def replicas(self) -> int:
        """How many ranks hold each piece: above 1 when kv heads are replicated."""
        holders = Counter(r for ranges in self.slices for r in ranges)
        return max(holders.values())

    def rank_shape(self, rank: int) -> tuple[int, ...]:
        if self.dim is None:
            return self.shape
        length = sum(b - a for a, b in self.slices[rank])
        return self.shape[: self.dim] + (length,) + self.shape[self.dim + 1 :]

    def rank_nbytes(self, rank: int) -> int:
        return math.prod(self.rank_shape(rank)) * DTYPE_SIZES[self.dtype]


def replicated(info: TensorInfo, tp: int, rule: str | None) -> TensorCut:
    return TensorCut(info.name, info.dtype, info.shape, "replicate", None, rule, tuple(((0, 1),) for _ in range(tp)))


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
                    "parts": list(t.parts),
                    "replicas": t.replicas,
                    "padding": t.padding,
                }
                for t in self.tensors
            ],
            "ranks": [
                {"rank": r, "device": self.tp_config.device(r), "bytes": self.rank_nbytes(r)} for r in range(self.tp)
            ],
        }


# Tensor-name endings of formats that pack several values into one element (GPTQ, AWQ, bitsandbytes).
PACKED_QUANT_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx", ".absmax", ".quant_map", ".SCB", ".nested_absmax")
# FP8 scales: they follow the cut of `<prefix>.weight`.
SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale", ".input_scale")


@dataclass(frozen=True)
class Count:
    """A count the cut dim is made of, and how tp may relate to it."""

    label: str  # how problems name it: "num_key_value_heads (8)"
    value: int
    replicate: bool = False
    pad: bool = False
    size: int | None = None  # elements of the cut dim per unit, when the config says
    size_label: str = ""  # "head_dim (128)"; empty for a size of 1

    def allows(self, tp: int) -> bool:
        return self.value % tp == 0 or (self.replicate and tp % self.value == 0) or self.pad

    def rank_units(self, tp: int) -> list[tuple[int, int]]:
        """The [start, stop) units each rank holds; past `value` on the last ranks when padded."""
        if self.value % tp == 0 or not self.replicate:
            per = -(-self.value // tp)
            return [(r * per, (r + 1) * per) for r in range(tp)]
        return [(r * self.value // tp, r * self.value // tp + 1) for r in range(tp)]

    def problem(self, tp: int) -> str:
        nor = ", nor --tp a multiple of it" if self.replicate else ""
        return f"{self.label} is not divisible by --tp {tp}{nor}"


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
    counts, bare_counts, problems = _counts(matched, config, family)
    all_counts = [*counts.values(), *bare_counts.values()]
    failing = [c for c in all_counts if not c.allows(tp)]
    if failing:
        valid = ", ".join(map(str, valid_tp(all_counts)))
        problems.extend(f"{c.problem(tp)}; valid --tp: {valid}" for c in failing)

    cuts: dict[str, TensorCut] = {}
    unknown: list[str] = []
    mismatches: list[str] = []
    quantized: list[str] = []
    scales: list[TensorInfo] = []
    for info, rule in matched:
        if rule is None:
            if info.name.endswith(SCALE_SUFFIXES):
                scales.append(info)
            elif info.name.endswith(PACKED_QUANT_SUFFIXES) or ".quant_state." in info.name:
                quantized.append(info.name)
            elif len(info.shape) <= 1 or replicate_unknown:
                cuts[info.name] = replicated(info, tp, None)
            else:
                unknown.append(info.name)
        elif rule.style == "replicate":
            cuts[info.name] = replicated(info, tp, rule.name)
        elif rule.dim >= len(info.shape):
            problems.append(f"tensor {info.name} has shape {list(info.shape)}; rule {rule.name} cuts dim {rule.dim}, which it does not have")
        else:
            parts = [counts.get(u) for u in rule.parts] or [bare_counts[(rule.name, info.shape[rule.dim])]]
            if any(p is None or not p.allows(tp) for p in parts):
                continue  # the count's problem is already listed once
            cut = _cut(info, rule.name, rule.style, rule.dim, parts, tp, config.name)
            if isinstance(cut, str):
                mismatches.append(cut)
            else:
                cuts[info.name] = cut
    if mismatches:
        # One wrong config key makes every tensor it sizes disagree: the first one says what to fix.
        n = len(mismatches) - 1
        more = "" if n == 0 else " (nor does 1 other tensor)" if n == 1 else f" (nor do {n} other tensors)"
        problems.append(mismatches[0] + more)
    for info in scales:
        cut = _scale_cut(info, cuts.get(_scaled_weight(info.name)), tp)
        if isinstance(cut, str):
            problems.append(cut)
        else:
            cuts[info.name] = cut
    if quantized:
        # First: shape complaints about such a checkpoint are consequences of the packing.
        problems.insert(
            0,
            f"tensor {quantized[0]} is in a packed quantized format (GPTQ, AWQ or bitsandbytes), whose elements hold "
            "several values and cannot be cut by rows or columns; dequantize the checkpoint first, or give a rule for it with --rules",
        )
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        problems.append(
            f"{len(unknown)} tensor(s) match no {family.name} rule and are not 1-D: {shown}; "
            "give a rule for them with --rules FILE, or pass --replicate-unknown to copy them whole to every rank"
        )
    if problems:
        raise PlanError(problems)
    return Plan(family=family.name, tp_config=tp_config, tensors=tuple(cuts[t.name] for t in tensors))


def _counts(
    matched: list[tuple[TensorInfo, Rule | None]], config: ModelConfig, family: Family
) -> tuple[dict[str, Count], dict[tuple[str, int], Count], list[str]]:
    """The config counts the matched rules use, and the dims no count describes (which must divide by tp
    themselves; one per rule and size, named after its first tensor)."""
    used = {unit for _, rule in matched if rule is not None for unit in rule.parts}
    problems: list[str] = []
    counts: dict[str, Count] = {}
    for unit in (u for u in family.units if u in used):
        key, value = family.count(unit, config)
        if value is None:
            problems.append(f"{config.name}: {key} is missing or not a positive integer; the {family.name} rules need it")
        else:
            spec = family.units[unit]
            size_key, size = family.size(unit, config)
            size_label = f"{size_key} ({size})" if size_key else ""
            counts[unit] = Count(f"{key} ({value})", value, spec.replicate, spec.pad, size, size_label)
    bare = {
        (rule.name, info.shape[rule.dim]): info.name
        for info, rule in reversed(matched)
        if rule is not None and rule.style != "replicate" and not rule.parts and rule.dim < len(info.shape)
    }
    bare_counts = {k: Count(f"tensor {name}: dim size {k[1]}", k[1]) for k, name in bare.items()}
    return counts, bare_counts, problems


def _cut(info: TensorInfo, rule: str, style: str, dim: int, parts: list[Count], tp: int, config: str) -> TensorCut | str:
    """Cut a dim made of `parts` (one count, or several packed back to back) so each rank gets its share of each."""
    size = info.shape[dim]
    total = sum(p.value for p in parts)
    if all(p.size is not None for p in parts):
        expected = sum(p.value * (p.size or 0) for p in parts)
        if size != expected:
            if len(parts) == 1 and not parts[0].size_label:
                says = f"{parts[0].label.split(' ')[0]} is {expected}"
            else:
                says = " + ".join(f"{p.label} x {p.size_label}" if p.size_label else p.label for p in parts) + f" = {expected}"
            return f"tensor {info.name}: dim {dim} is {size}, but {says}; {config} does not match the weights"
    if size % total:
        labels = " + ".join(p.label for p in parts)
        return f"tensor {info.name}: dim {dim} is {size}, not a multiple of {labels}; {config} does not match the weights"
    unit = size // total
    slices: list[list[tuple[int, int]]] = [[] for _ in range(tp)]
    offset = 0
    for part in parts:
        for rank, (a, b) in enumerate(part.rank_units(tp)):
            slices[rank].append((offset + a * unit, offset + b * unit))
        offset += part.value * unit
    packed = tuple(p.value * unit for p in parts) if len(parts) > 1 else ()
    return TensorCut(info.name, info.dtype, info.shape, style, dim, rule, tuple(tuple(r) for r in slices), packed)


def _scaled_weight(name: str) -> str:
    suffix = next(s for s in SCALE_SUFFIXES if name.endswith(s))
    return name[: -len(suffix)] + ".weight"


def _scale_cut(info: TensorInfo, weight: TensorCut | None, tp: int) -> TensorCut | str:
    """A scale is cut with its weight's rows or columns when it has one value per row, column or block of them."""
    if math.prod(info.shape) <= 1 or weight is None or weight.dim is None:
        return replicated(info, tp, None if weight is None else f"scale of {weight.rule}")
    rule = f"scale of {weight.rule}"
    shape = info.shape if len(info.shape) == len(weight.shape) else None
    if shape is None and len(info.shape) == 1:
        # A 1-D scale has one value per output channel (weight dim 0).
        shape = info.shape + (1,) * (len(weight.shape) - 1)
    if shape is None:
        return f"tensor {info.name} has shape {list(info.shape)}, which does not line up with {weight.name} {list(weight.shape)}"
    d = weight.dim
    if shape[d] == 1:
        return replicated(info, tp, rule)
    if weight.shape[d] % shape[d]:
        return f"tensor {info.name}: dim {d} ({shape[d]}) does not divide {weight.name} dim {d} ({weight.shape[d]})"
    block = weight.shape[d] // shape[d]
    if any(x % block for ranges in weight.slices for r in ranges for x in r):
        return f"tensor {info.name}: blocks of {block} along dim {d} would be split between ranks; choose another --tp"
    dim = d if len(info.shape) == len(weight.shape) else 0
    slices = tuple(tuple((a // block, b // block) for a, b in ranges) for ranges in weight.slices)
    return TensorCut(info.name, info.dtype, info.shape, weight.style, dim, rule, slices)


def valid_tp(counts: Sequence[Count]) -> list[int]:
    """Every tp that all the counts allow, up to the largest count that cannot be padded."""
    limit = max([c.value for c in counts if not c.pad], default=1)
    return [tp for tp in range(1, limit + 1) if all(c.allows(tp) for c in counts)]


def make_plan(
    model: Path,
    tp: int,
    device_ids: Sequence[int] | None = None,
    config: Path | None = None,
    arch: str | None = None,
    replicate_unknown: bool = False,
    rules: Path | None = None,
) -> tuple[Source, ModelConfig, Plan]:
    """Read a checkpoint's headers and config and plan its split.

    Args:
        model: a .safetensors file, a model.safetensors.index.json, or a folder holding either; or a folder
            written by `reshard split`, read as the checkpoint it was split from.
        tp: number of ranks.
        device_ids: GPU id per rank; defaults to 0..tp-1.
        config: the model's config.json when it is not beside the weights.
        arch: force a rules family instead of detecting it from the config.
        replicate_unknown: copy tensors that match no rule whole to every rank instead of refusing.
        rules: a rules file whose rules are tried before the family's.

    Returns:
        The opened source (checkpoint or split folder), its model config, and the plan.

    Example:
        >>> ckpt, cfg, plan = make_plan(Path("examples/tiny-llama"), tp=2)
        >>> plan.rank_nbytes(0) < plan.nbytes
        True
    """
    from reshard.sources import open_source  # sources reads manifests, which hold plans

    tp_config = TPConfig.create(tp, device_ids)
    source = open_source(model)
    model_config = source.model_config(config)
    family = detect_family(model_config, arch, rules)
    plan = build_plan(source.tensors, model_config, tp_config, family, replicate_unknown)
    return source, model_config, plan
