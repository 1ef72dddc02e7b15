"""What `mnist-client classify` reads: files, directories, globs and stdin, turned into images.

    sources = expand(["digit.png", "scans/", "batch-*.npy", "-"], sys.stdin.buffer)
    for source in sources:
        images = source.load()          # (n, 28, 28) uint8 or float, one file at a time

A source is read only when its turn comes, so a directory of 100k PNGs starts answering at
once and holds one file in memory; `count()` reads headers only, for the progress bar.
Formats are told apart by content (a .npy, an IDX file, gzipped or not, or an image Pillow
reads), so stdin needs no format flag. Client-side code: no server module is imported.
"""

from __future__ import annotations

import glob
import io
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

INPUT_SIZE = 28 * 28
NPY_MAGIC = b"\x93NUMPY"
IDX_IMAGES_MAGIC = b"\x00\x00\x08\x03"
GZIP_MAGIC = b"\x1f\x8b"
# The largest IDX file a gzip may expand to (the MNIST training set is 47 MB): a small .gz
# must not be able to fill the client's memory.
MAX_IDX_BYTES = 512 * 1024 * 1024
# What a directory contributes: the formats classify reads, recognised by name.
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
)
GLOB_CHARS = frozenset("*?[")


class InputError(Exception):
    """An input that cannot be turned into images; the message names it."""


@dataclass
class Source:
    """One input: a file, or stdin's bytes (`path` None)."""

    name: str
    path: Path | None = None
    stream: BinaryIO | None = None
    _data: bytes | None = None
    _images: npt.NDArray[Any] | None = None

    def _bytes(self) -> bytes:
        """The source's bytes; only stdin's are kept (it cannot be read twice), so a long list
        of files holds one file at a time."""
        if self.stream is not None:
            if self._data is None:
                self._data = self.stream.read()
            return self._data
        assert self.path is not None
        try:
            return self.path.read_bytes()
        except OSError as e:
            raise InputError(f"{self.name}: cannot read: {e.strerror or e}") from None

    def count(self) -> int | None:
        """How many images the source holds, from its header; None if that is not cheap."""
        try:
            if self.path is None:
                return len(self.load())
            if self.path.suffix.lower() in IMAGE_SUFFIXES:
                return 1
            if self.path.suffix == ".npy":
                arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
                return int(arr.size // INPUT_SIZE) or None
            with self.path.open("rb") as f:
                head = f.read(8)
            if head[:4] == IDX_IMAGES_MAGIC:
                return int.from_bytes(head[4:8], "big")
            return None
        except (OSError, ValueError, InputError):
            return None  # load() reports it, in its turn

    def load(self) -> npt.NDArray[Any]:
        """(n, 28, 28) uint8 or float images (stdin's are decoded once: count() loads them)."""
        if self.stream is None:
            return self._decode()
        if self._images is None:
            self._images = self._decode()
        return self._images

    def _decode(self) -> npt.NDArray[Any]:
        if self.path is not None and self.path.suffix == ".npy":
            try:
                return _npy(self.name, np.load(self.path, allow_pickle=False))
            except OSError as e:
                raise InputError(f"{self.name}: cannot read: {e.strerror or e}") from None
            except ValueError as e:
                raise InputError(f"{self.name}: not a readable .npy array ({e})") from None
        data = self._bytes()
        if data[:6] == NPY_MAGIC:
            try:
                return _npy(self.name, np.load(io.BytesIO(data), allow_pickle=False))
            except ValueError as e:
                raise InputError(f"{self.name}: not a readable .npy array ({e})") from None
        if data[:2] == GZIP_MAGIC:
            data = _gunzip(self.name, data)
        if data[:4] == IDX_IMAGES_MAGIC:
            return read_idx_images(self.name, data)
        if data[:3] == IDX_IMAGES_MAGIC[:3]:
            raise InputError(f"{self.name}: an IDX file of {data[3]} dimension(s), not images "
                             "(28x28 images are 3)")
        from mnist_client.images import ImageError, load_image

        try:
            return load_image(io.BytesIO(data), name=self.name)[None]
        except ImageError as e:
            raise InputError(str(e)) from None


def expand(args: list[str], stdin: BinaryIO) -> list[Source]:
    """Sources for classify's arguments: `-` is stdin; a directory gives its image, .npy and
    IDX image files (recursively, sorted, hidden ones skipped); an argument with glob
    characters that is not an existing file is expanded (the shell may have left it quoted)."""
    sources: list[Source] = []
    for arg in args:
        path = Path(arg)
        if arg == "-":
            if any(s.stream is not None for s in sources):
                raise InputError("-: stdin can be read only once")
            sources.append(Source("-", stream=stdin))
        elif path.is_dir():
            sources += _directory(path)
        elif not path.exists() and GLOB_CHARS & set(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                raise InputError(f"{arg}: no file matches")
            for match in matches:
                m = Path(match)
                sources += _directory(m) if m.is_dir() else [Source(match, m)]
        else:
            sources.append(Source(arg, path))
    return sources


def _directory(directory: Path) -> list[Source]:
    found = [
        Source(str(p), p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and _readable_kind(p)
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    ]
    if not found:
        raise InputError(f"{directory}: no image (PNG, JPEG, ...), .npy or IDX image files")
    return found


def _readable_kind(path: Path) -> bool:
    name = path.name.lower()
    return path.suffix.lower() in IMAGE_SUFFIXES or name.endswith(".npy") or "idx3" in name


def _npy(name: str, arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
    if arr.size == 0 or arr.size % INPUT_SIZE or arr.dtype.kind not in "uif":
        raise InputError(
            f"{name}: expected images of {INPUT_SIZE} pixels (shape (n, 28, 28) or "
            f"(n, 784)), got shape {arr.shape} dtype {arr.dtype}"
        )
    if arr.dtype.kind in "ui":
        if arr.min() < 0 or arr.max() > 255:
            raise InputError(f"{name}: integer pixels must be 0..255")
        arr = arr.astype(np.uint8)
    return arr.reshape(-1, 28, 28)


def _gunzip(name: str, data: bytes) -> bytes:
    inflate = zlib.decompressobj(wbits=31)
    try:
        out = inflate.decompress(data, MAX_IDX_BYTES)
    except zlib.error as e:
        raise InputError(f"{name}: not a readable gzip file ({e})") from None
    if inflate.unconsumed_tail:
        raise InputError(f"{name}: expands past {MAX_IDX_BYTES} bytes")
    return out


def read_idx_images(name: str, data: bytes) -> npt.NDArray[np.uint8]:
    """(n, 28, 28) from an IDX image file's bytes, each header field checked against its size."""
    if len(data) < 16:
        raise InputError(f"{name}: truncated IDX header ({len(data)} of 16 bytes)")
    n, rows, cols = (int.from_bytes(data[i: i + 4], "big") for i in (4, 8, 12))
    if (rows, cols) != (28, 28):
        raise InputError(f"{name}: images must be 28x28, found {rows}x{cols}")
    if n == 0:
        raise InputError(f"{name}: holds no images")
    if len(data) - 16 != n * INPUT_SIZE:
        raise InputError(
            f"{name}: header declares {n} images ({n * INPUT_SIZE} bytes of data), file holds "
            f"{len(data) - 16}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, 28, 28)
