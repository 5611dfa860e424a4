"""`reshard verify`: prove that a split folder holds what its manifest says (sizes and sha256 of every file) and,
given the source checkpoint, that every rank tensor is its slice of the source, bit for bit.

The comparison is written independently of the split engine: it rebuilds each rank's expected bytes from the
manifest's slices with plain reads, so a bug in the engine's copies or gathers cannot hide itself."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reshard.checkpoint import MANIFEST_NAME, open_checkpoint
from reshard.checksums import BackgroundHashes
from reshard.manifest import Manifest, rank_record_name, read_manifest
from reshard.split_folder import rank_tensors, require_all_ranks
from reshard.plan import TensorCut
from reshard.safetensors_io import Buffers, ByteReader, TensorInfo

BLOCK_BYTES = 32 << 20
Progress = Callable[[int], None]


@dataclass
class Report:
    manifest: Manifest
    files: int = 0  # files whose size and sha256 were checked
    file_bytes: int = 0
    tensors: int = 0  # tensors compared with the source
    tensor_bytes: int = 0
    problems: list[str] = field(default_factory=list)

    files_ok: bool = True  # every file has its recorded size and sha256

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(split_dir: Path, against: Path | None = None, progress: Progress | None = None) -> Report:
    """Check a split folder against its manifest and, with `against`, against the checkpoint it came from.

    Returns a report listing every problem found; a folder that cannot be read at all raises InputError.

    Example:
        >>> verify(Path("/tmp/tiny-tp2"), against=Path("examples/tiny-llama")).ok
        True
    """
    split_dir = Path(split_dir)
    manifest = read_manifest(split_dir)
    report = Report(manifest)
    _check_files(split_dir, manifest, report, progress)
    report.files_ok = report.ok
    if against is not None:
        require_all_ranks(split_dir, manifest, "--against")
    if against is not None and report.ok:
        _check_against(split_dir, manifest, Path(against), report, progress)
    return report


def _check_files(split_dir: Path, manifest: Manifest, report: Report, progress: Progress | None) -> None:
    for rank, names in enumerate(manifest.rank_files):
        if rank not in manifest.ranks_present and any((split_dir / n).is_file() for n in names):
            report.problems.append(
                f"{split_dir / rank_record_name(rank)}: missing, so rank {rank}'s files were never finished; split again"
            )
    present = []
    for name, expected in manifest.files.items():
        path = split_dir / name
        if not path.is_file():
            report.problems.append(f"{path}: missing; the split folder is incomplete, split again")
        elif (size := path.stat().st_size) != expected.bytes:
            report.problems.append(f"{path}: {size} bytes, but {manifest.record_file(name)} records {expected.bytes}; split again")
        else:
            present.append(path)
    with BackgroundHashes(present) as hashes:
        digests = hashes.results()
    for path in present:
        expected = manifest.files[path.name]
        if digests[path] != expected.sha256:
            report.problems.append(f"{path}: sha256 differs from {manifest.record_file(path.name)}; the file is corrupt, split again")
        report.files += 1
        report.file_bytes += expected.bytes
        if progress:
            progress(expected.bytes)


def _check_against(split_dir: Path, manifest: Manifest, model: Path, report: Report, progress: Progress | None) -> None:
    ckpt = open_checkpoint(model)
    found = {f.path.name: f for f in ckpt.files}
    for source in manifest.source_files:
        f = found.get(source.name)
        if f is None or (f.size, f.header_sha256) != (source.bytes, source.header_sha256):
            what = "is not there" if f is None else "differs from the one split"
            report.problems.append(
                f"{model}: {source.name} {what} ({MANIFEST_NAME} records {source.bytes} bytes, header sha256 "
                f"{source.header_sha256[:12]}); pass the checkpoint this folder was split from"
            )
    if report.problems:
        return
    by_name = {t.name: t for t in ckpt.tensors}
    ranks = rank_tensors(split_dir, manifest)
    with ExitStack() as stack:
        paths = {t.path for t in ckpt.tensors} | {i.path for tensors in ranks for i in tensors.values()}
        readers = {p: stack.enter_context(ByteReader(p)) for p in paths}
        buffers = Buffers()
        for cut in manifest.tensors:
            source = by_name[cut.name]
            infos = [tensors[cut.name] for tensors in ranks]
            rank = _first_difference(cut, readers[source.path], source, [readers[i.path] for i in infos], infos, buffers)
            if rank is not None:
                report.problems.append(
                    f"{infos[rank].path}: tensor {cut.name} differs from rank {rank}'s slice of {source.path}; split again"
                )
            report.tensors += 1
            report.tensor_bytes += cut.nbytes
            if progress:
                progress(cut.nbytes)


def _first_difference(
    cut: TensorCut, source: ByteReader, info: TensorInfo, ranks: list[ByteReader], infos: list[TensorInfo], buffers: Buffers
) -> int | None:
    """The first rank whose bytes are not what the manifest's slices of the source say, or None."""
    outer, length, inner = cut.layout
    if outer > 1 and 0 < length * inner <= BLOCK_BYTES:
        return _compare_rows(cut, source, info, ranks, infos, buffers)
    return _compare_runs(cut, source, info, ranks, infos, buffers)


def _compare_rows(
    cut: TensorCut, source: ByteReader, info: TensorInfo, ranks: list[ByteReader], infos: list[TensorInfo], buffers: Buffers
) -> int | None:
    """Short rows (column cuts): blocks of whole source rows against the same rows of every rank."""
    outer, length, inner = cut.layout
    row = length * inner
    rows = max(1, BLOCK_BYTES // row)
    rank_rows = [i.nbytes // outer for i in infos]
    for first in range(0, outer, rows):
        n = min(rows, outer - first)
        block = source.read_into(info.offset + first * row, buffers.get("source", (n, row)))
        for rank, (reader, rank_info) in enumerate(zip(ranks, infos)):
            got = reader.read_into(rank_info.offset + first * rank_rows[rank], buffers.get("rank", (n, rank_rows[rank])))
            at = 0
            for a, b in cut.slices[rank]:
                if a < length:
                    w = (min(b, length) - a) * inner
                    if not np.array_equal(got[:, at : at + w], block[:, a * inner : a * inner + w]):
                        return rank
                    at += w
                if b > length:
                    w = (b - max(a, length)) * inner
                    if got[:, at : at + w].any():
                        return rank
                    at += w
            if at != rank_rows[rank]:
                return rank
    return None


def _compare_runs(
    cut: TensorCut, source: ByteReader, info: TensorInfo, ranks: list[ByteReader], infos: list[TensorInfo], buffers: Buffers
) -> int | None:
    """Long rows, whole tensors: each rank's bytes as runs of the source, compared a block at a time."""
    for rank, (reader, rank_info) in enumerate(zip(ranks, infos)):
        position = rank_info.offset
        for offset, n in _expected_runs(cut, rank, info.offset):
            while n > 0:
                step = min(n, BLOCK_BYTES)
                got = reader.read_into(position, buffers.get("rank", (1, step)))
                if offset is None:
                    same = not got.any()
                else:
                    same = np.array_equal(got, source.read_into(offset, buffers.get("source", (1, step))))
                if not same:
                    return rank
                position, n = position + step, n - step
                offset = None if offset is None else offset + step
        if position != rank_info.offset + rank_info.nbytes:
            return rank
    return None


def _expected_runs(cut: TensorCut, rank: int, base: int) -> Iterator[tuple[int | None, int]]:
    """A rank's bytes in order, as runs of the source file (offset, length); offset None is zero padding.

    Consecutive rows that are one contiguous stretch of the source are joined into one run."""
    outer, length, inner = cut.layout
    row = length * inner
    pending: tuple[int | None, int] | None = None
    for o in range(outer):
        for a, b in cut.slices[rank]:
            runs: list[tuple[int | None, int]] = []
            if a < length:
                runs.append((base + o * row + a * inner, (min(b, length) - a) * inner))
            if b > length:
                runs.append((None, (b - max(a, length)) * inner))
            for offset, n in runs:
                if pending is not None and _joins(pending, offset):
                    pending = (pending[0], pending[1] + n)
                    continue
                if pending is not None:
                    yield pending
                pending = (offset, n)
    if pending is not None:
        yield pending


def _joins(run: tuple[int | None, int], offset: int | None) -> bool:
    start, n = run
    if start is None or offset is None:
        return start is None and offset is None
    return start + n == offset
