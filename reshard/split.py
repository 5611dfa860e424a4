"""The split engine: read each source tensor once, front to back, and write each rank's part into its place in
that rank's file (known from the plan, so a few tensors are processed at once). The source is a checkpoint or
a split folder of another tp, whose rank files are read as the checkpoint they came from.

Contiguous runs (row cuts, replicated tensors) are copied inside the kernel, as cp copies; column cuts are read in
blocks of whole rows and gathered with numpy. Memory stays at about two blocks whatever the checkpoint size."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

from reshard.checkpoint import MANIFEST_NAME
from reshard.config import ModelConfig
from reshard.errors import OutputError
from reshard.checksums import record
from reshard.manifest import Manifest, dumps, rank_file_name, rank_record_name, write_manifest
from reshard.outputs import fsync_dir, write_error, check_target, copy_durably, staged_output
from reshard.plan import Plan, TensorCut, make_plan
from reshard.sources import Source, TensorBytes
from reshard.safetensors_io import Buffers, PartedWriter, Region, partition
from reshard.workers import run_all, thread_buffers

BLOCK_BYTES = 32 << 20

Progress = Callable[[int], None]


def split(
    model: Path,
    tp: int,
    out: Path | None = None,
    device_ids: Sequence[int] | None = None,
    config: Path | None = None,
    arch: str | None = None,
    replicate_unknown: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    rules: Path | None = None,
    max_shard_size: int | None = None,
    ranks: Sequence[int] | None = None,
) -> Path:
    """Split a checkpoint into per-rank safetensors files plus reshard.json.

    Args:
        model: a .safetensors file, a model.safetensors.index.json, or a folder holding either.
        tp: number of ranks.
        out: output folder; defaults to `<model folder>-tp<tp>` beside the model folder.
        device_ids: GPU id per rank, recorded in the manifest; defaults to 0..tp-1.
        config: the model's config.json when it is not beside the weights.
        arch: force a rules family instead of detecting it from the config.
        replicate_unknown: copy tensors that match no rule whole to every rank instead of refusing.
        force: replace an existing output folder.
        progress: called with the number of source bytes just processed.
        rules: a rules file whose rules are tried before the family's.
        max_shard_size: cut each rank's output into files of at most this many bytes of tensor data.
        ranks: write only these ranks, into `out` beside any ranks already there (one node's share).

    Returns:
        The output folder.

    Example:
        >>> split(Path("examples/tiny-llama"), tp=2, out=Path("/tmp/tiny-tp2"))
        PosixPath('/tmp/tiny-tp2')
    """
    source, model_config, plan = make_plan(model, tp, device_ids, config, arch, replicate_unknown, rules)
    out = Path(out) if out is not None else default_split_dir(source.root, tp)
    write_split(source, model_config, plan, out, force, progress, max_shard_size, ranks)
    return out


def default_split_dir(model_root: Path, tp: int) -> Path:
    """`<model>-tp<N>` beside the model folder; a split folder `<model>-tp8` gives `<model>-tp4`."""
    root = model_root if model_root.name else model_root.absolute()
    name = re.sub(r"-tp\d+$", "", root.name) if (root / MANIFEST_NAME).is_file() else root.name
    return root.with_name(f"{name}-tp{tp}")


def write_split(
    source: Source,
    model_config: ModelConfig,
    plan: Plan,
    out: Path,
    force: bool,
    progress: Progress | None,
    max_shard_size: int | None = None,
    ranks: Sequence[int] | None = None,
) -> Manifest:
    """Write the split; with `ranks`, only those ranks, added to `out` beside any others already there."""
    inputs = [*source.inputs, *([model_config.path] if model_config.path else [])]
    groups = [partition([(t.name, t.dtype, t.rank_shape(r)) for t in plan.tensors], max_shard_size) for r in range(plan.tp)]
    manifest = Manifest.for_plan(
        plan,
        rank_files=[[rank_file_name(r, part) for part in range(len(groups[r]))] for r in range(plan.tp)],
        source_files=source.source_files,
        metadata=source.metadata,
        config=model_config.raw,
    )
    if model_config.path:
        manifest = replace(manifest, files={"config.json": record(model_config.path)})
    chosen = sorted(set(range(plan.tp) if ranks is None else ranks))
    staged = (
        staged_output(out, inputs, force)
        if ranks is None
        else staged_ranks(out, inputs, force, manifest, chosen, model_config.path)
    )
    with staged as staging, ExitStack() as stack:
        writers: list[PartedWriter | None] = [None] * plan.tp
        for r in chosen:
            files = [staging / f for f in manifest.rank_files[r]]
            writers[r] = stack.enter_context(PartedWriter(files, groups[r], rank_metadata(plan, r)))
        tensor_bytes = source.open(stack)

        def task(cut: TensorCut) -> Callable[[], None]:
            regions = [w.region(cut.name) if w is not None else None for w in writers]

            def run() -> None:
                buffers = thread_buffers()
                split_tensor(tensor_bytes(cut, buffers), cut, regions, progress, buffers)

            return run

        run_all(task(cut) for cut in plan.tensors)
        source.finish()
        files = dict(manifest.files)
        for w in writers:
            if w is not None:
                w.close()
                files |= w.records()
        manifest = replace(manifest, files=files)
        if ranks is None:
            if model_config.path:
                copy_durably(model_config.path, staging / "config.json")
            write_manifest(staging, manifest)
        else:
            write_manifest(staging, manifest, chosen)
    return manifest


@contextmanager
def staged_ranks(
    target: Path, inputs: Sequence[Path], force: bool, manifest: Manifest, ranks: Sequence[int], config: Path | None
) -> Iterator[Path]:
    """Yield a staging folder inside `target` for some ranks' files; on success they move into `target`, each
    rank's record last, beside any ranks already there (other nodes' or processes' extractions).

    reshard.json and config.json are the same whichever ranks are written, so they are added when absent and
    must match when present; several processes may add ranks to one folder at once.
    """
    target = check_target(target, inputs, force=True)
    target.mkdir(parents=True, exist_ok=True)
    expected = dumps(manifest.to_dict())
    existing = target / MANIFEST_NAME
    if existing.is_file() and existing.read_text(encoding="utf-8") != expected:
        raise OutputError(f"{target}: holds another split (its {MANIFEST_NAME} differs from this one); choose another --out")
    for rank in ranks:
        held = [target / n for n in (rank_record_name(rank), *manifest.rank_files[rank]) if (target / n).exists()]
        if held and not force:
            raise OutputError(f"{target}: already holds rank {rank}; pass --force to replace it")
    staging = Path(tempfile.mkdtemp(prefix=".ranks-", suffix=".partial", dir=target))
    try:
        yield staging
        if config is not None and not (target / "config.json").exists():
            copy_durably(config, staging / "config.json")
            os.replace(staging / "config.json", target / "config.json")
        for rank in ranks:
            for name in manifest.rank_files[rank]:
                os.replace(staging / name, target / name)
        if not existing.exists():
            os.replace(staging / MANIFEST_NAME, existing)
        for rank in ranks:
            os.replace(staging / rank_record_name(rank), target / rank_record_name(rank))
        fsync_dir(target)
    except OSError as e:
        raise write_error(e, staging, target) from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_nbytes(plan: Plan, ranks: Sequence[int] | None = None) -> int:
    """The source bytes a split of these ranks reads: what its progress bar counts to."""
    chosen = range(plan.tp) if ranks is None else ranks
    total = 0
    for cut in plan.tensors:
        outer, length, inner = cut.layout
        if outer == 1 or length * inner > BLOCK_BYTES:
            spans = {(a, min(b, length)) for r in chosen for a, b in cut.slices[r] if a < length}
            total += outer * inner * sum(b - a for a, b in spans)
        else:
            total += outer * length * inner  # column cuts read whole rows
    return total


def rank_metadata(plan: Plan, rank: int) -> dict[str, str]:
    # transformers refuses safetensors files without format=pt.
    return {"format": "pt", "rank": str(rank), "tp": str(plan.tp), "device": plan.tp_config.device(rank)}


def split_tensor(
    source: TensorBytes,
    cut: TensorCut,
    targets: Sequence[Region | None],
    progress: Progress | None,
    buffers: Buffers | None = None,
) -> None:
    """Write each rank's slices of one tensor into its region of that rank's file, reading the tensor once.

    A target of None is a rank not being written: its slices are not read. Ranges past the end of the cut dim
    are padding (a vocabulary tp does not divide) and are written as zeros.
    """
    outer, length, inner = cut.layout
    row = length * inner
    if row == 0 or outer == 0:
        return
    if outer == 1 or row > BLOCK_BYTES:
        _split_runs(source, cut, targets, progress)
        return
    buffers = buffers or Buffers()
    rows = max(1, BLOCK_BYTES // row)
    for first in range(0, outer, rows):
        n = min(rows, outer - first)
        block = source.read_rows(first, buffers.get("block", (n, row)))
        for rank, ranges in enumerate(cut.slices):
            target = targets[rank]
            if target is None:
                continue
            if ranges == ((0, length),):  # the whole row (tp 1, a merge): written as read
                target.write(block.data)
                continue
            width = sum(b - a for a, b in ranges) * inner
            piece = buffers.get("piece", (n, width))
            at = 0
            for a, b in ranges:
                if a < length:
                    w = (min(b, length) - a) * inner
                    piece[:, at : at + w] = block[:, a * inner : a * inner + w]
                    at += w
                if b > length:
                    piece[:, at : at + (b - max(a, length)) * inner] = 0
                    at += (b - max(a, length)) * inner
            target.write(piece.data)
        if progress:
            progress(n * row)


def _split_runs(source: TensorBytes, cut: TensorCut, targets: Sequence[Region | None], progress: Progress | None) -> None:
    """Each range of each row is a run (or a few) of the source: copied in the kernel, row by row."""
    outer, length, inner = cut.layout
    for o in range(outer):
        counted: set[tuple[int, int]] = set()  # a replicated range is progress once
        for rank, ranges in enumerate(cut.slices):
            target = targets[rank]
            if target is None:
                continue
            for a, b in ranges:
                if a < length:
                    for fd, offset, n in source.runs(o, a, min(b, length)):
                        target.copy_from(fd, offset, n)
                    if progress and (a, b) not in counted:
                        counted.add((a, b))
                        progress((min(b, length) - a) * inner)
                if b > length:
                    target.write_zeros((b - max(a, length)) * inner)
