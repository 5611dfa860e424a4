"""Safetensors headers: read and validated (a tensor is a name, a dtype name, a shape and a byte range in its
file; its bytes are never decoded), and encoded for the files reshard writes."""

from __future__ import annotations

import hashlib
import json
import math
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from reshard.errors import InputError, shown
from reshard.formats.io import Reorder
from reshard.jsonfile import DuplicateKey, strict_object
from reshard.plan.tensor import DTYPE_SIZES, SUB_BYTE_DTYPES, tensor_nbytes

MAX_HEADER_BYTES = 100_000_000
HEADER_ALIGN = 8
# What a dimension can be in the files' readers (a signed 64-bit count), even for an empty tensor.
MAX_DIM = 2**63 - 1


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: where its bytes are, never the bytes themselves."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute position of the first byte in the file
    nbytes: int
    reorder: Reorder | None = None  # stored in another order than its own (an engine layout's), or None


@dataclass(frozen=True)
class SafetensorsFile:
    path: Path
    metadata: dict[str, str]
    tensors: tuple[TensorInfo, ...]  # in data order
    size: int  # of the whole file
    header_sha256: str  # of the length prefix and the header: what the manifest records of a source file

    @property
    def data_start(self) -> int:
        return self.size - sum(t.nbytes for t in self.tensors)


# What a clone without Git LFS holds in place of a large file: a small text file that starts so.
LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def read_header(path: Path) -> SafetensorsFile:
    """Read and validate the header of a safetensors file; the tensor data is not read."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{path}: not a regular file (a pipe or a device is never read); pass the checkpoint's files")
        size = info.st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise InputError(f"{path}: file is {size} bytes, too short to be safetensors; re-download or re-save it")
            (header_len,) = struct.unpack("<Q", prefix)
            if prefix == LFS_POINTER[:8] and (prefix + f.read(len(LFS_POINTER) - 8)) == LFS_POINTER:
                raise InputError(f"{path}: a Git LFS pointer, not the weights; run `git lfs pull` in the model's repository")
            if header_len > MAX_HEADER_BYTES:
                raise InputError(
                    f"{path}: header length {header_len} exceeds {MAX_HEADER_BYTES} bytes; the file is not safetensors or is corrupt"
                )
            if 8 + header_len > size:
                raise InputError(
                    f"{path}: header says {header_len} bytes but the file has {size - 8} after the length; the file is truncated"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}") from e
    return parse_header(path, raw, size)


def parse_header(path: Path, raw: bytes, file_size: int) -> SafetensorsFile:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=strict_object)
    except DuplicateKey as e:
        raise InputError(f"{path}: {shown(str(e))} appears twice in the header; the file is corrupt") from e
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InputError(f"{path}: header is not UTF-8 JSON ({e}); the file is corrupt") from e
    if not isinstance(header, dict):
        raise InputError(f"{path}: header is not a JSON object; the file is corrupt")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InputError(f"{path}: __metadata__ must map strings to strings; the file is corrupt")
    data_start = 8 + len(raw)
    tensors = [_tensor_info(path, name, entry, data_start) for name, entry in header.items()]
    tensors.sort(key=lambda t: (t.offset, t.nbytes))  # an empty tensor sits before the one starting where it does
    pos = data_start
    for t in tensors:
        if t.offset != pos:
            what = "overlaps the previous tensor" if t.offset < pos else f"leaves a hole of {t.offset - pos} bytes"
            raise InputError(f"{path}: tensor {shown(t.name)} {what}; the file is corrupt")
        pos += t.nbytes
    if pos != file_size:
        problem = "is truncated" if pos > file_size else f"has {file_size - pos} bytes after the last tensor"
        raise InputError(f"{path}: the file {problem} (header describes {pos} bytes, file has {file_size})")
    digest = hashlib.sha256(struct.pack("<Q", len(raw)) + raw).hexdigest()
    return SafetensorsFile(path=path, metadata=dict(metadata), tensors=tuple(tensors), size=file_size, header_sha256=digest)


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    where = f"{path}: tensor {shown(name)}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise InputError(f"{where}: entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise InputError(f"{where}: dtype must be a string, got {dtype!r}")
    if dtype in SUB_BYTE_DTYPES:
        raise InputError(f"{where} has dtype {dtype}, which packs values below a byte and cannot be cut safely")
    if dtype not in DTYPE_SIZES:
        raise InputError(f"{where} has unknown dtype {dtype!r}; known: {', '.join(DTYPE_SIZES)}")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape):
        raise InputError(f"{where}: shape must be a list of non-negative integers below 2^63, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise InputError(f"{where}: data_offsets must be two non-negative integers, got {offsets!r}")
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != nbytes:
        raise InputError(f"{where}: data_offsets span {end - begin} bytes but {dtype} {shape} needs {nbytes}; the file is corrupt")
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), path=path, offset=data_start + begin, nbytes=nbytes)


Entry = tuple[str, str, tuple[int, ...]]  # name, dtype, shape


def entry_nbytes(entry: Entry) -> int:
    return tensor_nbytes(entry[1], entry[2])


def encode_header(entries: list[Entry], metadata: dict[str, str]) -> bytes:
    """The header bytes (length prefix included) for tensors stored back to back in the given order.

    Written as the safetensors library writes it (compact JSON, __metadata__ first, padded with spaces to
    8 bytes), so a merged file can come back byte-identical to a source that library wrote.
    """
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    pos = 0
    for name, dtype, shape in entries:
        nbytes = tensor_nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % HEADER_ALIGN)
    return struct.pack("<Q", len(raw)) + raw
