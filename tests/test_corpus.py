"""Malformed inputs: each gets one clear line on stderr, exit 1 (2 for bad flags), no output, the input unchanged."""

from __future__ import annotations

import ast
import inspect
import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from reshard import ReshardError, make_plan
from reshard.cli import app
from reshard.formats import checkpoint, safetensors

from helpers import snapshot, synthetic_llama

runner = CliRunner()
WEIGHTS = "model.safetensors"
Q0 = "model.layers.0.self_attn.q_proj.weight"


def read_file(model: Path) -> tuple[dict, bytes]:
    raw = (model / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_file(model: Path, header: dict | bytes, data: bytes, length: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    prefix = struct.pack("<Q", len(raw) if length is None else length)
    (model / WEIGHTS).write_bytes(prefix + raw + data)


def edit_header(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(model: Path) -> None:
        header, data = read_file(model)
        change(header)
        write_file(model, header, data)

    return apply


def raw_header(text: bytes) -> Callable[[Path], None]:
    return lambda model: write_file(model, text, read_file(model)[1])


def shift_after(header: dict, name: str, by: int) -> None:
    """Move every tensor stored after `name` by `by` bytes."""
    start = header[name]["data_offsets"][1]
    for key, entry in header.items():
        if key != "__metadata__" and entry["data_offsets"][0] >= start:
            entry["data_offsets"] = [o + by for o in entry["data_offsets"]]


def set_entry(name: str, **fields: object) -> Callable[[Path], None]:
    return edit_header(lambda h: h[name].update(fields))


def truncate(model: Path) -> None:
    path = model / WEIGHTS
    path.write_bytes(path.read_bytes()[:-10])


def append(model: Path) -> None:
    with open(model / WEIGHTS, "ab") as f:
        f.write(b"\0" * 16)


def duplicate_tensor(model: Path) -> None:
    header, data = read_file(model)
    text = json.dumps(header)
    entry = json.dumps(header["model.norm.weight"])
    text = text[:-1] + f', "model.norm.weight": {entry}' + "}"
    write_file(model, text.encode(), data)


def to_index(model: Path, weight_map: dict | str | None = None, raw: str | None = None) -> None:
    """Move the weights to a part file and describe it with an index."""
    (model / WEIGHTS).rename(model / "part-1.safetensors")
    header, _ = read_file_at(model / "part-1.safetensors")
    names = [k for k in header if k != "__metadata__"]
    index = {"metadata": {}, "weight_map": {n: "part-1.safetensors" for n in names}}
    if callable(weight_map):
        weight_map(index["weight_map"])
    text = raw if raw is not None else json.dumps(index)
    (model / "model.safetensors.index.json").write_text(text)


def read_file_at(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def index_with(change: Callable[[dict], object]) -> Callable[[Path], None]:
    return lambda model: to_index(model, change)


def index_twice(model: Path) -> None:
    to_index(model)
    path = model / "model.safetensors.index.json"
    text = path.read_text()
    path.write_text(text.replace('"weight_map": {', '"weight_map": {"lm_head.weight": "part-1.safetensors", ', 1))


def listed_in_a_copy(model: Path) -> None:
    """Two part files with the same tensors; the index lists lm_head.weight under the second."""
    to_index(model, lambda w: w.update({"lm_head.weight": "part-2.safetensors"}))
    (model / "part-2.safetensors").write_bytes((model / "part-1.safetensors").read_bytes())


def lfs_pointer(model: Path) -> None:
    (model / WEIGHTS).write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 2336927755\n")


def config_with(**changes: object) -> Callable[[Path], None]:
    def apply(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key)
            else:
                config[key] = value
        (model / "config.json").write_text(json.dumps(config))

    return apply


def replace_config(text: str) -> Callable[[Path], None]:
    return lambda model: (model / "config.json").write_text(text)


F = "{model}/model.safetensors"
IDX = "{model}/model.safetensors.index.json"
CFG = "{model}/config.json"

# (case id, damage, text the one error line must contain). The synthetic model: 8 heads of 4, 2 kv heads,
# FFN 48, vocabulary 64, bf16.
CORPUS = [
    ("empty-file", lambda m: (m / WEIGHTS).write_bytes(b""), f"{F}: file is 0 bytes, too short to be safetensors"),
    ("five-bytes", lambda m: (m / WEIGHTS).write_bytes(b"\x10\0\0\0\0"), f"{F}: file is 5 bytes, too short"),
    ("huge-header-length", lambda m: write_file(m, *read_file(m), length=1 << 40), f"{F}: header length 1099511627776 exceeds 100000000 bytes"),
    ("header-past-end", lambda m: write_file(m, b"{}", b"", length=4096), f"{F}: header says 4096 bytes but the file has 8 after the length; the file is truncated"),
    ("header-not-utf8", raw_header(b'{"a\xff": 1}'), f"{F}: header is not UTF-8 JSON"),
    ("header-not-json", raw_header(b'{"model.norm.weight": '), f"{F}: header is not UTF-8 JSON"),
    ("header-is-a-list", raw_header(b"[1, 2, 3]"), f"{F}: header is not a JSON object"),
    ("metadata-not-strings", edit_header(lambda h: h.update(__metadata__={"format": 1})), f"{F}: __metadata__ must map strings to strings"),
    ("metadata-not-object", edit_header(lambda h: h.update(__metadata__=["pt"])), f"{F}: __metadata__ must map strings to strings"),
    ("lfs-pointer", lfs_pointer, f"{F}: a Git LFS pointer, not the weights; run `git lfs pull` in the model's repository"),
    ("dtype-not-string", set_entry("model.norm.weight", dtype=7), f"{F}: tensor model.norm.weight: dtype must be a string, got 7"),
    ("unknown-dtype", set_entry("model.norm.weight", dtype="Q7"), f"{F}: tensor model.norm.weight has unknown dtype 'Q7'"),
    ("sub-byte-dtype", set_entry("model.norm.weight", dtype="F4"), f"{F}: tensor model.norm.weight has dtype F4, which packs values below a byte"),
    ("negative-dim", set_entry("model.norm.weight", shape=[-32]), f"{F}: tensor model.norm.weight: shape must be a list of non-negative integers below 2^63, got [-32]"),
    ("bool-dim", set_entry("model.norm.weight", shape=[True, 32]), "shape must be a list of non-negative integers below 2^63, got [True, 32]"),
    ("float-dim", set_entry("model.norm.weight", shape=[32.0]), "shape must be a list of non-negative integers below 2^63, got [32.0]"),
    ("shape-not-list", set_entry("model.norm.weight", shape="32"), "shape must be a list of non-negative integers below 2^63, got '32'"),
    ("offsets-wrong-size", set_entry("model.norm.weight", shape=[31]), f"{F}: tensor model.norm.weight: data_offsets span 64 bytes but BF16 [31] needs 62"),
    ("offsets-negative", set_entry("model.norm.weight", data_offsets=[-2, 62]), "data_offsets must be two non-negative integers, got [-2, 62]"),
    ("offsets-three", set_entry("model.norm.weight", data_offsets=[0, 2, 4]), "data_offsets must be two non-negative integers"),
    ("entry-extra-key", set_entry("model.norm.weight", offsets=[0, 1]), "tensor model.norm.weight: entry must have exactly dtype, shape and data_offsets"),
    ("entry-not-object", edit_header(lambda h: h.update({"model.norm.weight": [1]})), "tensor model.norm.weight: entry must have exactly dtype, shape and data_offsets"),
    ("offsets-overlap", edit_header(lambda h: shift_after(h, Q0, -2)), "overlaps the previous tensor; the file is corrupt"),
    ("offsets-hole", edit_header(lambda h: shift_after(h, Q0, 2)), "leaves a hole of 2 bytes; the file is corrupt"),
    ("bytes-after-last", append, f"{F}: the file has 16 bytes after the last tensor"),
    ("data-truncated", truncate, f"{F}: the file is truncated"),
    ("tensor-twice", duplicate_tensor, f"{F}: model.norm.weight appears twice in the header; the file is corrupt"),
    ("index-not-json", lambda m: to_index(m, raw="{"), f"{IDX}: cannot read the index as JSON"),
    ("index-no-weight-map", lambda m: to_index(m, raw='{"metadata": {}}'), f"{IDX}: weight_map must map tensor names to file names"),
    ("index-dotdot", index_with(lambda w: w.update({"lm_head.weight": "../part-1.safetensors"})), f"{IDX}: file '../part-1.safetensors' is outside the model folder"),
    ("index-absolute", index_with(lambda w: w.update({"lm_head.weight": "/etc/passwd"})), f"{IDX}: file '/etc/passwd' is outside the model folder"),
    ("index-missing-file", index_with(lambda w: w.update({"lm_head.weight": "part-2.safetensors"})), f"{IDX}: lists part-2.safetensors, which does not exist in"),
    ("index-tensor-twice", index_twice, f"{IDX}: tensor lm_head.weight is listed twice; the index is corrupt, re-save the checkpoint"),
    ("index-tensor-elsewhere", listed_in_a_copy, "tensor lm_head.weight is listed in model.safetensors.index.json under part-2.safetensors; the index is stale"),
    ("index-tensor-not-stored", index_with(lambda w: w.update({"extra.weight": "part-1.safetensors"})), f"{IDX}: tensor extra.weight is listed under part-1.safetensors but not stored there"),
    ("index-tensor-unlisted", index_with(lambda w: w.pop("lm_head.weight")), "tensor lm_head.weight is not in model.safetensors.index.json; the index is stale"),
    ("config-missing", lambda m: (m / "config.json").unlink(), f"{CFG}: no model config here; put config.json beside the weights or pass --config FILE"),
    ("config-not-json", replace_config("{'heads': 8}"), f"{CFG}: cannot read the model config as JSON"),
    ("config-not-object", replace_config("[8]"), f"{CFG}: the model config must be a JSON object"),
    ("config-heads-missing", config_with(num_attention_heads=None), f"{CFG}: num_attention_heads is missing or not a positive integer"),
    ("config-heads-zero", config_with(num_attention_heads=0), f"{CFG}: num_attention_heads is missing or not a positive integer"),
    ("config-heads-bool", config_with(num_attention_heads=True), f"{CFG}: num_attention_heads is missing or not a positive integer"),
    ("config-heads-string", config_with(num_attention_heads="8"), f"{CFG}: num_attention_heads is missing or not a positive integer"),
    ("config-head-dim-zero", config_with(head_dim=0), f"{CFG}: head_dim must be a positive integer, got 0"),
    ("config-heads-disagree", config_with(num_attention_heads=4), f"is 32, but num_attention_heads (4) x head_dim (4) = 16; {CFG} does not match the weights (nor do 3 other tensors)"),
    ("config-head-dim-disagree", config_with(head_dim=2), f"dim 0 is 8, but num_key_value_heads (2) x head_dim (2) = 4; {CFG} does not match the weights (nor do 7 other tensors)"),
    ("config-kv-disagree", config_with(num_key_value_heads=1), f"tensor model.layers.0.self_attn.k_proj.weight: dim 0 is 8, but num_key_value_heads (1) x head_dim (4) = 4; {CFG} does not match the weights (nor do 3 other tensors)"),
    ("config-ffn-disagree", config_with(intermediate_size=24), f"tensor model.layers.0.mlp.down_proj.weight: dim 1 is 48, but intermediate_size is 24; {CFG} does not match the weights (nor do 5 other tensors)"),
    ("config-vocab-disagree", config_with(vocab_size=32), f"tensor lm_head.weight: dim 0 is 64, but vocab_size is 32; {CFG} does not match the weights (nor does 1 other tensor)"),
]  # fmt: skip


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return synthetic_llama(tmp_path / "model", torch.bfloat16, kv_heads=2)


# The readers whose every refusal the corpus must meet (module, functions), and the refusals met elsewhere.
READERS = [(safetensors, ("read_header", "parse_header", "_tensor_info")), (checkpoint, ("_from_index",))]
ELSEWHERE = {
    "not a regular file": "test_safety.py: a FIFO in place of the weights (reading it here would block)",
    "cannot read": "an OSError on read, which a test running as root cannot provoke with permissions",
}


def refusals() -> dict[tuple[str, range], str]:
    """Every `raise InputError(...)` in the readers: (file, its lines) -> its source text."""
    found = {}
    for module, functions in READERS:
        source = inspect.getsource(module)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and node.name in functions:
                for raised in ast.walk(node):
                    if isinstance(raised, ast.Raise) and "InputError" in ast.unparse(raised.exc or raised):
                        lines = range(raised.lineno, (raised.end_lineno or raised.lineno) + 1)
                        found[(module.__file__, lines)] = ast.get_source_segment(source, raised) or ""
    return found


def refusal_met(model: Path) -> tuple[str, int] | None:
    """Where the reader refused the model: the file and line of the raise that gave the error."""
    try:
        make_plan(model, tp=2)
    except ReshardError as e:
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        return (tb.tb_frame.f_code.co_filename, tb.tb_lineno) if tb is not None else None
    return None


def test_the_corpus_meets_every_refusal_of_the_readers(tmp_path: Path) -> None:
    """Each way the header and index readers refuse a file is a case of the corpus (or listed with where it is
    met): a refusal added to the reader without a case fails here."""
    assert len({case[0] for case in CORPUS}) == len(CORPUS)
    met = set()
    for name, damage, _ in CORPUS:
        model = synthetic_llama(tmp_path / name, torch.bfloat16, kv_heads=2)
        damage(model)
        met.add(refusal_met(model))
    sites = refusals()
    assert len(sites) >= 20
    unmet = [
        text
        for (file, lines), text in sites.items()
        if not any(m is not None and m[0] == file and m[1] in lines for m in met) and not any(k in text for k in ELSEWHERE)
    ]
    assert not unmet, "refusals no corpus case meets:\n" + "\n".join(unmet)


@pytest.mark.parametrize(("damage", "message"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
@pytest.mark.parametrize("command", ["plan", "split"])
def test_malformed_input(model: Path, tmp_path: Path, damage, message: str, command: str) -> None:
    damage(model)
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    args = [command, str(model), "--tp", "2"] + (["--out", str(out)] if command == "split" else [])
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert message.format(model=model) in lines[0]
    assert result.stdout == ""
    assert not out.exists()
    assert snapshot(tmp_path) == before  # nothing written beside it, the input unchanged


BAD_FLAGS = [
    (["--tp", "0"], "Invalid value for '--tp'"),
    (["--tp", "-2"], "Invalid value for '--tp'"),
    (["--tp", "2", "--devices", "0,0"], "Error: --devices ids must be distinct, got 0,0"),
    (["--tp", "2", "--devices", "0,-1"], "Error: --devices ids must be non-negative, got 0,-1"),
    (["--tp", "2", "--devices", "0,1,2"], "Error: --devices lists 3 ids but --tp is 2; give one device id per rank"),
    (["--tp", "2", "--devices", "0,x"], "'0,x' is not a comma-separated list of GPU ids"),
    (["--tp", "two"], "Invalid value for '--tp'"),
]  # fmt: skip


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS)
def test_bad_cli_values_exit_2(model: Path, tmp_path: Path, flags: list[str], message: str) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["split", str(model), "--out", str(out), *flags])
    assert result.exit_code == 2
    assert message in result.stderr
    assert not out.exists()
