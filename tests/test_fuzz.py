"""Generated safetensors headers: the reader accepts them or raises its own one-line error, never anything else."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reshard.errors import InputError
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
        # What is accepted tiles the file exactly.
        pos = 8 + len(raw)
        for tensor in parsed.tensors:
            assert tensor.offset == pos and tensor.nbytes >= 0
            pos += tensor.nbytes
        assert pos == size


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


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=st.binary(max_size=40), length=st.integers(0, 2**64 - 1) | st.integers(0, 48))
def test_generated_files(tmp_path: Path, prefix: bytes, length: int) -> None:
    path = tmp_path / "gen.safetensors"
    path.write_bytes(struct.pack("<Q", length) + prefix)
    try:
        read_header(path)
    except InputError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
