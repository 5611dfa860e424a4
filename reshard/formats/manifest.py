"""reshard.json: what a split folder holds and everything merge needs to undo it."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from reshard.errors import InputError, ReshardError
from reshard.formats.checksums import FileRecord, is_digest
from reshard.formats.export import Layout, layout_from_dict, own_layout
from reshard.formats.io import write_durably
from reshard.formats.names import CHECKSUMS, CONFIG_NAME, DEFAULT_CHECKSUM, EARLIER_CHECKSUM, MANIFEST_NAME, NONE, rank_record_name
from reshard.jsonfile import read_json, read_text
from reshard.model.config import TPConfig
from reshard.model.rules import Style
from reshard.plan.cut import Plan, TensorCut, coverage
from reshard.plan.tensor import DTYPE_SIZES
from reshard.schema import Check, Count, NonEmpty, Positive, SchemaError, load

# What the files say they are; the specs below accept only these, and to_dict and rank_record write them.
ManifestFormat = Literal["reshard"]
RankFormat = Literal["reshard-rank"]
Version = Literal[2]
FORMAT: str = get_args(ManifestFormat)[0]
RANK_FORMAT: str = get_args(RankFormat)[0]
VERSION: int = get_args(Version)[0]


@dataclass(frozen=True)
class SourceFile:
    """A file of the checkpoint that was split: enough to tell it again without reading its data."""

    name: str
    bytes: int
    header_sha256: str
    sample_sha256: str  # of 64 blocks spread over its data (checksums.sampled_sha256)
    # How merge writes the file again: how many of the manifest's tensors, in order, it holds, and its
    # __metadata__ where that is not the first file's. Not part of its identity (absent from older manifests).
    tensors: int | None = field(default=None, compare=False)
    metadata: dict[str, str] | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "bytes": self.bytes,
            "header_sha256": self.header_sha256,
            "sample_sha256": self.sample_sha256,
            **({"tensors": self.tensors} if self.tensors is not None else {}),
            **({"metadata": self.metadata} if self.metadata is not None else {}),
        }


@dataclass(frozen=True)
class Manifest:
    tp_config: TPConfig
    family: str
    rank_files: tuple[tuple[str, ...], ...]
    tensors: tuple[TensorCut, ...]
    source_files: tuple[SourceFile, ...]
    source_metadata: dict[str, str]
    source_config: dict[str, Any]
    files: dict[str, FileRecord] = field(default_factory=dict)  # every file of the folder but the manifests
    ranks_present: tuple[int, ...] = ()  # ranks whose record file is in the folder (all, unless extracted with --rank)
    rules: dict[str, Any] | None = None  # the --rules file's JSON, when one shaped the family
    engine_layout: Layout | None = None  # an engine's layout the rank files follow, as recorded; None for reshard's own
    checksum: str = DEFAULT_CHECKSUM  # what the file records hold beside each size: sha256, xxh128 or none
    source_index: SourceIndex | None = None  # the source's index file, when it had one

    @cached_property
    def layout(self) -> Layout:
        """How the rank files name and pack the tensors: the engine's, or reshard's own (built once: it is asked for
        per rank and per tensor)."""
        return self.engine_layout if self.engine_layout is not None else own_layout(self.tensors)

    @property
    def complete(self) -> bool:
        return len(self.ranks_present) == self.tp_config.tp

    def rank_record(self, rank: int) -> dict[str, Any]:
        """The rank's files, bound to this manifest by its sha256: a record (and its files) from another split
        is refused."""
        return {
            "format": RANK_FORMAT,
            "version": VERSION,
            "rank": rank,
            "manifest_sha256": hashlib.sha256(dumps(self.to_dict()).encode()).hexdigest(),
            "files": {name: self.files[name].to_dict() for name in self.rank_files[rank]},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "tp": self.tp_config.num_devices,
            "device_ids": list(self.tp_config.device_ids),
            "family": self.family,
            "checksum": self.checksum,
            **({"rules": self.rules} if self.rules is not None else {}),
            **({"layout": self.engine_layout.to_dict()} if self.engine_layout is not None else {}),
            "ranks": [{"rank": r, "device": self.tp_config.device(r), "files": list(files)} for r, files in enumerate(self.rank_files)],
            "files": {name: r.to_dict() for name, r in self.files.items() if name not in self._rank_names},
            "source": {
                "files": [f.to_dict() for f in self.source_files],
                "metadata": self.source_metadata,
                "config": self.source_config,
                **({"index": self.source_index.to_dict()} if self.source_index is not None else {}),
            },
            "tensors": {t.name: _tensor_entry(t) for t in self.tensors},
        }

    def record_file(self, name: str) -> str:
        """Which manifest file records a file's size and digest."""
        for rank, names in enumerate(self.rank_files):
            if name in names:
                return rank_record_name(rank)
        return MANIFEST_NAME

    @property
    def _rank_names(self) -> set[str]:
        return {name for names in self.rank_files for name in names}

    @classmethod
    def for_plan(
        cls,
        plan: Plan,
        *,
        rank_files: list[list[str]],
        source_files: list[SourceFile],
        metadata: dict[str, str],
        config: dict[str, Any],
        layout: Layout | None = None,
        checksum: str = DEFAULT_CHECKSUM,
        index: SourceIndex | None = None,
    ) -> Manifest:
        return cls(
            tp_config=plan.tp_config,
            family=plan.family,
            rank_files=tuple(tuple(files) for files in rank_files),
            tensors=plan.tensors,
            source_files=tuple(source_files),
            source_metadata=metadata,
            source_config=config,
            rules=plan.rules,
            engine_layout=layout if layout is not None and not layout.own else None,
            checksum=checksum,
            source_index=index,
        )

    def source_groups(self) -> list[tuple[SourceFile, list[TensorCut]]] | None:
        """The source's files, each with its tensors in order, when the manifest records them (merge writes them
        again under their own names); None for a manifest that does not."""
        counts = [f.tensors for f in self.source_files]
        if not counts or None in counts or sum(c or 0 for c in counts) != len(self.tensors):
            return None
        groups, start = [], 0
        for f in self.source_files:
            groups.append((f, list(self.tensors[start : start + (f.tensors or 0)])))
            start += f.tensors or 0
        return groups


@dataclass(frozen=True)
class SourceIndex:
    """The source's index file: its name and its "metadata" (total_size), as transformers writes them."""

    name: str
    metadata: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "metadata": self.metadata}


def _tensor_entry(t: TensorCut) -> dict[str, Any]:
    entry: dict[str, Any] = {"shape": list(t.shape), "dtype": t.dtype, "style": t.style, "dim": t.dim, "rule": t.rule}
    if t.dim is not None:
        entry["slices"] = [[list(r) for r in ranges] for ranges in t.slices]
    if t.parts:
        entry["parts"] = list(t.parts)
    if t.padding:
        entry["padding"] = t.padding
    return entry


def write_manifest(folder: Path, manifest: Manifest, *, ranks: Iterable[int] | None = None) -> None:
    """reshard.json, the same whichever ranks a folder holds, and the record of each rank written here."""
    for rank in range(manifest.tp_config.tp) if ranks is None else ranks:
        write_durably(folder / rank_record_name(rank), dumps(manifest.rank_record(rank)).encode())
    write_durably(folder / MANIFEST_NAME, dumps(manifest.to_dict()).encode())


def dumps(data: dict[str, Any]) -> str:
    """JSON with one line per rank, per source field and per tensor: readable, and diffable line by line."""
    lines = []
    for key, value in data.items():
        head = f"  {json.dumps(key)}: "
        if isinstance(value, dict) and value:
            inner = [f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items()]
            lines.append(head + "{\n" + ",\n".join(inner) + "\n  }")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            inner = [f"    {json.dumps(v)}" for v in value]
            lines.append(head + "[\n" + ",\n".join(inner) + "\n  ]")
        else:
            lines.append(head + json.dumps(value))
    return "{\n" + ",\n".join(lines) + "\n}\n"


def read_manifest(folder: Path) -> Manifest:
    path = Path(folder) / MANIFEST_NAME
    if not os.path.lexists(path):
        raise InputError(f"{folder}: no {MANIFEST_NAME} here; pass a folder written by `reshard split`")
    text = read_text(path, what="manifest", fix="split again")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise InputError(f"{path}: cannot read the manifest as JSON ({e}); split again") from e
    try:
        manifest = _parse(data)
    except SchemaError as e:
        raise InputError(f"{path}: malformed manifest: {e}; split again") from e
    except ReshardError as e:
        raise InputError(f"{path}: {e}") from e
    return _with_rank_records(Path(folder), manifest, hashlib.sha256(text.encode()).hexdigest())


def _with_rank_records(folder: Path, manifest: Manifest, digest: str) -> Manifest:
    """The manifest with the size and digest of the files of every rank whose record is in the folder."""
    files, present = dict(manifest.files), []
    for rank, names in enumerate(manifest.rank_files):
        path = folder / rank_record_name(rank)
        if os.path.lexists(path):
            files |= _rank_record(path, rank, names, digest, manifest.checksum)
            present.append(rank)
    return replace(manifest, files=files, ranks_present=tuple(present))


@dataclass(frozen=True)
class RankRecordSpec:
    format: RankFormat
    version: Version
    rank: Count
    manifest_sha256: str
    files: dict[str, RecordSpec]


def _rank_record(path: Path, rank: int, names: tuple[str, ...], digest: str, checksum: str) -> dict[str, FileRecord]:
    data = read_json(path, what="rank record", fix="split again")
    try:
        spec = load(RankRecordSpec, data)
        if spec.rank != rank:
            raise SchemaError("rank", f"is {spec.rank}, in the record file of rank {rank}")
        if spec.manifest_sha256 != digest:
            raise InputError(f"{path}: belongs to another split (its manifest_sha256 is not this {MANIFEST_NAME}'s); split again")
        if list(spec.files) != list(names):
            raise SchemaError("files", f"lists {list(spec.files)}, {MANIFEST_NAME} lists {list(names)}")
        return {name: r.record(checksum, f"files.{name}") for name, r in spec.files.items()}
    except SchemaError as e:
        raise InputError(f"{path}: malformed rank record: {e}; split again") from e


def _plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name and name.isprintable()


# reshard.json as declared (schema.load reads it); _parse then checks what spans fields and builds the Manifest.
FileName = Annotated[str, Check(_plain_name, "a plain file name inside the split folder", "plain file names inside the split folder")]
Sha256 = Annotated[str, Check(lambda v: is_digest(v, "sha256"), "a sha256 in hex")]
DType = Annotated[str, Check(lambda v: v in DTYPE_SIZES, "a safetensors dtype (" + ", ".join(DTYPE_SIZES) + ")")]


def _slices(value: list[Any]) -> bool:
    return all(
        type(ranges) is list
        and all(type(r) is list and len(r) == 2 and type(r[0]) is int and type(r[1]) is int and 0 <= r[0] < r[1] for r in ranges)
        for ranges in value
    )


# Checked as one value: a manifest holds tp x ranges x 2 of these numbers per tensor, tens of thousands of tensors.
Slices = Annotated[list[Any], Check(_slices, "a list per rank of [start, stop) ranges with 0 <= start < stop")]
Checksum = Annotated[str, Check(lambda v: v in CHECKSUMS, "one of " + ", ".join(CHECKSUMS))]


@dataclass(frozen=True)
class RankSpec:
    rank: Count
    device: str
    files: list[FileName]


@dataclass(frozen=True)
class RecordSpec:
    bytes: Count
    sha256: str | None = None
    xxh128: str | None = None

    def record(self, checksum: str, at: str) -> FileRecord:
        """The record, its digest the one the manifest's checksum names; `at` is where the record is."""
        if checksum == NONE:
            return FileRecord(self.bytes, checksum, "")
        digest = getattr(self, checksum, None)
        if not is_digest(digest, checksum):
            raise SchemaError(f"{at}.{checksum}", f"must be a {checksum} in hex (the manifest's checksum)")
        return FileRecord(self.bytes, checksum, digest)


@dataclass(frozen=True)
class SourceFileSpec:
    name: FileName
    bytes: Count
    header_sha256: Sha256
    sample_sha256: Sha256
    tensors: Count | None = None
    metadata: dict[str, str] | None = None


@dataclass(frozen=True)
class SourceIndexSpec:
    name: FileName
    metadata: dict[str, Any]


@dataclass(frozen=True)
class SourceSpec:
    files: list[SourceFileSpec]
    metadata: dict[str, str]
    config: dict[str, Any]
    index: SourceIndexSpec | None = None


@dataclass(frozen=True)
class TensorEntry:
    shape: tuple[Count, ...]
    dtype: DType
    style: Style
    dim: Count | None
    rule: str | None
    slices: Slices | None = None
    parts: tuple[Count, ...] = ()
    padding: Count = 0


@dataclass(frozen=True)
class ManifestSpec:
    format: ManifestFormat
    version: Version
    tp: Positive
    device_ids: list[Count]
    family: NonEmpty
    ranks: list[RankSpec]
    files: dict[str, RecordSpec]
    source: SourceSpec
    tensors: dict[str, TensorEntry]
    checksum: Checksum = EARLIER_CHECKSUM
    rules: dict[str, Any] | None = None
    layout: dict[str, Any] | None = None


def _parse(data: Any) -> Manifest:
    spec = load(ManifestSpec, data)
    tp_config = TPConfig.create(spec.tp, device_ids=spec.device_ids)
    if [r.rank for r in spec.ranks] != list(range(tp_config.tp)):
        raise SchemaError("ranks", "must list ranks 0..tp-1 in order")
    rank_files = tuple(tuple(r.files) for r in spec.ranks)
    listed = [name for names in rank_files for name in names]
    reserved = {MANIFEST_NAME, CONFIG_NAME, *(rank_record_name(r) for r in range(tp_config.tp))}
    if len(set(listed)) != len(listed) or reserved & set(listed):
        raise SchemaError("ranks", "a rank file is listed twice, or under the name of a manifest or config file")
    tensors = tuple(_tensor(name, e, tp_config.tp) for name, e in spec.tensors.items())
    for name in spec.files:
        if not _plain_name(name):
            raise SchemaError("files", f"file {name!r} must be a plain file name inside the split folder")
    source = spec.source
    return Manifest(
        tp_config=tp_config,
        family=spec.family,
        rank_files=rank_files,
        tensors=tensors,
        source_files=tuple(
            SourceFile(f.name, f.bytes, f.header_sha256, f.sample_sha256, tensors=f.tensors, metadata=f.metadata) for f in source.files
        ),
        source_metadata=source.metadata,
        source_config=source.config,
        files={name: r.record(spec.checksum, f"files.{name}") for name, r in spec.files.items()},
        rules=spec.rules,
        engine_layout=layout_from_dict(spec.layout, tensors) if spec.layout is not None else None,
        checksum=spec.checksum,
        source_index=SourceIndex(source.index.name, source.index.metadata) if source.index is not None else None,
    )


def _tensor(name: str, e: TensorEntry, tp: int) -> TensorCut:
    at = f"tensors.{name}"
    slices: tuple[tuple[tuple[int, int], ...], ...]
    if e.dim is None:
        slices = tuple(((0, 1),) for _ in range(tp))
    else:
        slices = tuple(tuple((a, b) for a, b in ranges) for ranges in e.slices or ())
        if len(slices) != tp or not e.dim < len(e.shape):
            raise SchemaError(at, f"slices must list {tp} ranks and dim must be within its shape")
    cut = TensorCut(name=name, dtype=e.dtype, shape=e.shape, style=e.style, dim=e.dim, rule=e.rule, slices=slices, parts=e.parts)
    if cut.padding != e.padding:
        raise SchemaError(at, f"padding {e.padding} does not match its slices")
    coverage(cut)  # every row or column held by some rank
    return cut
