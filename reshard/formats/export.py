"""Output layouts: how the tensors of a plan are named and packed in the rank files.

reshard's own layout keeps every source tensor under its own name. An engine's layout (vLLM's sharded_state,
from engines/vllm.json) is a name and concatenation map on top of the same cuts: a rank's `qkv_proj.weight` is
its q, k and v slices one after another, a tied embedding is stored under the name the engine keeps, and a few
constant tensors the engine registers (attention scales) are added. The bytes of every source tensor's slice are
still written by the one split engine, each at its place inside the output tensor that holds it."""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from functools import cache
from importlib import resources
from typing import Any, Literal, get_args

from reshard.errors import InputError, shown
from reshard.formats.io import Reorder
from reshard.model.config import ModelConfig
from reshard.model.rules import compile_patterns
from reshard.plan.build import SCALE_SUFFIXES
from reshard.plan.cut import Plan, TensorCut
from reshard.plan.tensor import DTYPE_SIZES
from reshard.schema import Count, NonEmpty, Positive, SchemaError, json_key, load

EngineFormat = Literal["vllm"]  # the engines with a layouts file in engines/
FORMATS: tuple[str, ...] = ("reshard", *get_args(EngineFormat))
_PACK = {"F32": "<f", "F64": "<d", "F16": "<e", "BF16": "<f"}  # bfloat16: the high half of the float32


def _packed(dtype: str, value: float) -> bytes:
    data = struct.pack(_PACK[dtype], value)
    return data[2:] if dtype == "BF16" else data


@dataclass(frozen=True)
class OutTensor:
    """A tensor of every rank file: the source tensors whose rank slices it holds, back to back along dim 0,
    or a constant (no pieces) of the given dtype, shape and value."""

    name: str
    dtype: str
    pieces: tuple[str, ...]
    shape: tuple[int, ...] = ()  # a constant's shape
    value: float = 0.0  # a constant's value
    stack: int = 0  # when above 0: the pieces are this many equal groups stacked along a new leading dim (experts)
    flat: bool = False  # scalar pieces held as one vector of them (a fused layer's per-tensor scales)
    transpose: bool = False  # the one piece held with its last two dims swapped (experts stored [out, in])
    halves: tuple[str, ...] = ()  # pieces whose rows are held per head as rotary halves (even rows, then odd)
    head_rows: int = 0  # the rows of one head, for `halves`
    first_rank_only: bool = False  # the one (replicated) piece held by rank 0, zeros on every other rank

    def to_dict(self) -> dict[str, Any]:
        if self.pieces == (self.name,) and not (self.flat or self.transpose or self.first_rank_only):
            return {"name": self.name}
        if self.pieces:
            return {
                "name": self.name,
                "from": list(self.pieces),
                **({"stack": self.stack} if self.stack else {}),
                **({"flat": True} if self.flat else {}),
                **({"transpose": True} if self.transpose else {}),
                **({"halves": list(self.halves), "head_rows": self.head_rows} if self.halves else {}),
                **({"first_rank_only": True} if self.first_rank_only else {}),
            }
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "value": self.value}

    def constant_bytes(self) -> bytes:
        return _packed(self.dtype, self.value) * math.prod(self.shape)


@dataclass(frozen=True)
class Layout:
    format: str  # "reshard" or "vllm"
    version: str | None  # the engine version whose loader it targets
    tensors: tuple[OutTensor, ...]
    vocab_multiple: int | None = None

    @property
    def own(self) -> bool:
        return self.format == "reshard"

    def rank_entries(self, tensors: Sequence[TensorCut], rank: int) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) of every tensor of the rank's files, in order."""
        cuts = {t.name: t for t in tensors}
        return [(out.name, out.dtype, rank_shape(out, cuts, rank)) for out in self.tensors]

    def placements(self, tensors: Sequence[TensorCut], rank: int) -> dict[str, tuple[str, int]]:
        """Where each source tensor's slice goes on a rank: (output tensor, byte offset inside it)."""
        cuts = {t.name: t for t in tensors}
        found: dict[str, tuple[str, int]] = {}
        for out in self.tensors:
            at = 0
            for piece in out.pieces:
                found[piece] = (out.name, at)
                at += cuts[piece].rank_nbytes(rank)
        return found

    def reorders(self, tensors: Sequence[TensorCut], rank: int) -> dict[str, Reorder]:
        """The source tensors whose rank slices are stored in another order than theirs, and how."""
        cuts = {t.name: t for t in tensors}
        found: dict[str, Reorder] = {}
        for out in self.tensors:
            if out.transpose:
                shape = cuts[out.pieces[0]].rank_shape(rank)
                found[out.pieces[0]] = Reorder("transpose", shape[-2], shape[-1], DTYPE_SIZES[out.dtype])
            for piece in out.halves:
                shape = cuts[piece].rank_shape(rank)
                found[piece] = Reorder("halves", out.head_rows, math.prod(shape[1:]), DTYPE_SIZES[out.dtype])
        return found

    def zeroed(self, rank: int) -> set[str]:
        """The source tensors the rank holds as zeros (held by rank 0 alone)."""
        return {out.pieces[0] for out in self.tensors if out.first_rank_only} if rank else set()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "version": self.version,
            "vocab_multiple": self.vocab_multiple,
            "tensors": [out.to_dict() for out in self.tensors],
        }


def rank_shape(out: OutTensor, cuts: dict[str, TensorCut], rank: int) -> tuple[int, ...]:
    if not out.pieces:
        return out.shape
    shapes = [cuts[p].rank_shape(rank) for p in out.pieces]
    if out.flat:
        return (len(shapes),)
    if out.transpose:
        return (*shapes[0][:-2], shapes[0][-1], shapes[0][-2])
    if len(shapes) == 1 and not out.stack:
        return shapes[0]
    length = sum(s[0] for s in shapes)
    if out.stack:
        return (out.stack, length // out.stack, *shapes[0][1:])
    return (length, *shapes[0][1:])


# engines/<format>.json as declared (schema.load reads it, once per format).
@dataclass(frozen=True)
class Packs:
    """Tensors packed under one name: `from` back to back along dim 0 (`#` in a stack: each expert in turn)."""

    into: NonEmpty
    sources: list[NonEmpty] = field(metadata=json_key("from"))


@dataclass(frozen=True)
class ConstantSpec:
    """A tensor the engine registers that no checkpoint holds: one beside each match of `beside`, of `dtype` or
    of the dtype of the tensor `like` names in the same layer."""

    name: NonEmpty
    beside: NonEmpty
    value: float
    like: NonEmpty | None = None
    dtype: NonEmpty | None = None
    shape: list[Count] = field(default_factory=list)


@dataclass(frozen=True)
class LayoutPart:
    """Parts of a layout, shared by several (the file's `parts`) or a layout's own."""

    fuse: list[Packs] = field(default_factory=list)
    stack: list[Packs] = field(default_factory=list)
    constants: list[ConstantSpec] = field(default_factory=list)
    tied: dict[str, NonEmpty] = field(default_factory=dict)
    transpose: list[Packs] = field(default_factory=list)
    rotary_halves: list[NonEmpty] = field(default_factory=list)
    first_rank_only: list[Packs] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class EngineLayout(LayoutPart):
    """The layout of the model types listed, of one reshard family; `use` names the shared parts it includes."""

    family: NonEmpty
    model_types: list[NonEmpty]
    use: list[NonEmpty] = field(default_factory=list)


@dataclass(frozen=True)
class QuantizationSpec:
    constants: list[ConstantSpec] = field(default_factory=list)
    formats: list[NonEmpty] | None = None  # the quantization's formats the layout describes (None: any)


@dataclass(frozen=True)
class EngineSpec:
    engine: NonEmpty
    version: NonEmpty
    loader: NonEmpty
    vocab_multiple: Positive
    notes: str
    kv_cache_scales: list[NonEmpty]
    linear_parameters: list[NonEmpty]
    quantization: dict[str, QuantizationSpec]
    parts: dict[str, LayoutPart]
    layouts: dict[str, EngineLayout]


@cache
def engine_data(name: str) -> EngineSpec:
    """The engine's layouts file, checked (read once; not to be changed)."""
    path = resources.files("reshard.formats") / "engines" / f"{name}.json"
    try:
        return load(EngineSpec, json.loads(path.read_text(encoding="utf-8")))
    except SchemaError as e:
        raise InputError(f"reshard/formats/engines/{name}.json: {e}; reinstall reshard") from e


def vocab_multiple(output_format: str) -> int | None:
    """How the format pads the vocabulary before dividing it by tp (None: to a multiple of tp)."""
    return None if output_format == "reshard" else engine_data(output_format).vocab_multiple


@cache
def engine_layouts(output_format: str) -> dict[str, EngineLayout]:
    """The engine's layouts, each with the parts it uses folded in (read once; not to be changed)."""
    data = engine_data(output_format)
    found: dict[str, EngineLayout] = {}
    for name, spec in data.layouts.items():
        unknown = [p for p in spec.use if p not in data.parts]
        if unknown:
            raise InputError(f"reshard/formats/engines/{output_format}.json: layouts.{name}.use: no part {unknown[0]!r}; reinstall reshard")
        parts: list[LayoutPart] = [*(data.parts[p] for p in spec.use), spec]
        found[name] = EngineLayout(
            family=spec.family,
            model_types=spec.model_types,
            **{f.name: _folded([getattr(part, f.name) for part in parts]) for f in fields(LayoutPart)},
        )
    return found


def _folded(values: list[Any]) -> Any:
    """The parts' lists one after another, or their maps one over another."""
    if values and isinstance(values[0], dict):
        return {k: v for value in values for k, v in value.items()}
    return [item for value in values for item in value]


def model_types_with_layout(output_format: str) -> list[str]:
    return sorted(t for spec in engine_layouts(output_format).values() for t in spec.model_types)


def build_layout(plan: Plan, config: ModelConfig, *, output_format: str) -> Layout:
    """The layout of `output_format` for this plan; an engine layout refuses a model type it was not proven with and a
    quantization it does not describe."""
    if output_format == "reshard":
        return own_layout(plan.tensors)
    data = engine_data(output_format)
    layouts = engine_layouts(output_format)
    spec = next((s for s in layouts.values() if s.family == plan.family and config.model_type in s.model_types), None)
    if spec is None:
        what = f"model_type {config.model_type or 'none'!r} ({plan.family} family)"
        raise InputError(
            f"--format {output_format}: {what} has no {output_format} {data.version} layout in reshard; model types with one: "
            f"{', '.join(model_types_with_layout(output_format))} (split with the default format instead)"
        )
    quantization = _quantization(plan, config, output_format)
    constants = spec.constants + (quantization.constants if quantization is not None else [])
    tensors = _engine_tensors(plan, config, replace(spec, constants=constants), tuple(data.linear_parameters))
    return Layout(output_format, data.version, tensors, data.vocab_multiple)


def _quantization(plan: Plan, config: ModelConfig, output_format: str) -> QuantizationSpec | None:
    """What the engine layout adds for the checkpoint's quantization (None for none); a quantization it does not
    describe is refused by name."""
    data = engine_data(output_format)
    quant = config.raw.get("quantization_config")
    kv = next((t.name for t in plan.tensors if t.name.endswith(tuple(data.kv_cache_scales))), None)
    if kv is not None:
        raise InputError(
            f"--format {output_format}: tensor {shown(kv)} is a kv-cache scale, and reshard has no {output_format} {data.version} layout for "
            "quantized kv caches (split with the default format instead)"
        )
    scaled = next((t.name for t in plan.tensors if t.name.endswith(SCALE_SUFFIXES)), None)
    if not isinstance(quant, dict):
        if scaled is not None:
            raise InputError(
                f"--format {output_format}: tensor {shown(scaled)} is a quantization scale, but config.json has no quantization_config; "
                "add the one the checkpoint was made with, or split with the default format"
            )
        return None
    method = str(quant.get("quant_method", "unknown"))
    known = data.quantization.get(method)
    if known is None:
        raise InputError(
            f"--format {output_format}: quantization {method!r} (config.json quantization_config) has no {output_format} {data.version} layout "
            f"in reshard; quantizations with one: {', '.join(sorted(data.quantization))} (split with the default format instead)"
        )
    given = quant.get("format")
    if known.formats is not None and given not in known.formats:
        raise InputError(
            f"--format {output_format}: {method} format {given!r} has no {output_format} {data.version} layout in reshard; formats with one: "
            f"{', '.join(known.formats)} (split with the default format instead)"
        )
    if quant.get("kv_cache_scheme"):
        raise InputError(
            f"--format {output_format}: config.json quantization_config has a kv_cache_scheme, and reshard has no {output_format} "
            f"{data.version} layout for quantized kv-cache scales (split with the default format instead)"
        )
    return known


def _engine_tensors(plan: Plan, config: ModelConfig, spec: EngineLayout, linear: tuple[str, ...]) -> tuple[OutTensor, ...]:
    names = [t.name for t in plan.tensors]
    dtypes = {t.name: t.dtype for t in plan.tensors}
    shapes = {t.name: t.shape for t in plan.tensors}
    transposed, first_rank = _fusions(names, spec.transpose), _fusions(names, spec.first_rank_only)
    fused = _fusions(names, _with_linear_parameters(spec.fuse, linear)) | _stacks(names, _with_linear_parameters(spec.stack, linear))
    fused |= transposed | first_rank
    renamed = dict(spec.tied) if config.raw.get("tie_word_embeddings") else {}
    stored = _Storage(set(transposed), set(first_rank), spec.rotary_halves, config)
    out: list[OutTensor] = []
    done: set[str] = set()
    for name in names:
        if name in done:
            continue
        into, pieces, stack = fused.get(name, (renamed.get(name, name), (name,), 0))
        if len({dtypes[p] for p in pieces}) > 1:
            raise InputError(f"tensor {pieces[0]}: {into} packs tensors of different dtypes; convert the checkpoint to one dtype")
        if into in names and into not in pieces:
            raise InputError(f"tensor {name}: its layout name {into} is another tensor of the checkpoint; split with the default format")
        # A linear layer's per-tensor scales (one value each) are held as a vector of one value per fused part.
        flat = into.endswith(tuple(f".{p}" for p in linear)) and all(len(shapes[p]) == 0 for p in pieces) and not stack
        out.append(OutTensor(into, dtypes[name], pieces, stack=stack, flat=flat, **stored.flags(into, pieces, shapes)))
        done |= set(pieces)
    for constant in spec.constants:
        out += _constants(names, dtypes, constant)
    return tuple(out)


class _Storage:
    """Which pieces an engine layout stores otherwise than as cut: transposed, on rank 0 alone, as rotary halves."""

    def __init__(self, transposed: set[str], first_rank: set[str], rotary: list[str], config: ModelConfig) -> None:
        self._transposed, self._first_rank, self._config = transposed, first_rank, config
        self._rotary = compile_patterns(tuple(rotary)) if rotary else None

    def flags(self, into: str, pieces: tuple[str, ...], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
        name = pieces[0]
        if name in self._transposed and len(shapes[name]) < 2:
            raise InputError(f"tensor {name}: {into} holds it transposed, and it has fewer than 2 dims; split with the default format")
        rotary = self._rotary
        halves = tuple(p for p in pieces if rotary.fullmatch(p) and len(shapes[p]) >= 1 and shapes[p][0] > 1) if rotary else ()
        return {
            "transpose": name in self._transposed,
            "first_rank_only": name in self._first_rank,
            "halves": halves,
            "head_rows": _head_rows(self._config) if halves else 0,
        }


def _head_rows(config: ModelConfig) -> int:
    """The rows of one attention head (head_dim, or hidden_size / num_attention_heads)."""
    raw = config.raw
    rows = raw.get("head_dim") or raw.get("hidden_size", 0) // max(1, raw.get("num_attention_heads", 1))
    if not isinstance(rows, int) or rows < 2 or rows % 2:
        raise InputError(f"{config.name}: head_dim ({rows}) must be an even number of rows for rotary halves; check config.json")
    return rows


def _swap(name: str, suffix: str) -> str:
    return name[: -len("weight")] + suffix


def _with_linear_parameters(rules: list[Packs], linear: tuple[str, ...]) -> list[Packs]:
    """Each rule packing `.weight` tensors, and the same rule for each quantization parameter of those layers."""
    found = list(rules)
    for rule in rules:
        if rule.into.endswith(".weight") and all(p.endswith(".weight") for p in rule.sources):
            found += [Packs(_swap(rule.into, suffix), [_swap(p, suffix) for p in rule.sources]) for suffix in linear]
    return found


Packing = dict[str, tuple[str, tuple[str, ...], int]]  # source tensor -> (output name, its pieces, stacked groups)


def _stacks(names: list[str], rules: list[Packs]) -> Packing:
    """Experts stacked along a new leading dim: for each match of `into`'s `*` (the layer), every expert `#` in
    numeric order, each expert's `from` tensors back to back."""
    found: Packing = {}
    for rule in rules:
        first = rule.sources[0]
        groups: dict[tuple[str, ...], dict[int, tuple[str, ...]]] = {}
        pattern = re.compile(re.escape(first).replace(r"\*", "([^.]+)").replace("\\#", "([0-9]+)"))
        for name in names:
            match = pattern.fullmatch(name)
            if match is None:
                continue
            *layer, expert = match.groups()
            group = tuple(_fill(p.replace("#", expert), layer) for p in rule.sources)
            groups.setdefault(tuple(layer), {})[int(expert)] = group
        for key, experts in groups.items():
            stars = list(key)
            if sorted(experts) != list(range(len(experts))):
                raise InputError(f"{_fill(rule.into, stars)}: experts {sorted(experts)} are not numbered 0..{len(experts) - 1}")
            pieces = tuple(p for e in sorted(experts) for p in experts[e])
            missing = [p for p in pieces if p not in set(names)]
            if missing:
                raise InputError(f"tensor {missing[0]} is missing, and {_fill(rule.into, stars)} needs it")
            found |= {p: (_fill(rule.into, stars), pieces, len(experts)) for p in pieces}
    return found


def _fusions(names: list[str], rules: list[Packs]) -> Packing:
    """For every source tensor of a fused group: the output name and the group, in the rule's order."""
    present = set(names)
    found: Packing = {}
    for rule in rules:
        first = compile_patterns((rule.sources[0],))
        for name in names:
            match = first.fullmatch(name)
            if match is None:
                continue
            stars = list(match.groups())
            group = tuple(_fill(p, stars) for p in rule.sources)
            if all(p in present for p in group):
                found |= {p: (_fill(rule.into, stars), group, 0) for p in group}
            elif any(p in present for p in group[1:]):
                missing = next(p for p in group if p not in present)
                raise InputError(f"tensor {missing} is missing, and {_fill(rule.into, stars)} needs it")
    return found


def _constants(names: list[str], dtypes: dict[str, str], spec: ConstantSpec) -> list[OutTensor]:
    """A constant beside each match of `beside`: of `dtype`, or of the dtype of the tensor `like` names in the same
    layer (a buffer vLLM registers in the model's dtype)."""
    beside = compile_patterns((spec.beside,))
    found = []
    for match in (beside.fullmatch(name) for name in names):
        if match is None:
            continue
        stars = list(match.groups())
        dtype = spec.dtype if spec.dtype is not None else dtypes.get(_fill(spec.like or "", stars), "")
        if dtype not in _PACK or dtype not in DTYPE_SIZES:
            raise InputError(f"engine layout: constant {_fill(spec.name, stars)} would be {dtype or 'of no dtype'}, which is not supported")
        found.append(OutTensor(_fill(spec.name, stars), dtype, (), tuple(spec.shape), spec.value))
    return found


def _fill(pattern: str, stars: list[str]) -> str:
    parts = pattern.split("*")
    return parts[0] + "".join(star + part for star, part in zip(stars, parts[1:], strict=True))


def own_layout(tensors: Sequence[TensorCut]) -> Layout:
    """reshard's own layout: every source tensor under its own name."""
    return Layout("reshard", None, tuple(OutTensor(t.name, t.dtype, (t.name,)) for t in tensors))


@dataclass(frozen=True)
class OutRecord:
    """A tensor of a recorded layout (OutTensor.to_dict): source tensors under a name, or a constant."""

    name: NonEmpty
    sources: list[NonEmpty] | None = field(default=None, metadata=json_key("from"))
    stack: Count = 0
    flat: bool = False
    transpose: bool = False
    first_rank_only: bool = False
    halves: list[NonEmpty] = field(default_factory=list)
    head_rows: Count = 0
    dtype: NonEmpty | None = None
    shape: list[Count] | None = None
    value: float | None = None


@dataclass(frozen=True)
class LayoutRecord:
    """An engine layout as a manifest records it (Layout.to_dict)."""

    format: EngineFormat
    version: NonEmpty
    tensors: list[OutRecord]
    vocab_multiple: Positive | None = None


def layout_from_dict(data: Any, tensors: Sequence[TensorCut]) -> Layout:
    """A manifest's layout (None: reshard's own), in its recorded order; raises SchemaError (its path inside the
    layout) for one that does not hold every tensor of the manifest exactly once."""
    if data is None:
        return own_layout(tensors)
    try:
        record = load(LayoutRecord, data)
    except SchemaError as e:
        raise SchemaError(f"layout.{e.at}" if e.at else "layout", e.problem) from None
    dtypes = {t.name: t.dtype for t in tensors}
    out: list[OutTensor] = []
    for i, entry in enumerate(record.tensors):
        if entry.dtype is not None:
            if entry.shape is None or entry.value is None or entry.dtype not in _PACK:
                raise SchemaError(f"layout.tensors[{i}]", "a constant needs a dtype of " + ", ".join(_PACK) + ", a shape and a value")
            out.append(OutTensor(entry.name, entry.dtype, (), tuple(entry.shape), entry.value))
            continue
        pieces = tuple(entry.sources) if entry.sources is not None else (entry.name,)
        if pieces[0] not in dtypes:
            raise SchemaError(f"layout.tensors[{i}]", f"holds {pieces[0]!r}, which is not a tensor of the manifest")
        out.append(
            OutTensor(
                entry.name,
                dtypes[pieces[0]],
                pieces,
                stack=entry.stack,
                flat=entry.flat,
                transpose=entry.transpose,
                first_rank_only=entry.first_rank_only,
                halves=tuple(entry.halves),
                head_rows=entry.head_rows,
            )
        )
    held = [p for o in out for p in o.pieces]
    if sorted(held) != sorted(dtypes):
        raise SchemaError("layout", "must hold every tensor of the manifest exactly once")
    return Layout(record.format, record.version, tuple(out), record.vocab_multiple)
