"""The JSON files reshard reads and writes (rules files, manifests, engine layouts) declared as dataclasses, and the
one validator that reads JSON into them, `load`: it names the key at fault and what it must be.

A field's type says what its JSON value may be: str, int, float, bool, None, Any, Literal[...], list[X],
tuple[X, ...], dict[str, X], a nested dataclass, or a union of these (tried in order). `Annotated[T, Check(...)]`
adds a condition beyond the type; a field whose JSON key is not its name says so with `json_key`. A field without
a default is required. What depends on several fields (a rule that refuses needs a reason) is checked by the code
that uses the dataclass.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")


class SchemaError(ValueError):
    """A value that is not what its schema says: where (`at`, a path like `rules[2].dim`) and what it must be."""

    def __init__(self, at: str, problem: str) -> None:
        self.at, self.problem = at, problem
        super().__init__(f"{at}: {problem}" if at else problem)


@dataclass(frozen=True)
class Check:
    """A condition on a value beyond its type, as a message tells it ("a non-empty string", "non-empty strings")."""

    test: Callable[[Any], bool]
    says: str
    plural: str = ""


NonEmpty = Annotated[str, Check(bool, "a non-empty string", "non-empty strings")]
Count = Annotated[int, Check(lambda v: v >= 0, "a non-negative integer", "non-negative integers")]
Positive = Annotated[int, Check(lambda v: v > 0, "a positive integer", "positive integers")]


def json_key(name: str, **kwargs: Any) -> Any:
    """A dataclass field read from the JSON key `name` (for a key that is a Python keyword, like `from`)."""
    return dataclasses.field(metadata={"json_key": name}, **kwargs)


def load(cls: type[T], data: Any, at: str = "") -> T:
    """`data` (parsed JSON) as a `cls`; raises SchemaError for the first value that does not fit."""
    value: T = _read(cls, data, at)
    return value


def describe(tp: Any) -> str:
    """What a value of type `tp` must be, as an error tells it."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return next((a.says for a in args[1:] if isinstance(a, Check)), describe(args[0]))
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args if a is not type(None)) or "null"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_plural(args[0])}"
    if origin is dict:
        return f"a JSON object of {_plural(args[1])}"
    return _NAMES.get(tp, "a JSON object")


_NAMES: dict[Any, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    type(None): "null",
    Any: "any value",
}
_PLURALS: dict[Any, str] = {str: "strings", int: "integers", float: "numbers", bool: "true or false values", Any: "values"}


def _plural(tp: Any) -> str:
    if get_origin(tp) is Annotated:
        return next((a.plural for a in get_args(tp)[1:] if isinstance(a, Check) and a.plural), _plural(get_args(tp)[0]))
    if get_origin(tp) in (list, tuple):
        return f"lists of {_plural(get_args(tp)[0])}"
    return _PLURALS.get(tp, "JSON objects" if dataclasses.is_dataclass(tp) else "values")


def _at(at: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{at}[{key}]"
    return f"{at}.{key}" if at else key


def _read(tp: Any, data: Any, at: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        try:
            value = _read(args[0], data, at)
        except SchemaError as e:
            raise (SchemaError(at, f"must be {describe(tp)}") if e.at == at else e) from None
        for check in (a for a in args[1:] if isinstance(a, Check)):
            if not check.test(value):
                raise SchemaError(at, f"must be {check.says}")
        return value
    if origin in (Union, types.UnionType):
        return _read_union(tp, args, data, at)
    if origin is Literal:
        if not any(type(data) is type(a) and data == a for a in args):
            raise SchemaError(at, f"must be {describe(tp)}, not {data!r}")
        return data
    if origin in (list, tuple):
        if not isinstance(data, list):
            raise SchemaError(at, f"must be {describe(tp)}")
        items = [_read(args[0], v, _at(at, i)) for i, v in enumerate(data)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(data, dict):
            raise SchemaError(at, f"must be {describe(tp)}")
        return {k: _read(args[1], v, _at(at, k)) for k, v in data.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _read_object(tp, data, at)
    if not _is(tp, data):
        raise SchemaError(at, f"must be {describe(tp)}")
    return data


def _is(tp: Any, data: Any) -> bool:
    if tp is Any:
        return True
    if tp is float:
        return type(data) in (int, float)
    if tp is int:
        return type(data) is int
    return isinstance(data, tp)


def _read_union(tp: Any, args: tuple[Any, ...], data: Any, at: str) -> Any:
    errors = []
    for option in args:
        try:
            return _read(option, data, at)
        except SchemaError as e:
            errors.append(e)
    # A value of the right kind that is wrong inside (a list with a bad item) is told by what is wrong inside.
    inner = [e for e in errors if e.at != at]
    if inner:
        raise inner[0]
    raise SchemaError(at, f"must be {describe(tp)}")


@cache
def _fields(cls: type) -> tuple[tuple[str, str, Any, bool], ...]:
    """Each field's (name, JSON key, type, required)."""
    hints = get_type_hints(cls, include_extras=True)
    return tuple(
        (
            f.name,
            f.metadata.get("json_key", f.name),
            hints[f.name],
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)
        if f.init
    )


def _read_object(cls: type, data: Any, at: str) -> Any:
    if not isinstance(data, dict):
        raise SchemaError(at, "must be a JSON object")
    fields = _fields(cls)
    keys = {key for _, key, _, _ in fields}
    unknown = sorted(set(data) - keys)
    if unknown:
        raise SchemaError(at, f"unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(keys))}")
    missing = next((key for _, key, _, required in fields if required and key not in data), None)
    if missing is not None:
        raise SchemaError(at, f"missing key {missing!r}")
    return cls(**{name: _read(tp, data[key], _at(at, key)) for name, key, tp, _ in fields if key in data})
