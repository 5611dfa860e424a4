"""The cut of one tensor, the plan of a whole checkpoint, and the one range walk over a cut.

`rank_spans` says which stretches of the cut dim a rank holds (kv-head replicas and zero padding included) and
`coverage` where each stretch of the full tensor can be read back from. Split, merge, resplit, verify and the
forward check all call these two; nothing else computes ranges.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, NamedTuple

from reshard.errors import InputError
from reshard.model.config import TPConfig
from reshard.plan.tensor import DTYPE_SIZES, tensor_nbytes

Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class TensorCut:
    """How one tensor is cut: per rank, the [start, stop) ranges along `dim` it receives, in order.

    A replicated tensor has dim None and is treated as one unit that every rank receives whole, so split and
    merge need no special case for it. Ranges past the end of the dim are zero padding.
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
    def length(self) -> int:
        """The cut dim's length; 1 for a replicated tensor (one unit)."""
        return 1 if self.dim is None else self.shape[self.dim]

    @property
    def padding(self) -> int:
        """Zero rows or columns appended along dim so that every rank gets as many (vocabulary padding)."""
        return max(0, max(b for ranges in self.slices for _, b in ranges) - self.length)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)

    @property
    def geometry(self) -> tuple[int, int, int]:
        """The tensor seen as [outer, length, inner bytes] around the cut dim."""
        if self.dim is None:
            return 1, 1, self.nbytes
        inner = math.prod(self.shape[self.dim + 1 :]) * DTYPE_SIZES[self.dtype]
        return math.prod(self.shape[: self.dim]), self.shape[self.dim], inner

    @property
    def replicas(self) -> int:
        """How many ranks hold each piece: above 1 when kv heads are replicated."""
        holders = Counter(r for ranges in self.slices for r in ranges)
        return max(holders.values())

    def rank_shape(self, rank: int) -> tuple[int, ...]:
        if self.dim is None:
            return self.shape
        held = sum(span.length for span in rank_spans(self, rank))
        return (*self.shape[: self.dim], held, *self.shape[self.dim + 1 :])

    def rank_nbytes(self, rank: int) -> int:
        return tensor_nbytes(self.dtype, self.rank_shape(rank))

    def same_cut(self, other: TensorCut) -> bool:
        """Cut the same way: the style, dim, packing and every rank's ranges (the rule's name may differ)."""
        return (self.style, self.dim, self.slices, self.parts) == (other.style, other.dim, other.slices, other.parts)

    def describe(self) -> str:
        """The cut in a few words, for an error line."""
        if self.dim is None:
            return "replicated"
        return f"{self.style} on dim {self.dim} with slices {[list(map(list, r)) for r in self.slices]}"


def replicated(name: str, dtype: str, shape: tuple[int, ...], tp: int, rule: str | None) -> TensorCut:
    return TensorCut(name, dtype, shape, "replicate", None, rule, tuple(((0, 1),) for _ in range(tp)))


class Span(NamedTuple):
    """A stretch of the cut dim that a rank holds."""

    start: int  # along the cut dim of the full tensor (past its end for padding)
    stop: int
    at: int  # where the stretch begins in the rank's piece, along the same dim
    zeros: bool  # padding past the tensor's end: no source bytes, zeros on the rank

    @property
    def length(self) -> int:
        return self.stop - self.start


def rank_spans(cut: TensorCut, rank: int) -> tuple[Span, ...]:
    """The stretches of the cut dim rank `rank` holds, in the order it stores them; padding as spans of zeros."""
    length = cut.length
    spans: list[Span] = []
    at = 0
    for a, b in cut.slices[rank]:
        if a < length:
            stop = min(b, length)
            spans.append(Span(a, stop, at, False))
            at += stop - a
        if b > length:
            start = max(a, length)
            spans.append(Span(start, b, at, True))
            at += b - start
    return tuple(spans)


class Piece(NamedTuple):
    """A stretch of the full cut dim and where one copy of it is stored."""

    start: int
    stop: int
    rank: int
    at: int  # position in that rank's piece, along the dim


def coverage(cut: TensorCut) -> tuple[Piece, ...]:
    """The full cut dim, front to back, each stretch read from the first rank holding it: kv-head replicas are
    read once and padding never. Raises InputError when the ranks do not hold all of it."""
    held = sorted(
        (Piece(s.start, s.stop, rank, s.at) for rank in range(len(cut.slices)) for s in rank_spans(cut, rank) if not s.zeros),
        key=lambda p: (p.start, p.rank),
    )
    pieces: list[Piece] = []
    done = 0
    for piece in held:
        if piece.stop <= done:
            continue
        if piece.start > done:
            break
        pieces.append(Piece(done, piece.stop, piece.rank, piece.at + done - piece.start))
        done = piece.stop
    if done != cut.length:
        raise InputError(f"tensor {cut.name}: the ranks hold {done} of its {cut.length} along dim {cut.dim}")
    return tuple(pieces)


@dataclass(frozen=True)
class Plan:
    family: str
    tp_config: TPConfig
    tensors: tuple[TensorCut, ...]  # in the source's data order
    rules: dict[str, Any] | None = None  # the --rules file's JSON, when one shaped the family

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
            "tensors": [_tensor_dict(t) for t in self.tensors],
            "ranks": [{"rank": r, "device": self.tp_config.device(r), "bytes": self.rank_nbytes(r)} for r in range(self.tp)],
        }


def _tensor_dict(t: TensorCut) -> dict[str, Any]:
    return {
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
