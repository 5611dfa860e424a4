"""A tensor as the plan sees it: a name, a dtype name and a shape. Never its values: cuts are byte arithmetic,
so every dtype, bfloat16 and float8 included, splits bit for bit."""

from __future__ import annotations

import math
from typing import Protocol

# Bytes per element of every whole-byte safetensors dtype.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
    "C64": 8,
}
# Dtypes that pack several values into a byte: a cut may fall inside a byte, so they are refused.
SUB_BYTE_DTYPES = {"F4", "F6_E2M3", "F6_E3M2"}


class TensorSpec(Protocol):
    """What planning needs of a tensor; a safetensors header entry (formats.TensorInfo) is one."""

    @property
    def name(self) -> str: ...

    @property
    def dtype(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * DTYPE_SIZES[dtype]
