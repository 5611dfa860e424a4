"""The merge engine: rebuild every tensor from the rank files as the manifest says it was cut, streaming, each
into its place in the output, one thread per output file. It is the split engine, reading the rank files
(stitched by `coverage`) as its source and writing a single rank that holds the whole tensor."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from reshard.engine.sources import Contiguous, Stitched, TensorBytes
from reshard.engine.split import split_tensor
from reshard.engine.staging import staged_output
from reshard.engine.workers import WORKERS, run_all
from reshard.formats.io import Buffers, ByteReader, Progress, Watch, copy_durably, counting, thread_buffers, write_durably
from reshard.formats.manifest import Manifest, SourceIndex
from reshard.formats.names import CONFIG_NAME, INDEX_NAME, NONE, merged_file_names
from reshard.formats.safetensors import Entry, TensorInfo, entry_nbytes
from reshard.formats.split_folder import SplitFolder
from reshard.formats.writer import PartedWriter, Region, partition
from reshard.plan.cut import TensorCut


@dataclass(frozen=True)
class MergeResult:
    """What `merge` wrote: the folder, its safetensors files and index (None for one file), and how many tensors
    and bytes of tensor data they hold, rebuilt from tp ranks."""

    out: Path
    files: list[str]
    index: str | None
    tensors: int
    nbytes: int
    tp: int


def merge(
    split_dir: Path,
    *,
    out: Path | None = None,
    force: bool = False,
    progress: Watch | None = None,
    max_shard_size: int | None = None,
) -> MergeResult:
    """Rebuild the original checkpoint from a split folder, bit for bit.

    Args:
        split_dir: a folder written by `split`, holding reshard.json and the rank files.
        out: output folder; defaults to `<split_dir>-merged` beside it.
        force: replace an existing output folder.
        progress: called with the number of output bytes just written and the number to write in all.
        max_shard_size: write numbered files of at most this many bytes of tensor data, plus
            model.safetensors.index.json, as transformers does; by default the source's own files and index.

    Returns:
        The output folder (its safetensors files, their index if any, and config.json) and what it holds.

    Example:
        >>> merge(Path("/tmp/tiny-tp2"), out=Path("/tmp/tiny-merged")).files
        ['model.safetensors']
    """
    folder = SplitFolder(split_dir)
    out = Path(out) if out is not None else default_merge_dir(folder.path)
    nbytes = sum(t.nbytes for t in folder.manifest.tensors)
    files, index = write_merge(folder, out, force=force, progress=counting(progress, nbytes), max_shard_size=max_shard_size)
    return MergeResult(out, files, index, len(folder.manifest.tensors), nbytes, folder.tp)


def default_merge_dir(split_dir: Path) -> Path:
    root = split_dir if split_dir.name else split_dir.absolute()
    return root.with_name(f"{root.name}-merged")


def write_merge(
    folder: SplitFolder, out: Path, *, force: bool = False, progress: Progress | None = None, max_shard_size: int | None = None
) -> tuple[list[str], str | None]:
    """Write the merged checkpoint; returns the names of the safetensors files written and of the index, if any.

    The rank files' sizes and headers are checked against the manifest before anything is written, their
    checksums from the very reads the merge makes; a mismatch leaves no output.
    """
    folder.require(purpose="merge")
    manifest, ranks = folder.manifest, range(folder.tp)
    names, groups, metadata, index = merged_files(manifest, max_shard_size)
    with staged_output(out, [folder.path, *folder.paths(ranks)], force=force) as staging, ExitStack() as stack:
        readers = folder.readers(stack, ranks)
        writer = stack.enter_context(PartedWriter([staging / n for n in names], groups, metadata, checksum=NONE))

        def task(cut: TensorCut) -> Callable[[], None]:
            infos = [folder.tensor(r, cut.name) for r in ranks]
            target, rank_readers = writer.region(cut.name), [folder.piece_reader(readers, i) for i in infos]
            return lambda: merge_tensor(cut, rank_readers, infos, target, progress=progress, buffers=thread_buffers())

        # Writers to one file queue on its inode lock, so more threads than files only add contention.
        workers = folder.reader_threads(min(WORKERS, len(names)))
        run_all((task(cut) for cut in folder.in_file_order(manifest.tensors)), workers=workers)
        writer.close()
        folder.require_read(readers, ranks)
        if index is not None:
            _write_index(staging / index.name, names, groups, index.metadata)
        _write_shared(folder, staging)
    return names, index.name if index is not None else None


def merged_files(
    manifest: Manifest, max_shard_size: int | None
) -> tuple[list[str], list[list[Entry]], list[dict[str, str]], SourceIndex | None]:
    """The files merge writes, each with its tensors and __metadata__, and the index beside them: the source's own
    files and index where the manifest records them and no --max-shard-size is given; otherwise transformers'
    names, one file or numbered files of at most max_shard_size bytes with model.safetensors.index.json."""
    own = manifest.source_groups() if max_shard_size is None else None
    if own is not None:
        names = [f.name for f, _ in own]
        groups = [[(t.name, t.dtype, t.shape) for t in cuts] for _, cuts in own]
        metadata = [f.metadata if f.metadata is not None else manifest.source_metadata for f, _ in own]
        return names, groups, metadata, manifest.source_index
    groups = partition([(t.name, t.dtype, t.shape) for t in manifest.tensors], max_shard_size)
    names = merged_file_names(len(groups))
    total = {"total_size": sum(entry_nbytes(e) for group in groups for e in group)}
    return names, groups, [manifest.source_metadata] * len(names), SourceIndex(INDEX_NAME, total) if len(names) > 1 else None


def _write_index(path: Path, names: list[str], groups: list[list[Entry]], metadata: dict[str, Any]) -> None:
    """As transformers writes it: sorted keys, two-space indents, a final newline."""
    weight_map = {entry[0]: name for name, group in zip(names, groups, strict=True) for entry in group}
    index = {"metadata": metadata, "weight_map": weight_map}
    write_durably(path, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())


def merge_tensor(
    cut: TensorCut,
    readers: Sequence[ByteReader],
    infos: Sequence[TensorInfo],
    target: Region,
    *,
    progress: Progress | None = None,
    buffers: Buffers | None = None,
) -> None:
    """Rebuild one tensor into its region: the split engine with the rank files as its source, writing one rank
    that holds the whole cut dim."""
    buffers = buffers or Buffers()
    source: TensorBytes
    if cut.dim is None:
        source = Contiguous(readers[0], infos[0].offset, cut)
    else:
        source = Stitched(cut, readers, infos, buffers)
    split_tensor(source, replace(cut, slices=(((0, cut.length),),)), [target], progress=progress, buffers=buffers)


def _write_shared(folder: SplitFolder, staging: Path) -> None:
    # The split folder's copies, checked by their sha256 in the manifest, are the source's files byte for byte
    # (config.json, and the tokenizer files of an engine layout); a folder whose manifest lists no config.json
    # gets the manifest's parsed copy.
    shared = folder.file_names([])
    for name in shared:
        copy_durably(folder.path / name, staging / name)
    if CONFIG_NAME not in shared:
        write_durably(staging / CONFIG_NAME, (json.dumps(folder.manifest.source_config, indent=2) + "\n").encode())
