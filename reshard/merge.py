"""The merge engine: rebuild every tensor from the rank files as the manifest says it was cut, streaming, each
into its place in the output, one thread per output file."""

from __future__ import annotations

import json
from dataclasses import replace
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

from reshard.checkpoint import INDEX_NAME, SINGLE_NAME
from reshard.checksums import BackgroundHashes
from reshard.manifest import Manifest, read_manifest
from reshard.outputs import copy_durably, staged_output, write_durably
from reshard.plan import TensorCut
from reshard.sources import Contiguous, Stitched, TensorBytes
from reshard.split import split_tensor
from reshard.split_folder import check_hashes, check_sizes, rank_tensors, require_all_ranks
from reshard.workers import WORKERS, run_all, thread_buffers
from reshard.safetensors_io import Buffers, ByteReader, Entry, PartedWriter, Region, TensorInfo, entry_nbytes, partition

Progress = Callable[[int], None]


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
            return lambda: merge_tensor(cut, rank_readers, infos, target, progress, thread_buffers())

        # Writers to one file queue on its inode lock, so more threads than files only add contention.
        run_all((task(cut) for cut in manifest.tensors), workers=min(WORKERS, len(names)))
        writer.close()
        if len(names) > 1:
            _write_index(staging / INDEX_NAME, names, groups)
        _write_config(split_dir, manifest, staging / "config.json")
        check_hashes(split_dir, manifest, hashes.results())
    return names


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


def merge_tensor(
    cut: TensorCut,
    readers: Sequence[ByteReader],
    infos: Sequence[TensorInfo],
    target: Region,
    progress: Progress | None,
    buffers: Buffers | None = None,
) -> None:
    """Rebuild one tensor into its region: the split engine, reading the rank files as the source and writing
    a single rank that holds the whole tensor."""
    buffers = buffers or Buffers()
    if cut.dim is None:
        source: TensorBytes = Contiguous(readers[0], infos[0].offset, cut)
        whole = replace(cut, slices=(((0, 1),),))
    else:
        source = Stitched(cut, readers, infos, buffers)
        whole = replace(cut, slices=(((0, cut.shape[cut.dim]),),))
    split_tensor(source, whole, [target], progress, buffers)


def _write_config(split_dir: Path, manifest: Manifest, target: Path) -> None:
    # The split folder's copy is the source's file byte for byte; the manifest's parsed copy is the fallback.
    if (split_dir / "config.json").is_file():
        copy_durably(split_dir / "config.json", target)
    else:
        write_durably(target, (json.dumps(manifest.source_config, indent=2) + "\n").encode())
