"""MNIST IDX files: read and validate them, and fetch the originals from public mirrors.

Everything that can go wrong with a data file is reported as one `DataError` whose message
names the file and says what was expected and what was found, so the CLI can print a single
line instead of a NumPy traceback.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from service.model import IMAGE_SHAPE, NUM_CLASSES, file_sha256

# The four standard names; each may also be present gzipped (name + ".gz").
TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILE_NAMES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

# The mirrors torchvision, TensorFlow and the original page use, tried in this order.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
# sha256 of the original gzipped files (the same on every mirror).
MNIST_SHA256: Mapping[str, str] = {
    TRAIN_IMAGES + ".gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    TRAIN_LABELS + ".gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    TEST_IMAGES + ".gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    TEST_LABELS + ".gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
# Nothing in the MNIST family is this big; a larger download is not what we asked for.
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
# The largest IDX payload we will decompress (60k images are 47 MB).
MAX_IDX_BYTES = 512 * 1024 * 1024

_UBYTE = 0x08
Uint8Array = npt.NDArray[np.uint8]


class DataError(Exception):
    """A data file that is missing, damaged or not what its name says; the message says which."""


@dataclass(frozen=True)
class Dataset:
    """Train and test images (n, 28, 28) uint8, labels (n,) uint8, and where they came from."""

    train_images: Uint8Array
    train_labels: Uint8Array
    test_images: Uint8Array
    test_labels: Uint8Array
    # file name -> sha256 of the bytes read, so a model records exactly what it saw.
    fingerprints: dict[str, str] = field(default_factory=dict)


def find_file(data_dir: Path, name: str) -> Path | None:
    """The file for a standard name, plain or gzipped; the plain one wins if both exist."""
    for candidate in (data_dir / name, data_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def missing_files(data_dir: Path) -> list[str]:
    return [name for name in FILE_NAMES if find_file(data_dir, name) is None]


def read_idx(path: Path, ndim: int) -> Uint8Array:
    """A uint8 IDX array with `ndim` dimensions, every header field checked against the size."""
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE or raw[3] != ndim:
        raise DataError(
            f"{path}: not an IDX file of unsigned bytes with {ndim} dimension(s) "
            f"(magic 0x0000080{ndim} expected, found 0x{raw[:4].hex()})"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header ({len(raw)} of {header} bytes)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = 1
    for d in dims:
        expected *= d
    actual = len(raw) - header
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise DataError(
            f"{path}: {what}: header declares shape {dims} ({expected} bytes of data), "
            f"file holds {actual}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def write_idx(path: Path, array: npt.NDArray[np.uint8]) -> None:
    """Write a uint8 array as IDX (gzipped if the name ends in .gz): to convert other data."""
    if array.dtype != np.uint8 or not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX needs a uint8 array with 1..255 dimensions, got {array.dtype}")
    header = bytes([0, 0, _UBYTE, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    payload = header + np.ascontiguousarray(array).tobytes()
    if path.suffix == ".gz":
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=f) as gz:
                    data = gz.read(MAX_IDX_BYTES + 1)
            else:
                data = f.read(MAX_IDX_BYTES + 1)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: damaged gzip stream ({e or 'ends early'})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > MAX_IDX_BYTES:
        raise DataError(f"{path}: more than {MAX_IDX_BYTES} bytes of data, not an MNIST file")
    return data


def read_images(path: Path) -> Uint8Array:
    images = read_idx(path, 3)
    if images.shape[1:] != IMAGE_SHAPE:
        raise DataError(
            f"{path}: images must be {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}, "
            f"found {images.shape[1]}x{images.shape[2]}"
        )
    if images.shape[0] == 0:
        raise DataError(f"{path}: holds no images")
    return images


def read_labels(path: Path) -> Uint8Array:
    labels = read_idx(path, 1)
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise DataError(
            f"{path}: labels must be 0..{NUM_CLASSES - 1}, found {int(labels.max())}"
        )
    return labels


def load_pair(data_dir: Path, images_name: str, labels_name: str) -> tuple[
    Uint8Array, Uint8Array, dict[str, str]
]:
    """Images and their labels, checked to be the same count, with the files' sha256."""
    paths = []
    for name in (images_name, labels_name):
        path = find_file(data_dir, name)
        if path is None:
            raise DataError(
                f"{data_dir}: no {name} or {name}.gz (use --download to fetch MNIST)"
            )
        paths.append(path)
    images, labels = read_images(paths[0]), read_labels(paths[1])
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{paths[1]}: {labels.shape[0]} labels for the {images.shape[0]} images "
            f"in {paths[0].name}"
        )
    return images, labels, {p.name: file_sha256(p) for p in paths}


def load_dataset(data_dir: Path) -> Dataset:
    """The four standard files of `data_dir`, each validated."""
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such directory")
    train_x, train_y, fp_train = load_pair(data_dir, TRAIN_IMAGES, TRAIN_LABELS)
    test_x, test_y, fp_test = load_pair(data_dir, TEST_IMAGES, TEST_LABELS)
    return Dataset(train_x, train_y, test_x, test_y, {**fp_train, **fp_test})


# --- download -----------------------------------------------------------------------------


def download(
    data_dir: Path,
    *,
    mirrors: Sequence[str] = MIRRORS,
    checksums: Mapping[str, str] = MNIST_SHA256,
    timeout_s: float = 30.0,
    log: Callable[[str], None] = lambda _: None,
) -> list[Path]:
    """Fetch every standard file missing from `data_dir`, each verified against `checksums`.

    Each file is streamed into a temporary sibling and renamed into place only once its
    sha256 matches, so a corrupted or interrupted download never leaves a file that a later
    run would read. Mirrors are tried in turn; returns the paths written.
    """
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{data_dir}: cannot create the data directory: {e.strerror}") from None
    written = []
    for name in missing_files(data_dir):
        filename = f"{name}.gz"
        expected = checksums.get(filename)
        if expected is None:
            raise DataError(f"{filename}: no known checksum, refusing to download it")
        written.append(_fetch_one(data_dir, filename, expected, mirrors, timeout_s, log))
    return written


def _fetch_one(
    data_dir: Path,
    filename: str,
    expected: str,
    mirrors: Sequence[str],
    timeout_s: float,
    log: Callable[[str], None],
) -> Path:
    failures: list[str] = []
    unreachable = 0
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + filename
        log(f"downloading {url}")
        try:
            return _fetch_verified(url, data_dir / filename, expected, timeout_s)
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(e, urllib.error.HTTPError):
                failures.append(f"{url}: HTTP {e.code}")
            else:
                unreachable += 1
                failures.append(f"{url}: {reason}")
        except DataError as e:
            failures.append(str(e))
    if unreachable == len(mirrors):
        raise DataError(
            f"cannot download {filename}: no network (no mirror could be reached: "
            + "; ".join(failures)
            + ")"
        )
    raise DataError(f"cannot download {filename}: every mirror failed: " + "; ".join(failures))


def _fetch_verified(url: str, target: Path, expected: str, timeout_s: float) -> Path:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as resp:
            while chunk := resp.read(1 << 16):
                size += len(chunk)
                if size > MAX_DOWNLOAD_BYTES:
                    raise DataError(f"{url}: more than {MAX_DOWNLOAD_BYTES} bytes, not MNIST")
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != expected:
            raise DataError(f"{url}: sha256 {actual[:16]}..., expected {expected[:16]}...")
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return target
