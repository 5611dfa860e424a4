"""The one reader of a folder written by `reshard split`. Merge, resplit, verify and load_rank all open a split
folder through `SplitFolder` and nothing else, so every one of them checks the same things: the manifest parses,
each rank asked for is there and finished, every file has its recorded size, each rank file's tensors have the
manifest's dtypes and shapes, and, when asked, every file its recorded digest."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from reshard.errors import InputError, shown
from reshard.formats.checksums import BackgroundHashes, HashedReader, file_digest
from reshard.formats.export import build_layout, engine_data
from reshard.formats.io import ByteReader, Progress, ReorderedReader
from reshard.formats.manifest import Manifest, read_manifest
from reshard.formats.names import MANIFEST_NAME, NONE, rank_record_name
from reshard.formats.safetensors import TensorInfo, read_header
from reshard.model.config import ModelConfig
from reshard.plan.build import first_difference, replan
from reshard.plan.cut import Plan, TensorCut


class SplitFolder:
    """A split folder and its manifest; `check` lists what is wrong with it, `require` raises the first problem."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.manifest: Manifest = read_manifest(self.path)
        self._tensors: dict[int, dict[str, TensorInfo]] = {}

    @property
    def tp(self) -> int:
        return self.manifest.tp_config.tp

    def require(self, *, ranks: Sequence[int] | None = None, purpose: str, checksums: bool = False) -> SplitFolder:
        """Check the ranks asked for (every rank by default) and raise InputError at the first problem."""
        problem = next(self.check(ranks=ranks, purpose=purpose, checksums=checksums), None)
        if problem is not None:
            raise InputError(problem)
        return self

    def check(
        self, *, ranks: Sequence[int] | None = None, purpose: str, checksums: bool = False, progress: Progress | None = None
    ) -> Iterator[str]:
        """Every problem with the ranks asked for, in order: unfinished ranks, absent ranks, file sizes, rank-file
        headers against the manifest, and with `checksums` every file's digest (unless none are recorded)."""
        chosen = list(range(self.tp)) if ranks is None else list(ranks)
        yield from self._cuts()
        yield from self.unfinished(chosen)
        yield from self._absent(chosen, purpose, every=ranks is None)
        present = [r for r in chosen if r in self.manifest.ranks_present]
        yield from self._links(self.file_names(present))
        yield from self._sizes(self.file_names(present))
        for rank in present:
            yield from self._headers(rank)
        if checksums:
            yield from self.digest_problems(self.hash_all(self.file_names(present), progress=progress))

    def file_names(self, ranks: Iterable[int]) -> list[str]:
        """The files of these ranks and those every split folder has (config.json), as the manifest lists them."""
        wanted = {name for r in ranks for name in self.manifest.rank_files[r]}
        return [n for n in self.manifest.files if n in wanted or self.manifest.record_file(n) == MANIFEST_NAME]

    def paths(self, ranks: Iterable[int]) -> list[Path]:
        return [self.path / name for name in self.file_names(ranks)]

    def tensor(self, rank: int, name: str) -> TensorInfo:
        """Where a checked rank keeps a tensor."""
        return self._tensors[rank][name]

    def rank_tensors(self, rank: int) -> dict[str, TensorInfo]:
        return self._tensors[rank]

    def readers(self, stack: ExitStack, ranks: Iterable[int]) -> dict[Path, ByteReader]:
        """Readers of the checked ranks' files, open until `stack` closes. Unless the manifest records no checksum,
        each file's digest comes from the very reads made of it, checked by `require_read` once they are done."""
        checksum = self.manifest.checksum
        paths = [self.path / name for r in ranks for name in self.manifest.rank_files[r]]
        return {p: stack.enter_context(ByteReader(p) if checksum == NONE else HashedReader(p, checksum)) for p in paths}

    def reader_threads(self, most: int) -> int:
        """How many threads may read through `readers`: one when they hash what they read (a file's digest
        follows its reads in order), else `most`."""
        return most if self.manifest.checksum == NONE else 1

    def in_file_order(self, cuts: Iterable[TensorCut]) -> list[TensorCut]:
        """The cuts in the order their pieces lie in the rank files, which a reader that hashes as it reads wants."""
        files = self.manifest.rank_files[0]
        return sorted(cuts, key=lambda cut: (files.index(self.tensor(0, cut.name).path.name), self.tensor(0, cut.name).offset))

    def require_read(self, readers: dict[Path, ByteReader], ranks: Iterable[int]) -> None:
        """After an engine has read the ranks' files through `readers`: each file is the one the manifest
        describes, by its recorded digest (the files no reader read, config.json among them, are hashed here)."""
        checksum = self.manifest.checksum
        if checksum == NONE:
            return
        digests = {path: r.hexdigest() for path, r in readers.items() if isinstance(r, HashedReader)}
        digests |= {p: file_digest(p, checksum) or "" for p in self.paths(ranks) if p not in digests}
        self.require_digests(digests)

    def hash_all(self, names: Sequence[str], *, progress: Progress | None = None) -> dict[Path, str]:
        """The digests of the files named that have their recorded size (the others are told by the size check)."""
        paths = [self.path / n for n in names if self._sized(n)]
        digests: dict[Path, str] = {}
        if self.manifest.checksum != NONE:
            with BackgroundHashes(paths, self.manifest.checksum) as hashes:
                digests = hashes.results()
        if progress is not None:
            progress(sum(p.stat().st_size for p in paths))
        return digests

    def digest_problems(self, digests: dict[Path, str]) -> Iterator[str]:
        """The files whose digest is not the recorded one."""
        for name, expected in self.manifest.files.items():
            path = self.path / name
            if path in digests and digests[path] != expected.digest:
                yield f"{path}: {expected.checksum} differs from {self.manifest.record_file(name)}; the file is corrupt, split again"

    def require_digests(self, digests: dict[Path, str]) -> None:
        problem = next(self.digest_problems(digests), None)
        if problem is not None:
            raise InputError(problem)

    def _cuts(self) -> Iterator[str]:
        """Every tensor is cut as the recorded config and rules say: slices edited, swapped or reversed in the
        manifest would rebuild another model."""
        where, manifest = self.path / MANIFEST_NAME, self.manifest
        config = ModelConfig(raw=manifest.source_config)
        try:
            plan = self.replan(rules=manifest.rules)
        except InputError as e:
            yield str(e)
            return
        found = first_difference(manifest.tensors, plan.tensors)
        if found is not None:
            recorded, derived = found
            yield (
                f"{where}: tensor {shown(recorded.name)} is recorded {recorded.describe()}, but the {manifest.family} "
                f"rules cut it {derived.describe()}; the manifest was changed, split again"
            )
        elif not manifest.layout.own:
            yield from self._layout_problems(plan, config)

    def replan(self, *, rules: dict[str, Any] | None) -> Plan:
        """The plan the family's rules (with `rules`, the JSON of a rules file) give for the recorded tensors,
        config, tp and layout: what the recorded cuts are checked against."""
        manifest = self.manifest
        return replan(
            manifest.tensors,
            ModelConfig(raw=manifest.source_config),
            manifest.tp_config,
            family=manifest.family,
            rules=rules,
            where=str(self.path / MANIFEST_NAME),
            vocab_multiple=manifest.layout.vocab_multiple,
        )

    def _layout_problems(self, plan: Plan, config: ModelConfig) -> Iterator[str]:
        """An engine layout is the one reshard makes for this plan: names and packing order included."""
        recorded, where = self.manifest.layout, self.path / MANIFEST_NAME
        if recorded.version != engine_data(recorded.format).version:
            yield f"{where}: made for {recorded.format} {recorded.version}, and this reshard writes {engine_data(recorded.format).version}; split again"
            return
        try:
            derived = build_layout(plan, config, output_format=recorded.format)
        except InputError as e:
            yield f"{where}: {e}"
            return
        if derived.to_dict() != recorded.to_dict():
            yield f"{where}: the {recorded.format} layout is not the one reshard makes for this model; the manifest was changed, split again"

    def _links(self, names: list[str]) -> Iterator[str]:
        """Files are read only inside the folder, and each listed file is a file of its own: no link out of the
        folder, no two names for one file (rank 0 a link to rank 1)."""
        inside = os.path.realpath(self.path)
        seen: dict[tuple[int, int], str] = {}
        for name in names:
            path = self.path / name
            if not os.path.lexists(path):
                continue  # told by the size check
            if os.path.dirname(os.path.realpath(path)) != inside:
                yield f"{path}: links to {os.path.realpath(path)}, outside the split folder; copy the file in, or split again"
                continue
            info = os.stat(path)
            if not stat.S_ISREG(info.st_mode):
                yield f"{path}: is not a regular file; split again"
            elif (key := (info.st_dev, info.st_ino)) in seen:
                yield f"{path}: is the same file as {seen[key]}; every file of a split is its own, split again"
            else:
                seen[key] = name

    def unfinished(self, ranks: Iterable[int]) -> Iterator[str]:
        """Ranks whose files are here without their record: a run that never finished them."""
        for rank in ranks:
            names = self.manifest.rank_files[rank]
            if rank not in self.manifest.ranks_present and any((self.path / n).exists() for n in names):
                yield f"{self.path / rank_record_name(rank)}: missing, so rank {rank}'s files were never finished; split again"

    def _absent(self, ranks: list[int], purpose: str, every: bool) -> Iterator[str]:
        absent = [r for r in ranks if r not in self.manifest.ranks_present]
        if not absent:
            return
        held = f"{', '.join(map(str, self.manifest.ranks_present)) or 'none'} of 0..{self.tp - 1}"
        if every:
            yield (
                f"{self.path}: holds ranks {held}; {purpose} needs every rank: gather the other ranks' files (with "
                "their reshard-rank-N.json) beside them, or split again"
            )
        else:
            yield f"{self.path}: holds ranks {held}, not rank {absent[0]}; {purpose} needs it: split it again with --rank {absent[0]}"

    def _sizes(self, names: list[str]) -> Iterator[str]:
        for name in names:
            path, expected = self.path / name, self.manifest.files[name]
            if not path.is_file():
                yield f"{path}: missing; the split folder is incomplete, split again"
            elif (size := path.stat().st_size) != expected.bytes:
                yield (
                    f"{path}: {size} bytes, but {self.manifest.record_file(name)} records {expected.bytes}; "
                    "the file is truncated or was changed, split again"
                )

    def _sized(self, name: str) -> bool:
        path = self.path / name
        return path.is_file() and path.stat().st_size == self.manifest.files[name].bytes

    def _headers(self, rank: int) -> Iterator[str]:
        """The rank's tensors are exactly the manifest's, with its dtypes and rank shapes."""
        tensors: dict[str, TensorInfo] = {}
        for name in self.manifest.rank_files[rank]:
            path = self.path / name
            if not self._sized(name):
                return  # told by the size check
            try:
                infos = read_header(path).tensors
            except InputError as e:
                yield str(e)
                return
            for info in infos:
                if info.name in tensors:
                    yield f"{path}: tensor {shown(info.name)} is also in another of rank {rank}'s files; split again"
                tensors[info.name] = info
        problems = list(self._against_manifest(rank, tensors))
        yield from problems
        if not problems:
            self._tensors[rank] = self._sources(rank, tensors)

    def _against_manifest(self, rank: int, tensors: dict[str, TensorInfo]) -> Iterator[str]:
        """The rank files hold exactly the layout's tensors, with their dtypes and rank shapes."""
        first = self.path / self.manifest.rank_files[rank][0]
        entries = self.manifest.layout.rank_entries(self.manifest.tensors, rank)
        expected = {name for name, _, _ in entries}
        for extra in [n for n in tensors if n not in expected][:1]:
            yield f"{tensors[extra].path}: tensor {shown(extra)} is not in the manifest; the rank file does not belong to this split"
        for name, dtype, shape in entries:
            info = tensors.get(name)
            if info is None:
                yield f"{first}: tensor {shown(name)} is missing; the split folder is incomplete, split again"
            elif info.dtype != dtype or info.shape != shape:
                yield (
                    f"{info.path}: tensor {shown(name)} is {info.dtype} {list(info.shape)}, the manifest expects "
                    f"{dtype} {list(shape)}; the rank file does not belong to this manifest"
                )

    def _sources(self, rank: int, tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
        """Where each source tensor's slice lies in the rank's files: inside the output tensor that holds it."""
        found = {}
        places = self.manifest.layout.placements(self.manifest.tensors, rank)
        reorders = self.manifest.layout.reorders(self.manifest.tensors, rank)
        for cut in self.manifest.tensors:
            name, offset = places[cut.name]
            out = tensors[name]
            at, size = out.offset + offset, cut.rank_nbytes(rank)
            found[cut.name] = TensorInfo(cut.name, cut.dtype, cut.rank_shape(rank), out.path, at, size, reorders.get(cut.name))
        return found

    def piece_reader(self, readers: dict[Path, ByteReader], info: TensorInfo) -> ByteReader:
        """What reads a rank's slice of a source tensor in its own order from `readers` (see `readers`)."""
        reader = readers[info.path]
        return reader if info.reorder is None else ReorderedReader(reader, info.offset, info.reorder)

    def zeroed(self, rank: int) -> set[str]:
        """The source tensors the rank holds as zeros (an engine that keeps them on rank 0 alone)."""
        return self.manifest.layout.zeroed(rank)
