"""The two inputs of a plan besides the weights: the model's config.json and the TP config (tp, device ids)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reshard.errors import InputError, UsageError


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' (10^9, as transformers reads it), '512MiB' (2^20), or plain bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.I)
    if not match or float(match.group(1)) <= 0:
        raise UsageError(f"--max-shard-size {text!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").upper()])


@dataclass(frozen=True)
class ModelConfig:
    """A model's config.json, kept as read; the family's rules say which keys matter."""

    raw: dict[str, Any]
    path: Path | None = None

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{path}: no model config here; put config.json beside the weights or pass --config FILE") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: cannot read the model config as JSON ({e}); fix or replace the file") from e
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


@dataclass(frozen=True)
class TPConfig:
    """How many ranks, and which GPU each rank runs on (rank r -> cuda:device_ids[r])."""

    num_devices: int
    device_ids: tuple[int, ...] = field(default=())

    @classmethod
    def create(cls, tp: int, device_ids: Sequence[int] | None = None) -> TPConfig:
        if tp < 1:
            raise UsageError(f"--tp must be at least 1, got {tp}")
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
