"""The installed command: output, exit codes, one-line errors, nothing left behind on failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from reshard.cli import app
from reshard.model.rules import builtin_families

from helpers import snapshot, synthetic_llama

runner = CliRunner()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    # 8 heads, 2 kv heads (replicated at tp 4 and 8), FFN 48, vocabulary 64.
    return synthetic_llama(tmp_path / "model", torch.bfloat16, kv_heads=2)


def run(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def test_plan_prints_a_row_per_rule_and_every_rank(model: Path) -> None:
    result = run("plan", model, "--tp", "2", "--devices", "4,6")
    assert result.exit_code == 0, result.output
    assert f"{model}: llama family, 21 tensors, 37.2kB, tp 2 on cuda:4, cuda:6" in result.stdout
    lines = result.stdout.splitlines()
    assert not any("q_proj.weight" in line for line in lines)
    q = next(line for line in lines if "│ q_proj " in line)
    assert [c.strip() for c in q.split("│")[1:-1]] == ["q_proj", "colwise", "0", "2", "4.10kB", "2.05kB"]
    kv = next(line for line in lines if "│ kv_proj " in line)
    assert [c.strip() for c in kv.split("│")[1:-1]] == ["kv_proj", "colwise", "0", "4", "2.05kB", "1.02kB"]
    norm = next(line for line in lines if "│ norm " in line)
    assert [c.strip() for c in norm.split("│")[1:-1]] == ["norm", "replicate", "-", "5", "320B", "320B"]
    assert result.stderr == ""


def test_plan_tensors_prints_every_tensor_and_every_rank(model: Path) -> None:
    result = run("plan", model, "--tp", "2", "--devices", "4,6", "--tensors")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert all(len(line) <= 120 for line in lines if line[:1] in "┏┃┡│└")  # tables fit 120 columns when piped
    q = next(line for line in lines if "layers.0.self_attn.q_proj.weight" in line)
    assert [c.strip() for c in q.split("│")[1:-1]] == [
        "model.layers.0.self_attn.q_proj.weight", "q_proj", "colwise 0", "BF16", "[32, 32]", "[16, 32]", "1.02kB"
    ]  # fmt: skip
    down = next(line for line in lines if "layers.1.mlp.down_proj.weight" in line)
    assert "rowwise" in down and "[32, 48]" in down and "[32, 24]" in down
    assert any("model.norm.weight" in line and "replicate" in line for line in lines)
    assert [line.split("│")[1:3] for line in lines if "cuda:6" in line and "│" in line][0][1].strip() == "cuda:6"
    assert result.stderr == ""


def test_plan_notes_show_replicated_kv_heads_and_padding(model: Path) -> None:
    result = run("plan", model, "--tp", "8", "--json")
    cuts = {t["name"]: t for t in json.loads(result.stdout)["tensors"]}
    assert cuts["model.layers.1.self_attn.v_proj.weight"]["replicas"] == 4  # 2 kv heads on 8 ranks
    table = run("plan", model, "--tp", "8").stdout
    assert any("kv_proj" in line and "slices shared by 4 ranks" in line for line in table.splitlines())
    table = runner.invoke(app, ["plan", str(model), "--tp", "8", "--tensors"], env={"COLUMNS": "200"}).stdout
    assert any("v_proj" in line and "slices shared by 4 ranks" in line for line in table.splitlines())
    padded = run("plan", model, "--tp", "6", "--json")
    assert padded.exit_code == 1  # 8 heads
    odd = synthetic_llama(model.parent / "odd", torch.bfloat16, kv_heads=2, vocab=62)
    table = runner.invoke(app, ["plan", str(odd), "--tp", "4", "--tensors"], env={"COLUMNS": "200"}).stdout
    assert any("lm_head.weight" in line and "+2 zero rows" in line for line in table.splitlines())


def test_plan_json(model: Path) -> None:
    result = run("plan", model, "--tp", "2", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert (data["family"], data["tp"], data["device_ids"]) == ("llama", 2, [0, 1])
    k = next(t for t in data["tensors"] if t["name"] == "model.layers.0.self_attn.k_proj.weight")
    assert k == {
        "name": "model.layers.0.self_attn.k_proj.weight", "dtype": "BF16", "rule": "kv_proj", "style": "colwise",
        "dim": 0, "shape": [8, 32], "rank_shape": [4, 32], "bytes": 512, "rank_bytes": 256,
        "parts": [], "replicas": 1, "padding": 0,
    }  # fmt: skip
    assert [r["device"] for r in data["ranks"]] == ["cuda:0", "cuda:1"]
    assert sum(r["bytes"] for r in data["ranks"]) > sum(t["bytes"] for t in data["tensors"])


def test_split_then_merge(model: Path, tmp_path: Path) -> None:
    before = snapshot(model)
    result = run("split", model, "--tp", "2", "--quiet")
    assert result.exit_code == 0, result.output
    out = tmp_path / "model-tp2"
    assert f"Wrote {out}: llama family, tp 2, 21 tensors per rank" in result.stdout
    assert "model-rank-1-part-0.safetensors" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model-rank-0-part-0.safetensors", "model-rank-1-part-0.safetensors",
        "reshard-rank-0.json", "reshard-rank-1.json", "reshard.json",
    ]  # fmt: skip
    result = run("merge", out, "--quiet")
    assert result.exit_code == 0, result.output
    merged = tmp_path / "model-tp2-merged"
    assert f"Wrote {merged}: model.safetensors (21 tensors, 37.2kB) and config.json, from tp 2" in result.stdout
    assert (merged / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    assert snapshot(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model-tp2", "model-tp2-merged"]


def test_progress_bar_goes_to_a_terminal_unless_quiet(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("reshard.cli.PROGRESS_DELAY_S", 0)
    # stderr captured, not a terminal: no bar, however long the work.
    result = run("split", model, "--tp", "2", "--out", tmp_path / "p")
    assert (result.exit_code, result.stderr) == (0, "")
    monkeypatch.setattr("reshard.cli._on_terminal", lambda: True)
    result = run("split", model, "--tp", "2", "--out", tmp_path / "a")
    assert result.exit_code == 0
    assert "split: 100%" in result.stderr and "37.2k/37.2k" in result.stderr
    assert "%" not in result.stdout
    result = run("merge", tmp_path / "a")
    assert "merge: 100%" in result.stderr
    result = run("split", model, "--tp", "2", "--out", tmp_path / "b", "--quiet")
    assert (result.exit_code, result.stderr) == (0, "")


BAD = [
    (["plan", "{model}", "--tp", "6"], 1, ["Error: num_attention_heads (8) is not divisible by --tp 6; valid --tp: 1, 2, 4, 8"]),
    (
        ["plan", "{model}", "--tp", "3"],
        1,
        [
            "Error: num_attention_heads (8) is not divisible by --tp 3; valid --tp: 1, 2, 4, 8",
            "Error: num_key_value_heads (2) is not divisible by --tp 3, nor --tp a multiple of it; valid --tp: 1, 2, 4, 8",
        ],
    ),
    (["split", "{model}", "--tp", "2", "--devices", "0"], 2, ["Error: --devices lists 1 ids but --tp is 2; give one device id per rank"]),
    (["split", "{model}", "--tp", "2", "--devices", "1,1"], 2, ["Error: --devices ids must be distinct, got 1,1"]),
    (["split", "{tmp}/nope", "--tp", "2"], 1, ["Error: {tmp}/nope: no such file or folder"]),
    (["split", "{model}", "--tp", "2", "--config", "{tmp}/c.json"], 1, ["Error: {tmp}/c.json: no model config here; put config.json beside the weights or pass --config FILE"]),
    (["split", "{model}", "--tp", "2", "--out", "{model}", "--force"], 1, ["Error: {model}: output would replace the input {model}/model.safetensors; choose another --out"]),
    (["split", "{model}", "--tp", "2", "--out", "{tmp}", "--force"], 1, ["Error: {tmp}: output would replace the input {model}/model.safetensors; choose another --out"]),
    (["merge", "{model}"], 1, ["Error: {model}: no reshard.json here; pass a folder written by `reshard split`"]),
    (["split", "{model}", "--tp", "2", "--arch", "opt"], 1, [f"Error: --arch opt: unknown family; `reshard families` lists the {len(builtin_families())} known ones"]),
    (["split", "{model}", "--tp", "2", "--arch", "gpt2"], 1, ["Error: 15 tensor(s) match no gpt2 rule and are not 1-D: model.embed_tokens.weight, model.layers.0.mlp.down_proj.weight, model.layers.0.mlp.gate_proj.weight and 12 more; give a rule for them with --rules FILE, or pass --replicate-unknown to copy them whole to every rank"]),
]  # fmt: skip


@pytest.mark.parametrize(("args", "code", "lines"), BAD)
def test_errors(model: Path, tmp_path: Path, args: list[str], code: int, lines: list[str]) -> None:
    fill = {"model": str(model), "tmp": str(tmp_path)}
    before = snapshot(tmp_path)
    result = runner.invoke(app, [a.format(**fill) for a in args])
    assert result.exit_code == code
    assert result.stderr.splitlines() == [line.format(**fill) for line in lines]
    assert result.stdout == ""
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("args", "text"),
    [(["split", "x", "--tp", "2", "--max-shard-size", "5XB"], "Error: --max-shard-size '5XB' is not a size; write e.g. 5GB, 500MB or 2GiB"), (["plan", "x", "--tp", "0"], "Invalid value for '--tp'"), (["split", "x"], "Missing option '--tp'"), (["plan", "x", "--tp", "2", "--devices", "a"], "is not a comma-separated list of GPU ids")],
)  # fmt: skip
def test_bad_flags_exit_2(args: list[str], text: str) -> None:
    result = run(*args)
    assert result.exit_code == 2
    assert text in result.stderr


def test_existing_output_needs_force(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run("split", model, "--tp", "2", "--out", out, "-q").exit_code == 0
    first = snapshot(out)
    result = run("split", model, "--tp", "1", "--out", out, "-q")
    assert (result.exit_code, result.stderr) == (1, f"Error: {out}: already exists; pass --force to replace it or choose another --out\n")
    assert snapshot(out) == first
    assert run("split", model, "--tp", "1", "--out", out, "-q", "--force").exit_code == 0
    assert json.loads((out / "reshard.json").read_text())["tp"] == 1


def test_merge_refuses_missing_or_mismatched_rank_file(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "split"
    assert run("split", model, "--tp", "2", "--out", out, "-q").exit_code == 0
    rank1 = out / "model-rank-1-part-0.safetensors"
    rank1.rename(tmp_path / "aside")
    result = run("merge", out)
    assert result.exit_code == 1
    assert result.stderr == f"Error: {rank1}: missing; the split folder is incomplete, split again\n"
    (tmp_path / "aside").rename(rank1)
    # A rank file from a different split: same names, other shapes.
    assert run("split", model, "--tp", "1", "--out", tmp_path / "tp1", "-q").exit_code == 0
    (tmp_path / "tp1" / "model-rank-0-part-0.safetensors").replace(out / "model-rank-0-part-0.safetensors")
    result = run("merge", out)
    assert result.exit_code == 1
    assert "bytes, but reshard-rank-0.json records" in result.stderr
    assert not (tmp_path / "split-merged").exists()


def reshard_process(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reshard", *args], capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_python_dash_m_and_debug_traceback(tmp_path: Path) -> None:
    version = reshard_process("--version")
    assert version.returncode == 0 and version.stdout.startswith("reshard ")
    plain = reshard_process("plan", str(tmp_path / "nope"), "--tp", "2")
    assert (plain.returncode, plain.stderr) == (1, f"Error: {tmp_path}/nope: no such file or folder\n")
    debug = reshard_process("plan", str(tmp_path / "nope"), "--tp", "2", env={"RESHARD_DEBUG": "1"})
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "reshard.errors.InputError" in debug.stderr


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda m: m.pop("tensors"), "malformed manifest: missing key 'tensors'; split again"),
        (lambda m: m.update(version=9), "malformed manifest: version: must be one of 2, not 9; split again"),
        (lambda m: m["ranks"][0].update(files=["../elsewhere.safetensors"]), "ranks[0].files[0]: must be a plain file name inside the split folder"),
        (lambda m: m["tensors"]["model.norm.weight"].update(dtype="X9"), "tensors.model.norm.weight.dtype: must be a safetensors dtype (BOOL, U8"),
    ],
)  # fmt: skip
def test_merge_refuses_a_damaged_manifest(model: Path, tmp_path: Path, damage, message: str) -> None:
    out = tmp_path / "split"
    assert run("split", model, "--tp", "2", "--out", out, "-q").exit_code == 0
    manifest = json.loads((out / "reshard.json").read_text())
    damage(manifest)
    (out / "reshard.json").write_text(json.dumps(manifest))
    result = run("merge", out)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {out}/reshard.json: ") and message in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "split-merged").exists()


def neox_like(folder: Path) -> Path:
    """A layout no built-in family knows: fused query_key_value with heads interleaved is not assumed, just named."""
    config = {"model_type": "toy", "num_attention_heads": 4, "vocab_size": 32}
    tensors = {
        "embed.weight": torch.arange(32 * 8, dtype=torch.float32).reshape(32, 8),
        "blocks.0.attn.wq.weight": torch.arange(16 * 8, dtype=torch.float32).reshape(16, 8),
        "blocks.0.attn.wo.weight": torch.arange(8 * 16, dtype=torch.float32).reshape(8, 16),
        "blocks.0.norm.weight": torch.ones(8),
    }
    from helpers import write_checkpoint

    return write_checkpoint(folder, tensors, config)


def test_rules_file_for_a_new_layout(tmp_path: Path) -> None:
    model = neox_like(tmp_path / "toy")
    rules = tmp_path / "toy.json"
    rules.write_text(json.dumps({
        "family": "toy",
        "model_types": ["toy"],
        "units": {"heads": {"key": "num_attention_heads"}, "vocab": {"key": "vocab_size", "pad": True}},
        "rules": [
            {"name": "embed", "match": "embed.weight", "style": "vocab", "dim": 0, "units": "vocab"},
            {"name": "wq", "match": "blocks.*.attn.wq.weight", "style": "colwise", "dim": 0, "units": "heads"},
            {"name": "wo", "match": "blocks.*.attn.wo.weight", "style": "rowwise", "dim": 1, "units": "heads"},
        ],
    }))  # fmt: skip
    without = run("plan", model, "--tp", "2")
    assert without.exit_code == 1 and "model_type 'toy' is not supported" in without.stderr
    result = run("plan", model, "--tp", "2", "--rules", rules, "--json")
    assert result.exit_code == 0, result.output
    cuts = {t["name"]: (t["rule"], t["style"], t["rank_shape"]) for t in json.loads(result.stdout)["tensors"]}
    assert cuts == {
        "blocks.0.attn.wo.weight": ("wo", "rowwise", [8, 8]),
        "blocks.0.attn.wq.weight": ("wq", "colwise", [8, 8]),
        "blocks.0.norm.weight": (None, "replicate", [8]),
        "embed.weight": ("embed", "vocab", [16, 8]),
    }
    assert run("split", model, "--tp", "3", "--rules", rules, "-q").exit_code == 1  # 4 heads
    assert run("split", model, "--tp", "4", "--rules", rules, "-q").exit_code == 0
    merged = run("merge", tmp_path / "toy-tp4", "-q")
    assert merged.exit_code == 0
    assert (tmp_path / "toy-tp4-merged" / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()


def test_a_refuse_rule_names_the_tensor_and_the_reason(model: Path, tmp_path: Path) -> None:
    """A Mamba-1 mixer forced into the llama family is refused by name, with why, not replicated on a guess."""
    from safetensors.torch import load_file, save_file

    forged = tmp_path / "hybrid"
    shutil.copytree(model, forged)
    tensors = load_file(str(forged / "model.safetensors"))
    tensors["model.layers.0.mamba.x_proj.weight"] = torch.zeros(8, 4)
    save_file(tensors, str(forged / "model.safetensors"))
    result = run("split", forged, "--tp", "2", "--replicate-unknown")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == (
        "Error: tensor model.layers.0.mamba.x_proj.weight (state_space): a state-space mixer other than Mamba-2's, which reshard "
        "does not cut yet (engines split it by heads in ways no rule here describes); this model cannot be split"
    )
    assert not (tmp_path / "hybrid-tp2").exists()


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"rules": [{"name": "x", "match": "a", "style": "colwise", "dim": 0, "dims": 1}]}, "rules[0]: unknown key 'dims'; allowed keys: dim, match, name, parts, reason, style, units"),
        ({"rules": [{"name": "x", "match": "a", "style": "sideways", "dim": 0}]}, "rules[0].style: must be one of colwise, rowwise, vocab, replicate, refuse, not 'sideways'"),
        ({"units": {"u": {"key": []}}, "rules": []}, "units.u.key: must name at least one config key"),
        ({"rules": [{"name": "x", "match": "a", "style": "refuse"}]}, "rule 'x': a refuse rule needs a reason, and only a refuse rule takes one"),
        ({"rules": [{"name": "x", "match": "a", "style": "refuse", "reason": "r", "dim": 0}]}, "rule 'x': a refuse rule takes no dim, units or parts"),
        ({"family": "f", "extends": "bloom", "rules": []}, "extends 'bloom', which is not a known family; `reshard families` lists them"),
        ({"rules": [{"name": "x", "match": "a", "style": "colwise", "dim": 0, "parts": ["heads", "vocab"]}]}, "rule 'x': a packed tensor cannot hold a padded unit"),
    ],
)  # fmt: skip
def test_rules_file_is_validated_strictly(model: Path, tmp_path: Path, rules: dict, message: str) -> None:
    path = tmp_path / "my-rules.json"
    path.write_text(json.dumps(rules))
    result = run("plan", model, "--tp", "2", "--rules", path)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {path}") and message in result.stderr
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("command", ["plan", "split", "merge", "verify"])
def test_help_reads_as_a_person_writes_it(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], prog_name="reshard")
    assert result.exit_code == 0
    usage = result.stdout.splitlines()[0]
    assert usage == f"Usage: reshard {command} [OPTIONS] {'MODEL' if command in ('plan', 'split') else 'DIR'}"
    text = " ".join(result.stdout.split())  # as one line, whatever the terminal width wrapped
    assert "<" not in text.replace("<model folder>-tp<N>", "").replace("<model folder>-vllm-tp<N>", "").replace("<DIR>-merged", "").replace(
        "./<name>-tp<N>", ""
    )
    assert "{" not in result.stdout
    if command == "split":
        for shown in (
            "--tp N",
            "--out DIR",
            "--devices IDS",
            "--config FILE",
            "--max-shard-size SIZE",
            "--rank R",
            "--force  ",
            "cuda:IDS[r]",
        ):
            assert shown in result.stdout, shown


def test_top_level_help_tells_how_to_see_a_traceback() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "RESHARD_DEBUG=1" in result.stdout


@pytest.mark.parametrize("args", [["-h"], ["split", "-h"], ["merge", "-h"]])
def test_dash_h_is_help(args: list[str]) -> None:
    result = runner.invoke(app, args, prog_name="reshard")
    assert result.exit_code == 0 and result.stdout.startswith("Usage: reshard")


def test_every_command_prints_one_json_document_errors_included(model: Path, tmp_path: Path) -> None:
    """--json: one document on stdout, nothing on stderr, the same exit codes as without it (usage errors too)."""
    out, merged = tmp_path / "s", tmp_path / "m"
    cases = [
        (["plan", model, "--tp", "2"], 0, lambda d: d["tp"] == 2 and len(d["tensors"]) == 21),
        (["split", model, "--tp", "2", "--out", out], 0, lambda d: d["out"] == str(out) and [r["rank"] for r in d["ranks"]] == [0, 1]),
        (["verify", out, "--against", model], 0, lambda d: d["ok"] and d["tensors"] == 21 and d["problems"] == []),
        (["merge", out, "--out", merged], 0, lambda d: d["files"] == ["model.safetensors"] and d["index"] is None),
        (["families"], 0, lambda d: any(f["family"] == "llama" and "llama" in f["model_types"] for f in d)),
        (
            ["plan", model, "--tp", "3"],
            1,
            lambda d: d["error"].startswith("num_attention_heads (8) is not divisible") and len(d["problems"]) == 2,
        ),
        (["split", model, "--tp", "2", "--out", out], 1, lambda d: "--force" in d["error"]),
        (["merge", model], 1, lambda d: d["error"] == f"{model}: no reshard.json here; pass a folder written by `reshard split`"),
        (["plan", model, "--tp", "0"], 2, lambda d: d["error"] == "Invalid value for '--tp': Input should be greater than or equal to 1"),
    ]
    for args, code, check in cases:
        run = subprocess.run([sys.executable, "-m", "reshard", *map(str, args), "--json"], capture_output=True, text=True)
        assert (run.returncode, run.stderr) == (code, ""), args
        data = json.loads(run.stdout)
        assert check(data), (args, data)
        assert code == 0 or data["exit_code"] == code
    (out / "model-rank-1-part-0.safetensors").write_bytes(b"x")
    run = subprocess.run([sys.executable, "-m", "reshard", "verify", str(out), "--json"], capture_output=True, text=True)
    data = json.loads(run.stdout)
    assert run.returncode == 1 and not data["ok"] and "model-rank-1-part-0.safetensors" in data["problems"][0]
