"""The merge engine: rebuild every tensor from the rank files as the manifest says it was cut, streaming, each
into its place in the output, one thread per output file."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

from reshard.checkpoint import INDEX_NAME, SINGLE_NAME
from reshard.checksums import BackgroundHashes
from reshard.errors import InputError
from reshard.manifest import Manifest, rank_record_name, read_manifest
from reshard.outputs import copy_durably, staged_output, write_durably
from reshard.plan import TensorCut
from reshard.workers import WORKERS, run_all, thread_buffers
from reshard.safetensors_io import (
    Buffers,
    ByteReader,
    Entry,
    PartedWriter,
    Region,
    TensorInfo,
    entry_nbytes,
    partition,
    read_header,
)

BLOCK_BYTES = 32 << 20

Progress = Callable[[int], None]
Piece = tuple[int, int, int, int]  # [start, stop) along the dim, from rank, at this position in the rank's part


def merge(
    split_dir: Path,
    out: Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
    max_shard_size: int | None = None,
) -> Path:
    """Rebuild the original checkpoint from a split folder, bit for bit.

    Args:
        split_dir: a folder written by `split`, holding reshard.json and the rank files.
        out: output folder; defaults to `<split_dir>-merged` beside it.
        force: replace an existing output folder.
        progress: called with the number of output bytes just written.
        max_shard_size: write numbered files of at most this many bytes of tensor data, plus
            model.safetensors.index.json, as transformers does.

    Returns:
        The output folder, holding model.safetensors (or numbered files and an index) and config.json.

    Example:
        >>> merge(Path("/tmp/tiny-tp2"), out=Path("/tmp/tiny-merged"))
        PosixPath('/tmp/tiny-merged')
    """
    split_dir = Path(split_dir)
    manifest = read_manifest(split_dir)
    out = Path(out) if out is not None else default_merge_dir(split_dir)
    write_merge(split_dir, manifest, out, force, progress, max_shard_size)
    return out


def default_merge_dir(split_dir: Path) -> Path:
    root = split_dir if split_dir.name else split_dir.absolute()
    return root.with_name(f"{root.name}-merged")


def write_merge(
    split_dir: Path,
    manifest: Manifest,
    out: Path,
    force: bool,
    progress: Progress | None,
    max_shard_size: int | None = None,
) -> list[str]:
    """Write the merged checkpoint; returns the names of the safetensors files written.

    The rank files' sizes and headers are checked against the manifest before anything is written, their sha256
    while the merge runs; a mismatch leaves no output.
    """
    require_all_ranks(split_dir, manifest, "merge")
    listed = check_sizes(split_dir, manifest)
    by_rank = rank_tensors(split_dir, manifest)
    pieces = {t.name: coverage(t) for t in manifest.tensors}
    rank_paths = sorted({info.path for tensors in by_rank for info in tensors.values()})
    groups = partition([(t.name, t.dtype, t.shape) for t in manifest.tensors], max_shard_size)
    names = merged_file_names(len(groups))
    with staged_output(out, [split_dir, *rank_paths], force) as staging, ExitStack() as stack:
        hashes = stack.enter_context(BackgroundHashes(listed))
        readers = {path: stack.enter_context(ByteReader(path)) for path in rank_paths}
        writer = stack.enter_context(PartedWriter([staging / n for n in names], groups, manifest.source_metadata))

        def task(cut: TensorCut) -> Callable[[], None]:
            infos = [tensors[cut.name] for tensors in by_rank]
            target = writer.region(cut.name)
            rank_readers = [readers[i.path] for i in infos]
            return lambda: merge_tensor(cut, pieces[cut.name], rank_readers, infos, target, progress, thread_buffers())

        # Writers to one file queue on its inode lock, so more threads than files only add contention.
        run_all((task(cut) for cut in manifest.tensors), workers=min(WORKERS, len(names)))
        writer.close()
        if len(names) > 1:
            _write_index(staging / INDEX_NAME, names, groups)
        _write_config(split_dir, manifest, staging / "config.json")
        check_hashes(split_dir, manifest, hashes.results())
    return names


def require_all_ranks(split_dir: Path, manifest: Manifest, what: str) -> None:
    """Every rank's record file is there: a folder extracted with --rank holds only some ranks."""
    tp = manifest.tp_config.tp
    for rank in range(tp):
        if rank in manifest.ranks_present:
            continue
        if any((split_dir / name).is_file() for name in manifest.rank_files[rank]):
            raise InputError(
                f"{split_dir / rank_record_name(rank)}: missing, so rank {rank}'s files were never finished; split again"
            )
        held = ", ".join(map(str, manifest.ranks_present)) or "none"
        raise InputError(
            f"{split_dir}: holds ranks {held} of 0..{tp - 1}; {what} needs every rank: gather the other ranks' "
            "files (with their reshard-rank-N.json) beside them, or split again"
        )


def check_sizes(split_dir: Path, manifest: Manifest) -> list[Path]:
    """Every file the manifest lists is there with its recorded size; returns their paths."""
    paths = []
    for name, expected in manifest.files.items():
        path = split_dir / name
        if not path.is_file():
            continue  # a missing rank file is named by the header checks; config.json has the manifest's copy
        size = path.stat().st_size
        if size != expected.bytes:
            raise InputError(
                f"{path}: {size} bytes, but {manifest.record_file(name)} records {expected.bytes}; the file is truncated or was changed, split again"
            )
        paths.append(path)
    return paths


def check_hashes(split_dir: Path, manifest: Manifest, digests: dict[Path, str]) -> None:
    for name, expected in manifest.files.items():
        path = split_dir / name
        if path in digests and digests[path] != expected.sha256:
            raise InputError(f"{path}: sha256 differs from {manifest.record_file(name)}; the file is corrupt, split again")


def merged_file_names(count: int) -> list[str]:
    """transformers' names: model.safetensors alone, or model-00001-of-00003.safetensors and so on."""
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _write_index(path: Path, names: list[str], groups: list[list[Entry]]) -> None:
    weight_map = {entry[0]: name for name, group in zip(names, groups) for entry in group}
    index = {
        "metadata": {"total_size": sum(entry_nbytes(e) for group in groups for e in group)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    write_durably(path, (json.dumps(index, indent=2) + "\n").encode())


def rank_tensors(split_dir: Path, manifest: Manifest) -> list[dict[str, TensorInfo]]:
    """Each rank's tensors by name, checked against the manifest before anything is written."""
    result = []
    for rank, files in enumerate(manifest.rank_files):
        tensors: dict[str, TensorInfo] = {}
        for name in files:
            path = split_dir / name
            if not path.is_file():
                raise InputError(f"{path}: rank {rank} file is missing; the split folder is incomplete, split again")
            for info in read_header(path).tensors:
                tensors[info.name] = info
        for cut in manifest.tensors:
            info = tensors.get(cut.name)
            where = f"{split_dir / files[0]}: tensor {cut.name}"
            if info is None:
                raise InputError(f"{where} is missing; the split folder is incomplete, split again")
            if info.dtype != cut.dtype or info.shape != cut.rank_shape(rank):
                raise InputError(
                    f"{where} is {info.dtype} {list(info.shape)}, the manifest expects "
                    f"{cut.dtype} {list(cut.rank_shape(rank))}; the rank file does not belong to this manifest"
                )
        result.append(tensors)
    return result


def coverage(cut: TensorCut) -> list[Piece]:
    """Where each part of the full dim comes from: the first rank holding it; padding past the end is dropped."""
    _, length, _ = cut.layout
    found = []
    for rank, ranges in enumerate(cut.slices):
        pos = 0
        for a, b in ranges:
            found.append((a, b, rank, pos))
            pos += b - a
    pieces: list[Piece] = []
    done = 0
    for a, b, rank, pos in sorted(found, key=lambda p: (p[0], p[2])):
        if done >= length:
            break
        if b <= done:
            continue
        if a > done:
            break
        pieces.append((done, min(b, length), rank, pos + done - a))
        done = min(b, length)
    if done != length:
        raise InputError(f"reshard.json: tensor {cut.name}: the slices cover {done} of {length} along dim {cut.dim}; split again")
    return pieces


def merge_tensor(
    cut: TensorCut,
    pieces: list[Piece],
    readers: Sequence[ByteReader],
    infos: Sequence[TensorInfo],
    target: Region,
    progress: Progress | None,
    buffers: Buffers | None = None,
) -> None:
    outer, length, inner = cut.layout
    row = length * inner
    if row == 0 or outer == 0:
        return
    rank_rows = [info.nbytes // outer for info in infos]
    if outer == 1 or row > BLOCK_BYTES:
        # Every piece of a row is a contiguous run of one rank file: copied in the kernel.
        for o in range(outer):
            for a, b, r, pos in pieces:
                n = (b - a) * inner
                target.copy_from(readers[r].fd, infos[r].offset + o * rank_rows[r] + pos * inner, n)
                if progress:
                    progress(n)
        return
    buffers = buffers or Buffers()
    rows = max(1, BLOCK_BYTES // row)
    needed = sorted({p[2] for p in pieces})
    for first in range(0, outer, rows):
        n = min(rows, outer - first)
        blocks = {
            r: readers[r].read_into(infos[r].offset + first * rank_rows[r], buffers.get(f"rank{r}", (n, rank_rows[r])))
            for r in needed
        }
        out = buffers.get("out", (n, row))
        for a, b, r, pos in pieces:
            out[:, a * inner : b * inner] = blocks[r][:, pos * inner : (pos + b - a) * inner]
        target.write(out.data)
        if progress:
            progress(n * row)


def _write_config(split_dir: Path, manifest: Manifest, target: Path) -> None:
    # The split folder's copy is the source's file byte for byte; the manifest's parsed copy is the fallback.
    if (split_dir / "config.json").is_file():
        copy_durably(split_dir / "config.json", target)
    else:
        write_durably(target, (json.dumps(manifest.source_config, indent=2) + "\n").encode())
