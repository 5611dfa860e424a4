"""The one validator of reshard's JSON files: each misfit is named by its path and what it must be."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from reshard.schema import Count, NonEmpty, SchemaError, json_key, load


@dataclass(frozen=True)
class Piece:
    into: NonEmpty
    sources: list[NonEmpty] = field(metadata=json_key("from"))


@dataclass(frozen=True)
class Doc:
    name: NonEmpty
    kind: Literal["a", "b", 2]
    size: Count | None = None
    pieces: list[Piece] = field(default_factory=list)
    span: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    match: NonEmpty | list[NonEmpty] = "x"


def test_a_fitting_document_is_read_into_the_dataclasses() -> None:
    doc = load(Doc, {"name": "n", "kind": 2, "pieces": [{"into": "q", "from": ["a", "b"]}], "span": [1, 2], "match": ["m"]})
    assert doc == Doc("n", 2, None, [Piece("q", ["a", "b"])], (1, 2), {}, ["m"])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "must be a JSON object"),
        ({"kind": "a"}, "missing key 'name'"),
        ({"name": "n", "kind": "a", "colour": 1}, "unknown key 'colour'; allowed keys: extra, kind, match, name, pieces, size, span"),
        ({"name": "", "kind": "a"}, "name: must be a non-empty string"),
        ({"name": "n", "kind": "c"}, "kind: must be one of a, b, 2, not 'c'"),
        ({"name": "n", "kind": 2.0}, "kind: must be one of a, b, 2, not 2.0"),
        ({"name": "n", "kind": "a", "size": -1}, "size: must be a non-negative integer"),
        ({"name": "n", "kind": "a", "size": True}, "size: must be a non-negative integer"),
        ({"name": "n", "kind": "a", "pieces": [{"into": "q", "from": ["a", 3]}]}, "pieces[0].from[1]: must be a non-empty string"),
        ({"name": "n", "kind": "a", "pieces": [{"into": "q"}]}, "pieces[0]: missing key 'from'"),
        ({"name": "n", "kind": "a", "span": "12"}, "span: must be a list of integers"),
        ({"name": "n", "kind": "a", "extra": []}, "extra: must be a JSON object of values"),
        ({"name": "n", "kind": "a", "match": 7}, "match: must be a non-empty string or a list of non-empty strings"),
        ({"name": "n", "kind": "a", "match": ["ok", ""]}, "match[1]: must be a non-empty string"),
    ],
)
def test_a_misfit_is_named_by_its_path(data: Any, message: str) -> None:
    with pytest.raises(SchemaError) as e:
        load(Doc, data)
    assert str(e.value) == message
