"""Atomic publishing: complete versions or nothing, never an overwrite, cleanup on failure."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from service.model import Model, build_model, load_model
from trainer import publish as publish_module
from trainer.publish import PublishError, next_version, publish, rename_noreplace, versions

REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_model(seed: int = 0) -> Model:
    rng = np.random.default_rng(seed)
    meta = {
        "format_version": 1, "cost": "cross_entropy",
        "input": {"shape": [784], "dtype": "float32", "range": [0, 1], "scale": "pixel / 255",
                  "image_shape": [28, 28], "pixels": "uint8"},
        "labels": [str(i) for i in range(10)], "training": {"seed": seed}, "data": {},
        "metrics": {}, "created_at": "2026-01-01T00:00:00Z", "trainer_version": "test",
    }
    return build_model([rng.normal(0, 0.05, (784, 8)), rng.normal(0, 0.3, (8, 10))],
                       [np.zeros(8), np.zeros(10)], ["relu"], "softmax", meta,
                       rng.uniform(0, 1, (2, 784)))


def integer_dirs(repo: Path) -> list[str]:
    return sorted(p.name for p in repo.iterdir() if p.name.isdigit())


def test_versions_count_up_and_load(tmp_path: Path) -> None:
    v1, p1 = publish(tiny_model(1), tmp_path, "mnist")
    v2, p2 = publish(tiny_model(2), tmp_path, "mnist")
    assert (v1, v2) == (1, 2)
    assert p2 == tmp_path / "mnist" / "2"
    assert load_model(p1).metadata["training"]["seed"] == 1
    assert load_model(p2).metadata["training"]["seed"] == 2
    assert sorted(os.listdir(tmp_path / "mnist")) == ["1", "2"]  # no temp dir left


def test_next_version_is_highest_integer_plus_one(tmp_path: Path) -> None:
    repo = tmp_path / "m"
    for name in ("1", "7", "3", ".tmp-abc", "latest", "8.bak"):
        (repo / name).mkdir(parents=True)
    (repo / "9").write_text("a file, not a version")
    assert versions(repo) == [1, 3, 7]
    assert next_version(repo) == 8
    assert publish(tiny_model(), tmp_path, "m")[0] == 8
    assert next_version(tmp_path / "empty") == 1


def test_an_existing_version_is_never_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(tiny_model(1), tmp_path, "m")
    before = (tmp_path / "m" / "1" / "model.npz").read_bytes()
    (tmp_path / "m" / "2").mkdir()  # another writer's version, still empty
    real = publish_module.next_version
    stale = iter([1])  # our scan happened before both appeared: a race
    monkeypatch.setattr(
        publish_module, "next_version", lambda repo: next(stale, None) or real(repo)
    )
    version, path = publish(tiny_model(3), tmp_path, "m")
    assert version == 3
    assert (tmp_path / "m" / "1" / "model.npz").read_bytes() == before
    assert list((tmp_path / "m" / "2").iterdir()) == []
    assert load_model(path).metadata["training"]["seed"] == 3


def test_rename_noreplace_refuses_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    with pytest.raises(OSError, match="exists") as info:
        rename_noreplace(tmp_path / "src", tmp_path / "dst")
    assert info.value.errno == errno.EEXIST
    assert (tmp_path / "src").is_dir()


def test_failure_before_rename_leaves_no_version_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(src: Path, dst: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(publish_module, "rename_noreplace", crash)
    with pytest.raises(KeyboardInterrupt):
        publish(tiny_model(), tmp_path, "m")
    assert os.listdir(tmp_path / "m") == []


def test_full_disk_removes_the_partial_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync
    written: list[int] = []

    def fsync(fd: int) -> None:
        written.append(fd)
        if len(written) == 2:  # model.npz is written, the checksum file does not fit
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(PublishError, match="no space left on device"):
        publish(tiny_model(), tmp_path, "m")
    assert os.listdir(tmp_path / "m") == []


def test_a_killed_publisher_leaves_no_integer_directory(tmp_path: Path) -> None:
    """A real crash: the process dies (os._exit) halfway through writing the weights."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import service.model as m
        from test_publish import tiny_model
        from trainer.publish import publish

        def die(path, data):
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            os._exit(9)

        m._write_synced = die
        publish(tiny_model(), __import__("pathlib").Path({str(tmp_path)!r}), "m")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert integer_dirs(tmp_path / "m") == []
    assert [p.name.startswith(".tmp-") for p in (tmp_path / "m").iterdir()] == [True]
    assert publish(tiny_model(), tmp_path, "m")[0] == 1  # the leftover does not get in the way


def test_unwritable_model_dir_is_a_publish_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(PublishError, match="cannot create"):
        publish(tiny_model(), tmp_path / "file", "m")


@pytest.mark.parametrize("name", ["", "..", ".hidden", "a/b", "-x", "x" * 200])
def test_bad_model_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(PublishError, match="model name"):
        publish(tiny_model(), tmp_path, name)
    assert list(tmp_path.iterdir()) == []
