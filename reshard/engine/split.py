"""The split engine: read each source tensor once, front to back, and write each rank's part into its place in
that rank's file (known from the plan, so a few tensors are processed at once). The source is a checkpoint or
a split folder of another tp, whose rank files are read as the checkpoint they came from.

Contiguous runs (row cuts, replicated tensors) are copied inside the kernel, as cp copies; column cuts are read in
blocks of whole rows and gathered with numpy. Memory stays at about two blocks whatever the checkpoint size."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from reshard.engine.planning import make_plan
from reshard.engine.sources import Source, TensorBytes, TensorSource
from reshard.engine.staging import staged_output, staged_ranks
from reshard.engine.workers import run_all
from reshard.errors import UsageError
from reshard.formats.checksums import record
from reshard.formats.export import Layout, OutTensor, own_layout
from reshard.formats.hub import cached_repo_name
from reshard.formats.io import BLOCK_BYTES, Buffers, Progress, Reorder, Watch, copy_durably, counting, thread_buffers
from reshard.formats.manifest import Manifest, write_manifest
from reshard.formats.names import CHECKSUMS, CONFIG_NAME, DEFAULT_CHECKSUM, MANIFEST_NAME, rank_file_name
from reshard.formats.safetensors import Entry
from reshard.formats.writer import PartedWriter, Region, partition
from reshard.model.config import ModelConfig
from reshard.plan.cut import Plan, Span, TensorCut, rank_spans
from reshard.timing import clock, spent


@dataclass(frozen=True)
class SplitResult:
    """What `split` wrote: the folder, the plan it followed, the manifest it wrote, and the ranks it wrote (every
    rank, or those asked for)."""

    out: Path
    plan: Plan
    manifest: Manifest
    ranks: list[int]


def split(
    model: Path | str,
    *,
    tp: int,
    revision: str | None = None,
    out: Path | None = None,
    device_ids: Sequence[int] | None = None,
    config: Path | None = None,
    arch: str | None = None,
    replicate_unknown: bool = False,
    force: bool = False,
    progress: Watch | None = None,
    rules: Path | None = None,
    max_shard_size: int | None = None,
    ranks: Sequence[int] | None = None,
    output_format: str = "reshard",
    checksum: str = DEFAULT_CHECKSUM,
) -> SplitResult:
    """Split a checkpoint into per-rank safetensors files plus reshard.json.

    Args:
        model: a .safetensors file, a model.safetensors.index.json, or a folder holding either; a split folder; or
            a Hugging Face Hub repo id (`org/name`), read from the local cache or downloaded into it.
        tp: number of ranks.
        revision: the repo id's branch, tag or commit.
        out: output folder; defaults to `<model folder>-tp<tp>` beside the model folder (`./<name>-tp<tp>` for a
            model in the Hugging Face cache).
        device_ids: GPU id per rank, recorded in the manifest; defaults to 0..tp-1.
        config: the model's config.json when it is not beside the weights.
        arch: force a rules family instead of detecting it from the config.
        replicate_unknown: copy tensors that match no rule whole to every rank instead of refusing.
        force: replace an existing output folder.
        progress: called with the number of source bytes just processed and the number to process in all.
        rules: a rules file whose rules are tried before the family's.
        max_shard_size: cut each rank's output into files of at most this many bytes of tensor data.
        ranks: write only these ranks, into `out` beside any ranks already there (one node's share).
        output_format: "reshard" (each tensor under its own name) or "vllm" (vLLM's sharded_state layout: its fused
            names, vocabulary padding and buffers, loaded with `load_format="sharded_state"`).
        checksum: what the manifest records of every file beside its size: "xxh128" (XXH3-128), "sha256" (many
            times slower to compute) or "none".

    Returns:
        The output folder, the plan, the manifest written and the ranks written.

    Example:
        >>> split(Path("examples/tiny-llama"), tp=2, out=Path("/tmp/tiny-tp2")).out
        PosixPath('/tmp/tiny-tp2')
    """
    if checksum not in CHECKSUMS:
        raise UsageError(f"--checksum {checksum!r} is not one of {', '.join(CHECKSUMS)}")
    planned = make_plan(
        model, revision=revision, tp=tp, device_ids=device_ids, config=config, arch=arch, replicate_unknown=replicate_unknown,
        rules=rules, output_format=output_format,
    )  # fmt: skip
    plan, chosen = planned.plan, sorted(set(range(tp) if ranks is None else ranks))
    outside = [r for r in chosen if not 0 <= r < tp]
    if outside:
        raise UsageError(f"rank {outside[0]} is outside 0..{tp - 1} for tp {tp}")
    out = Path(out) if out is not None else default_split_dir(planned.source.root, tp, output_format=output_format)
    manifest = write_split(
        planned.source,
        planned.model_config,
        plan,
        out,
        layout=planned.layout,
        force=force,
        progress=counting(progress, read_nbytes(plan, ranks=chosen)),
        max_shard_size=max_shard_size,
        ranks=None if ranks is None else chosen,
        checksum=checksum,
    )
    return SplitResult(out, plan, manifest, chosen)


def default_split_dir(model_root: Path, tp: int, *, output_format: str = "reshard") -> Path:
    """`<model>-tp<N>` beside the model folder (`<model>-vllm-tp<N>` for vLLM's layout); a split folder
    `<model>-tp8` or `<model>-vllm-tp8` gives `<model>-tp4`. A model in the Hugging Face cache gets
    `./<name>-tp<N>` in the working folder: nothing is ever written into the cache."""
    suffix = f"-{output_format}-tp{tp}" if output_format != "reshard" else f"-tp{tp}"
    cached = cached_repo_name(model_root)
    if cached is not None:
        return Path(cached + suffix)
    root = model_root if model_root.name else model_root.absolute()
    name = re.sub(r"(-vllm)?-tp\d+$", "", root.name) if (root / MANIFEST_NAME).is_file() else root.name
    return root.with_name(name + suffix)


def write_split(
    source: Source,
    model_config: ModelConfig,
    plan: Plan,
    out: Path,
    *,
    layout: Layout | None = None,
    force: bool = False,
    progress: Progress | None = None,
    max_shard_size: int | None = None,
    ranks: Sequence[int] | None = None,
    checksum: str = DEFAULT_CHECKSUM,
) -> Manifest:
    """Write the split in `layout` (reshard's own by default); with `ranks`, only those ranks, added to `out`
    beside any others already there."""
    source.check_plan(plan.tensors)
    layout = layout if layout is not None else own_layout(plan.tensors)
    groups = [partition(layout.rank_entries(plan.tensors, r), max_shard_size) for r in range(plan.tp)]
    shared = _shared_files(source, model_config, layout)
    manifest = _manifest(source, model_config, plan, groups, layout, shared, checksum)
    chosen = sorted(set(range(plan.tp) if ranks is None else ranks))
    inputs = [*source.inputs, *shared.values()]
    staged: AbstractContextManager[Path] = (
        staged_output(out, inputs, force=force)
        if ranks is None
        else staged_ranks(out, inputs, force=force, manifest=manifest, ranks=chosen, shared=shared)
    )
    with staged as staging:
        manifest = _write_ranks(source, plan, manifest, staging, groups, chosen, progress)
        if ranks is None:
            for name, path in shared.items():
                copy_durably(path, staging / name)
        write_manifest(staging, manifest, ranks=None if ranks is None else chosen)
    return manifest


def _shared_files(source: Source, model_config: ModelConfig, layout: Layout) -> dict[str, Path]:
    """The files every rank folder gets beside the rank files: config.json, and for an engine layout the files
    the engine starts from (generation config, tokenizer), when the source has them."""
    shared = {CONFIG_NAME: model_config.path} if model_config.path else {}
    if not layout.own:
        shared |= source.engine_files()
    return shared


def _manifest(
    source: Source,
    model_config: ModelConfig,
    plan: Plan,
    groups: list[list[list[Entry]]],
    layout: Layout,
    shared: dict[str, Path],
    checksum: str,
) -> Manifest:
    manifest = Manifest.for_plan(
        plan,
        rank_files=[[rank_file_name(r, part=part) for part in range(len(groups[r]))] for r in range(plan.tp)],
        source_files=source.source_files,
        metadata=source.metadata,
        config=model_config.raw,
        layout=layout,
        checksum=checksum,
        index=source.source_index,
    )
    return replace(manifest, files={name: record(path, checksum) for name, path in shared.items()})


def _write_ranks(
    source: Source,
    plan: Plan,
    manifest: Manifest,
    staging: Path,
    groups: list[list[list[Entry]]],
    chosen: list[int],
    progress: Progress | None,
) -> Manifest:
    """Every tensor of the chosen ranks' files, written at once by a few threads; the files' records added."""
    with ExitStack() as stack:
        writers: list[PartedWriter | None] = [None] * plan.tp
        for r in chosen:
            paths = [staging / f for f in manifest.rank_files[r]]
            writers[r] = stack.enter_context(PartedWriter(paths, groups[r], rank_metadata(plan, r), checksum=manifest.checksum))
        tensor_bytes = source.open(stack)
        layout = manifest.layout
        stored = [_Stored(layout.placements(plan.tensors, r), layout.reorders(plan.tensors, r), layout.zeroed(r)) for r in range(plan.tp)]
        constants = [out for out in layout.tensors if not out.pieces]
        run_all(
            [
                *(_task(tensor_bytes, cut, _regions(cut, writers, stored), progress) for cut in source.in_read_order(plan.tensors)),
                *(_constant(out, writers) for out in constants),
            ],
            workers=source.workers,
        )
        source.finish()
        files = dict(manifest.files)
        for w in writers:
            if w is not None:
                w.close()
                files |= w.records()
    return replace(manifest, files=files)


class _Stored(NamedTuple):
    """How a rank stores the source tensors' slices: where (output tensor, offset), in what order, and which as zeros."""

    places: dict[str, tuple[str, int]]
    reorders: dict[str, Reorder]
    zeroed: set[str]


def _regions(cut: TensorCut, writers: Sequence[PartedWriter | None], stored: list[_Stored]) -> list[Region | None]:
    """Where each rank's slice of the tensor goes: its place inside the output tensor that holds it (transposed,
    or zeros on the ranks that do not hold it, when the layout says so)."""
    regions: list[Region | None] = []
    for rank, writer in enumerate(writers):
        if writer is None:
            regions.append(None)
            continue
        name, offset = stored[rank].places[cut.name]
        reorder, zeros = stored[rank].reorders.get(cut.name), cut.name in stored[rank].zeroed
        regions.append(writer.region(name, offset=offset, size=cut.rank_nbytes(rank), reorder=reorder, zeros=zeros))
    return regions


def _constant(out: OutTensor, writers: Sequence[PartedWriter | None]) -> Callable[[], None]:
    def run() -> None:
        for writer in writers:
            if writer is not None:
                writer.region(out.name).write(out.constant_bytes())

    return run


def _task(tensor_bytes: TensorSource, cut: TensorCut, regions: list[Region | None], progress: Progress | None) -> Callable[[], None]:
    def run() -> None:
        buffers = thread_buffers()
        split_tensor(tensor_bytes(cut, buffers), cut, regions, progress=progress, buffers=buffers)

    return run


def read_nbytes(plan: Plan, *, ranks: Sequence[int] | None = None) -> int:
    """The source bytes a split of these ranks reads: what its progress bar counts to."""
    chosen = range(plan.tp) if ranks is None else ranks
    total = 0
    for cut in plan.tensors:
        outer, length, inner = cut.geometry
        if _by_runs(cut):
            held = {(s.start, s.stop) for r in chosen for s in rank_spans(cut, r) if not s.zeros}
            total += outer * inner * sum(b - a for a, b in held)
        else:
            total += outer * length * inner  # column cuts read whole rows
    return total


def rank_metadata(plan: Plan, rank: int) -> dict[str, str]:
    # transformers refuses safetensors files without format=pt.
    return {"format": "pt", "rank": str(rank), "tp": str(plan.tp), "device": plan.tp_config.device(rank)}


def _by_runs(cut: TensorCut) -> bool:
    """Rows too long for a block, or a tensor that is one row: copied as runs rather than gathered in blocks."""
    outer, length, inner = cut.geometry
    return outer == 1 or length * inner > BLOCK_BYTES


def split_tensor(
    source: TensorBytes,
    cut: TensorCut,
    targets: Sequence[Region | None],
    *,
    progress: Progress | None = None,
    buffers: Buffers | None = None,
) -> None:
    """Write each rank's spans of one tensor into its region of that rank's file, reading the tensor once.

    A target of None is a rank not being written: its spans are not read. Spans past the end of the cut dim are
    padding (a vocabulary tp does not divide) and are written as zeros.
    """
    outer, length, inner = cut.geometry
    if length * inner == 0 or outer == 0:
        return
    spans = [rank_spans(cut, r) if target is not None else () for r, target in enumerate(targets)]
    if _by_runs(cut):
        _split_runs(source, cut, list(zip(targets, spans, strict=True)), progress)
    else:
        _split_rows(source, cut, list(zip(targets, spans, strict=True)), progress, buffers or Buffers())


def _split_rows(
    source: TensorBytes, cut: TensorCut, targets: list[tuple[Region | None, tuple[Span, ...]]], progress: Progress | None, buffers: Buffers
) -> None:
    """Blocks of whole rows, each rank's columns gathered from them."""
    outer, length, inner = cut.geometry
    row = length * inner
    rows = max(1, BLOCK_BYTES // row)
    for first in range(0, outer, rows):
        n = min(rows, outer - first)
        block = source.read_rows(first, buffers.get("block", (n, row)))
        for target, spans in targets:
            if target is not None:
                target.write(_gather(block, spans, length, inner, buffers))
        if progress:
            progress(n * row)


def _gather(block: np.ndarray, spans: tuple[Span, ...], length: int, inner: int, buffers: Buffers) -> memoryview:
    """A rank's columns of a block of rows, in its order, zeros for padding."""
    if spans == (Span(0, length, 0, False),):  # the whole row (tp 1, a merge): written as read
        return block.data
    width, start = sum(s.length for s in spans) * inner, clock()
    piece = buffers.get("piece", (block.shape[0], width))
    for s in spans:
        target = piece[:, s.at * inner : (s.at + s.length) * inner]
        if s.zeros:
            target[...] = 0
        else:
            target[...] = block[:, s.start * inner : s.stop * inner]
    spent("gather", start, piece.nbytes)
    return piece.data


def _split_runs(
    source: TensorBytes, cut: TensorCut, targets: list[tuple[Region | None, tuple[Span, ...]]], progress: Progress | None
) -> None:
    """Each span of each row is a run (or a few) of the source: copied in the kernel, row by row."""
    outer, _, inner = cut.geometry
    for o in range(outer):
        counted: set[tuple[int, int]] = set()  # a replicated span is progress once
        for target, spans in targets:
            if target is None:
                continue
            for s in spans:
                if s.zeros:
                    target.write_zeros(s.length * inner)
                    continue
                for reader, offset, n in source.runs(o, s.start, s.stop):
                    target.copy_from(reader, offset, n)
                if progress and (s.start, s.stop) not in counted:
                    counted.add((s.start, s.stop))
                    progress(s.length * inner)
