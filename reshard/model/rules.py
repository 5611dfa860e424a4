"""Rules files: per model family, which tensor names are cut how. Loaded strictly, matched first-wins."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from reshard.errors import InputError, RulesError
from reshard.jsonfile import read_json
from reshard.model.config import LAYER_TYPE, ModelConfig
from reshard.schema import Check, Count, NonEmpty, Positive, SchemaError, load

Style = Literal["colwise", "rowwise", "vocab", "replicate", "refuse"]
STYLES: tuple[str, ...] = get_args(Style)


@dataclass(frozen=True)
class Unit:
    """A count from config.json that a split dim is made of (heads, kv heads, FFN columns, vocab rows)."""

    # Config keys or expressions tried in order, the first whose keys are all set ("key", then "default_key").
    keys: tuple[str, ...]
    # When tp is a multiple of the count, rank r gets unit r*count//tp (kv heads, as vLLM and TensorRT-LLM do).
    replicate: bool = False
    # When tp does not divide the count, zero units are appended to a multiple of tp (vocabulary rows).
    pad: bool = False
    # How many elements of the cut dim one unit is: a number (1 for FFN columns and vocabulary rows), or config
    # keys tried in order, each a key ("head_dim") or an expression of keys and numbers with + * /
    # ("hidden_size/num_attention_heads", "qk_nope_head_dim+qk_rope_head_dim"). None: unchecked.
    size: int | tuple[str, ...] | None = None
    # The key (or expression) read instead in layers of a given type (config.json's layer_types), for models whose
    # layers of one type have other counts than the config's key says (MiMo's sliding layers: 2 x kv heads).
    layer_types: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Rule:
    name: str
    patterns: tuple[str, ...]
    style: str
    dim: int | None
    parts: tuple[str, ...]  # the units the cut dim is made of, in order: ("heads", "kv_heads", "kv_heads") for q|k|v
    regex: re.Pattern[str]
    reason: str = ""  # why a `refuse` rule's tensors cannot be cut, and what to do

    @property
    def packed(self) -> bool:
        return len(self.parts) > 1


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    units: dict[str, Unit]
    rules: tuple[Rule, ...]
    source: str
    notes: str = ""  # what is special in this family, one line for `reshard families` and docs/rules.md
    extends: str | None = None
    given: dict[str, Any] | None = None  # the --rules file's JSON that shaped this family, recorded in the manifest

    def match(self, tensor_name: str) -> Rule | None:
        for rule in self.rules:
            if rule.regex.fullmatch(tensor_name):
                return rule
        return None

    def count(self, unit: str, config: ModelConfig) -> tuple[str, int | None]:
        """The config key (or expression of keys) a unit reads, and its value (None when absent or not a
        positive integer)."""
        spec = self.units[unit]
        layer_type = config.raw.get(LAYER_TYPE)
        choices = tuple(key for kind, key in spec.layer_types if kind == layer_type) or spec.keys
        key = next((c for c in choices if _keys_set(c, config.raw)), choices[0])
        return key, evaluate(key, config.raw)

    def size(self, unit: str, config: ModelConfig) -> tuple[str, int | None]:
        """How the config sizes one unit, and the size: None when the config does not say.

        Raises InputError for a size key that is present but not a positive integer.
        """
        spec = self.units[unit].size
        if spec is None or isinstance(spec, int):
            return "", spec
        for choice in spec:
            if _NAME.fullmatch(choice):
                value = config.raw.get(choice)
                if value is None:
                    continue
                if type(value) is not int or value <= 0:
                    raise InputError(f"{config.name}: {choice} must be a positive integer, got {json.dumps(value)}; fix the model config")
                return choice, value
            found = evaluate(choice, config.raw)
            if found is not None:
                return choice, found
        return "", None


_NAME = re.compile(r"[A-Za-z_][\w.]*")
_EXPRESSION = re.compile(r"[\w.]+(?:[*/+][\w.]+)*")


def _keys_set(expression: str, raw: dict[str, Any]) -> bool:
    """Whether every config key the expression names is set (to anything but null)."""
    return all(name.isdigit() or raw.get(name) is not None for name in re.split(r"[*/+]", expression))


def evaluate(expression: str, raw: dict[str, Any]) -> int | None:
    """A count or size from config keys and numbers joined by +, * and / (exact division, * and / before +):
    None when a key is absent or null, not a positive integer, or a division is not exact."""
    total = 0
    for term in expression.split("+"):
        value: int | None = None
        for op, factor in re.findall(r"(^|[*/])([^*/]+)", term):
            number = int(factor) if factor.isdigit() else raw.get(factor)
            if type(number) is not int or number <= 0:
                return None
            if op == "/":
                if value is None or value % number:
                    return None
                value //= number
            else:
                value = number if value is None else value * number
        total += value or 0
    return total if total > 0 else None


def compile_patterns(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """`*` stands for one dotted name component (a layer index, an expert number), captured in order."""
    alternatives = ("([^.]+)".join(re.escape(part) for part in p.split("*")) for p in patterns)
    return re.compile("|".join(f"(?:{a})" for a in alternatives))


def read_rules(path: Path) -> Any:
    """A --rules file's JSON (not yet checked as rules); a file that cannot be read is a RulesError."""
    try:
        return read_json(Path(path), what="rules file", fix="fix the file")
    except InputError as e:
        raise RulesError(str(e)) from e


# A rules file, as declared (schema.load reads it); parse_family then checks what spans fields and builds a Family.
Expression = Annotated[
    str,
    Check(
        lambda v: bool(_EXPRESSION.fullmatch(v)),
        'a config key or an expression of keys like "n_shared_experts*moe_intermediate_size"',
        "config keys or expressions of keys",
    ),
]


@dataclass(frozen=True)
class UnitSpec:
    key: Expression | list[Expression]
    default_key: Expression | None = None
    replicate: bool = False
    pad: bool = False
    size: Positive | list[Expression] | None = None
    layer_types: dict[str, Expression] = field(default_factory=dict)


@dataclass(frozen=True)
class RuleSpec:
    name: NonEmpty
    match: NonEmpty | list[NonEmpty]
    style: Style
    dim: Count | None = None
    units: NonEmpty | None = None
    parts: list[NonEmpty] | None = None
    reason: NonEmpty | None = None


@dataclass(frozen=True)
class FamilySpec:
    family: NonEmpty | None = None  # required in a file of its own; a file adding to a detected family may omit it
    extends: NonEmpty | None = None
    notes: NonEmpty | None = None
    model_types: list[NonEmpty] = field(default_factory=list)
    architectures: list[NonEmpty] = field(default_factory=list)
    units: dict[str, UnitSpec] = field(default_factory=dict)
    rules: list[RuleSpec] = field(default_factory=list)


def read_spec(data: Any, source: str) -> FamilySpec:
    """A rules file's JSON checked against FamilySpec; any misfit is one RulesError line naming the key."""
    try:
        return load(FamilySpec, data)
    except SchemaError as e:
        raise RulesError(f"{source}: {e}") from e


def parse_family(data: Any, source: str, *, parents: dict[str, Family] | None = None) -> Family:
    """Validate a rules file. With `extends`, the parent's units and rules apply after this file's own."""
    return _family(read_spec(data, source), source, parents or {})


def _family(spec: FamilySpec, source: str, parents: dict[str, Family]) -> Family:
    """The family a checked rules file describes, once what spans its fields is checked."""
    if spec.family is None:
        raise RulesError(f"{source}: missing key 'family'")
    parent = _parent(spec, source, parents)
    units = dict(parent.units) if parent else {}
    units |= {name: _unit(unit, f"{source}: units.{name}") for name, unit in spec.units.items()}
    if not (spec.rules or parent):
        raise RulesError(f"{source}: rules must be a non-empty list")
    rules = tuple(_rule(rule, f"{source}: rule {rule.name!r}", units) for rule in spec.rules) + (parent.rules if parent else ())
    return Family(
        name=spec.family,
        model_types=tuple(spec.model_types),
        architectures=tuple(spec.architectures),
        units=units,
        rules=rules,
        source=source,
        notes=spec.notes or "",
        extends=parent.name if parent else None,
    )


def _parent(spec: FamilySpec, where: str, parents: dict[str, Family]) -> Family | None:
    if spec.extends is None:
        return None
    if spec.extends not in parents:
        raise RulesError(f"{where}: extends {spec.extends!r}, which is not a known family; `reshard families` lists them")
    return parents[spec.extends]


def _unit(spec: UnitSpec, at: str) -> Unit:
    keys = spec.key if isinstance(spec.key, list) else [spec.key]
    if not keys:
        raise RulesError(f"{at}.key: must name at least one config key")
    return Unit(
        keys=tuple(keys + ([spec.default_key] if spec.default_key is not None else [])),
        replicate=spec.replicate,
        pad=spec.pad,
        size=tuple(spec.size) if isinstance(spec.size, list) else spec.size,
        layer_types=tuple(spec.layer_types.items()),
    )


def _rule(spec: RuleSpec, at: str, units: dict[str, Unit]) -> Rule:
    """A rule, once what spans its fields is checked."""
    patterns = (spec.match,) if isinstance(spec.match, str) else tuple(spec.match)
    if not patterns:
        raise RulesError(f"{at}: match must name at least one tensor pattern")
    if (spec.style == "refuse") != (spec.reason is not None):
        raise RulesError(f"{at}: a refuse rule needs a reason, and only a refuse rule takes one")
    if spec.style == "refuse":
        if spec.dim is not None or spec.units is not None or spec.parts is not None:
            raise RulesError(f"{at}: a refuse rule takes no dim, units or parts; remove them")
        return Rule(spec.name, patterns, spec.style, None, (), compile_patterns(patterns), spec.reason or "")
    if spec.units is not None and spec.parts is not None:
        raise RulesError(f"{at}: give units (one count) or parts (a packed tensor), not both")
    parts = spec.parts if spec.parts is not None else [spec.units] if spec.units is not None else []
    if spec.style == "replicate" and (spec.dim is not None or parts):
        raise RulesError(f"{at}: a replicate rule takes no dim or units; remove them")
    if spec.style != "replicate" and spec.dim is None:
        raise RulesError(f"{at}: style {spec.style} needs dim, a non-negative integer")
    for unit in parts:
        if unit not in units:
            raise RulesError(f"{at}: units {unit!r} is not defined in units; defined: {', '.join(units) or 'none'}")
    if len(parts) > 1 and any(units[u].pad for u in parts):
        raise RulesError(f"{at}: a packed tensor cannot hold a padded unit")
    return Rule(name=spec.name, patterns=patterns, style=spec.style, dim=spec.dim, parts=tuple(parts), regex=compile_patterns(patterns))


def builtin_families() -> dict[str, Family]:
    """Every built-in family by name (parsed once per process; a new dict each call)."""
    return dict(_builtin_families())


@cache
def _builtin_families() -> dict[str, Family]:
    folder = resources.files("reshard.model") / "architectures"
    pending = {entry.name: json.loads(entry.read_text(encoding="utf-8")) for entry in folder.iterdir() if entry.name.endswith(".json")}
    families: dict[str, Family] = {}
    # Parents first: a file is parsed once the family it extends is known.
    while pending:
        ready = sorted(n for n, d in pending.items() if d.get("extends") in (None, *families))
        if not ready:
            raise RulesError(f"reshard/architectures: cannot resolve extends in {', '.join(sorted(pending))}")
        for name in ready:
            family = parse_family(pending.pop(name), f"reshard/model/architectures/{name}", parents=families)
            families[family.name] = family
    return dict(sorted(families.items()))


def detect_family(config: ModelConfig, *, arch: str | None = None, rules: Path | None = None, names: Sequence[str] = ()) -> Family:
    """The family named by --arch, else the one whose model_types or architectures list the config's.

    A --rules file adds or overrides rules: its rules are tried first, then the family's. A file without
    `extends` builds on the detected family; one that lists the config's model_type, or is given for a model
    no built-in family knows, stands on its own (or on the family it names in `extends`).
    """
    data = read_rules(rules) if rules is not None else None
    return family_for(config, arch=arch, given=data, source=str(rules), names=names)


def family_for(config: ModelConfig, *, arch: str | None, given: Any, source: str = "the rules", names: Sequence[str] = ()) -> Family:
    """detect_family with the rules file's JSON already read (as a manifest records it)."""
    families = builtin_families()
    spec = read_spec(given, source) if given is not None else None  # checked once, before detection reads it
    if arch is not None and arch not in families and not (spec is not None and spec.family == arch):
        raise InputError(f"--arch {arch}: unknown family; `reshard families` lists the {len(families)} known ones")
    base = families.get(arch) if arch is not None else _detect(config, families.values(), names)
    if spec is None:
        if base is None:
            known = sum(len(f.model_types) for f in families.values())
            why = _refused().get(config.model_type or "")
            raise InputError(
                f"{config.name}: model_type {config.model_type or 'none'!r} is not supported{': ' + why if why else ''} "
                f"(`reshard families` lists the {known} that are); pass --arch NAME to cut it as one of those families, or "
                "--rules FILE for a new layout"
            )
        return base
    if base is None or config.model_type in spec.model_types or spec.extends is not None:
        family = _family(spec, source, families)
    else:
        family = _family(replace(spec, extends=base.name, family=base.name), f"{source} + {base.source}", families)
    return replace(family, given=given)


def _refused() -> dict[str, str]:
    """Model types reshard knows and does not split yet, with the reason."""
    data: dict[str, str] = json.loads((resources.files("reshard.model") / "refused.json").read_text(encoding="utf-8"))
    return data


def _detect(config: ModelConfig, families: Iterable[Family], names: Sequence[str]) -> Family | None:
    """model_type first; then architectures, unless the tensor names say otherwise (a config that says
    LlamaForCausalLM over `transformer.h.*` tensors): then the family whose rules match every tensor."""
    families = list(families)
    for family in families:
        if config.model_type in family.model_types:
            return family
    by_architecture = next((f for f in families if set(config.architectures) & set(f.architectures)), None)
    if by_architecture is None or not names or _covers(by_architecture, names):
        return by_architecture
    return next((f for f in families if _covers(f, names)), by_architecture)


def _covers(family: Family, names: Sequence[str]) -> bool:
    return all(family.match(name) is not None for name in names)
