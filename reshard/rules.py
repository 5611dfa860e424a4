"""Rules files: per model family, which tensor names are cut how. Loaded strictly, matched first-wins."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from reshard.config import ModelConfig
from reshard.errors import InputError, RulesError

STYLES = ("colwise", "rowwise", "vocab", "replicate")
_FAMILY_KEYS = {"family", "model_types", "architectures", "units", "rules"}
_UNIT_KEYS = {"key", "default_key"}
_RULE_KEYS = {"name", "match", "style", "dim", "units"}


@dataclass(frozen=True)
class Unit:
    """A count from config.json that a split dim is made of (heads, kv heads, FFN columns, vocab rows)."""

    key: str
    default_key: str | None = None


@dataclass(frozen=True)
class Rule:
    name: str
    patterns: tuple[str, ...]
    style: str
    dim: int | None
    units: str | None
    regex: re.Pattern[str]


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    units: dict[str, Unit]
    rules: tuple[Rule, ...]
    source: str

    def match(self, tensor_name: str) -> Rule | None:
        for rule in self.rules:
            if rule.regex.fullmatch(tensor_name):
                return rule
        return None

    def count(self, unit: str, config: ModelConfig) -> tuple[str, int | None]:
        """The config key a unit reads, and its value (None when absent or not a positive integer)."""
        spec = self.units[unit]
        key = spec.key
        value = config.raw.get(key)
        if value is None and spec.default_key is not None:
            key, value = spec.default_key, config.raw.get(spec.default_key)
        ok = type(value) is int and value > 0
        return key, value if ok else None


def compile_patterns(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """`*` stands for one dotted name component (a layer index, an expert number)."""
    alternatives = ("[^.]+".join(re.escape(part) for part in p.split("*")) for p in patterns)
    return re.compile("|".join(f"(?:{a})" for a in alternatives))


def load_family(path: Path) -> Family:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RulesError(f"{path}: cannot read rules file as JSON ({e})") from e
    return parse_family(data, str(path))


def parse_family(data: Any, source: str) -> Family:
    where = source
    _require_object(data, where, _FAMILY_KEYS, required={"family", "rules"})
    units = {}
    for unit_name, spec in (data.get("units") or {}).items():
        _require_object(spec, f"{where}: units.{unit_name}", _UNIT_KEYS, required={"key"})
        units[unit_name] = Unit(key=_string(spec["key"], f"{where}: units.{unit_name}.key"), default_key=spec.get("default_key"))
    if not isinstance(data["rules"], list) or not data["rules"]:
        raise RulesError(f"{where}: rules must be a non-empty list")
    rules = tuple(_parse_rule(i, r, where, units) for i, r in enumerate(data["rules"]))
    return Family(
        name=_string(data["family"], f"{where}: family"),
        model_types=tuple(_strings(data.get("model_types", []), f"{where}: model_types")),
        architectures=tuple(_strings(data.get("architectures", []), f"{where}: architectures")),
        units=units,
        rules=rules,
        source=source,
    )


def _parse_rule(index: int, rule: Any, where: str, units: dict[str, Unit]) -> Rule:
    at = f"{where}: rules[{index}]"
    _require_object(rule, at, _RULE_KEYS, required={"name", "match", "style"})
    name = _string(rule["name"], f"{at}.name")
    at = f"{where}: rule {name!r}"
    match = rule["match"]
    patterns = tuple(_strings([match] if isinstance(match, str) else match, f"{at}.match"))
    if not patterns:
        raise RulesError(f"{at}: match must name at least one tensor pattern")
    style = rule["style"]
    if style not in STYLES:
        raise RulesError(f"{at}: unknown style {style!r}; use one of {', '.join(STYLES)}")
    dim = rule.get("dim")
    if style == "replicate":
        if dim is not None or rule.get("units") is not None:
            raise RulesError(f"{at}: a replicate rule takes no dim or units; remove them")
    elif type(dim) is not int or dim < 0:
        raise RulesError(f"{at}: style {style} needs dim, a non-negative integer")
    unit = rule.get("units")
    if unit is not None and unit not in units:
        raise RulesError(f"{at}: units {unit!r} is not defined in units; defined: {', '.join(units) or 'none'}")
    return Rule(name=name, patterns=patterns, style=style, dim=dim, units=unit, regex=compile_patterns(patterns))


def _require_object(value: Any, at: str, allowed: set[str], required: set[str]) -> None:
    if not isinstance(value, dict):
        raise RulesError(f"{at}: must be a JSON object")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise RulesError(f"{at}: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(allowed))}")
    missing = sorted(required - set(value))
    if missing:
        raise RulesError(f"{at}: missing key {missing[0]!r}")


def _string(value: Any, at: str) -> str:
    if not isinstance(value, str) or not value:
        raise RulesError(f"{at}: must be a non-empty string")
    return value


def _strings(value: Any, at: str) -> list[str]:
    if not isinstance(value, list):
        raise RulesError(f"{at}: must be a list of strings")
    return [_string(v, at) for v in value]


def builtin_families() -> dict[str, Family]:
    folder = resources.files("reshard") / "architectures"
    families = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            family = parse_family(json.loads(entry.read_text(encoding="utf-8")), f"reshard/architectures/{entry.name}")
            families[family.name] = family
    return families


def detect_family(config: ModelConfig, arch: str | None = None) -> Family:
    """The family named by --arch, else the one whose model_types or architectures list the config's."""
    families = builtin_families()
    if arch is not None:
        if arch not in families:
            raise InputError(f"--arch {arch}: unknown family; known: {', '.join(families)}")
        return families[arch]
    for family in families.values():
        if config.model_type in family.model_types:
            return family
    for family in families.values():
        if set(config.architectures) & set(family.architectures):
            return family
    known = sorted(t for f in families.values() for t in f.model_types)
    seen = config.model_type or "none"
    raise InputError(f"{config.name}: model_type {seen!r} is not supported; supported: {', '.join(known)}")
