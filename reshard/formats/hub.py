"""Models named by their Hugging Face Hub id (`org/name`): found in the local cache, or downloaded into it, only
the files a split reads. huggingface_hub does the finding and the downloading, so HF_HOME, HF_HUB_CACHE,
HF_HUB_OFFLINE and HF_TOKEN mean what they mean to every other tool; it is imported only for a repo id."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from reshard.errors import InputError, UsageError
from reshard.formats.names import CONFIG_NAME, ENGINE_FILES, INDEX_NAME, SINGLE_NAME
from reshard.jsonfile import read_json

# `org/name` as the Hub spells repo ids; a path that exists on disk is always read as a path.
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
# Beside the weights: what `split` copies or reads (config, generation config, tokenizer), never other weights.
SMALL_FILES = [CONFIG_NAME, INDEX_NAME, *ENGINE_FILES]


def is_repo_id(model: str | Path) -> bool:
    text = str(model)
    return not os.path.lexists(text) and REPO_ID.match(text) is not None and not text.endswith((".json", ".safetensors"))


def locate_model(model: str | Path, *, revision: str | None = None, progress: bool | None = None) -> Path:
    """A model as a local path: a path as it is; a repo id as its snapshot folder in the Hugging Face cache,
    downloading what is missing (the index or model.safetensors, the files the index names, config and tokenizer).

    Args:
        model: a path, or a Hub repo id such as "Qwen/Qwen3-8B".
        revision: a branch, tag or commit of the repo; only with a repo id.
        progress: show huggingface_hub's download bars (None: its own default).
    """
    if not is_repo_id(model):
        if revision is not None:
            raise UsageError(f"--revision {revision}: applies to a Hub repo id (org/name); {model} is a path")
        return Path(model)
    repo = str(model)
    try:
        from huggingface_hub.utils.tqdm import disable_progress_bars, enable_progress_bars
    except ImportError:
        raise UsageError(f"{repo}: reading a Hub repo id needs huggingface_hub: pip install huggingface_hub") from None
    if progress is not None:
        (enable_progress_bars if progress else disable_progress_bars)()
    folder = _download(repo, revision, SMALL_FILES)
    weights = _weights(folder)
    return folder if all((folder / name).is_file() for name in weights) else _download(repo, revision, weights)


def _weights(folder: Path) -> list[str]:
    """The safetensors files the index names, or model.safetensors."""
    index = folder / INDEX_NAME
    if not index.is_file():
        return [SINGLE_NAME]
    try:  # read as every JSON input is: bounded in size and depth
        weight_map = read_json(index, what="index", fix="download it again")["weight_map"]
        return sorted({str(name) for name in weight_map.values()})
    except (InputError, KeyError, TypeError, AttributeError):
        return [INDEX_NAME]  # open_checkpoint reports what is wrong with it


def _download(repo: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as e:  # huggingface_hub's errors: named below, each with its fix
        at = f" (revision {revision})" if revision is not None else ""
        raise InputError(f"{repo}{at}: {_explain(e, revision)}") from e


def _explain(error: Exception, revision: str | None) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    what = type(error).__name__
    if isinstance(error, GatedRepoError):
        return "a gated model; accept its terms on huggingface.co and log in with `hf auth login`"
    if isinstance(error, RepositoryNotFoundError):
        return "no such folder here, and no such model on the Hugging Face Hub (a private one needs `hf auth login`); check the name"
    if isinstance(error, RevisionNotFoundError):
        return f"no revision {revision!r} in this repo; pass a branch, tag or commit it has"
    if isinstance(error, LocalEntryNotFoundError) or _offline(constants):
        return (
            f"no such folder here, not in the Hugging Face cache ({constants.HF_HUB_CACHE}), and the Hub cannot be reached"
            f"{' (HF_HUB_OFFLINE is set)' if _offline(constants) else ''}; download it where the Hub can be reached, "
            "or pass the model's folder"
        )
    return f"cannot download from the Hugging Face Hub ({what}: {error}); check the network, or pass the model's folder"


def _offline(constants: Any) -> bool:
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def cached_repo_name(folder: Path) -> str | None:
    """The repo's name when `folder` is a snapshot in a Hugging Face cache (models--org--name/snapshots/<commit>)."""
    parts = folder.absolute().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].split("--")[-1]
    return None


def inside_cached_repo(folder: Path, path: Path) -> bool:
    """Whether a link in a cached snapshot leads to a blob of the same repo, as huggingface_hub lays them out."""
    if cached_repo_name(folder) is None:
        return False
    return path.resolve().is_relative_to(folder.absolute().parent.parent.resolve())
