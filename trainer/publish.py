"""Atomic publishing of a Model as the next integer version of a model repository.

The version is written into `models/<name>/.tmp-XXXX/`, every file and the directory are
fsynced, and only then is the directory renamed to `models/<name>/<N>/`. A rename is atomic,
so a reader (the service's registry scan) sees either no version N or a complete one: a
crash, a kill or a full disk at any point leaves at most a `.tmp-*` directory, which the
server ignores because its name is not an integer. Half-copied versions are the classic
failure of this layout (tensorflow/serving #207, #1086).

An existing version is never overwritten: the rename uses RENAME_NOREPLACE where Linux has
it, and otherwise a target that exists (another trainer won the race) makes us try N + 1.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from service.model import Model, save_model

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_VERSION = re.compile(r"^[0-9]+$")
# How many taken version numbers we step over before giving up (only a race gets here).
MAX_RACE_RETRIES = 100


class PublishError(Exception):
    """Publishing failed; no version was created. The message is one line for the CLI."""


def versions(repo: Path) -> list[int]:
    """The integer versions present in `models/<name>/`, ascending."""
    try:
        names = os.listdir(repo)
    except FileNotFoundError:
        return []
    return sorted(int(n) for n in names if _VERSION.match(n) and (repo / n).is_dir())


def next_version(repo: Path) -> int:
    """Highest existing integer + 1 (1 for an empty repository)."""
    existing = versions(repo)
    return existing[-1] + 1 if existing else 1


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new files, a rename) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(
    model: Model,
    model_dir: Path,
    name: str,
    *,
    extra_files: Callable[[Path], None] | None = None,
) -> tuple[int, Path]:
    """Write `model` as the next version of `model_dir/name`; returns (version, its path).

    `extra_files(tmp_dir)` may add files (plots) before the directory is sealed; they are
    fsynced and published with the model, or discarded with it.
    """
    if not _NAME.match(name):
        raise PublishError(
            f"model name must be letters, digits, '.', '_' or '-' (not starting with "
            f"'.' or '-'), got {name!r}"
        )
    repo = model_dir / name
    try:
        repo.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=repo))
    except OSError as e:
        raise PublishError(_describe(e, f"cannot create {repo}")) from None
    try:
        save_model(model, tmp)
        if extra_files is not None:
            extra_files(tmp)
            for child in tmp.iterdir():
                _fsync_file(child)
        fsync_dir(tmp)
        version, target = _rename_into_place(tmp, repo)
        fsync_dir(repo)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise PublishError(_describe(e, f"cannot publish into {repo}")) from None
        raise
    return version, target


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rename_into_place(tmp: Path, repo: Path) -> tuple[int, Path]:
    version = next_version(repo)
    for _ in range(MAX_RACE_RETRIES):
        target = repo / str(version)
        try:
            rename_noreplace(tmp, target)
            return version, target
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        # Someone else published `version` between our scan and our rename.
        version = max(version + 1, next_version(repo))
    raise PublishError(f"{repo}: gave up after {MAX_RACE_RETRIES} versions were taken under us")


_libc: ctypes.CDLL | None = None
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2() -> Callable[..., int] | None:
    global _libc
    if _libc is None:
        with contextlib.suppress(OSError):
            _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fn = getattr(_libc, "renameat2", None) if _libc is not None else None
    return fn


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, failing with EEXIST if `dst` exists, even as an empty directory.

    Plain rename(2) silently replaces an empty directory; renameat2(RENAME_NOREPLACE) does
    not. Where it is unavailable (old kernel or libc, some filesystems) we check and rename,
    which is only racy against a concurrent mkdir of the very same empty directory.
    """
    fn = _renameat2()
    if fn is not None:
        rc = fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _describe(e: OSError, what: str) -> str:
    if e.errno == errno.ENOSPC:
        return f"{what}: no space left on device; the partial version was removed"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{what}: not writable ({e.strerror})"
    return f"{what}: {e.strerror or e}"
