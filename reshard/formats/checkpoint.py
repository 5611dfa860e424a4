"""Finding a checkpoint's safetensors files: one file, a folder, or an index with its parts."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from reshard.errors import InputError, shown
from reshard.formats.names import CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, SINGLE_NAME
from reshard.formats.safetensors import SafetensorsFile, TensorInfo, read_header
from reshard.jsonfile import DuplicateKey, read_json

TORCH_SUFFIXES = (".bin", ".pt", ".pth")
CONVERT = (
    "reshard reads safetensors only: convert them with transformers "
    "(AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out)) and pass that folder"
)


@dataclass(frozen=True)
class Checkpoint:
    root: Path  # the folder holding the weights and, normally, config.json
    files: tuple[SafetensorsFile, ...]
    index_path: Path | None = None
    folder: Path | None = None  # the model folder, when one was given (or an index, which names one)
    index_metadata: dict[str, Any] | None = None  # the index's "metadata" object (total_size)

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def tensors(self) -> tuple[TensorInfo, ...]:
        """Every tensor, file by file in data order, so reading them in turn reads each file front to back."""
        return tuple(t for f in self.files for t in f.tensors)

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(f.path for f in self.files)


def open_checkpoint(model: Path) -> Checkpoint:
    model = Path(model)
    if model.is_dir():
        if (model / MANIFEST_NAME).exists():
            raise InputError(f"{model}: this is a reshard split folder, not a checkpoint; run `reshard merge {model}` first")
        if (model / INDEX_NAME).is_file():
            return replace(_from_index(model / INDEX_NAME), folder=model)
        if (model / SINGLE_NAME).is_file():
            return replace(_from_file(model / SINGLE_NAME), folder=model)
        found = sorted(model.glob("*.safetensors"))
        if len(found) == 1:
            return replace(_from_file(found[0]), folder=model)
        torch_files = sorted(p.name for p in model.iterdir() if p.suffix in TORCH_SUFFIXES) if not found else []
        if torch_files:
            raise InputError(f"{model}: holds PyTorch weights ({torch_files[0]}), not safetensors; {CONVERT}")
        what = f"{len(found)} .safetensors files and no {INDEX_NAME}" if found else "no .safetensors file"
        raise InputError(f"{model}: folder has {what}; pass the .safetensors file or the index to use")
    if not model.exists():
        raise InputError(f"{model}: no such file or folder")
    if model.suffix in TORCH_SUFFIXES or model.name.endswith(".bin.index.json"):
        raise InputError(f"{model}: PyTorch weights, not safetensors; {CONVERT}")
    if model.name.endswith(".index.json"):
        return _from_index(model)
    if model.suffix == ".safetensors":
        return _from_file(model)
    raise InputError(f"{model}: not a .safetensors file, an index .json or a folder; pass the checkpoint's folder")


def _from_file(path: Path) -> Checkpoint:
    return Checkpoint(root=path.parent, files=(read_header(path),))


def _from_index(index_path: Path) -> Checkpoint:
    try:
        index = read_json(index_path, what="index", fix="fix or re-save it", strict=True)
    except DuplicateKey as e:
        raise InputError(f"{index_path}: tensor {shown(str(e))} is listed twice; the index is corrupt, re-save the checkpoint") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise InputError(f"{index_path}: weight_map must map tensor names to file names")
    root = index_path.parent
    names = sorted(set(weight_map.values()))
    for name in names:
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts or "\\" in name:
            raise InputError(f"{index_path}: file {name!r} is outside the model folder; the index must name files beside it")
        if not (root / name).is_file():
            raise InputError(f"{index_path}: lists {name}, which does not exist in {root}; download the missing part")
    files = tuple(read_header(root / name) for name in names)
    seen: set[str] = set()
    for f in files:
        for t in f.tensors:
            listed = weight_map.get(t.name)
            if listed is None:
                raise InputError(f"{f.path}: tensor {t.name} is not in {index_path.name}; the index is stale, re-save the checkpoint")
            if root / listed != f.path:
                raise InputError(f"{f.path}: tensor {t.name} is listed in {index_path.name} under {listed}; the index is stale")
            seen.add(t.name)
    missing = sorted(set(weight_map) - seen)
    if missing:
        raise InputError(f"{index_path}: tensor {missing[0]} is listed under {weight_map[missing[0]]} but not stored there")
    metadata = index.get("metadata")
    return Checkpoint(
        root=root, files=files, index_path=index_path, folder=root, index_metadata=metadata if isinstance(metadata, dict) else {}
    )
