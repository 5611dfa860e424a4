"""What a split reads from: a checkpoint, or a split folder of any tp seen as the checkpoint it was split from.

Either way each tensor is offered to the split engine as full rows along its cut dim: as runs of bytes in files
(copied in the kernel) or as blocks of whole rows (gathered in memory). From a split folder, a row is stitched
from the rank files that hold its pieces, as merge would, without the merged checkpoint ever being written.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from reshard.checkpoint import MANIFEST_NAME, Checkpoint, open_checkpoint
from reshard.checksums import BackgroundHashes
from reshard.config import ModelConfig
from reshard.errors import InputError
from reshard.manifest import Manifest, SourceFile, read_manifest
from reshard.split_folder import Piece, check_hashes, check_sizes, coverage, rank_tensors, require_all_ranks
from reshard.plan import TensorCut
from reshard.safetensors_io import Buffers, ByteReader, TensorInfo

Run = tuple[int, int, int]  # file descriptor, offset, bytes


class TensorBytes(Protocol):
    """One tensor's bytes, seen as [outer rows] x [length along the cut dim] x [inner bytes]."""

    def runs(self, o: int, a: int, b: int) -> Iterator[Run]:
        """Where [a, b) along the dim of row o lives, in order."""

    def read_rows(self, first: int, out: np.ndarray) -> np.ndarray:
        """Fill `out` (n x row bytes) with rows first .. first + n."""


class Contiguous:
    """A tensor stored whole in one file."""

    def __init__(self, reader: ByteReader, base: int, cut: TensorCut) -> None:
        _, length, inner = cut.layout
        self._reader, self._base, self._row, self._inner = reader, base, length * inner, inner

    def runs(self, o: int, a: int, b: int) -> Iterator[Run]:
        yield self._reader.fd, self._base + o * self._row + a * self._inner, (b - a) * self._inner

    def read_rows(self, first: int, out: np.ndarray) -> np.ndarray:
        return self._reader.read_into(self._base + first * self._row, out)


class Stitched:
    """A tensor whose rows are pieces in several rank files, as an earlier split cut it along the same dim."""

    def __init__(self, old: TensorCut, readers: Sequence[ByteReader], infos: Sequence[TensorInfo], buffers: Buffers) -> None:
        self._outer, self._length, self._inner = old.layout
        self._pieces: list[Piece] = coverage(old)
        self._readers, self._infos, self._buffers = readers, infos, buffers
        self._rank_rows = [i.nbytes // self._outer if self._outer else 0 for i in infos]

    def runs(self, o: int, a: int, b: int) -> Iterator[Run]:
        for start, stop, r, pos in self._pieces:
            x0, x1 = max(a, start), min(b, stop)
            if x0 < x1:
                yield (
                    self._readers[r].fd,
                    self._infos[r].offset + o * self._rank_rows[r] + (pos + x0 - start) * self._inner,
                    (x1 - x0) * self._inner,
                )

    def whole(self) -> Iterator[Run]:
        """Every byte of the tensor, in order: for a tensor the new plan replicates."""
        for o in range(self._outer):
            yield from self.runs(o, 0, self._length)

    def read_rows(self, first: int, out: np.ndarray) -> np.ndarray:
        n = out.shape[0]
        blocks = {}
        for r in sorted({p[2] for p in self._pieces}):
            shape = (n, self._rank_rows[r])
            blocks[r] = self._readers[r].read_into(self._infos[r].offset + first * self._rank_rows[r], self._buffers.get(f"source{r}", shape))
        inner = self._inner
        for a, b, r, pos in self._pieces:
            out[:, a * inner : b * inner] = blocks[r][:, pos * inner : (pos + b - a) * inner]
        return out


class Whole:
    """A replicated tensor rebuilt from a split along some dim: one row of the new layout, stitched."""

    def __init__(self, stitched: Stitched) -> None:
        self._stitched = stitched

    def runs(self, o: int, a: int, b: int) -> Iterator[Run]:
        assert (o, a, b) == (0, 0, 1)
        return self._stitched.whole()

    def read_rows(self, first: int, out: np.ndarray) -> np.ndarray:
        raise AssertionError("a replicated tensor is copied as runs")


@dataclass
class CheckpointSource:
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
        return [SourceFile(f.path.name, f.size, f.header_sha256) for f in self.checkpoint.files]

    @property
    def metadata(self) -> dict[str, str]:
        return self.checkpoint.files[0].metadata

    def open(self, stack: ExitStack) -> Callable[[TensorCut, Buffers], TensorBytes]:
        readers = {path: stack.enter_context(ByteReader(path)) for path in self.checkpoint.paths}
        by_name = {t.name: t for t in self.checkpoint.tensors}
        return lambda cut, _: Contiguous(readers[by_name[cut.name].path], by_name[cut.name].offset, cut)

    def finish(self) -> None:
        """Called once every byte has been read: nothing more to check."""


@dataclass
class SplitSource:
    """A split folder, read as the checkpoint it came from (whose identity its manifest records)."""

    split_dir: Path
    manifest: Manifest

    def __post_init__(self) -> None:
        require_all_ranks(self.split_dir, self.manifest, "a new split")
        self._listed = check_sizes(self.split_dir, self.manifest)
        self._ranks = rank_tensors(self.split_dir, self.manifest)
        self._hashes: BackgroundHashes | None = None

    @property
    def root(self) -> Path:
        return self.split_dir

    @property
    def tensors(self) -> tuple[TensorInfo, ...]:
        where = self.split_dir / MANIFEST_NAME
        return tuple(TensorInfo(t.name, t.dtype, t.shape, where, 0, t.nbytes) for t in self.manifest.tensors)

    def model_config(self, config: Path | None) -> ModelConfig:
        if config is not None or (self.split_dir / "config.json").is_file():
            return ModelConfig.load(config or self.split_dir / "config.json")
        return ModelConfig(raw=self.manifest.source_config)

    @property
    def inputs(self) -> list[Path]:
        return [self.split_dir, *self._listed]

    @property
    def source_files(self) -> list[SourceFile]:
        return list(self.manifest.source_files)

    @property
    def metadata(self) -> dict[str, str]:
        return self.manifest.source_metadata

    def open(self, stack: ExitStack) -> Callable[[TensorCut, Buffers], TensorBytes]:
        paths = sorted({i.path for tensors in self._ranks for i in tensors.values()})
        self._hashes = stack.enter_context(BackgroundHashes(self._listed))
        readers = {path: stack.enter_context(ByteReader(path)) for path in paths}
        old = {t.name: t for t in self.manifest.tensors}

        def source(cut: TensorCut, buffers: Buffers) -> TensorBytes:
            before = old[cut.name]
            infos = [tensors[cut.name] for tensors in self._ranks]
            if before.dim is None:
                return Contiguous(readers[infos[0].path], infos[0].offset, cut)
            stitched = Stitched(before, [readers[i.path] for i in infos], infos, buffers)
            if cut.dim is None:
                return Whole(stitched)
            if cut.dim != before.dim:
                raise InputError(
                    f"{self.split_dir / MANIFEST_NAME}: tensor {cut.name} was cut along dim {before.dim} and the new "
                    f"plan cuts dim {cut.dim}; split the original checkpoint instead"
                )
            return stitched

        return source

    def finish(self) -> None:
        """Every rank file read must have been the one the manifest describes."""
        assert self._hashes is not None
        check_hashes(self.split_dir, self.manifest, self._hashes.results())


Source = CheckpointSource | SplitSource


def open_source(model: Path) -> Source:
    """A checkpoint (file, folder, index), or a folder written by `reshard split`."""
    model = Path(model)
    if model.is_dir() and (model / MANIFEST_NAME).is_file():
        return SplitSource(model, read_manifest(model))
    return CheckpointSource(open_checkpoint(model))
