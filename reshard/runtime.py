"""Loading one rank's weights for a tensor-parallel runtime: straight from its rank files onto its device.

Needs torch (`pip install reshard[torch]`); nothing else in reshard imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from reshard.errors import InputError, UsageError
from reshard.manifest import read_manifest

if TYPE_CHECKING:
    import torch


def load_rank(split_dir: Path, rank: int, device: str | None = None) -> dict[str, torch.Tensor]:
    """One rank's tensors, by their source names, on the rank's device from the manifest (`cuda:N`) or on `device`.

    Args:
        split_dir: a folder written by `reshard split`.
        rank: which rank, 0 <= rank < tp.
        device: where to put the tensors instead of the manifest's device, e.g. "cpu" or "cuda:1".

    Example:
        >>> weights = load_rank(Path("/tmp/tiny-tp2"), 1, device="cpu")
        >>> weights["model.layers.0.self_attn.q_proj.weight"].shape
        torch.Size([32, 64])
    """
    try:
        import torch
        from safetensors import safe_open
    except ImportError:
        raise UsageError("load_rank needs torch; install it with `pip install reshard[torch]`") from None
    split_dir = Path(split_dir)
    manifest = read_manifest(split_dir)
    tp = manifest.tp_config.tp
    if not 0 <= rank < tp:
        raise UsageError(f"rank {rank} is outside this split's ranks 0..{tp - 1}")
    target = device if device is not None else manifest.tp_config.device(rank)
    where = "its manifest device" if device is None else "the device asked for"
    try:
        place = torch.device(target)
    except RuntimeError:
        raise UsageError(f"{target!r} is not a torch device; write e.g. 'cpu' or 'cuda:0'") from None
    if place.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"{split_dir}: rank {rank} goes on {target} ({where}), but torch sees no CUDA device; "
                "pass device='cpu' to load it there"
            )
        count = torch.cuda.device_count()
        if (place.index or 0) >= count:
            raise InputError(
                f"{split_dir}: rank {rank} goes on {target} ({where}), but torch sees {count} CUDA device(s); "
                "split again with --devices, or pass another device"
            )
    tensors: dict[str, torch.Tensor] = {}
    for name in manifest.rank_files[rank]:
        path = split_dir / name
        expected = manifest.files.get(name)
        if not path.is_file():
            raise InputError(f"{path}: rank {rank} file is missing; the split folder is incomplete, split again")
        if expected is not None and path.stat().st_size != expected.bytes:
            raise InputError(f"{path}: {path.stat().st_size} bytes, but the manifest records {expected.bytes}; split again")
        with safe_open(str(path), framework="pt", device=str(place)) as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    missing = [t.name for t in manifest.tensors if t.name not in tensors]
    if missing:
        raise InputError(f"{split_dir}: rank {rank} has no tensor {missing[0]}; the split folder is incomplete, split again")
    return {t.name: tensors[t.name] for t in manifest.tensors}
