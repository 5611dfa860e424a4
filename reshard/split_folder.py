"""Reading a folder written by `reshard split`: its rank files checked against the manifest before they are used,
and where each part of a tensor lives among them."""

from __future__ import annotations

from pathlib import Path

from reshard.errors import InputError
from reshard.manifest import Manifest, rank_record_name
from reshard.plan import TensorCut
from reshard.safetensors_io import TensorInfo, read_header

Piece = tuple[int, int, int, int]  # [start, stop) along the dim, from rank, at this position in the rank's part


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
