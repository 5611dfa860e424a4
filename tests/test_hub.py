"""Models named by a Hugging Face Hub repo id, read offline from a cache laid out as huggingface_hub lays it out
(blobs, snapshots of links into them, refs), through the installed command."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import snapshot, synthetic_llama

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo: str, model: Path, *, commit: str = COMMIT, ref: str = "main") -> Path:
    """Put the files of `model` into a Hub cache as huggingface_hub does; returns the snapshot folder."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    snapshot_dir = root / "snapshots" / commit
    snapshot_dir.mkdir(parents=True)
    for path in sorted(model.iterdir()):
        data = path.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (root / "blobs" / blob).write_bytes(data)
        (snapshot_dir / path.name).symlink_to(Path("..", "..", "blobs", blob))
    (root / "refs" / ref).write_text(commit)
    return snapshot_dir


def reshard(*args: object, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    hub_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | env
    return subprocess.run([sys.executable, "-m", "reshard", *map(str, args)], cwd=cwd, env=hub_env, capture_output=True, text=True)


@pytest.fixture
def hub(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A cache holding org/tiny (a llama with a tokenizer file), a working folder, and the offline environment."""
    model = synthetic_llama(tmp_path / "model", torch.bfloat16, kv_heads=2)
    (model / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    cache = tmp_path / "cache"
    cache_repo(cache, "org/tiny", model)
    work = tmp_path / "work"
    work.mkdir()
    return model, work, {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def test_a_repo_id_splits_offline_from_the_cache_into_the_working_folder(hub, tmp_path: Path) -> None:
    model, work, env = hub
    before = snapshot(tmp_path / "cache")
    run = reshard("split", "org/tiny", "--tp", "2", cwd=work, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("Wrote tiny-tp2: llama family, tp 2")
    assert run.stderr == ""
    assert snapshot(tmp_path / "cache") == before  # nothing written into the cache
    run = reshard("merge", "tiny-tp2", "--out", "back", cwd=work, env=env)
    assert run.returncode == 0, run.stderr
    assert (work / "back" / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    run = reshard("verify", "tiny-tp2", "--against", "org/tiny", cwd=work, env=env)
    assert run.returncode == 0 and "every rank holds exactly its slice of org/tiny" in run.stdout, run.stderr
    # vLLM's layout takes the tokenizer files along, read through the cache's links into its blobs.
    run = reshard("split", "org/tiny", "--tp", "2", "--format", "vllm", "--revision", COMMIT, cwd=work, env=env)
    assert run.returncode == 0, run.stderr
    assert (work / "tiny-vllm-tp2" / "tokenizer_config.json").read_text() == '{"model_max_length": 64}\n'


def test_hf_home_and_a_snapshot_folder_given_as_a_path(hub, tmp_path: Path) -> None:
    model, work, _ = hub
    home = tmp_path / "home"
    snapshot_dir = cache_repo(home / "hub", "org/other", model, commit="f" * 40, ref="v1")
    run = reshard("plan", "org/other", "--tp", "2", "--revision", "v1", cwd=work, env={"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("org/other: llama family")
    # The snapshot folder itself: the output still goes to the working folder, never into the cache.
    run = reshard("split", snapshot_dir, "--tp", "2", cwd=work, env={})
    assert run.returncode == 0, run.stderr
    assert (work / "other-tp2" / "reshard.json").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["org/missing"],
            "Error: org/missing: no such folder here, not in the Hugging Face cache ({cache}), and the Hub cannot be reached (HF_HUB_OFFLINE is set)",
        ),
        (
            ["org/tiny", "--revision", "v9"],
            "Error: org/tiny (revision v9): no such folder here, not in the Hugging Face cache ({cache}), and the Hub cannot be reached",
        ),
        (["{model}", "--revision", "v9"], "Error: --revision v9: applies to a Hub repo id (org/name); {model} is a path"),
    ],
)
def test_a_repo_id_that_cannot_be_read_is_named_with_the_fix(hub, tmp_path: Path, args: list[str], message: str) -> None:
    model, work, env = hub
    run = reshard("split", *[a.format(model=model) for a in args], "--tp", "2", cwd=work, env=env)
    assert run.returncode in (1, 2)
    assert run.stderr.startswith(message.format(cache=tmp_path / "cache", model=model)), run.stderr
    assert len(run.stderr.splitlines()) == 1
    assert list(work.iterdir()) == []
