"""What a split reads from: a checkpoint, or a split folder of any tp seen as the checkpoint it was split from.

Either way each tensor is offered to the split engine as full rows along its cut dim: as runs of bytes in files
(copied in the kernel) or as blocks of whole rows (gathered in memory). From a split folder, a row is stitched
from the rank files that hold its pieces (`coverage`), as merge does, without the merged checkpoint being written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from reshard.engine.workers import WORKERS
from reshard.errors import InputError
from reshard.formats.checkpoint import Checkpoint, open_checkpoint
from reshard.formats.checksums import sampled_sha256
from reshard.formats.hub import inside_cached_repo, locate_model
from reshard.formats.io import Buffers, ByteReader
from reshard.formats.manifest import SourceFile, SourceIndex
from reshard.formats.names import CONFIG_NAME, ENGINE_FILES, MANIFEST_NAME
from reshard.formats.safetensors import SafetensorsFile, TensorInfo
from reshard.formats.split_folder import SplitFolder
from reshard.model.config import ModelConfig
from reshard.plan.cut import Piece, TensorCut, coverage
from reshard.timing import clock, spent

Run = tuple[ByteReader, int, int]  # file, offset, bytes


class TensorBytes(Protocol):
    """One tensor's bytes, seen as [outer rows] x [length along the cut dim] x [inner bytes]."""

    def runs(self, o: int, a: int, b: int) -> Iterator[Run]:
        """Where [a, b) along the dim of row o lives, in order."""

    def read_rows(self, first: int, out: np.ndarray) -> np.ndarray:
        """Fill `out` (n x row bytes) with rows first .. first + n."""


class Contiguous:
    """A tensor stored whole in one file."""

    def __init__(self, reader: ByteReader, base: int, cut: TensorCut) -> None:
        _, length, inner = cut.geometry
        self._reader, self._base, self._row, self._inner = reader, base, length * inner, inner

    def runs(self, o: int, a: int, b: int) -> Iterator[Run]:
        yield self._reader, self._base + o * self._row + a * self._inner, (b - a) * self._inner

    def read_rows(self, first: int, out: np.ndarray) -> np.ndarray:
        return self._reader.read(self._base + first * self._row, out)


class Stitched:
    """A tensor whose rows are pieces in several rank files, as an earlier split cut it along the same dim.

    With `whole`, the stitched tensor is offered as one unit (a tensor the new plan replicates)."""

    def __init__(
        self, old: TensorCut, readers: Sequence[ByteReader], infos: Sequence[TensorInfo], buffers: Buffers, *, whole: bool = False
    ) -> None:
        self._outer, self._length, self._inner = old.geometry
        self._pieces: tuple[Piece, ...] = coverage(old)
        self._readers, self._infos, self._buffers, self._whole = readers, infos, buffers, whole
        self._rank_rows = [i.nbytes // self._outer if self._outer else 0 for i in infos]

    def runs(self, o: int, a: int, b: int) -> Iterator[Run]:
        if self._whole:  # the one unit of a replicated tensor: every byte, in order
            for row in range(self._outer):
                yield from self._row_runs(row, 0, self._length)
        else:
            yield from self._row_runs(o, a, b)

    def _row_runs(self, o: int, a: int, b: int) -> Iterator[Run]:
        for piece in self._pieces:
            x0, x1 = max(a, piece.start), min(b, piece.stop)
            if x0 < x1:
                info = self._infos[piece.rank]
                at = info.offset + o * self._rank_rows[piece.rank] + (piece.at + x0 - piece.start) * self._inner
                yield self._readers[piece.rank], at, (x1 - x0) * self._inner

    def read_rows(self, first: int, out: np.ndarray) -> np.ndarray:
        n, inner = out.shape[0], self._inner
        blocks = {}
        for r in sorted({p.rank for p in self._pieces}):
            buffer = self._buffers.get(f"source{r}", (n, self._rank_rows[r]))
            blocks[r] = self._readers[r].read(self._infos[r].offset + first * self._rank_rows[r], buffer)
        start = clock()
        for p in self._pieces:
            out[:, p.start * inner : p.stop * inner] = blocks[p.rank][:, p.at * inner : (p.at + p.stop - p.start) * inner]
        spent("gather", start, out.nbytes)
        return out


TensorSource = Callable[[TensorCut, Buffers], TensorBytes]


class Source(Protocol):
    """What a split reads from, whatever it is: a checkpoint (CheckpointSource) or a split folder (SplitSource)."""

    @property
    def root(self) -> Path:
        """The folder the default output is named after."""

    @property
    def tensors(self) -> tuple[TensorInfo, ...]:
        """The checkpoint's tensors (from a split folder: as its manifest records them), in its order."""

    def model_config(self, config: Path | None) -> ModelConfig:
        """`config` when given, else the source's own."""

    @property
    def inputs(self) -> list[Path]:
        """Every path the split reads: the output may be none of them, nor inside one."""

    @property
    def source_files(self) -> list[SourceFile]:
        """What the manifest records of the checkpoint's files, to tell them again and write them again."""

    @property
    def source_index(self) -> SourceIndex | None: ...

    @property
    def metadata(self) -> dict[str, str]:
        """The checkpoint's safetensors __metadata__."""

    def open(self, stack: ExitStack) -> TensorSource:
        """Open the files (closed with `stack`); the function that offers each cut tensor's bytes."""

    def engine_files(self) -> dict[str, Path]:
        """The files beside the weights an engine starts from (generation config, tokenizer), by name."""

    def check_plan(self, cuts: Sequence[TensorCut]) -> None:
        """Refuse a plan the source cannot be read for."""

    @property
    def workers(self) -> int:
        """How many threads read it at once."""

    def in_read_order(self, cuts: Sequence[TensorCut]) -> list[TensorCut]:
        """The cuts in the order their bytes are best read."""

    def finish(self) -> None:
        """Called once every byte has been read: what was read must be what was described."""


def source_file(f: SafetensorsFile, *, shared_metadata: dict[str, str] | None = None) -> SourceFile:
    """What a manifest records of a checkpoint file, to tell it again (size, header and a sample of its data)
    and to write it again (its tensor count, and its __metadata__ where that is not `shared_metadata`)."""
    metadata = f.metadata if shared_metadata is not None and f.metadata != shared_metadata else None
    return SourceFile(
        f.path.name, f.size, f.header_sha256, sampled_sha256(f.path, start=f.data_start), tensors=len(f.tensors), metadata=metadata
    )


@dataclass
class CheckpointSource:
    """A checkpoint: safetensors files, with an index or without."""

    checkpoint: Checkpoint

    @property
    def root(self) -> Path:
        return self.checkpoint.root

    @property
    def tensors(self) -> tuple[TensorInfo, ...]:
        return self.checkpoint.tensors

    def model_config(self, config: Path | None) -> ModelConfig:
        return ModelConfig.load(config or self.checkpoint.config_path)

    @property
    def inputs(self) -> list[Path]:
        return [*self.checkpoint.paths, *([self.checkpoint.folder] if self.checkpoint.folder else [])]

    @property
    def source_files(self) -> list[SourceFile]:
        return [source_file(f, shared_metadata=self.metadata) for f in self.checkpoint.files]

    @property
    def source_index(self) -> SourceIndex | None:
        index, metadata = self.checkpoint.index_path, self.checkpoint.index_metadata
        return SourceIndex(index.name, metadata or {}) if index is not None else None

    @property
    def metadata(self) -> dict[str, str]:
        return self.checkpoint.files[0].metadata

    def open(self, stack: ExitStack) -> TensorSource:
        readers = {path: stack.enter_context(ByteReader(path)) for path in self.checkpoint.paths}
        by_name = {t.name: t for t in self.checkpoint.tensors}
        return lambda cut, _: Contiguous(readers[by_name[cut.name].path], by_name[cut.name].offset, cut)

    def engine_files(self) -> dict[str, Path]:
        """The files beside the weights an engine starts from (generation config, tokenizer)."""
        folder = self.checkpoint.folder or self.checkpoint.root
        # A link is followed only into the cache's own blobs, where huggingface_hub keeps a snapshot's files.
        return {
            name: folder / name
            for name in ENGINE_FILES
            if (folder / name).is_file() and (not (folder / name).is_symlink() or inside_cached_repo(folder, folder / name))
        }

    def check_plan(self, cuts: Sequence[TensorCut]) -> None:
        """Any cut of a checkpoint can be read."""

    @property
    def workers(self) -> int:
        return WORKERS

    def in_read_order(self, cuts: Sequence[TensorCut]) -> list[TensorCut]:
        return list(cuts)

    def finish(self) -> None:
        """Called once every byte has been read: nothing more to check."""


@dataclass
class SplitSource:
    """A split folder, read as the checkpoint it came from (whose identity its manifest records)."""

    folder: SplitFolder
    _readers: dict[Path, ByteReader] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.folder.require(purpose="a new split")

    @property
    def root(self) -> Path:
        return self.folder.path

    @property
    def tensors(self) -> tuple[TensorInfo, ...]:
        where = self.folder.path / MANIFEST_NAME
        return tuple(TensorInfo(t.name, t.dtype, t.shape, where, 0, t.nbytes) for t in self.folder.manifest.tensors)

    def model_config(self, config: Path | None) -> ModelConfig:
        if config is not None or (self.folder.path / CONFIG_NAME).is_file():
            return ModelConfig.load(config or self.folder.path / CONFIG_NAME)
        return ModelConfig(raw=self.folder.manifest.source_config)

    @property
    def inputs(self) -> list[Path]:
        return [self.folder.path, *self.folder.paths(range(self.folder.tp))]

    @property
    def source_files(self) -> list[SourceFile]:
        return list(self.folder.manifest.source_files)

    @property
    def source_index(self) -> SourceIndex | None:
        return self.folder.manifest.source_index

    @property
    def metadata(self) -> dict[str, str]:
        return self.folder.manifest.source_metadata

    def open(self, stack: ExitStack) -> TensorSource:
        folder = self.folder
        ranks = range(folder.tp)
        readers = self._readers = folder.readers(stack, ranks)
        old = {t.name: t for t in folder.manifest.tensors}

        def source(cut: TensorCut, buffers: Buffers) -> TensorBytes:
            before, infos = old[cut.name], [folder.tensor(r, cut.name) for r in ranks]
            pieces = [folder.piece_reader(readers, i) for i in infos]
            if before.dim is None:
                return Contiguous(pieces[0], infos[0].offset, cut)
            return Stitched(before, pieces, infos, buffers, whole=cut.dim is None)

        return source

    def engine_files(self) -> dict[str, Path]:
        """The engine files this folder holds (its manifest lists and checks them)."""
        return {name: self.folder.path / name for name in self.folder.manifest.files if name in ENGINE_FILES}

    def check_plan(self, cuts: Sequence[TensorCut]) -> None:
        """A row is stitched along the dim the folder was cut on: a plan cutting another dim needs the original."""
        old = {t.name: t for t in self.folder.manifest.tensors}
        for cut in cuts:
            before = old[cut.name]
            if before.dim is not None and cut.dim is not None and cut.dim != before.dim:
                raise InputError(
                    f"{self.folder.path / MANIFEST_NAME}: tensor {cut.name} was cut along dim {before.dim} and the new "
                    f"plan cuts dim {cut.dim}; split the original checkpoint instead"
                )

    @property
    def workers(self) -> int:
        return self.folder.reader_threads(WORKERS)

    def in_read_order(self, cuts: Sequence[TensorCut]) -> list[TensorCut]:
        return self.folder.in_file_order(cuts)

    def finish(self) -> None:
        """Every rank file read must have been the one the manifest describes."""
        self.folder.require_read(self._readers, range(self.folder.tp))


def open_source(model: Path | str, *, revision: str | None = None) -> Source:
    """A checkpoint (file, folder, index, or a Hub repo id), or a folder written by `reshard split`."""
    model = locate_model(model, revision=revision)
    if model.is_dir() and (model / MANIFEST_NAME).is_file():
        return SplitSource(SplitFolder(model))
    return CheckpointSource(open_checkpoint(model))
