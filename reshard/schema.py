"""The JSON files reshard reads and writes (rules files, manifests, engine layouts) declared as dataclasses, and the
one validator that reads JSON into them, `load`: it names the key at fault and what it must be.

A field's type says what its JSON value may be: str, int, float, bool, None, Any, Literal[...], list[X],
tuple[X, ...], dict[str, X], a nested dataclass, or a union of these (tried in order). `Annotated[T, Check(...)]`
adds a condition beyond the type; a field whose JSON key is not its name says so in its metadata (`json_key`). A field without
a default is required. What depends on several fields (a rule that refuses needs a reason) is checked by the code
that uses the dataclass.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal, TypeVar, Union, cast, get_args, get_origin, get_type_hints

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


def json_key(name: str) -> dict[str, str]:
    """The metadata of a dataclass field read from the JSON key `name` (for a key that is a Python keyword, like
    `from`): `sources: list[str] = field(metadata=json_key("from"))`."""
    return {"json_key": name}


def load(cls: type[T], data: Any, *, at: str = "") -> T:
    """`data` (parsed JSON) as a `cls`; raises SchemaError for the first value that does not fit, `at` its path."""
    try:
        value: T = _reader(cast(Any, cls))(data)
    except SchemaError as e:
        raise SchemaError(_join(at, e.at), e.problem) from None
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
    if origin is tuple and args[-1:] != (Ellipsis,):
        return f"a list of {len(args)} {_plural(args[0])}"
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


Reader = Callable[[Any], Any]


def _join(at: str, inner: str) -> str:
    if not inner:
        return at
    return f"{at}{inner}" if inner.startswith("[") or not at else f"{at}.{inner}"


def _key(key: str | int) -> str:
    return f"[{key}]" if isinstance(key, int) else key


def _inside(key: str | int, e: SchemaError) -> SchemaError:
    """The error of a value inside a container, its path now starting at the container."""
    return SchemaError(_join(_key(key), e.at), e.problem)


@cache
def _reader(tp: Any) -> Reader:
    """The function that reads a value of type `tp` (built once per type): returns it, as the dataclass wants it,
    or raises SchemaError with the path inside it."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _annotated(tp, _reader(args[0]), [a for a in args[1:] if isinstance(a, Check)])
    if origin in (Union, types.UnionType):
        return _union(tp, [_reader(a) for a in args])
    if origin is Literal:
        return _literal(tp, args)
    if origin is list or (origin is tuple and args[-1:] == (Ellipsis,)):
        return _sequence(tp, _reader(args[0]), tuple if origin is tuple else list)
    if origin is tuple:
        return _fixed(tp, [_reader(a) for a in args])
    if origin is dict:
        return _mapping(tp, _reader(args[1]))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _object(tp)
    return _plain(tp)


def _fail(tp: Any, data: Any = None, *, show: bool = False) -> SchemaError:
    return SchemaError("", f"must be {describe(tp)}" + (f", not {data!r}" if show else ""))


def _plain(tp: Any) -> Reader:
    if tp is Any:
        return lambda v: v
    if tp in (int, float, bool, type(None)):
        kinds = (int, float) if tp is float else (tp,)  # exact types: True is not an integer here

        def exact(v: Any) -> Any:
            if type(v) in kinds:
                return v
            raise _fail(tp)

        return exact

    def read(v: Any) -> Any:
        if isinstance(v, tp):
            return v
        raise _fail(tp)

    return read


def _annotated(tp: Any, base: Reader, checks: list[Check]) -> Reader:
    test = checks[0].test if len(checks) == 1 else lambda value: all(c.test(value) for c in checks)

    def read(v: Any) -> Any:
        try:
            value = base(v)
        except SchemaError as e:
            raise (_fail(tp) if not e.at else e) from None
        if test(value):
            return value
        raise _fail(tp)

    return read


def _union(tp: Any, options: list[Reader]) -> Reader:
    def read(v: Any) -> Any:
        errors = []
        for option in options:
            try:
                return option(v)
            except SchemaError as e:
                errors.append(e)
        # A value of the right kind that is wrong inside (a list with a bad item) is told by what is wrong inside.
        raise next((e for e in errors if e.at), _fail(tp))

    return read


def _literal(tp: Any, allowed: tuple[Any, ...]) -> Reader:
    def read(v: Any) -> Any:
        if any(type(v) is type(a) and v == a for a in allowed):
            return v
        raise _fail(tp, v, show=True)

    return read


def _sequence(tp: Any, item: Reader, kind: type) -> Reader:
    def read(v: Any) -> Any:
        if not isinstance(v, list):
            raise _fail(tp)
        try:
            items = [item(x) for x in v]
            return tuple(items) if kind is tuple else items
        except SchemaError as e:
            index = next(i for i, x in enumerate(v) if _fails(item, x))
            raise _inside(index, e) from None

    return read


def _fails(read: Reader, value: Any) -> bool:
    try:
        read(value)
    except SchemaError:
        return True
    return False


def _fixed(tp: Any, items: list[Reader]) -> Reader:
    def read(v: Any) -> Any:
        if not isinstance(v, list) or len(v) != len(items):
            raise _fail(tp)
        try:
            return tuple([item(x) for item, x in zip(items, v, strict=True)])
        except SchemaError as e:
            index = next(i for i, (item, x) in enumerate(zip(items, v, strict=True)) if _fails(item, x))
            raise _inside(index, e) from None

    return read


def _mapping(tp: Any, value: Reader) -> Reader:
    def read(v: Any) -> Any:
        if not isinstance(v, dict):
            raise _fail(tp)
        out = {}
        for k, x in v.items():
            try:
                out[k] = value(x)
            except SchemaError as e:
                raise _inside(k, e) from None
        return out

    return read


def _object(cls: type) -> Reader:
    fields = _fields(cls)
    keys = {key for _, key, _, _ in fields}
    allowed = ", ".join(sorted(keys))
    required = [key for _, key, _, needed in fields if needed]
    readers = [(name, key, _reader(tp)) for name, key, tp, _ in fields]

    def read(v: Any) -> Any:
        if not isinstance(v, dict):
            raise SchemaError("", "must be a JSON object")
        if not keys.issuperset(v):
            raise SchemaError("", f"unknown key {min(set(v) - keys)!r}; allowed keys: {allowed}")
        missing = next((key for key in required if key not in v), None)
        if missing is not None:
            raise SchemaError("", f"missing key {missing!r}")
        given = {}
        for name, key, read_value in readers:
            if key in v:
                try:
                    given[name] = read_value(v[key])
                except SchemaError as e:
                    raise _inside(key, e) from None
        return cls(**given)

    return read


def _fields(cls: type) -> tuple[tuple[str, str, Any, bool], ...]:
    """Each field's (name, JSON key, type, required); read once per class, as its reader is built once."""
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
