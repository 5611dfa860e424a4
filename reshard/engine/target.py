"""Where an output may go, decided by the file system rather than by spelling: never an input, inside one or
around one (compared by device and inode, through any symlink, `//` or bind mount); an existing folder only with
--force and only when reshard wrote it; one run at a time per output, by a lock held for the whole run."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from reshard.errors import InputError, OutputError
from reshard.formats.manifest import read_manifest
from reshard.formats.names import CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, SINGLE_NAME, rank_record_name

Identity = tuple[int, int]  # st_dev, st_ino

LOCK_SUFFIX = ".reshard-lock"
MERGED_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def identity(path: Path) -> Identity | None:
    """What the file system knows the path as (symlinks followed); None when nothing is there."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return info.st_dev, info.st_ino


def _chain(path: Path) -> list[Identity]:
    """The identities of the path and of every existing folder above it, innermost first."""
    real = Path(os.path.realpath(path))
    found = (identity(p) for p in (real, *real.parents))
    return [i for i in found if i is not None]


def check_identity(target: Path, inputs: Sequence[Path]) -> Path:
    """Refuse a target that is an input, lies inside an input folder, or holds an input, however it is spelled."""
    target = Path(os.path.abspath(target))
    mine, here = _chain(target), identity(target)
    for path in inputs:
        theirs = identity(path)
        if theirs is None:
            continue
        if theirs == here or (here is not None and here in _chain(path)):
            raise OutputError(f"{target}: output would replace the input {path}; choose another --out")
        if theirs in mine:
            raise OutputError(f"{target}: output would be written inside the input folder {path}; choose another --out")
    return target


def check_replaceable(target: Path, *, force: bool) -> Identity | None:
    """The identity of the existing output --force may replace, or None when there is none. Refused: a file or
    link in the way, an existing folder without --force, and any folder holding something reshard did not write."""
    if not os.path.lexists(target):
        return None
    if target.is_symlink() or not target.is_dir():
        raise OutputError(f"{target}: exists and is not a folder; choose another --out")
    if not force:
        raise OutputError(f"{target}: already exists; pass --force to replace it or choose another --out")
    foreign = _foreign_entry(target)
    if foreign is not None:
        raise OutputError(
            f"{target}: holds {foreign}, which reshard did not write; --force replaces only a folder written by reshard "
            "split or merge: remove it yourself or choose another --out"
        )
    return identity(target)


def _foreign_entry(folder: Path) -> str | None:
    """The first entry of a folder that is not a file reshard writes there, or None."""
    known = {CONFIG_NAME, SINGLE_NAME, INDEX_NAME}
    if (folder / MANIFEST_NAME).is_file():
        try:
            manifest = read_manifest(folder)
        except InputError:
            return MANIFEST_NAME + " (unreadable)"
        known |= {MANIFEST_NAME, *manifest.files}
        known |= {name for files in manifest.rank_files for name in files}
        known |= {rank_record_name(r) for r in range(manifest.tp_config.tp)}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        plain = entry.is_file(follow_symlinks=False)
        if not plain or not (entry.name in known or MERGED_NAME.fullmatch(entry.name)):
            return entry.name
    return None


@contextmanager
def locked(target: Path) -> Iterator[None]:
    """Hold the output's lock file (beside it) for the whole run: a second run on the same output is refused at
    once, and a run killed with -9 leaves a lock that the next one takes over."""
    path = target.parent / f".{target.name}{LOCK_SUFFIX}"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"{target}: another reshard run is writing it; wait for it to finish or choose another --out") from None
        if identity(path) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
            break
        os.close(fd)  # the run that held it finished and removed it: take a fresh one
    try:
        yield
    finally:
        try:
            os.unlink(path)
        finally:
            os.close(fd)


def staging_pattern(target: Path) -> re.Pattern[str]:
    """The names of this output's staging (.partial) and replaced (.old) folders, and no other output's."""
    return re.compile(rf"\.{re.escape(target.name)}\.reshard-[a-z0-9_]{{8}}\.(partial|old)")


def clear_leftovers(target: Path) -> None:
    """Under the lock: remove what runs killed before finishing left beside the output. A run killed between
    moving the old output aside and moving the new one in left the old one in `.old`: it is put back."""
    pattern = staging_pattern(target)
    for entry in sorted(os.scandir(target.parent), key=lambda e: e.name):
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        kept = Path(entry.path) / target.name
        if match.group(1) == "old" and not os.path.lexists(target) and os.path.lexists(kept):
            os.rename(kept, target)
        shutil.rmtree(entry.path, ignore_errors=True)


@cache
def _renameat2() -> Callable[..., int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    found: Callable[..., int] = function
    return found


AT_FDCWD = -100
RENAME_NOREPLACE = 1


def rename_noreplace(source: Path, target: Path) -> None:
    """Rename, failing with FileExistsError rather than replacing anything at `target` (Linux's renameat2; where
    the file system lacks it, a check just before the rename)."""
    function = _renameat2()
    if function is not None:
        if function(AT_FDCWD, os.fsencode(source), AT_FDCWD, os.fsencode(target), RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(target))
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def output_modes(inputs: Sequence[Path]) -> tuple[int, int]:
    """(file mode, folder mode) for an output: no wider than the input files' permission bits or the umask."""
    mode = 0o666
    for path in inputs:
        info = os.stat(path)
        if stat.S_ISREG(info.st_mode):
            mode &= info.st_mode
    mode &= ~umask() & 0o666
    return mode, mode | ((mode & 0o444) >> 2)


def restrict(folder: Path, modes: tuple[int, int]) -> None:
    """Give every file in a staging folder, and the folder, the output's modes."""
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False):
            os.chmod(entry.path, modes[0])
    os.chmod(folder, modes[1])
