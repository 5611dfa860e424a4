"""Generated safetensors headers: the reader accepts them or raises its own one-line error, never anything else."""

from __future__ import annotations

import json
import random
import struct
import tempfile
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from reshard.errors import InputError
from reshard.formats.io import ByteReader
from reshard.formats.safetensors import parse_header, read_header
from reshard.plan.tensor import DTYPE_SIZES

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
dims = st.integers(-3, 6) | st.booleans() | st.floats(0, 4) | st.text(max_size=2)
entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*DTYPE_SIZES, "F4", "Q7", ""]) | json_values,
        "shape": st.lists(dims, max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-4, 200), min_size=0, max_size=3) | json_values,
    },
    optional={"extra": json_values},
)
headers = (
    st.dictionaries(
        st.text(min_size=1, max_size=6),
        entries | json_values,
        max_size=5,
    ).map(lambda h: h)
    | json_values
)
metadata = st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4) | json_values, max_size=3)


def check(path: Path, raw: bytes, size: int) -> None:
    try:
        parsed = parse_header(path, raw, size)
    except InputError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
    else:
        # What is accepted tiles the file exactly...
        pos = 8 + len(raw)
        for tensor in parsed.tensors:
            assert tensor.offset == pos and tensor.nbytes >= 0
            pos += tensor.nbytes
        assert pos == size
        # ...and each tensor's bytes are the ones its header entry names, as the safetensors library reads them.
        check_bytes(raw, size, parsed.tensors)


def check_bytes(raw: bytes, size: int, tensors) -> None:
    data = bytes(random.Random(size).getrandbits(8) for _ in range(size - 8 - len(raw)))
    header = json.loads(raw)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "accepted.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        with ByteReader(path) as reader:
            for tensor in tensors:
                begin, end = header[tensor.name]["data_offsets"]
                got = reader.read_into(tensor.offset, np.empty(tensor.nbytes, dtype=np.uint8)).tobytes()
                assert got == data[begin:end], tensor.name
        try:
            loaded = safetensors.torch.load_file(str(path))
        except (safetensors.SafetensorError, TypeError, ValueError, RuntimeError):
            return  # a dtype or name this torch cannot hold; the offsets were checked above
        for tensor in tensors:
            begin, end = header[tensor.name]["data_offsets"]
            flat = loaded[tensor.name].reshape(-1)
            stored = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
            assert stored == data[begin:end], tensor.name


@settings(max_examples=400, deadline=None)
@given(header=headers, meta=metadata, extra=st.integers(0, 300))
def test_generated_headers(header: object, meta: object, extra: int) -> None:
    if isinstance(header, dict) and meta is not None:
        header = {"__metadata__": meta, **header}
    raw = json.dumps(header).encode()
    check(Path("gen.safetensors"), raw, 8 + len(raw) + extra)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=64), extra=st.integers(0, 64))
def test_generated_bytes(raw: bytes, extra: int) -> None:
    check(Path("gen.safetensors"), raw, 8 + len(raw) + extra)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prefix=st.binary(max_size=40) | headers.map(lambda h: json.dumps(h).encode()),
    length=st.none() | st.integers(0, 2**64 - 1) | st.integers(0, 48),
    extra=st.just(0) | st.integers(0, 64),
)
def test_generated_files(tmp_path: Path, prefix: bytes, length: int | None, extra: int) -> None:
    """Whole files (a length prefix, bytes, `extra` zero bytes): read_header refuses one in its own one-line error,
    or what it accepts is the header of the bytes the length names, tiling the file as the safetensors library
    reads it."""
    n = len(prefix) if length is None else length
    path = tmp_path / "gen.safetensors"
    path.write_bytes(struct.pack("<Q", n) + prefix + bytes(extra))
    try:
        parsed = read_header(path)
    except InputError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
        event("refused")
    else:
        event("accepted")
        size = path.stat().st_size
        assert 8 + n <= size
        assert parsed == parse_header(path, prefix[:n], size)
        check(path, prefix[:n], size)


valid_tensors = st.lists(
    st.tuples(st.text(min_size=1, max_size=6), st.sampled_from(sorted(DTYPE_SIZES)), st.lists(st.integers(0, 5), max_size=3)),
    max_size=5,
    unique_by=lambda t: t[0],
)


@settings(max_examples=150, deadline=None)
@given(tensors=valid_tensors, order=st.randoms(use_true_random=False))
def test_generated_valid_headers_read_the_right_bytes(tensors: list, order: random.Random) -> None:
    """Headers that are valid, entries in any order: every one is accepted and each tensor's bytes checked."""
    header, pos = {}, 0
    for name, dtype, shape in tensors:
        n = DTYPE_SIZES[dtype] * int(np.prod(shape))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    items = list(header.items())
    order.shuffle(items)
    raw = json.dumps(dict(items)).encode()
    size = 8 + len(raw) + pos
    parsed = parse_header(Path("gen.safetensors"), raw, size)
    assert sorted(t.name for t in parsed.tensors) == sorted(header)
    check_bytes(raw, size, parsed.tensors)
