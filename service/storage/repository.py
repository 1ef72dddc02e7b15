"""The disk side of the model repository: what versions exist, their identity, safe loading.

Everything here is blocking file I/O; the registry calls it through `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from service.model import (
    CHECKSUM_FILE,
    WEIGHTS_FILE,
    Model,
    ModelFormatError,
    load_files,
    os_error,
)

log = logging.getLogger("service.registry")

Signature = tuple[object, ...]


def signature(directory: Path) -> Signature:
    """What identifies the files of a version: where they really are, inode, size, times.

    The inode and ctime catch a directory deleted and republished under the same number
    within one mtime tick; the real path catches a symlink re-pointed elsewhere.
    """
    out: list[object] = [os.path.realpath(directory)]
    for name in (WEIGHTS_FILE, CHECKSUM_FILE):
        try:
            st = (directory / name).stat()
            out.append((name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        except OSError:
            out.append((name, None))
    return tuple(out)


def load_inside(root: Path, directory: Path) -> Model:
    """load_model, refusing anything whose real path leaves the repository (symlinks).

    A repository is often a shared volume; a version that links to /etc or another
    tenant's files must not be read, whatever those files contain. Paths are resolved
    without raising (a symlink loop stays a symlink, which the O_NOFOLLOW open then
    refuses as `symlink_loop`).
    """
    real_root = Path(os.path.realpath(root))
    real: dict[str, Path] = {}
    for name, p in (("", directory), (WEIGHTS_FILE, directory / WEIGHTS_FILE),
                    (CHECKSUM_FILE, directory / CHECKSUM_FILE)):
        real[name] = Path(os.path.realpath(p))
        if not real[name].is_relative_to(real_root):
            raise ModelFormatError(
                "unsafe_path",
                f"{p} resolves to {real[name]}, outside the model repository {real_root}",
            )
    try:
        if not stat.S_ISDIR(os.stat(real[""]).st_mode):
            raise ModelFormatError("not_a_directory", f"{directory}: not a directory")
    except OSError as e:
        raise os_error(directory, e) from None
    return load_files(real[WEIGHTS_FILE], real[CHECKSUM_FILE])


# A version number must fit the int64 of the APIs; 1..2**63-1, written without leading
# zeros so that one number names one directory ("7" and "007" would both be version 7).
MAX_VERSION = 2**63 - 1
_VERSION = re.compile(r"^[1-9][0-9]{0,18}$")
# The model names the version-policy flag accepts: safe as metric labels and protobuf text.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True, slots=True)
class Scan:
    """What the repository holds: versions by model, and the names that are not versions.

    `refused` holds (model, name) pairs that look like a version or a model but cannot be
    one (a number past int64, leading zeros, a model name that is not valid text); the
    registry logs and counts each once. Hidden names (".tmp-3") and other words are
    ignored silently: they are how publishing and editors work.
    """

    versions: dict[str, dict[int, Path]] = field(default_factory=dict)
    refused: dict[tuple[str, str], str] = field(default_factory=dict)


def version_number(name: str) -> int | None:
    """The version a directory name stands for, or None if it is not a canonical number."""
    if _VERSION.fullmatch(name) and int(name) <= MAX_VERSION:
        return int(name)
    return None


def scan(root: Path) -> Scan:
    """Every version entry per model (blocking I/O).

    A canonical number that is not a directory (a file, a dangling link) is still listed,
    so the load reports it (`not_a_directory`) instead of it vanishing silently.
    """
    out = Scan()
    try:
        model_dirs = [p for p in root.iterdir() if p.is_dir()]
    except OSError as e:
        log.warning("cannot read model repository %s: %s", root, e)
        return out
    for model_dir in model_dirs:
        name = model_dir.name
        if name.startswith("."):
            continue
        if not _MODEL_NAME.fullmatch(name):
            out.refused[(_printable(name), "")] = "not a model name (A-Z a-z 0-9 _ . -, 1-128)"
            continue
        versions: dict[int, Path] = {}
        with contextlib.suppress(OSError):
            for v in model_dir.iterdir():
                number = version_number(v.name)
                if number is not None:
                    versions[number] = v
                elif v.name.isascii() and v.name.isdigit():
                    out.refused[(name, v.name[:40])] = (
                        "not a version number (1 to 2**63-1, no leading zeros)"
                    )
        out.versions[name] = versions
    return out


def _printable(name: str) -> str:
    """A directory name safe to log: escapes, cut short."""
    return ascii(name)[1:-1][:80]
