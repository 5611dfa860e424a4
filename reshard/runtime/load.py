"""Loading one rank's weights for a tensor-parallel runtime: straight from its rank files onto its device, after
the split folder's reader has checked them (their checksums included, unless asked not to)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from reshard.errors import InputError, UsageError
from reshard.formats.io import Reorder
from reshard.formats.split_folder import SplitFolder

if TYPE_CHECKING:
    import torch


def load_rank(split_dir: Path, rank: int, *, device: str | None = None, check_checksums: bool = True) -> dict[str, torch.Tensor]:
    """One rank's tensors, by their source names, on the rank's device from the manifest (`cuda:N`) or on `device`.

    Args:
        split_dir: a folder written by `reshard split`.
        rank: which rank, 0 <= rank < tp.
        device: where to put the tensors instead of the manifest's device, e.g. "cpu" or "cuda:1".
        check_checksums: check the rank's files against the digests in the manifest (sha256 or xxh128, as the
            split recorded) before loading them; False skips it, as does a split made with `--checksum none`
            (sizes, dtypes and shapes are checked either way).

    Example:
        >>> weights = load_rank(Path("/tmp/tiny-tp2"), 1, device="cpu")
        >>> weights["model.layers.0.self_attn.q_proj.weight"].shape
        torch.Size([32, 64])
    """
    try:
        from safetensors import safe_open
    except ImportError:
        raise UsageError("load_rank needs torch; install the torch extra: pip install -e '.[torch]' in reshard's folder") from None
    folder = SplitFolder(split_dir)
    if not 0 <= rank < folder.tp:
        raise UsageError(f"rank {rank} is outside this split's ranks 0..{folder.tp - 1}")
    place = _place(folder, rank, device)
    folder.require(ranks=[rank], purpose=f"loading rank {rank}", checksums=check_checksums)
    tensors: dict[str, torch.Tensor] = {}
    for name in folder.manifest.rank_files[rank]:
        with safe_open(str(folder.path / name), framework="pt", device=str(place)) as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    layout = folder.manifest.layout
    places, reorders = layout.placements(folder.manifest.tensors, rank), layout.reorders(folder.manifest.tensors, rank)
    return {
        t.name: piece(tensors[places[t.name][0]], places[t.name][1], t.rank_shape(rank), reorder=reorders.get(t.name))
        for t in folder.manifest.tensors
    }


def piece(packed: torch.Tensor, offset: int, shape: tuple[int, ...], *, reorder: Reorder | None = None) -> torch.Tensor:
    """The source tensor's slice that starts `offset` bytes into a tensor of an engine layout: a view, or a copy
    put back in its own order when the engine stores it reordered."""
    import torch

    flat = packed.reshape(-1)
    start = offset // max(1, flat.element_size())
    found = flat[start : start + math.prod(shape)]
    if reorder is not None:
        data = reorder.load_all(found.cpu().contiguous().view(torch.uint8).numpy())
        found = torch.from_numpy(data).view(found.dtype).to(found.device)
    return found.reshape(shape)


def _place(folder: SplitFolder, rank: int, device: str | None) -> torch.device:
    """The torch device the rank goes on, refused when it is not here."""
    try:
        import torch
    except ImportError:
        raise UsageError("load_rank needs torch; install the torch extra: pip install -e '.[torch]' in reshard's folder") from None
    target = device if device is not None else folder.manifest.tp_config.device(rank)
    where = "its manifest device" if device is None else "the device asked for"
    try:
        place = torch.device(target)
    except RuntimeError:
        raise UsageError(f"{target!r} is not a torch device; write e.g. 'cpu' or 'cuda:0'") from None
    if place.type != "cuda":
        return place
    if not torch.cuda.is_available():
        raise InputError(
            f"{folder.path}: rank {rank} goes on {target} ({where}), but torch sees no CUDA device; pass device='cpu' to load it there"
        )
    count = torch.cuda.device_count()
    if (place.index or 0) >= count:
        raise InputError(
            f"{folder.path}: rank {rank} goes on {target} ({where}), but torch sees {count} CUDA device(s); "
            "split again with --devices, or pass another device"
        )
    return place
