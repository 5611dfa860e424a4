"""Reading the small JSON files reshard is given (config.json, TP configs, rules, indexes, manifests): a regular
file only, of bounded size, any failure told as one InputError line that names the file and the fix."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from reshard.errors import InputError

# Far above any real config, index or manifest; a file this large is not one.
MAX_JSON_BYTES = 1 << 30


class DuplicateKey(ValueError):
    """A JSON object with a key given twice."""


def strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object that refuses a key given twice (json.loads would keep the last silently)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKey(key)
        result[key] = value
    return result


def read_text(path: Path, *, what: str, fix: str, missing: str | None = None) -> str:
    """A regular file's UTF-8 text: a FIFO or a device (which would block or never end) is refused unread.

    `what` names the file in messages ("model config"), `fix` says what to do about a bad one and `missing`
    about an absent one (`fix` when not given)."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{path}: the {what} is not a regular file; {fix}")
        if info.st_size > MAX_JSON_BYTES:
            raise InputError(f"{path}: the {what} is {info.st_size} bytes, too large to be one; {fix}")
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no {what} here; {missing or fix}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the {what} ({e}); {fix}") from e


def read_json(path: Path, *, what: str, fix: str, missing: str | None = None, strict: bool = False) -> Any:
    """The file's JSON; with `strict`, an object giving a key twice raises DuplicateKey for the caller to name."""
    text = read_text(path, what=what, fix=fix, missing=missing)
    try:
        return json.loads(text, object_pairs_hook=strict_object if strict else None)
    except DuplicateKey:
        raise
    except (ValueError, RecursionError) as e:
        raise InputError(f"{path}: cannot read the {what} as JSON ({e}); {fix}") from e
