"""Output folders appear whole or not at all: written in a hidden folder beside the target while the target's
lock is held, given the inputs' permission bits, fsynced, and renamed into place without replacing anything that
appeared meanwhile. With --rank, a rank's files are staged inside the target and moved in, its record last."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from reshard.engine.target import (
    check_identity,
    check_replaceable,
    clear_leftovers,
    identity,
    locked,
    output_modes,
    rename_noreplace,
    restrict,
)
from reshard.errors import OutputError
from reshard.formats.io import copy_durably, fsync_dir
from reshard.formats.manifest import Manifest, dumps
from reshard.formats.names import MANIFEST_NAME, rank_record_name

RANKS_STAGING = re.compile(r"\.ranks-[a-z0-9_]{8}\.partial")


@contextmanager
def staged_output(target: Path, inputs: Sequence[Path], *, force: bool) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes `target` (replacing, with --force, the reshard output
    that was there when the run began); on any error or interrupt it is removed and `target` is as it was."""
    target = check_identity(target, inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(target):
        clear_leftovers(target)
        replacing = check_replaceable(target, force=force)
        modes = output_modes(inputs)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.reshard-", suffix=".partial", dir=target.parent))
        try:
            yield staging
            restrict(staging, modes)
            fsync_dir(staging)
            _move_in(staging, target, replacing)
            fsync_dir(target.parent)
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise write_error(e, staging, target) from e
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _move_in(staging: Path, target: Path, replacing: tuple[int, int] | None) -> None:
    """The staging folder becomes the target; what it replaces is the folder checked when the run began, and
    nothing that appeared since."""
    if identity(target) != replacing:
        raise OutputError(f"{target}: appeared or changed while reshard was writing; nothing was replaced; choose another --out")
    if replacing is None:
        rename_noreplace(staging, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.reshard-", suffix=".old", dir=target.parent))
    os.rename(target, old / target.name)
    try:
        rename_noreplace(staging, target)
    except BaseException:
        os.rename(old / target.name, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


_FIXES = {
    errno.ENOSPC: "free some space or choose another --out",
    errno.EDQUOT: "free some space or choose another --out",
    errno.EACCES: "choose a folder you can write to with --out",
    errno.EPERM: "choose a folder you can write to with --out",
    errno.EROFS: "choose a folder you can write to with --out",
}


def write_error(error: OSError, staging: Path, target: Path) -> OSError | OutputError:
    """A failed write inside the staging folder, told as the output file it was for."""
    if isinstance(error, FileExistsError) and error.filename and Path(os.fsdecode(error.filename)) == target:
        return OutputError(f"{target}: appeared while reshard was writing; nothing was replaced; choose another --out")
    if not error.filename:
        return error
    path = Path(os.fsdecode(error.filename))
    if staging != path and staging not in path.parents:
        return error
    where = target / path.relative_to(staging)
    fix = _FIXES.get(error.errno or 0, "check the disk or choose another --out")
    return OutputError(f"{where}: cannot write: {error.strerror}; {fix}; nothing was written")


@contextmanager
def staged_ranks(
    target: Path, inputs: Sequence[Path], *, force: bool, manifest: Manifest, ranks: Sequence[int], shared: dict[str, Path]
) -> Iterator[Path]:
    """Yield a staging folder inside `target` for some ranks' files; on success they move into `target`, each
    rank's record last, beside any ranks already there (other nodes' or processes' extractions).

    reshard.json and config.json are the same whichever ranks are written, so they are added when absent and
    must match when present; several processes may add ranks to one folder at once. A target this run created
    and left empty is removed again.
    """
    target = check_identity(target, inputs)
    created = not os.path.lexists(target)
    target.mkdir(parents=True, exist_ok=True)
    try:
        _check_ranks_target(target, force=force, manifest=manifest, ranks=ranks)
        with _rank_staging(target) as staging:
            yield staging
            _move_ranks(staging, target, manifest, ranks, shared, output_modes(inputs))
    except BaseException:
        if created:
            _remove_if_empty(target)
        raise


def _check_ranks_target(target: Path, *, force: bool, manifest: Manifest, ranks: Sequence[int]) -> None:
    """Refused: a target that is not a folder, holds another split or, without --force, one of these ranks."""
    if target.is_symlink() or not target.is_dir():
        raise OutputError(f"{target}: exists and is not a folder; choose another --out")
    existing = target / MANIFEST_NAME
    if existing.is_file() and existing.read_text(encoding="utf-8") != dumps(manifest.to_dict()):
        raise OutputError(f"{target}: holds another split (its {MANIFEST_NAME} differs from this one); choose another --out")
    for rank in ranks:
        held = [target / n for n in (rank_record_name(rank), *manifest.rank_files[rank]) if (target / n).exists()]
        if held and not force:
            raise OutputError(f"{target}: already holds rank {rank}; pass --force to replace it")


@contextmanager
def _rank_staging(target: Path) -> Iterator[Path]:
    """A staging folder inside the target, locked while this run uses it; stale ones (their run died, so their
    lock is free) are removed first."""
    for entry in os.scandir(target):
        if RANKS_STAGING.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
            with _try_lock(Path(entry.path)) as free:
                if free:
                    shutil.rmtree(entry.path, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".ranks-", suffix=".partial", dir=target))
    try:
        with _try_lock(staging):
            yield staging
    except OSError as e:
        raise write_error(e, staging, target) from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _try_lock(folder: Path) -> Iterator[bool]:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _move_ranks(
    staging: Path, target: Path, manifest: Manifest, ranks: Sequence[int], shared: dict[str, Path], modes: tuple[int, int]
) -> None:
    added = [name for name in shared if not (target / name).exists()]
    for name in added:
        copy_durably(shared[name], staging / name)
    restrict(staging, modes)
    for name in added:
        os.replace(staging / name, target / name)
    for rank in ranks:
        for name in manifest.rank_files[rank]:
            os.replace(staging / name, target / name)
    if not (target / MANIFEST_NAME).exists():
        os.replace(staging / MANIFEST_NAME, target / MANIFEST_NAME)
    for rank in ranks:
        os.replace(staging / rank_record_name(rank), target / rank_record_name(rank))
    fsync_dir(target)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # other ranks' files, or another process's staging: it stays
