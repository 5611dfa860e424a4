"""Deciding every tensor's cut from the rules and the config: `build_plan` does no I/O, so `plan` shows exactly
what `split` will do."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from reshard.errors import InputError, PlanError, Problem, shown
from reshard.model.config import ModelConfig, TPConfig
from reshard.model.rules import Family, Rule, builtin_families, family_for
from reshard.plan.cut import Plan, TensorCut, replicated
from reshard.plan.tensor import TensorSpec

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
    pad_to: int | None = None  # a padded count is first padded to a multiple of this (of tp when None)
    tensor: str | None = None  # the tensor whose dim it is, for a dim no config count describes

    def padded(self, tp: int) -> int:
        multiple = self.pad_to or tp
        return -(-self.value // multiple) * multiple

    def allows(self, tp: int) -> bool:
        if self.pad:
            return self.padded(tp) % tp == 0
        return self.value % tp == 0 or (self.replicate and tp % self.value == 0)

    def rank_units(self, tp: int) -> list[tuple[int, int]]:
        """The [start, stop) units each rank holds; past `value` on the last ranks when padded."""
        if self.pad or self.value % tp == 0 or not self.replicate:
            per = -(-(self.padded(tp) if self.pad else self.value) // tp)
            return [(r * per, (r + 1) * per) for r in range(tp)]
        return [(r * self.value // tp, r * self.value // tp + 1) for r in range(tp)]

    def problem(self, tp: int) -> str:
        if self.pad:
            return f"{self.label}, padded to {self.padded(tp)} (a multiple of {self.pad_to}), is not divisible by --tp {tp}"
        nor = ", nor --tp a multiple of it" if self.replicate else ""
        return f"{self.label} is not divisible by --tp {tp}{nor}"


class _Kind(IntEnum):
    """The kinds of problem planning finds, in the order they are told: a packed quantized tensor first (the shape
    complaints about such a checkpoint follow from its packing), tensors no rule matches last."""

    QUANTIZED = 0
    CONFIG = 1  # a count the rules need is missing
    COUNT = 2  # a count --tp does not divide
    TENSOR = 3  # a tensor its rule refuses, or cannot cut
    MISMATCH = 4  # a tensor the config does not describe
    SCALE = 5  # a scale that cannot follow its weight's cut
    UNKNOWN = 6  # no rule matches


@dataclass
class _Draft:
    """What planning has found so far: the cuts decided and the problems, each of its kind."""

    tp: int
    config_name: str
    cuts: dict[str, TensorCut] = field(default_factory=dict)
    found: list[tuple[_Kind, Problem]] = field(default_factory=list)
    scales: list[TensorSpec] = field(default_factory=list)
    refused: set[str] = field(default_factory=set)

    def add(self, kind: _Kind, problem: Problem) -> None:
        self.found.append((kind, problem))

    def report(self, family: str) -> list[Problem]:
        """The problems in the order they are told; the kinds that repeat for many tensors told once."""
        by_kind: dict[_Kind, list[Problem]] = {}
        for kind, problem in self.found:
            by_kind.setdefault(kind, []).append(problem)
        told = []
        for kind in sorted(by_kind):
            problems = by_kind[kind]
            if kind == _Kind.QUANTIZED:
                problems = [_quantized(problems[0].tensor or "")]
            elif kind == _Kind.MISMATCH:
                problems = [_mismatched(problems)]  # one wrong config key makes every tensor it sizes disagree
            elif kind == _Kind.UNKNOWN:
                problems = [_unknown([p.tensor or "" for p in problems], family)]
            told += problems
        return told


def _quantized(name: str) -> Problem:
    return Problem(
        name,
        f"tensor {shown(name)} is in a packed quantized format (GPTQ, AWQ or bitsandbytes), whose elements hold several "
        "values and cannot be cut by rows or columns; dequantize the checkpoint first, or give a rule for it with --rules",
    )


def _mismatched(problems: list[Problem]) -> Problem:
    """The first tensor the config does not describe says what to fix; the others are counted."""
    n = len(problems) - 1
    more = "" if n == 0 else " (nor does 1 other tensor)" if n == 1 else f" (nor do {n} other tensors)"
    return Problem(problems[0].tensor, problems[0].line + more)


def _unknown(names: list[str], family: str) -> Problem:
    n = len(names)
    listed = ", ".join(shown(n) for n in names[:3]) + (f" and {n - 3} more" if n > 3 else "")
    return Problem(
        names[0],
        f"{n} tensor(s) match no {family} rule and are not 1-D: {listed}; give a rule for them with --rules FILE, or "
        "pass --replicate-unknown to copy them whole to every rank",
    )


def build_plan(
    tensors: Sequence[TensorSpec],
    config: ModelConfig,
    tp_config: TPConfig,
    family: Family,
    *,
    replicate_unknown: bool = False,
    vocab_multiple: int | None = None,
) -> Plan:
    """Decide every tensor's cut, or raise PlanError listing every problem found. Does no I/O.

    A padded count (the vocabulary) is padded to a multiple of tp, or first to one of `vocab_multiple` (as an
    engine that pads its vocabulary to 64 rows lays it out) and then divided by tp."""
    tp = tp_config.num_devices
    matched = [(t, family.match(t.name)) for t in tensors]
    draft = _Draft(tp, config.name)
    per_layer, bare = _layer_counts(draft, matched, config, family, vocab_multiple)
    every = [*bare.values(), *(c for layer in per_layer.values() for c in layer.values())]
    failing = list(dict.fromkeys(c for c in every if not c.allows(tp)))
    valid = ", ".join(map(str, valid_tp(every))) if failing else ""
    for count in failing:
        draft.add(_Kind.COUNT, Problem(count.tensor, f"{count.problem(tp)}; valid --tp: {valid}"))
    for info, rule in matched:
        if rule is None:
            _unmatched(draft, info, replicate_unknown)
        else:
            _matched(draft, info, rule, per_layer[layer_of(info.name)], bare)
    for info in draft.scales:
        _scaled(draft, info)
    problems = draft.report(family.name)
    if problems:
        raise PlanError(problems)
    return Plan(family=family.name, tp_config=tp_config, tensors=tuple(draft.cuts[t.name] for t in tensors), rules=family.given)


def _unmatched(draft: _Draft, info: TensorSpec, replicate_unknown: bool) -> None:
    if info.name.endswith(SCALE_SUFFIXES):
        draft.scales.append(info)
    elif info.name.endswith(PACKED_QUANT_SUFFIXES) or ".quant_state." in info.name:
        draft.add(_Kind.QUANTIZED, Problem(info.name, ""))
    elif len(info.shape) <= 1 or replicate_unknown:
        draft.cuts[info.name] = replicated(info.name, info.dtype, info.shape, draft.tp, None)
    else:
        draft.add(_Kind.UNKNOWN, Problem(info.name, ""))


def _matched(draft: _Draft, info: TensorSpec, rule: Rule, counts: dict[str, Count], bare: dict[tuple[str, int], Count]) -> None:
    if rule.style == "refuse":
        if rule.name not in draft.refused:  # one line per rule: its tensors all share the reason
            draft.refused.add(rule.name)
            draft.add(_Kind.TENSOR, Problem(info.name, f"tensor {shown(info.name)} ({rule.name}): {rule.reason}"))
        return
    if rule.style == "replicate" or rule.dim is None:
        draft.cuts[info.name] = replicated(info.name, info.dtype, info.shape, draft.tp, rule.name)
        return
    if rule.dim >= len(info.shape):
        line = f"tensor {shown(info.name)} has shape {list(info.shape)}; rule {rule.name} cuts dim {rule.dim}, which it does not have"
        draft.add(_Kind.TENSOR, Problem(info.name, line))
        return
    parts = [counts.get(u) for u in rule.parts] or [bare[(rule.name, info.shape[rule.dim])]]
    known = [p for p in parts if p is not None]
    if len(known) < len(parts) or not all(p.allows(draft.tp) for p in known):
        return  # the count's problem is already listed once
    cut = _cut(info, rule, rule.dim, known, draft.tp, draft.config_name)
    if isinstance(cut, Problem):
        draft.add(_Kind.MISMATCH, cut)
    else:
        draft.cuts[info.name] = cut


def _scaled(draft: _Draft, info: TensorSpec) -> None:
    cut = _scale_cut(info, draft.cuts.get(_scaled_weight(info.name)), draft.tp)
    if isinstance(cut, Problem):
        draft.add(_Kind.SCALE, cut)
    else:
        draft.cuts[info.name] = cut


def _counts(
    draft: _Draft, matched: list[tuple[TensorSpec, Rule | None]], config: ModelConfig, family: Family, pad_to: int | None
) -> tuple[dict[str, Count], dict[tuple[str, int], Count]]:
    """The config counts the matched rules use, and the dims no count describes (which must divide by tp
    themselves; one per rule and size, named after its first tensor)."""
    used = {unit for _, rule in matched if rule is not None for unit in rule.parts}
    counts: dict[str, Count] = {}
    for unit in (u for u in family.units if u in used):
        key, value = family.count(unit, config)
        if value is None:
            missing = Problem(None, f"{config.name}: {key} is missing or not a positive integer; the {family.name} rules need it")
            if (_Kind.CONFIG, missing) not in draft.found:  # once, whichever layers lack it
                draft.add(_Kind.CONFIG, missing)
            continue
        spec = family.units[unit]
        size_key, size = family.size(unit, config)
        size_label = f"{size_key} ({size})" if size_key else ""
        counts[unit] = Count(f"{key} ({value})", value, spec.replicate, spec.pad, size, size_label, pad_to if spec.pad else None)
    bare = {
        (rule.name, info.shape[rule.dim]): info.name
        for info, rule in reversed(matched)
        if rule is not None and rule.dim is not None and rule.style != "replicate" and not rule.parts and rule.dim < len(info.shape)
    }
    bare_counts = {k: Count(f"tensor {name}: dim size {k[1]}", k[1], tensor=name) for k, name in bare.items()}
    return counts, bare_counts


_LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor belongs to, from its name (`model.layers.<n>.`, `transformer.h.<n>.`)."""
    found = _LAYER.search(name)
    return int(found.group(1)) if found else None


def _layer_counts(
    draft: _Draft, matched: list[tuple[TensorSpec, Rule | None]], config: ModelConfig, family: Family, pad_to: int | None
) -> tuple[dict[int | None, dict[str, Count]], dict[tuple[str, int], Count]]:
    """The counts each layer's tensors are cut by (None: tensors outside the layers), as that layer's config gives
    them (sizes given per layer, per_layer_config overrides, layer types), and the bare counts."""
    by_layer: dict[int | None, list[tuple[TensorSpec, Rule | None]]] = {}
    for item in matched:
        by_layer.setdefault(layer_of(item[0].name), []).append(item)
    counts: dict[int | None, dict[str, Count]] = {}
    bare: dict[tuple[str, int], Count] = {}
    for layer, items in by_layer.items():
        counts[layer], own_bare = _counts(draft, items, config if layer is None else config.for_layer(layer), family, pad_to)
        bare |= own_bare
    return counts, bare


def _size_problem(info: TensorSpec, dim: int, parts: list[Count], config: str) -> Problem | None:
    """A dim that is not count x size for the counts whose size the config gives."""
    if not all(p.size is not None for p in parts):
        return None
    size = info.shape[dim]
    expected = sum(p.value * (p.size or 0) for p in parts)
    if size == expected:
        return None
    if len(parts) == 1 and not parts[0].size_label:
        says = f"{parts[0].label.split(' ')[0]} is {expected}"
    else:
        says = " + ".join(f"{p.label} x {p.size_label}" if p.size_label else p.label for p in parts) + f" = {expected}"
    return Problem(info.name, f"tensor {shown(info.name)}: dim {dim} is {size}, but {says}; {config} does not match the weights")


def _cut(info: TensorSpec, rule: Rule, dim: int, parts: list[Count], tp: int, config: str) -> TensorCut | Problem:
    """Cut a dim made of `parts` (one count, or several packed back to back) so each rank gets its share of each."""
    problem = _size_problem(info, dim, parts, config)
    if problem is not None:
        return problem
    size, total = info.shape[dim], sum(p.value for p in parts)
    if all(p.size is not None for p in parts):
        units = [p.size or 0 for p in parts]  # checked: the dim is the sum of count x size
    elif size % total:
        labels = " + ".join(p.label for p in parts)
        return Problem(
            info.name, f"tensor {shown(info.name)}: dim {dim} is {size}, not a multiple of {labels}; {config} does not match the weights"
        )
    else:
        units = [size // total] * len(parts)
    slices: list[list[tuple[int, int]]] = [[] for _ in range(tp)]
    offset = 0
    for part, unit in zip(parts, units, strict=True):
        for rank, (a, b) in enumerate(part.rank_units(tp)):
            slices[rank].append((offset + a * unit, offset + b * unit))
        offset += part.value * unit
    packed = tuple(p.value * u for p, u in zip(parts, units, strict=True)) if len(parts) > 1 else ()
    return TensorCut(info.name, info.dtype, info.shape, rule.style, dim, rule.name, tuple(map(tuple, slices)), packed)


def _scaled_weight(name: str) -> str:
    suffix = next(s for s in SCALE_SUFFIXES if name.endswith(s))
    return name[: -len(suffix)] + ".weight"


def _scale_cut(info: TensorSpec, weight: TensorCut | None, tp: int) -> TensorCut | Problem:
    """A scale is cut with its weight's rows or columns when it has one value per row, column or block of them."""
    if math.prod(info.shape) <= 1 or weight is None or weight.dim is None:
        return replicated(info.name, info.dtype, info.shape, tp, None if weight is None else f"scale of {weight.rule}")
    rule = f"scale of {weight.rule}"
    shape = info.shape if len(info.shape) == len(weight.shape) else None
    if shape is None and len(info.shape) == 1:
        # A 1-D scale has one value per output channel (weight dim 0).
        shape = info.shape + (1,) * (len(weight.shape) - 1)
    if shape is None:
        line = (
            f"tensor {shown(info.name)} has shape {list(info.shape)}, which does not line up with {shown(weight.name)} {list(weight.shape)}"
        )
        return Problem(info.name, line)
    d = weight.dim
    if shape[d] == 1:
        return replicated(info.name, info.dtype, info.shape, tp, rule)
    if weight.shape[d] % shape[d]:
        return Problem(
            info.name, f"tensor {shown(info.name)}: dim {d} ({shape[d]}) does not divide {shown(weight.name)} dim {d} ({weight.shape[d]})"
        )
    block = weight.shape[d] // shape[d]
    if any(x % block for ranges in weight.slices for r in ranges for x in r):
        return Problem(
            info.name, f"tensor {shown(info.name)}: blocks of {block} along dim {d} would be split between ranks; choose another --tp"
        )
    dim = d if len(info.shape) == len(weight.shape) else 0
    slices = tuple(tuple((a // block, b // block) for a, b in ranges) for ranges in weight.slices)
    return TensorCut(info.name, info.dtype, info.shape, weight.style, dim, rule, slices)


def replan(
    cuts: Sequence[TensorCut],
    config: ModelConfig,
    tp_config: TPConfig,
    *,
    family: str,
    rules: dict[str, Any] | None,
    where: str,
    vocab_multiple: int | None = None,
) -> Plan:
    """The plan the rules give, again, for tensors a recorded plan says how it cut: what to check it against.
    Tensors no rule matches are taken as replicated (the only cut --replicate-unknown makes)."""
    if rules is None and family not in builtin_families():
        raise InputError(f"{where}: family {family!r} is not built in and no rules are recorded for it; pass its rules with --rules FILE")
    try:
        found = family_for(config, arch=family, given=rules, source=f"{where}: rules")
        return build_plan(cuts, config, tp_config, found, replicate_unknown=True, vocab_multiple=vocab_multiple)
    except PlanError as e:
        raise InputError(f"{where}: the {family} rules cannot cut these tensors at tp {tp_config.tp}: {e.problems[0].line}") from e


def first_difference(recorded: Sequence[TensorCut], derived: Sequence[TensorCut]) -> tuple[TensorCut, TensorCut] | None:
    """The first tensor cut otherwise than the rules say, with the cut they give."""
    return next(((r, d) for r, d in zip(recorded, derived, strict=True) if not r.same_cut(d)), None)


def valid_tp(counts: Sequence[Count]) -> list[int]:
    """Every tp that all the counts allow, up to the largest count that cannot be padded."""
    limit = max([c.value for c in counts if not c.pad], default=1)
    return [tp for tp in range(1, limit + 1) if all(c.allows(tp) for c in counts)]
