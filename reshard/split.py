"""The split engine: read each source tensor once, front to back, and write each rank's part into its place in
that rank's file (known from the plan, so a few tensors are processed at once).

Contiguous runs (row cuts, replicated tensors) are copied inside the kernel, as cp copies; column cuts are read in
blocks of whole rows and gathered with numpy. Memory stays at about two blocks whatever the checkpoint size."""

from __future__ import annotations

from dataclasses import replace
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

from reshard.checkpoint import Checkpoint
from reshard.config import ModelConfig
from reshard.checksums import record
from reshard.manifest import Manifest, SourceFile, rank_file_name, write_manifest
from reshard.outputs import copy_durably, staged_output
from reshard.plan import Plan, TensorCut, make_plan
from reshard.safetensors_io import Buffers, ByteReader, PartedWriter, Region, partition
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
    ckpt, model_config, plan = make_plan(model, tp, device_ids, config, arch, replicate_unknown, rules)
    out = Path(out) if out is not None else default_split_dir(ckpt.root, tp)
    write_split(ckpt, model_config, plan, out, force, progress, max_shard_size)
    return out


def default_split_dir(model_root: Path, tp: int) -> Path:
    root = model_root if model_root.name else model_root.absolute()
    return root.with_name(f"{root.name}-tp{tp}")


def write_split(
    ckpt: Checkpoint,
    model_config: ModelConfig,
    plan: Plan,
    out: Path,
    force: bool,
    progress: Progress | None,
    max_shard_size: int | None = None,
) -> Manifest:
    inputs = [*ckpt.paths, *([ckpt.folder] if ckpt.folder else []), *([model_config.path] if model_config.path else [])]
    groups = [partition([(t.name, t.dtype, t.rank_shape(r)) for t in plan.tensors], max_shard_size) for r in range(plan.tp)]
    manifest = Manifest.for_plan(
        plan,
        rank_files=[[rank_file_name(r, part) for part in range(len(groups[r]))] for r in range(plan.tp)],
        source_files=[SourceFile(f.path.name, f.size, f.header_sha256) for f in ckpt.files],
        metadata=ckpt.files[0].metadata,
        config=model_config.raw,
    )
    by_name = {t.name: t for t in ckpt.tensors}
    with staged_output(out, inputs, force) as staging, ExitStack() as stack:
        writers = [
            stack.enter_context(PartedWriter([staging / f for f in files], groups[r], rank_metadata(plan, r)))
            for r, files in enumerate(manifest.rank_files)
        ]
        readers = {path: stack.enter_context(ByteReader(path)) for path in ckpt.paths}

        def task(cut: TensorCut) -> Callable[[], None]:
            info = by_name[cut.name]
            regions = [w.region(cut.name) for w in writers]
            return lambda: split_tensor(readers[info.path], info.offset, cut, regions, progress, thread_buffers())

        run_all(task(cut) for cut in plan.tensors)
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
    reader: ByteReader,
    base: int,
    cut: TensorCut,
    targets: Sequence[Region],
    progress: Progress | None,
    buffers: Buffers | None = None,
) -> None:
    """Write each rank's slices of one tensor into its region of that rank's file, reading the tensor once.

    Ranges past the end of the cut dim are padding (a vocabulary tp does not divide) and are written as zeros.
    """
    outer, length, inner = cut.layout
    row = length * inner
    if row == 0 or outer == 0:
        return
    if outer == 1 or row > BLOCK_BYTES:
        _split_runs(reader, base, cut, targets, progress)
        return
    buffers = buffers or Buffers()
    rows = max(1, BLOCK_BYTES // row)
    for first in range(0, outer, rows):
        n = min(rows, outer - first)
        block = reader.read_into(base + first * row, buffers.get("block", (n, row)))
        for rank, ranges in enumerate(cut.slices):
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


def _split_runs(
    reader: ByteReader, base: int, cut: TensorCut, targets: Sequence[Region], progress: Progress | None
) -> None:
    """Each range of each row is a contiguous run of the source: copy it in the kernel, row by row."""
    outer, length, inner = cut.layout
    row = length * inner
    for o in range(outer):
        counted: set[tuple[int, int]] = set()  # a replicated range is progress once
        for rank, ranges in enumerate(cut.slices):
            for a, b in ranges:
                if a < length:
                    n = (min(b, length) - a) * inner
                    targets[rank].copy_from(reader.fd, base + o * row + a * inner, n)
                    if progress and (a, b) not in counted:
                        counted.add((a, b))
                        progress(n)
                if b > length:
                    targets[rank].write_zeros((b - max(a, length)) * inner)
