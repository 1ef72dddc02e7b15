"""The disk side of the model repository: what versions exist, their identity, safe loading.

Everything here is blocking file I/O; the registry calls it through `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from service.model import CHECKSUM_FILE, WEIGHTS_FILE, Model, ModelFormatError, load_model

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
    tenant's files must not be read, whatever those files contain.
    """
    real_root = root.resolve()
    for p in (directory, directory / WEIGHTS_FILE, directory / CHECKSUM_FILE):
        real = p.resolve()
        if not real.is_relative_to(real_root):
            raise ModelFormatError(
                "unsafe_path",
                f"{p} resolves to {real}, outside the model repository {real_root}",
            )
    return load_model(directory)


def scan(root: Path) -> dict[str, dict[int, Path]]:
    """{model: {version: path}} for every integer-named version directory (blocking I/O)."""
    found: dict[str, dict[int, Path]] = {}
    try:
        model_dirs = [p for p in root.iterdir() if p.is_dir()]
    except OSError as e:
        log.warning("cannot read model repository %s: %s", root, e)
        return found
    for model_dir in model_dirs:
        if model_dir.name.startswith("."):
            continue
        versions: dict[int, Path] = {}
        with contextlib.suppress(OSError):
            for v in model_dir.iterdir():
                if v.name.isascii() and v.name.isdigit() and int(v.name) > 0 and v.is_dir():
                    versions[int(v.name)] = v
        found[model_dir.name] = versions
    return found
