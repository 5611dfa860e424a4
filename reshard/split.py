"""The split engine: read each source tensor once, in large contiguous blocks, and append each rank's part of
every block to that rank's file. Memory stays at about two blocks whatever the checkpoint size."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from reshard.checkpoint import Checkpoint
from reshard.config import ModelConfig
from reshard.manifest import Manifest, write_manifest
from reshard.outputs import staged_output
from reshard.plan import Plan, TensorCut, make_plan
from reshard.safetensors_io import ByteReader, SafetensorsWriter

BLOCK_BYTES = 32 << 20

Progress = Callable[[int], None]
Sink = Callable[[memoryview], None]


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

    Returns:
        The output folder.

    Example:
        >>> split(Path("examples/tiny-llama"), tp=2, out=Path("/tmp/tiny-tp2"))
        PosixPath('/tmp/tiny-tp2')
    """
    ckpt, model_config, plan = make_plan(model, tp, device_ids, config, arch, replicate_unknown, rules)
    out = Path(out) if out is not None else default_split_dir(ckpt.root, tp)
    write_split(ckpt, model_config, plan, out, force, progress)
    return out


def default_split_dir(model_root: Path, tp: int) -> Path:
    root = model_root if model_root.name else model_root.absolute()
    return root.with_name(f"{root.name}-tp{tp}")


def write_split(
    ckpt: Checkpoint, model_config: ModelConfig, plan: Plan, out: Path, force: bool, progress: Progress | None
) -> Manifest:
    inputs = [*ckpt.paths] + ([model_config.path] if model_config.path else [])
    manifest = Manifest.for_plan(
        plan,
        source_files=[p.name for p in ckpt.paths],
        metadata=ckpt.files[0].metadata,
        config=model_config.raw,
    )
    by_name = {t.name: t for t in ckpt.tensors}
    with staged_output(out, inputs, force) as staging, ExitStack() as stack:
        writers = [
            stack.enter_context(
                SafetensorsWriter(
                    staging / files[0],
                    [(t.name, t.dtype, t.rank_shape(rank)) for t in plan.tensors],
                    rank_metadata(plan, rank),
                )
            )
            for rank, files in enumerate(manifest.rank_files)
        ]
        readers = {path: stack.enter_context(ByteReader(path)) for path in ckpt.paths}
        sinks = [w.write for w in writers]
        for cut in plan.tensors:
            info = by_name[cut.name]
            split_tensor(readers[info.path], info.offset, cut, sinks, progress)
        for w in writers:
            w.close()
        if model_config.path:
            shutil.copyfile(model_config.path, staging / "config.json")
        write_manifest(staging, manifest)
    return manifest


def rank_metadata(plan: Plan, rank: int) -> dict[str, str]:
    # transformers refuses safetensors files without format=pt.
    return {"format": "pt", "rank": str(rank), "tp": str(plan.tp), "device": plan.tp_config.device(rank)}


def split_tensor(reader: ByteReader, base: int, cut: TensorCut, sinks: Sequence[Sink], progress: Progress | None) -> None:
    """Append each rank's slices of one tensor to that rank's sink, reading the tensor once, front to back.

    Ranges past the end of the cut dim are padding (a vocabulary tp does not divide) and are written as zeros.
    """
    outer, length, inner = cut.layout
    row = length * inner
    if row == 0 or outer == 0:
        return
    if row <= BLOCK_BYTES:
        # Many whole rows per read; numpy gathers each rank's columns out of the block.
        rows = max(1, BLOCK_BYTES // row)
        for first in range(0, outer, rows):
            n = min(rows, outer - first)
            block = np.frombuffer(reader.read(base + first * row, n * row), dtype=np.uint8).reshape(n, row)
            for rank, ranges in enumerate(cut.slices):
                parts = []
                for a, b in ranges:
                    if a < length:
                        parts.append(block[:, a * inner : min(b, length) * inner])
                    if b > length:
                        parts.append(np.zeros((n, (b - max(a, length)) * inner), dtype=np.uint8))
                piece = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
                sinks[rank](np.ascontiguousarray(piece).data)
            if progress:
                progress(n * row)
        return
    # One row is larger than a block: every range is a contiguous run of bytes, so stream windows of it.
    for o in range(outer):
        for w in range(0, row, BLOCK_BYTES):
            window = memoryview(reader.read(base + o * row + w, min(BLOCK_BYTES, row - w)))
            end = w + len(window)
            for rank, ranges in enumerate(cut.slices):
                for a, b in ranges:
                    lo, hi = max(a * inner, w), min(b * inner, end)
                    if lo < hi:
                        sinks[rank](window[lo - w : hi - w])
            if progress:
                progress(len(window))
        for rank, ranges in enumerate(cut.slices):
            # Padding only ever ends a rank's last range, so it follows all of that rank's data in this row.
            a, b = ranges[-1]
            _write_zeros(sinks[rank], (b - max(a, length)) * inner)


def _write_zeros(sink: Sink, nbytes: int) -> None:
    zeros = memoryview(bytes(min(nbytes, BLOCK_BYTES))) if nbytes > 0 else memoryview(b"")
    for start in range(0, nbytes, BLOCK_BYTES):
        sink(zeros[: min(BLOCK_BYTES, nbytes - start)])
