"""`reshard verify`: prove that a split folder holds what its manifest says (sizes and checksums of every file, each
rank file's dtypes and shapes) and, given the source checkpoint, that every rank tensor is its slice of the
source, bit for bit.

The comparison is written independently of the split engine: it rebuilds each rank's expected bytes from the
same range walk with plain reads, so a bug in the engine's copies or gathers cannot hide itself."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reshard.engine.sources import source_file
from reshard.formats.checkpoint import Checkpoint, open_checkpoint
from reshard.formats.hub import locate_model
from reshard.formats.io import BLOCK_BYTES, Buffers, ByteReader, Progress, Watch, counting
from reshard.formats.manifest import Manifest
from reshard.formats.names import MANIFEST_NAME
from reshard.formats.safetensors import TensorInfo
from reshard.formats.split_folder import SplitFolder
from reshard.plan.cut import TensorCut, rank_spans


@dataclass
class VerifyReport:
    """What `verify` found: how many files and tensors it checked, and every problem, one line each."""

    manifest: Manifest
    files: int = 0  # files whose size and checksum were checked
    file_bytes: int = 0
    tensors: int = 0  # tensors compared with the source
    tensor_bytes: int = 0
    problems: list[str] = field(default_factory=list)
    files_ok: bool = True  # every file has its recorded size and checksum, every rank file the manifest's tensors

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(split_dir: Path, *, against: Path | str | None = None, progress: Watch | None = None) -> VerifyReport:
    """Check a split folder against its manifest and, with `against`, against the checkpoint it came from.

    Args:
        split_dir: a folder written by `split`.
        against: the checkpoint it was split from (a path or a Hub repo id): every rank tensor is compared with its
            slice of it.
        progress: called with the number of bytes just checked and the number to check in all.

    Returns:
        A report listing every problem found; a folder that cannot be read at all raises InputError.

    Example:
        >>> verify(Path("/tmp/tiny-tp2"), against=Path("examples/tiny-llama")).ok
        True
    """
    folder = SplitFolder(split_dir)
    manifest = folder.manifest
    report = VerifyReport(manifest)
    ranks = None if against is not None else manifest.ranks_present
    names = folder.file_names(manifest.ranks_present)
    report.files, report.file_bytes = len(names), sum(manifest.files[n].bytes for n in names)
    step = counting(progress, report.file_bytes + (sum(t.nbytes for t in manifest.tensors) if against is not None else 0))
    if ranks is not None:
        report.problems.extend(folder.unfinished(range(folder.tp)))
    report.problems.extend(folder.check(ranks=ranks, purpose="verify --against", checksums=True, progress=step))
    report.files_ok = report.ok
    if against is not None and report.ok:
        _check_against(folder, locate_model(against), report, step)  # a path, or a Hub repo id
    return report


def _source_problems(manifest: Manifest, model: Path, ckpt: Checkpoint) -> Iterator[str]:
    found = {f.path.name: f for f in ckpt.files}
    for source in manifest.source_files:
        f = found.get(source.name)
        if f is None or source_file(f) != source:
            what = "is not there" if f is None else "differs from the one split"
            yield (
                f"{model}: {source.name} {what} ({MANIFEST_NAME} records {source.bytes} bytes, header sha256 "
                f"{source.header_sha256[:12]}, data sample sha256 {source.sample_sha256[:12]}); pass the checkpoint this folder was split from"
            )


def _check_against(folder: SplitFolder, model: Path, report: VerifyReport, progress: Progress | None) -> None:
    ckpt = open_checkpoint(model)
    report.problems.extend(_source_problems(folder.manifest, model, ckpt))
    if report.problems:
        return
    by_name = {t.name: t for t in ckpt.tensors}
    ranks = range(folder.tp)
    with ExitStack() as stack:
        paths = {t.path for t in ckpt.tensors} | {i.path for r in ranks for i in folder.rank_tensors(r).values()}
        readers = {p: stack.enter_context(ByteReader(p)) for p in paths}
        buffers = Buffers()
        zeroed_on = [folder.zeroed(r) for r in ranks]
        for cut in folder.manifest.tensors:
            source, infos = by_name[cut.name], [folder.tensor(r, cut.name) for r in ranks]
            pieces = [folder.piece_reader(readers, i) for i in infos]
            zeroed = {r for r in ranks if cut.name in zeroed_on[r]}
            rank = _first_difference(cut, readers[source.path], source, pieces, infos, buffers, zeroed)
            if rank is not None:
                report.problems.append(
                    f"{infos[rank].path}: tensor {cut.name} differs from rank {rank}'s slice of {source.path}; split again"
                )
            report.tensors += 1
            report.tensor_bytes += cut.nbytes
            if progress:
                progress(cut.nbytes)


def _first_difference(
    cut: TensorCut,
    source: ByteReader,
    info: TensorInfo,
    ranks: list[ByteReader],
    infos: list[TensorInfo],
    buffers: Buffers,
    zeroed: Collection[int] = (),
) -> int | None:
    """The first rank whose bytes are not what the range walk over the source says (zeros on the ranks an engine
    layout leaves without this replicated tensor), or None."""
    outer, length, inner = cut.geometry
    if outer > 1 and 0 < length * inner <= BLOCK_BYTES and not zeroed:
        return _compare_rows(cut, source, info, ranks, infos, buffers)
    for rank, (reader, rank_info) in enumerate(zip(ranks, infos, strict=True)):
        if rank in zeroed:
            if not _all_zeros(reader, rank_info, buffers):
                return rank
        elif not _same_runs(cut, rank, source, info, reader, rank_info, buffers):
            return rank
    return None


def _all_zeros(reader: ByteReader, info: TensorInfo, buffers: Buffers) -> bool:
    for at in range(0, info.nbytes, BLOCK_BYTES):
        if reader.read_into(info.offset + at, buffers.get("rank", (1, min(BLOCK_BYTES, info.nbytes - at)))).any():
            return False
    return True


def _compare_rows(
    cut: TensorCut, source: ByteReader, info: TensorInfo, ranks: list[ByteReader], infos: list[TensorInfo], buffers: Buffers
) -> int | None:
    """Short rows (column cuts): blocks of whole source rows against the same rows of every rank."""
    outer, length, inner = cut.geometry
    row = length * inner
    rows = max(1, BLOCK_BYTES // row)
    rank_rows = [i.nbytes // outer for i in infos]
    for first in range(0, outer, rows):
        n = min(rows, outer - first)
        block = source.read_into(info.offset + first * row, buffers.get("source", (n, row)))
        for rank, (reader, rank_info) in enumerate(zip(ranks, infos, strict=True)):
            got = reader.read_into(rank_info.offset + first * rank_rows[rank], buffers.get("rank", (n, rank_rows[rank])))
            for s in rank_spans(cut, rank):
                held = got[:, s.at * inner : (s.at + s.length) * inner]
                if held.any() if s.zeros else not np.array_equal(held, block[:, s.start * inner : s.stop * inner]):
                    return rank
    return None


def _same_runs(
    cut: TensorCut, rank: int, source: ByteReader, info: TensorInfo, reader: ByteReader, rank_info: TensorInfo, buffers: Buffers
) -> bool:
    """Long rows, whole tensors: a rank's bytes as runs of the source, compared a block at a time."""
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
                return False
            position, n = position + step, n - step
            offset = None if offset is None else offset + step
    return position == rank_info.offset + rank_info.nbytes


def _expected_runs(cut: TensorCut, rank: int, base: int) -> Iterator[tuple[int | None, int]]:
    """A rank's bytes in order, as runs of the source file (offset, length); offset None is zero padding.

    Consecutive rows that are one contiguous stretch of the source are joined into one run."""
    outer, length, inner = cut.geometry
    row = length * inner
    spans = rank_spans(cut, rank)
    pending: tuple[int | None, int] | None = None
    for o in range(outer):
        for s in spans:
            offset = None if s.zeros else base + o * row + s.start * inner
            if pending is not None and _joins(pending, offset):
                pending = (pending[0], pending[1] + s.length * inner)
                continue
            if pending is not None:
                yield pending
            pending = (offset, s.length * inner)
    if pending is not None:
        yield pending


def _joins(run: tuple[int | None, int], offset: int | None) -> bool:
    start, n = run
    if start is None or offset is None:
        return start is None and offset is None
    return start + n == offset
