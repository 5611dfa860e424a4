"""Output folders appear whole or not at all: written in a hidden folder beside the target, renamed when done."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from reshard.errors import OutputError


def check_target(target: Path, inputs: Sequence[Path], force: bool) -> Path:
    """Refuse a target that is, holds or lies inside an input, or an existing one without --force."""
    target = Path(os.path.abspath(target))
    for path in inputs:
        path = Path(os.path.abspath(path))
        if path == target or target in path.parents:
            raise OutputError(f"{target}: output would replace the input {path}; choose another --out")
        if path in target.parents and path.is_dir():
            raise OutputError(f"{target}: output would be written inside the input folder {path}; choose another --out")
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise OutputError(f"{target}: exists and is not a folder; choose another --out")
        if not force:
            raise OutputError(f"{target}: already exists; pass --force to replace it or choose another --out")
    return target


@contextmanager
def staged_output(target: Path, inputs: Sequence[Path], force: bool) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `target`, on any error or interrupt it is removed."""
    target = check_target(target, inputs, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; the result should look like any new folder
        yield staging
        fsync_dir(staging)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            target.rename(old / target.name)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
        fsync_dir(target.parent)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise write_error(e, staging, target) from e
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


_FIXES = {
    errno.ENOSPC: "free some space or choose another --out",
    errno.EDQUOT: "free some space or choose another --out",
    errno.EACCES: "choose a folder you can write to with --out",
    errno.EPERM: "choose a folder you can write to with --out",
    errno.EROFS: "choose a folder you can write to with --out",
}


def write_error(error: OSError, staging: Path, target: Path) -> OSError | OutputError:
    """A failed write inside the staging folder, told as the output file it was for."""
    if not error.filename:
        return error
    path = Path(os.fsdecode(error.filename))
    if staging != path and staging not in path.parents:
        return error
    where = target / path.relative_to(staging)
    fix = _FIXES.get(error.errno or 0, "check the disk or choose another --out")
    return OutputError(f"{where}: cannot write: {error.strerror}; {fix}; nothing was written")


def write_durably(path: Path, data: bytes) -> None:
    """A small output file, on disk before the folder is renamed into place."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def copy_durably(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)
    with open(target, "rb+") as f:
        os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
