"""IDX reading and validation, and --download against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from support.data import SHARED_DATA, _real_dir, dead_url, real_mnist_dir, serve

from trainer.data import (
    FILE_NAMES,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    DataError,
    download,
    load_dataset,
    read_images,
    read_labels,
    write_idx,
)


def write_set(directory: Path, n_train: int = 40, n_test: int = 20, gz: bool = True) -> None:
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for images, labels, n in ((TRAIN_IMAGES, TRAIN_LABELS, n_train), (TEST_IMAGES, TEST_LABELS,
                                                                         n_test)):
        write_idx(directory / f"{images}{suffix}", rng.integers(0, 256, (n, 28, 28), np.uint8))
        write_idx(directory / f"{labels}{suffix}", (np.arange(n) % 10).astype(np.uint8))


@pytest.mark.parametrize("gz", [True, False])
def test_reads_plain_and_gzipped_files(tmp_path: Path, gz: bool) -> None:
    write_set(tmp_path, gz=gz)
    data = load_dataset(tmp_path)
    assert data.train_images.shape == (40, 28, 28)
    assert data.train_images.dtype == np.uint8
    assert data.test_labels.tolist() == [i % 10 for i in range(20)]
    suffix = ".gz" if gz else ""
    assert set(data.fingerprints) == {f"{n}{suffix}" for n in FILE_NAMES}


def test_round_trip_keeps_every_byte(tmp_path: Path) -> None:
    images = np.random.default_rng(1).integers(0, 256, (3, 28, 28), np.uint8)
    write_idx(tmp_path / "x", images)
    np.testing.assert_array_equal(read_images(tmp_path / "x"), images)


def _break(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "too short"),
        (b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x01\x02", "truncated"),
        (b"\x00\x00\x08\x01" + (2).to_bytes(4, "big") + b"\x01\x02\x03", "trailing"),
        (b"\x00\x00\x0d\x01" + (2).to_bytes(4, "big") + b"\x00" * 8, "magic"),
        (b"PK\x03\x04 this is a zip file, not IDX", "magic"),
        (b"\x00\x00\x08\x01\x00", "truncated header"),
        (b"\x00\x00\x08\x01" + (2).to_bytes(4, "big") + b"\x01\x0a", "labels must be 0..9"),
    ],
)
def test_bad_label_files_get_a_clear_error_naming_the_file(
    tmp_path: Path, payload: bytes, message: str
) -> None:
    path = _break(tmp_path / "train-labels-idx1-ubyte", payload)
    with pytest.raises(DataError, match=message) as info:
        read_labels(path)
    assert str(path) in str(info.value)


def test_images_with_the_wrong_shape_or_rank_are_rejected(tmp_path: Path) -> None:
    write_idx(tmp_path / "a", np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(DataError, match="28x28"):
        read_images(tmp_path / "a")
    write_idx(tmp_path / "b", np.zeros(5, np.uint8))
    with pytest.raises(DataError, match="magic"):
        read_images(tmp_path / "b")


def test_truncated_gzip_is_a_data_error(tmp_path: Path) -> None:
    write_idx(tmp_path / "full.gz", np.zeros((100, 28, 28), np.uint8) + 7)
    data = (tmp_path / "full.gz").read_bytes()
    path = _break(tmp_path / "t10k-images-idx3-ubyte.gz", data[: len(data) // 2])
    with pytest.raises(DataError, match="gzip") as info:
        read_images(path)
    assert str(path) in str(info.value)


def test_label_count_must_match_image_count(tmp_path: Path) -> None:
    write_set(tmp_path)
    write_idx(tmp_path / f"{TEST_LABELS}.gz", np.zeros(19, np.uint8))
    with pytest.raises(DataError, match="19 labels for the 20 images"):
        load_dataset(tmp_path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such directory"):
        load_dataset(tmp_path / "nope")
    write_set(tmp_path)
    (tmp_path / f"{TRAIN_LABELS}.gz").unlink()
    with pytest.raises(DataError, match=f"no {TRAIN_LABELS} or {TRAIN_LABELS}.gz"):
        load_dataset(tmp_path)


def test_real_mnist_counts() -> None:
    data = load_dataset(real_mnist_dir())
    assert data.train_images.shape == (5000, 28, 28)
    assert np.bincount(data.train_labels).tolist() == [500] * 10
    assert np.bincount(data.test_labels).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_full_size_files_read() -> None:
    """60,000 training images: the same reader handles the full-size sets."""
    path = _real_dir(Path(os.environ.get("FASHION_DATA_DIR", SHARED_DATA / "fashion-mnist")),
                     "FASHION_DATA_DIR")
    data = load_dataset(path)
    assert data.train_images.shape == (60000, 28, 28)
    assert data.test_images.shape == (10000, 28, 28)
    assert np.bincount(data.train_labels).tolist() == [6000] * 10


# --- download ----------------------------------------------------------------------------








def sha256s(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.glob("*.gz")}


def test_download_tries_mirrors_in_turn_and_verifies(tmp_path: Path) -> None:
    source = real_mnist_dir()
    target = tmp_path / "data"
    with serve(source) as url:
        written = download(target, mirrors=[dead_url(), url], checksums=sha256s(source),
                           timeout_s=5)
    assert sorted(p.name for p in written) == sorted(f"{n}.gz" for n in FILE_NAMES)
    assert sha256s(target) == sha256s(source)
    assert sorted(p.name for p in target.iterdir()) == sorted(f"{n}.gz" for n in FILE_NAMES)
    assert load_dataset(target).train_labels.size == 5000


def test_corrupted_download_is_rejected_and_leaves_no_file(tmp_path: Path) -> None:
    source = real_mnist_dir()
    corrupt = tmp_path / "corrupt"
    shutil.copytree(source, corrupt)
    blob = bytearray((corrupt / f"{TRAIN_LABELS}.gz").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (corrupt / f"{TRAIN_LABELS}.gz").write_bytes(bytes(blob))
    target = tmp_path / "data"
    with serve(corrupt) as url, pytest.raises(DataError, match="sha256") as info:
        download(target, mirrors=[url], checksums=sha256s(source), timeout_s=5)
    assert TRAIN_LABELS in str(info.value)
    assert not (target / f"{TRAIN_LABELS}.gz").exists()
    assert not [p for p in target.iterdir() if p.name.startswith(".")]  # no .part left


def test_a_corrupt_mirror_falls_back_to_the_next(tmp_path: Path) -> None:
    source = real_mnist_dir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in FILE_NAMES:
        with gzip.open(corrupt / f"{name}.gz", "wb") as f:
            f.write(b"not mnist")
    target = tmp_path / "data"
    with serve(corrupt) as bad, serve(source) as good:
        download(target, mirrors=[bad, good], checksums=sha256s(source), timeout_s=5)
    assert sha256s(target) == sha256s(source)


def test_no_network_says_so(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no network"):
        download(tmp_path, mirrors=[dead_url(), dead_url()], timeout_s=2)
    assert list(tmp_path.iterdir()) == []


def test_missing_on_every_mirror_is_not_called_no_network(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with serve(empty) as url, pytest.raises(DataError, match="HTTP 404") as info:
        download(tmp_path / "data", mirrors=[url], timeout_s=5)
    assert "no network" not in str(info.value)


def test_download_skips_files_already_present(tmp_path: Path) -> None:
    write_set(tmp_path)
    assert download(tmp_path, mirrors=[dead_url()], timeout_s=2) == []
