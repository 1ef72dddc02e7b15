"""Atomic publishing of a Model as the next integer version of a model repository.

The version is written into `models/<name>/.tmp-XXXX/`, every file and the directory are
fsynced, and only then is the directory renamed to `models/<name>/<N>/`. A rename is atomic,
so a reader (the service's registry scan) sees either no version N or a complete one: a
crash, a kill or a full disk at any point leaves at most a `.tmp-*` directory, which the
server ignores because its name is not an integer. Half-copied versions are the classic
failure of this layout (tensorflow/serving #207, #1086).

An existing version is never overwritten: the rename uses RENAME_NOREPLACE where Linux has
it, and otherwise a target that exists (another trainer won the race) makes us try N + 1.

A published version is readable by a server running as another user: directories 0755 and
files 0644, narrowed by the umask (mkdtemp alone would leave the directory 0700, whatever the
umask). A umask of 077 keeps versions private to the trainer's user, as it would any file.

Version numbers are never reused: `models/<name>/.version-high-water` holds the highest
number ever published there, so deleting the newest version (a rollback) and publishing
again gives a new number, and logs and dashboards never name two models with one number.
Publishers take an flock on `models/<name>/.publish.lock` while they choose the number,
rename and raise the mark, so concurrent trainers on one host (or a file system with working
flock) never collide; the no-replace rename keeps even a publisher without the lock from
overwriting a version. The mark only rises, and a missing or damaged one counts as 0 (the
directories on disk still bound the next number from below).

The staging directory is `.tmp-<host>-<pid>-XXXX`. A trainer killed while staging leaves it
behind; the next publish into the same model removes those whose trainer is gone: on this
host, a pid that no longer runs; otherwise (another host on a shared volume, or a name
without a pid) one not modified for STALE_STAGING_AGE_S.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from service.model import Model, save_model

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_VERSION = re.compile(r"^[0-9]+$")
# How many taken version numbers we step over before giving up (only a race gets here).
MAX_RACE_RETRIES = 100
# Widest modes of a published version, before the umask narrows them.
DIR_MODE = 0o755
FILE_MODE = 0o644
STAGING_PREFIX = ".tmp-"
# A staging directory whose owner cannot be checked is stale once untouched this long.
STALE_STAGING_AGE_S = 3600.0
HIGH_WATER_FILE = ".version-high-water"
LOCK_FILE = ".publish.lock"
_STAGING = re.compile(r"^\.tmp-(?P<host>[A-Za-z0-9_.]*)-(?P<pid>[0-9]+)-")


class PublishError(Exception):
    """Publishing failed; no version was created. The message is one line for the CLI."""


def versions(repo: Path) -> list[int]:
    """The integer versions present in `models/<name>/`, ascending."""
    try:
        names = os.listdir(repo)
    except FileNotFoundError:
        return []
    return sorted(int(n) for n in names if _VERSION.match(n) and (repo / n).is_dir())


def high_water(repo: Path) -> int:
    """The highest version number ever published into `repo` (0: none recorded)."""
    try:
        with open(repo / HIGH_WATER_FILE, "rb") as f:
            text = f.read(64).decode("ascii", "replace").strip()
    except OSError:
        return 0
    return int(text) if _VERSION.match(text) and len(text) <= 19 else 0


def next_version(repo: Path) -> int:
    """One past both the highest version on disk and the high-water mark (1 when new)."""
    existing = versions(repo)
    return max(existing[-1] if existing else 0, high_water(repo)) + 1


def _raise_high_water(repo: Path, version: int) -> None:
    """Record `version` as published (temp file, fsync, rename: never a torn mark)."""
    if high_water(repo) >= version:
        return
    tmp = repo / f"{HIGH_WATER_FILE}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{version}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, repo / HIGH_WATER_FILE)


@contextlib.contextmanager
def _publish_lock(repo: Path) -> Iterator[None]:
    """Exclusive among publishers of one model while a number is chosen and taken."""
    fd = os.open(repo / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


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
        remove_stale_staging(repo)
        tmp = Path(tempfile.mkdtemp(prefix=_staging_prefix(), dir=repo))
    except OSError as e:
        raise PublishError(_describe(e, f"cannot create {repo}")) from None
    try:
        save_model(model, tmp)
        if extra_files is not None:
            extra_files(tmp)
            for child in tmp.iterdir():
                _fsync_file(child)
        _make_readable(tmp)
        fsync_dir(tmp)
        version, target = _rename_into_place(tmp, repo)
        fsync_dir(repo)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise PublishError(_describe(e, f"cannot publish into {repo}")) from None
        raise
    return version, target


def _umask() -> int:
    """This process's umask, read without changing it where Linux allows."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore (the trainer is one thread here)
    os.umask(mask)
    return mask


def _make_readable(tmp: Path) -> None:
    """DIR_MODE / FILE_MODE narrowed by the umask, on the version and everything in it."""
    mask = _umask()
    for root, dirs, files in os.walk(tmp):
        os.chmod(root, DIR_MODE & ~mask)
        for d in dirs:
            os.chmod(os.path.join(root, d), DIR_MODE & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), FILE_MODE & ~mask)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64]


def _staging_prefix() -> str:
    return f"{STAGING_PREFIX}{_host()}-{os.getpid()}-"


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_staging(repo: Path, *, now: float | None = None) -> list[str]:
    """Remove staging directories that killed trainers left in `repo`; return their names.

    On this host a dead pid says the trainer is gone; anything else (another host, an old
    `.tmp-XXXX` name) must be untouched for STALE_STAGING_AGE_S. A directory that vanishes
    meanwhile (its trainer finished) is fine.
    """
    now = time.time() if now is None else now
    host = _host()
    removed: list[str] = []
    try:
        names = os.listdir(repo)
    except FileNotFoundError:
        return removed
    for entry in names:
        if not entry.startswith(STAGING_PREFIX):
            continue
        path = repo / entry
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue
        match = _STAGING.match(entry)
        if match and match["host"] == host:
            stale = int(match["pid"]) != os.getpid() and not _pid_running(int(match["pid"]))
        else:
            stale = now - info.st_mtime > STALE_STAGING_AGE_S
        if not stale:
            continue
        if path.is_symlink() or not path.is_dir():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        else:
            shutil.rmtree(path, ignore_errors=True)
        removed.append(entry)
    return removed


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rename_into_place(tmp: Path, repo: Path) -> tuple[int, Path]:
    with _publish_lock(repo):
        return _take_number(tmp, repo)


def _take_number(tmp: Path, repo: Path) -> tuple[int, Path]:
    version = next_version(repo)
    for _ in range(MAX_RACE_RETRIES):
        target = repo / str(version)
        try:
            rename_noreplace(tmp, target)
            _raise_high_water(repo, version)
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
