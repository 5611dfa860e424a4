"""The two inputs of a plan besides the weights: the model's config.json and the TP config (tp, device ids)."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from reshard.errors import InputError, UsageError
from reshard.jsonfile import read_json, read_text

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, *, flag: str = "--max-shard-size") -> int:
    """'5GB' (10^9, as transformers reads it), '512MiB' (2^20), '1.5GB', or plain bytes: a whole number of
    bytes above zero, or UsageError."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.I)
    if not match:
        raise UsageError(f"{flag} {text!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
    value = Fraction(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").upper()]
    if value <= 0 or value.denominator != 1:
        raise UsageError(f"{flag} {text!r} is not a whole number of bytes above zero; write e.g. 5GB, 500MB or 2GiB")
    return int(value)


# Where ModelConfig.for_layer puts the layer's entry of `layer_types`; not a key config.json has.
LAYER_TYPE = "reshard.layer_type"


@dataclass(frozen=True)
class ModelConfig:
    """A model's config.json, kept as read; the family's rules say which keys matter."""

    raw: dict[str, Any]
    path: Path | None = None

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        raw = read_json(
            path, what="model config", fix="fix or replace the file", missing="put config.json beside the weights or pass --config FILE"
        )
        if not isinstance(raw, dict):
            raise InputError(f"{path}: the model config must be a JSON object")
        return cls(raw=raw, path=path)

    @property
    def name(self) -> str:
        return str(self.path) if self.path else "the model config"

    @property
    def model_type(self) -> str | None:
        value = self.raw.get("model_type")
        return value if isinstance(value, str) else None

    @property
    def architectures(self) -> tuple[str, ...]:
        value = self.raw.get("architectures") or ()
        return tuple(a for a in value if isinstance(a, str)) if isinstance(value, list) else ()

    def for_layer(self, layer: int) -> ModelConfig:
        """The config as layer `layer` sees it: a count given per layer (a list of one integer per layer under the
        key or under `<key>_per_layer`) taken at this layer, then `per_layer_config["<layer>"]`'s keys; and the
        layer's type from `layer_types` under LAYER_TYPE."""
        layers = self.raw.get("num_hidden_layers")
        raw = dict(self.raw)
        types = self.raw.get("layer_types")
        if isinstance(types, list) and len(types) == layers and layer < len(types):
            raw[LAYER_TYPE] = types[layer]
        for key, value in self.raw.items():
            if isinstance(value, list) and len(value) == layers and layer < len(value) and all(type(v) is int for v in value):
                raw[key.removesuffix("_per_layer")] = value[layer]
        overrides = self.raw.get("per_layer_config")
        if isinstance(overrides, dict) and isinstance(overrides.get(str(layer)), dict):
            raw |= overrides[str(layer)]
        return ModelConfig(raw=raw, path=self.path)


# More ranks than any cut dim of a real model has rows; a bound that keeps plans small.
MAX_TP = 65536


@dataclass(frozen=True)
class TPConfig:
    """How many ranks, and which GPU each rank runs on (rank r -> cuda:device_ids[r])."""

    num_devices: int
    device_ids: tuple[int, ...] = field(default=())

    @classmethod
    def create(cls, tp: int, *, device_ids: Sequence[int] | None = None) -> TPConfig:
        if tp < 1:
            raise UsageError(f"--tp must be at least 1, got {tp}")
        if tp > MAX_TP:
            raise UsageError(f"--tp {tp} is more ranks than reshard cuts a model into; at most {MAX_TP}")
        ids = tuple(range(tp)) if device_ids is None else tuple(device_ids)
        if len(ids) != tp:
            raise UsageError(f"--devices lists {len(ids)} ids but --tp is {tp}; give one device id per rank")
        if any(i < 0 for i in ids):
            raise UsageError(f"--devices ids must be non-negative, got {','.join(map(str, ids))}")
        if len(set(ids)) != len(ids):
            raise UsageError(f"--devices ids must be distinct, got {','.join(map(str, ids))}")
        return cls(num_devices=tp, device_ids=ids)

    @property
    def tp(self) -> int:
        return self.num_devices

    def device(self, rank: int) -> str:
        return f"cuda:{self.device_ids[rank]}"


TP_KEYS = ("tp", "num_devices", "device_ids")


@dataclass(frozen=True)
class TPSettings:
    """What a TP config file says; either part may be absent, and flags override both."""

    tp: int | None = None
    device_ids: tuple[int, ...] | None = None


def is_tp_config(path: Path) -> bool:
    """A TOML file, or a JSON object whose keys are all TP keys (a model config has model_type and sizes)."""
    if path.suffix.lower() == ".toml":
        return True
    try:
        data = read_json(path, what="config", fix="")
    except InputError:
        return False  # read again, and reported, as a model config
    return isinstance(data, dict) and bool(data) and set(data) <= set(TP_KEYS)


def load_tp_config(path: Path) -> TPSettings:
    """A TP config: `tp` (or `num_devices`, as the seed's TPConfig calls it) and `device_ids`, in TOML or JSON."""
    if path.suffix.lower() != ".toml":
        data = read_json(path, what="TP config", fix="fix the file")
    else:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        try:
            data = tomllib.loads(read_text(path, what="TP config", fix="fix the file"))
        except (ValueError, RecursionError) as e:
            raise InputError(f"{path}: cannot read the TP config as TOML ({e}); fix the file") from e
    if not isinstance(data, dict):
        raise InputError(f"{path}: the TP config must be a table of tp and device_ids")
    unknown = sorted(set(data) - set(TP_KEYS))
    if unknown:
        raise InputError(f"{path}: unknown key {unknown[0]!r} in the TP config; allowed: {', '.join(TP_KEYS)}")
    tp = data.get("tp", data.get("num_devices"))
    if "tp" in data and "num_devices" in data and data["tp"] != data["num_devices"]:
        raise InputError(f"{path}: tp ({data['tp']}) and num_devices ({data['num_devices']}) disagree; keep one")
    if tp is not None and (type(tp) is not int or tp < 1):
        raise InputError(f"{path}: tp must be a positive integer, got {json.dumps(tp)}")
    ids = data.get("device_ids")
    if ids is not None and (not isinstance(ids, list) or not all(type(i) is int for i in ids)):
        raise InputError(f"{path}: device_ids must be a list of integers, got {json.dumps(ids)}")
    if ids is not None:
        if tp is not None and len(ids) != tp:
            raise InputError(f"{path}: device_ids lists {len(ids)} ids but tp is {tp}; give one device id per rank")
        if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
            raise InputError(f"{path}: device_ids must be distinct non-negative GPU ids, got {json.dumps(ids)}")
    return TPSettings(tp, tuple(ids) if ids is not None else None)


def check_visible_gpus(ids: Sequence[int]) -> None:
    """Each id below the number of CUDA devices, when torch with CUDA is here to count them.

    torch is consulted only when it is already loaded or an NVIDIA driver is present, so splitting on a
    machine without GPUs never pays for importing it.
    """
    if "torch" not in sys.modules and not Path("/dev/nvidiactl").exists():
        return
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        return
    count = torch.cuda.device_count()
    beyond = [i for i in ids if i >= count]
    if beyond:
        raise UsageError(f"device id {beyond[0]} is not a GPU here: torch sees {count} CUDA device(s), ids 0..{count - 1}")


def resolve_tp(
    *, tp: int | None = None, device_ids: Sequence[int] | None = None, configs: Sequence[Path] = ()
) -> tuple[int, list[int] | None, Path | None]:
    """The ranks and GPUs of a split from --tp, --devices and the --config files together (a TP config, the
    model's config.json, or both): flags override the TP config. Returns tp, the device ids (None: 0..tp-1) and
    the model config given, if any; the ids are checked against the GPUs here before any work starts."""
    model_config: Path | None = None
    settings, tp_file = TPSettings(), None
    for path in configs:
        if is_tp_config(path):
            settings, tp_file = load_tp_config(path), path
        elif model_config is None:
            model_config = path
        else:
            raise UsageError(f"--config {path}: a model config was already given ({model_config}); pass one")
    ids = list(device_ids) if device_ids is not None else (list(settings.device_ids) if settings.device_ids is not None else None)
    count = tp if tp is not None else settings.tp if settings.tp is not None else (len(ids) if ids else None)
    if count is None:
        raise UsageError("Missing option '--tp' (or a TP config giving tp, through --config)")
    if device_ids is None and ids is not None and len(ids) != count:
        raise UsageError(f"{tp_file}: device_ids lists {len(ids)} ids but --tp is {count}; pass --devices as well, or fix the TP config")
    if ids is not None:
        TPConfig.create(count, device_ids=ids)  # one id per rank, distinct, non-negative: before any GPU is asked
        check_visible_gpus(ids)
    return count, ids, model_config
