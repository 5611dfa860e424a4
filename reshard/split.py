"""The split engine: read each source tensor once, front to back, and write each rank's part into its place in
that rank's file (known from the plan, so a few tensors are processed at once). The source is a checkpoint or
a split folder of another tp, whose rank files are read as the checkpoint they came from.

Contiguous runs (row cuts, replicated tensors) are copied inside the kernel, as cp copies; column cuts are read in
blocks of whole rows and gathered with numpy. Memory stays at about two blocks whatever the checkpoint size."""

from __future__ import annotations

import re
from dataclasses import replace
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

from reshard.checkpoint import MANIFEST_NAME
from reshard.config import ModelConfig
from reshard.checksums import record
from reshard.manifest import Manifest, rank_file_name, write_manifest
from reshard.outputs import copy_durably, staged_output
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

    Returns:
        The output folder.

    Example:
        >>> split(Path("examples/tiny-llama"), tp=2, out=Path("/tmp/tiny-tp2"))
        PosixPath('/tmp/tiny-tp2')
    """
    source, model_config, plan = make_plan(model, tp, device_ids, config, arch, replicate_unknown, rules)
    out = Path(out) if out is not None else default_split_dir(source.root, tp)
    write_split(source, model_config, plan, out, force, progress, max_shard_size)
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
) -> Manifest:
    inputs = [*source.inputs, *([model_config.path] if model_config.path else [])]
    groups = [partition([(t.name, t.dtype, t.rank_shape(r)) for t in plan.tensors], max_shard_size) for r in range(plan.tp)]
    manifest = Manifest.for_plan(
        plan,
        rank_files=[[rank_file_name(r, part) for part in range(len(groups[r]))] for r in range(plan.tp)],
        source_files=source.source_files,
        metadata=source.metadata,
        config=model_config.raw,
    )
    with staged_output(out, inputs, force) as staging, ExitStack() as stack:
        writers = [
            stack.enter_context(PartedWriter([staging / f for f in files], groups[r], rank_metadata(plan, r)))
            for r, files in enumerate(manifest.rank_files)
        ]
        tensor_bytes = source.open(stack)

        def task(cut: TensorCut) -> Callable[[], None]:
            regions = [w.region(cut.name) for w in writers]

            def run() -> None:
                buffers = thread_buffers()
                split_tensor(tensor_bytes(cut, buffers), cut, regions, progress, buffers)

            return run

        run_all(task(cut) for cut in plan.tensors)
        source.finish()
        files = {}
        for w in writers:
            w.close()
            files |= w.records()
        if model_config.path:
            copy_durably(model_config.path, staging / "config.json")
            files["config.json"] = record(staging / "config.json")
        manifest = replace(manifest, files=files)
        write_manifest(staging, manifest)
    return manifest


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
            if targets[rank] is None:
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
            targets[rank].write(piece.data)
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
