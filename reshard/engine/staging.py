"""Output folders appear whole or not at all: written in a hidden folder beside the target, renamed when done;
with --rank, a rank's files staged inside the target and moved in, its record last."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from reshard.errors import OutputError
from reshard.formats.io import copy_durably, fsync_dir
from reshard.formats.layout import CONFIG_NAME, MANIFEST_NAME, rank_record_name
from reshard.formats.manifest import Manifest, dumps


def check_target(target: Path, inputs: Sequence[Path], *, force: bool) -> Path:
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
def staged_output(target: Path, inputs: Sequence[Path], *, force: bool) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `target`, on any error or interrupt it is removed."""
    target = check_target(target, inputs, force=force)
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def staged_ranks(
    target: Path, inputs: Sequence[Path], *, force: bool, manifest: Manifest, ranks: Sequence[int], config: Path | None
) -> Iterator[Path]:
    """Yield a staging folder inside `target` for some ranks' files; on success they move into `target`, each
    rank's record last, beside any ranks already there (other nodes' or processes' extractions).

    reshard.json and config.json are the same whichever ranks are written, so they are added when absent and
    must match when present; several processes may add ranks to one folder at once.
    """
    target = _ranks_target(target, inputs, force=force, manifest=manifest, ranks=ranks)
    staging = Path(tempfile.mkdtemp(prefix=".ranks-", suffix=".partial", dir=target))
    try:
        yield staging
        if config is not None and not (target / CONFIG_NAME).exists():
            copy_durably(config, staging / CONFIG_NAME)
            os.replace(staging / CONFIG_NAME, target / CONFIG_NAME)
        for rank in ranks:
            for name in manifest.rank_files[rank]:
                os.replace(staging / name, target / name)
        if not (target / MANIFEST_NAME).exists():
            os.replace(staging / MANIFEST_NAME, target / MANIFEST_NAME)
        for rank in ranks:
            os.replace(staging / rank_record_name(rank), target / rank_record_name(rank))
        fsync_dir(target)
    except OSError as e:
        raise write_error(e, staging, target) from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _ranks_target(target: Path, inputs: Sequence[Path], *, force: bool, manifest: Manifest, ranks: Sequence[int]) -> Path:
    """The folder ranks are added to, created if needed: refused when it holds another split or, without
    --force, one of these ranks."""
    target = check_target(target, inputs, force=True)
    target.mkdir(parents=True, exist_ok=True)
    existing = target / MANIFEST_NAME
    if existing.is_file() and existing.read_text(encoding="utf-8") != dumps(manifest.to_dict()):
        raise OutputError(f"{target}: holds another split (its {MANIFEST_NAME} differs from this one); choose another --out")
    for rank in ranks:
        held = [target / n for n in (rank_record_name(rank), *manifest.rank_files[rank]) if (target / n).exists()]
        if held and not force:
            raise OutputError(f"{target}: already holds rank {rank}; pass --force to replace it")
    return target
