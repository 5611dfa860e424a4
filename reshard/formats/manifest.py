"""reshard.json: what a split folder holds and everything merge needs to undo it."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from reshard.errors import InputError, ReshardError
from reshard.formats.checksums import FileRecord, is_digest
from reshard.formats.export import Layout, layout_from_dict, own_layout
from reshard.formats.io import write_durably
from reshard.formats.names import CHECKSUMS, CONFIG_NAME, DEFAULT_CHECKSUM, EARLIER_CHECKSUM, MANIFEST_NAME, NONE, rank_record_name
from reshard.jsonfile import read_json, read_text
from reshard.model.config import TPConfig
from reshard.model.rules import STYLES
from reshard.plan.cut import Plan, TensorCut, coverage
from reshard.plan.tensor import DTYPE_SIZES

FORMAT = "reshard"
RANK_FORMAT = "reshard-rank"
VERSION = 2


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
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputError(f"{path}: malformed manifest ({type(e).__name__}: {e}); split again") from e
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


def _rank_record(path: Path, rank: int, names: tuple[str, ...], digest: str, checksum: str) -> dict[str, FileRecord]:
    data = read_json(path, what="rank record", fix="split again")
    try:
        if not isinstance(data, dict):
            raise ValueError("the rank record must be a JSON object")
        if data.get("format") != RANK_FORMAT or data.get("version") != VERSION or data.get("rank") != rank:
            raise ValueError(f"expected format {RANK_FORMAT!r} version {VERSION} for rank {rank}")
        if data.get("manifest_sha256") != digest:
            raise InputError(f"{path}: belongs to another split (its manifest_sha256 is not this {MANIFEST_NAME}'s); split again")
        if list(data["files"]) != list(names):
            raise ValueError(f"lists {list(data['files'])}, {MANIFEST_NAME} lists {list(names)}")
        return {name: _file_record(r, checksum) for name, r in data["files"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputError(f"{path}: malformed rank record ({type(e).__name__}: {e}); split again") from e


def _parse(data: Any) -> Manifest:
    if not isinstance(data, dict):
        raise ValueError("the manifest must be a JSON object")
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ValueError(f"expected format {FORMAT!r} version {VERSION}, found {data.get('format')!r} {data.get('version')!r}")
    tp_config = TPConfig.create(int(data["tp"]), device_ids=[int(i) for i in data["device_ids"]])
    ranks = data["ranks"]
    if [r["rank"] for r in ranks] != list(range(tp_config.tp)):
        raise ValueError("ranks must list 0..tp-1 in order")
    rank_files = tuple(tuple(_relative(f) for f in r["files"]) for r in ranks)
    listed = [name for names in rank_files for name in names]
    reserved = {MANIFEST_NAME, CONFIG_NAME, *(rank_record_name(r) for r in range(tp_config.tp))}
    if len(set(listed)) != len(listed) or reserved & set(listed):
        raise ValueError("a rank file is listed twice, or under the name of a manifest or config file")
    rules = data.get("rules")
    if rules is not None and not isinstance(rules, dict):
        raise ValueError("rules must be the JSON object of a rules file")
    tensors = tuple(_parse_tensor(name, e, tp_config.tp) for name, e in data["tensors"].items())
    source = data["source"]
    checksum = data.get("checksum", EARLIER_CHECKSUM)
    if checksum not in CHECKSUMS:
        raise ValueError(f"checksum {checksum!r} is not one of {', '.join(CHECKSUMS)}")
    files = {_relative(name, "file"): _file_record(r, checksum) for name, r in data["files"].items()}
    return Manifest(
        tp_config=tp_config,
        family=str(data["family"]),
        rank_files=rank_files,
        tensors=tensors,
        source_files=tuple(_source_file(f) for f in source["files"]),
        source_metadata={str(k): str(v) for k, v in source["metadata"].items()},
        source_config=dict(source["config"]),
        files=files,
        rules=rules,
        engine_layout=layout_from_dict(data["layout"], tensors) if "layout" in data else None,
        checksum=checksum,
        source_index=_source_index(source["index"]) if "index" in source else None,
    )


def _source_file(f: dict[str, Any]) -> SourceFile:
    metadata = f.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ValueError(f"source file {f['name']!r}: metadata must map names to strings")
    return SourceFile(
        _relative(f["name"], "source file"),
        _count(f["bytes"]),
        _hex(f["header_sha256"]),
        _hex(f["sample_sha256"]),
        tensors=_count(f["tensors"]) if "tensors" in f else None,
        metadata=metadata,
    )


def _source_index(data: dict[str, Any]) -> SourceIndex:
    if not isinstance(data.get("metadata"), dict):
        raise ValueError("source index: metadata must be a JSON object")
    return SourceIndex(_relative(data["name"], "source index"), dict(data["metadata"]))


def _relative(name: object, what: str = "rank file") -> str:
    """A file of the split folder: a plain name beside the manifest, never a path."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or not name.isprintable():
        raise ValueError(f"{what} {name!r} must be a plain file name inside the split folder")
    return name


def _count(value: object) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{value!r} is not a non-negative integer (a size or a count)")
    return value


def _hex(value: object, checksum: str = "sha256") -> str:
    if not is_digest(value, checksum):
        raise ValueError(f"{value!r} is not a {checksum} in hex")
    return value


def _file_record(data: dict[str, Any], checksum: str) -> FileRecord:
    return FileRecord(_count(data["bytes"]), checksum, "" if checksum == NONE else _hex(data[checksum], checksum))


def _parse_tensor(name: str, e: dict[str, Any], tp: int) -> TensorCut:
    dtype, style, dim = e["dtype"], e["style"], e["dim"]
    shape = tuple(int(d) for d in e["shape"])
    if dtype not in DTYPE_SIZES or style not in STYLES:
        raise ValueError(f"tensor {name}: unknown dtype {dtype!r} or style {style!r}")
    slices: tuple[tuple[tuple[int, int], ...], ...]
    if dim is None:
        slices = tuple(((0, 1),) for _ in range(tp))
    else:
        slices = tuple(tuple((int(a), int(b)) for a, b in ranges) for ranges in e["slices"])
        if len(slices) != tp or not 0 <= dim < len(shape):
            raise ValueError(f"tensor {name}: slices must list {tp} ranks and dim must be within its shape")
    parts = tuple(int(p) for p in e.get("parts", ()))
    if any(not 0 <= a < b for ranges in slices for a, b in ranges):
        raise ValueError(f"tensor {name}: every slice must be [start, stop) with 0 <= start < stop")
    cut = TensorCut(name=name, dtype=dtype, shape=shape, style=style, dim=dim, rule=e.get("rule"), slices=slices, parts=parts)
    if cut.padding != int(e.get("padding", 0)):
        raise ValueError(f"tensor {name}: padding {e.get('padding', 0)} does not match its slices")
    coverage(cut)  # every row or column held by some rank
    return cut
