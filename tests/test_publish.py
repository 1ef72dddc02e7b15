"""Atomic publishing: complete versions or nothing, never an overwrite, cleanup on failure."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from service.model import Model, build_model, load_model
from trainer import publish as publish_module
from trainer.publish import (
    PublishError,
    high_water,
    next_version,
    publish,
    rename_noreplace,
    versions,
)

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


def leftovers(repo: Path) -> list[str]:
    """What a publish left in the model directory besides its lock file (which stays)."""
    return sorted(n for n in os.listdir(repo) if n != publish_module.LOCK_FILE)


def integer_dirs(repo: Path) -> list[str]:
    return sorted(p.name for p in repo.iterdir() if p.name.isdigit())


def test_versions_count_up_and_load(tmp_path: Path) -> None:
    v1, p1 = publish(tiny_model(1), tmp_path, "mnist")
    v2, p2 = publish(tiny_model(2), tmp_path, "mnist")
    assert (v1, v2) == (1, 2)
    assert p2 == tmp_path / "mnist" / "2"
    assert load_model(p1).metadata["training"]["seed"] == 1
    assert load_model(p2).metadata["training"]["seed"] == 2
    # No temp dir left; beside the versions only the high-water mark and the publish lock.
    assert sorted(os.listdir(tmp_path / "mnist")) == [
        ".publish.lock", ".version-high-water", "1", "2",
    ]


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
    assert leftovers(tmp_path / "m") == []


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
    assert leftovers(tmp_path / "m") == []


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


# --- readable by another user; staging left by a killed trainer is cleaned up


def _modes(version_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(version_dir)): p.stat().st_mode & 0o777
            for p in [version_dir, *version_dir.rglob("*")]}


@pytest.mark.parametrize(("umask", "dir_mode", "file_mode"),
                         [(0o022, 0o755, 0o644), (0o002, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_published_versions_are_readable_as_the_umask_allows(
    tmp_path: Path, umask: int, dir_mode: int, file_mode: int
) -> None:
    def plots(directory: Path) -> None:
        (directory / "plots").mkdir()
        (directory / "plots" / "loss.txt").write_text("0.1\n")

    old = os.umask(umask)
    try:
        _, path = publish(tiny_model(), tmp_path, "m", extra_files=plots)
    finally:
        os.umask(old)
    modes = _modes(path)
    assert modes.pop(".") == dir_mode
    assert modes.pop("plots") == dir_mode
    assert set(modes.values()) == {file_mode}, modes


def test_another_user_can_read_a_published_version(tmp_path: Path) -> None:
    """As root (the container image's test run), read it for real as 'nobody'."""
    world = Path(tempfile.mkdtemp(prefix="mnist-publish-"))  # /tmp: traversable by anyone
    try:
        os.chmod(world, 0o755)
        old = os.umask(0o022)
        try:
            _, path = publish(tiny_model(), world, "m")
        finally:
            os.umask(old)
        assert _modes(path)["."] == 0o755
        if os.geteuid() != 0:
            return  # cannot switch user: the modes above are the proof
        nobody = 65534

        def drop() -> None:
            os.setgid(nobody)
            os.setuid(nobody)

        out = subprocess.run(["/bin/cat", str(path / "model.npz.sha256")], preexec_fn=drop,
                             capture_output=True, timeout=30, check=False)
        assert out.returncode == 0, out.stderr
        assert out.stdout == (path / "model.npz.sha256").read_bytes()
    finally:
        shutil.rmtree(world, ignore_errors=True)


_STAGE_AND_HANG = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from test_publish import tiny_model
    from trainer.publish import publish

    def hang(directory):
        print(directory, flush=True)
        time.sleep(600)

    publish(tiny_model(), Path(sys.argv[1]), "m", extra_files=hang)
""")


def test_staging_left_by_a_killed_trainer_is_removed_on_the_next_publish(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "m"
    proc = subprocess.Popen(
        [sys.executable, "-c", _STAGE_AND_HANG, str(tmp_path), str(Path(__file__).parent)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        staging = Path(proc.stdout.readline().strip())
        assert staging.parent == repo, staging
        assert staging.name.startswith(".tmp-"), staging
        assert (staging / "model.npz").exists()
    finally:
        proc.kill()  # SIGKILL: no cleanup handler runs
        proc.wait(timeout=10)
    assert staging.exists()
    # A live trainer's staging (this process), and an old-style name still fresh, stay.
    mine = repo / f".tmp-{publish_module._host()}-{os.getpid()}-live"
    mine.mkdir()
    fresh = repo / ".tmp-abcd1234"
    fresh.mkdir()
    old = repo / ".tmp-otherhost-1-old"
    old.mkdir()
    long_ago = time.time() - publish_module.STALE_STAGING_AGE_S - 60
    os.utime(old, (long_ago, long_ago))

    version, _ = publish(tiny_model(), tmp_path, "m")
    assert version == 1
    assert not staging.exists(), "the killed trainer's staging directory is still there"
    assert not old.exists()
    assert mine.exists()
    assert fresh.exists()
    assert leftovers(repo) == sorted(
        ["1", mine.name, fresh.name, publish_module.HIGH_WATER_FILE]
    )


def test_deleting_the_newest_version_never_gives_its_number_again(tmp_path: Path) -> None:
    assert [publish(tiny_model(i), tmp_path, "m")[0] for i in (1, 2, 3)] == [1, 2, 3]
    shutil.rmtree(tmp_path / "m" / "3")  # a rollback by deletion
    assert next_version(tmp_path / "m") == 4
    assert publish(tiny_model(4), tmp_path, "m")[0] == 4
    shutil.rmtree(tmp_path / "m" / "4")
    shutil.rmtree(tmp_path / "m" / "2")
    assert publish(tiny_model(5), tmp_path, "m")[0] == 5
    assert high_water(tmp_path / "m") == 5


def test_a_damaged_high_water_mark_falls_back_to_the_disk(tmp_path: Path) -> None:
    publish(tiny_model(1), tmp_path, "m")
    for junk in (b"", b"banana", b"-3", b"9" * 40, b"\xff\xfe"):
        (tmp_path / "m" / ".version-high-water").write_bytes(junk)
        assert next_version(tmp_path / "m") == 2


def test_concurrent_publishers_never_collide(tmp_path: Path) -> None:
    """Six real processes publishing four versions each, all at once: 24 distinct numbers,
    each directory holding the model its publisher wrote, and the mark at the top."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO_ROOT)!r}); sys.path.insert(0, {str(REPO_ROOT / "tests")!r})
        from pathlib import Path
        from test_publish import tiny_model
        from trainer.publish import publish
        worker = int(sys.argv[1])
        for i in range(4):
            v, _ = publish(tiny_model(100 * worker + i), Path(sys.argv[2]), "m")
            print(v, 100 * worker + i, flush=True)
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(w), str(tmp_path)],
                         stdout=subprocess.PIPE, text=True)
        for w in range(6)
    ]
    seeds: dict[int, int] = {}
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        for line in out.split("\n"):
            if line:
                v, seed = map(int, line.split())
                assert v not in seeds, f"version {v} published twice"
                seeds[v] = seed
    assert sorted(seeds) == list(range(1, 25))
    assert high_water(tmp_path / "m") == 24
    for v, seed in seeds.items():
        assert load_model(tmp_path / "m" / str(v)).metadata["training"]["seed"] == seed
