"""Reading inputs: safetensors headers, index files, rules files. Each bad input gives one exact, actionable line."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from reshard import InputError, RulesError
from reshard.formats.checkpoint import open_checkpoint
from reshard.formats.safetensors import encode_header, read_header
from reshard.model.rules import parse_family


def write_raw(path: Path, header: dict | bytes, data: bytes, length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_header_bytes_match_the_safetensors_library(tmp_path: Path) -> None:
    tensors = {"b": torch.zeros(3, 5, dtype=torch.bfloat16), "a": torch.ones(7, dtype=torch.float32)}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    parsed = read_header(tmp_path / "x.safetensors")
    entries = [(t.name, t.dtype, t.shape) for t in parsed.tensors]
    written = (tmp_path / "x.safetensors").read_bytes()
    assert written.startswith(encode_header(entries, {"format": "pt"}))
    assert [(t.name, t.dtype, t.shape, t.nbytes) for t in parsed.tensors] == [
        ("a", "F32", (7,), 28),
        ("b", "BF16", (3, 5), 30),
    ]


def test_header_is_padded_to_eight_bytes() -> None:
    encoded = encode_header([("w", "U8", (3,))], {})
    (length,) = struct.unpack("<Q", encoded[:8])
    assert length % 8 == 0 and encoded[8:].rstrip(b" ") == b'{"w":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}'


W = {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}


@pytest.mark.parametrize(
    ("header", "data", "length", "message"),
    [
        (b"", b"", None, "header is not UTF-8 JSON"),
        ({"w": W}, b"\0" * 4, 10**9, "header length 1000000000 exceeds 100000000 bytes"),
        ({"w": W}, b"\0" * 4, 5000, "header says 5000 bytes but the file has"),
        (b"\xff\xfe{}", b"", None, "header is not UTF-8 JSON"),
        (b"[1, 2]", b"", None, "header is not a JSON object"),
        ({"__metadata__": {"a": 1}, "w": W}, b"\0" * 4, None, "__metadata__ must map strings to strings"),
        ({"w": dict(W, dtype="Q7")}, b"\0" * 4, None, "tensor w has unknown dtype 'Q7'"),
        ({"w": dict(W, dtype="F4")}, b"\0" * 4, None, "tensor w has dtype F4, which packs values below a byte"),
        ({"w": dict(W, shape=[True, 4])}, b"\0" * 4, None, "shape must be a list of non-negative integers"),
        ({"w": dict(W, shape=[-4])}, b"\0" * 4, None, "shape must be a list of non-negative integers"),
        ({"w": dict(W, data_offsets=[0, 5])}, b"\0" * 5, None, "data_offsets span 5 bytes but U8 [4] needs 4"),
        ({"w": W, "v": dict(W, data_offsets=[2, 6])}, b"\0" * 6, None, "tensor v overlaps the previous tensor"),
        ({"w": W, "v": dict(W, data_offsets=[6, 10])}, b"\0" * 10, None, "tensor v leaves a hole of 2 bytes"),
        ({"w": W}, b"\0" * 6, None, "has 2 bytes after the last tensor"),
        ({"w": W}, b"\0" * 3, None, "the file is truncated"),
        ({"w": {"dtype": "U8", "shape": [4]}}, b"\0" * 4, None, "entry must have exactly dtype, shape and data_offsets"),
    ],
)
def test_malformed_safetensors(tmp_path: Path, header: dict | bytes, data: bytes, length: int | None, message: str) -> None:
    path = write_raw(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(InputError) as e:
        read_header(path)
    assert str(e.value).startswith(f"{path}: ")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_short_file(tmp_path: Path) -> None:
    (tmp_path / "x.safetensors").write_bytes(b"abc")
    with pytest.raises(InputError, match="file is 3 bytes, too short to be safetensors"):
        read_header(tmp_path / "x.safetensors")


def sharded(tmp_path: Path) -> Path:
    save_file({"a": torch.zeros(2)}, str(tmp_path / "p1.safetensors"))
    save_file({"b": torch.ones(2)}, str(tmp_path / "p2.safetensors"))
    return tmp_path


def write_index(folder: Path, weight_map: object) -> Path:
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def test_index_reads_parts_in_place(tmp_path: Path) -> None:
    write_index(sharded(tmp_path), {"a": "p1.safetensors", "b": "p2.safetensors"})
    ckpt = open_checkpoint(tmp_path)
    assert [t.name for t in ckpt.tensors] == ["a", "b"]
    assert ckpt.paths == (tmp_path / "p1.safetensors", tmp_path / "p2.safetensors")


@pytest.mark.parametrize(
    ("weight_map", "message"),
    [
        ({"a": "../p1.safetensors", "b": "p2.safetensors"}, "file '../p1.safetensors' is outside the model folder"),
        ({"a": "/etc/p1.safetensors", "b": "p2.safetensors"}, "file '/etc/p1.safetensors' is outside the model folder"),
        ({"a": "p1.safetensors", "b": "p3.safetensors"}, "lists p3.safetensors, which does not exist"),
        ({"a": "p2.safetensors", "b": "p1.safetensors"}, "p1.safetensors: tensor a is listed in model.safetensors.index.json under p2"),
        ({"a": "p1.safetensors", "b": "p1.safetensors"}, "tensor b is listed under p1.safetensors but not stored there"),
        ({"a": "p1.safetensors", "b": "p2.safetensors", "c": "p2.safetensors"}, "tensor c is listed under p2"),
        (["a"], "weight_map must map tensor names to file names"),
    ],
)
def test_bad_index(tmp_path: Path, weight_map: object, message: str) -> None:
    write_index(sharded(tmp_path), weight_map)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(".", r"\.")):
        open_checkpoint(tmp_path)


def test_index_missing_a_stored_tensor(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2), "c": torch.zeros(1)}, str(tmp_path / "p1.safetensors"))
    write_index(tmp_path, {"a": "p1.safetensors"})
    with pytest.raises(InputError, match="p1.safetensors: tensor c is not in model.safetensors.index.json; the index is stale"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p, "folder has no .safetensors file; pass the .safetensors file or the index to use"),
        (lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt", "not a .safetensors file, an index .json or a folder"),
        (lambda p: p / "missing", "no such file or folder"),
        (lambda p: (p / "reshard.json").write_text("{}") and p, "this is a reshard split folder, not a checkpoint"),
        (
            lambda p: (p / "pytorch_model.bin").write_bytes(b"PK") and p,
            "holds PyTorch weights \\(pytorch_model.bin\\), not safetensors; reshard reads safetensors only: convert them with transformers",
        ),
        (
            lambda p: (p / "w.pt").write_bytes(b"PK") and p / "w.pt",
            "w.pt: PyTorch weights, not safetensors; reshard reads safetensors only",
        ),
        (
            lambda p: (p / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n") and p,
            "model.safetensors: a Git LFS pointer, not the weights; run `git lfs pull` in the model's repository",
        ),
    ],
)
def test_model_path_errors(tmp_path: Path, setup, message: str) -> None:
    with pytest.raises(InputError, match=message):
        open_checkpoint(setup(tmp_path))


GOOD_RULE = {"name": "q", "match": "model.layers.*.q.weight", "style": "colwise", "dim": 0, "units": "heads"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "red"}, "unknown key 'colour'"),
        (
            {"rules": [dict(GOOD_RULE, style="diagonal")]},
            "rules\\[0\\].style: must be one of colwise, rowwise, vocab, replicate, refuse, not 'diagonal'",
        ),
        ({"rules": [dict(GOOD_RULE, dim=None)]}, "rule 'q': style colwise needs dim, a non-negative integer"),
        ({"rules": [dict(GOOD_RULE, units="experts")]}, "rule 'q': units 'experts' is not defined in units; defined: heads"),
        ({"rules": [dict(GOOD_RULE, dims=1)]}, "rules\\[0\\]: unknown key 'dims'"),
        ({"rules": [{"name": "n", "match": "*.norm", "style": "replicate", "dim": 0}]}, "a replicate rule takes no dim or units"),
        ({"rules": []}, "rules must be a non-empty list"),
    ],
)
def test_rules_are_validated_strictly(change: dict, message: str) -> None:
    data = {"family": "t", "units": {"heads": {"key": "num_attention_heads"}}, "rules": [GOOD_RULE], **change}
    with pytest.raises(RulesError, match=message):
        parse_family(data, "my.json")


def test_rules_patterns_match_one_component() -> None:
    family = parse_family({"family": "t", "units": {"heads": {"key": "h"}}, "rules": [GOOD_RULE]}, "r.json")
    assert family.match("model.layers.12.q.weight").name == "q"
    assert family.match("model.layers.1.2.q.weight") is None
    assert family.match("model.layers.12.q.weight.extra") is None
