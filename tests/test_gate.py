"""The quality gate on real servers: a version below its model's gate is REJECTED (a state
of its own, with the measured figures), the old version keeps serving, an admin can force
it; a broken gate holds new versions without taking the server down; the gate hot-reloads.

The gate's labels are what one model (seed 1) answers on random digits, so that model scores
1.0 on it and a model of another seed scores about what chance gives: a real, measured gap.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import ServerThread, make_model, uint8_request, write_version

from service.model import Model, pixels_to_input
from service.pb.inference import grpc_service_pb2 as opb
from service.pb.inference import grpc_service_pb2_grpc as opb_grpc
from service.pb.mnist.v1 import admin_pb2 as apb
from service.pb.mnist.v1 import admin_pb2_grpc as apb_grpc
from service.pb.mnist.v1 import classifier_pb2 as pb
from service.pb.mnist.v1 import classifier_pb2_grpc as pb_grpc
from service.promotion import gate as gates

TOKEN = "gate-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
IMAGES = np.random.default_rng(11).integers(0, 256, (300, 784), dtype=np.uint8)


def labels_of(model: Model) -> np.ndarray:  # type: ignore[type-arg]
    return np.argmax(model.predict(pixels_to_input(IMAGES)), axis=1).astype(np.uint8)


def write_gate(repo: Path, model: Model, min_accuracy: float = 0.9,
               max_drop: float | None = None) -> None:
    gates.write_gate(repo / "mnist", IMAGES, labels_of(model), min_accuracy=min_accuracy,
                     max_drop=max_drop)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    write_version(repo, "mnist", 1, make_model(seed=1))
    write_gate(repo, make_model(seed=1))
    return repo


@pytest.fixture
def server(repo: Path, start: Callable[..., ServerThread]) -> ServerThread:
    return start(repo, admin_enabled=True, admin_token=TOKEN, rescan_interval_s=0.05)


@pytest.fixture
def stubs(server: ServerThread) -> Iterator[tuple[Any, Any, Any]]:
    with grpc.insecure_channel(server.target) as channel:
        yield (pb_grpc.ClassifierStub(channel), apb_grpc.AdminStub(channel),
               opb_grpc.GRPCInferenceServiceStub(channel))


def version_row(info: pb.ModelInfo, version: int) -> pb.VersionInfo:
    return next(v for v in info.versions if v.version == version)


def wait_for(check: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def state_of(classifier: Any, version: int) -> str:
    info = classifier.GetModelInfo(pb.GetModelInfoRequest(model="mnist"), timeout=5)
    if all(v.version != version for v in info.versions):
        return "ABSENT"
    return str(pb.VersionState.Name(version_row(info, version).state))


def served(classifier: Any) -> int:
    return int(classifier.Classify(uint8_request(IMAGES[:2]), timeout=5).version)


def test_bad_version_is_rejected_with_figures_and_the_old_one_keeps_serving(
    repo: Path, server: ServerThread, stubs: tuple[Any, Any, Any]
) -> None:
    classifier, admin, oip = stubs
    assert served(classifier) == 1
    write_version(repo, "mnist", 2, make_model(seed=2))
    wait_for(lambda: state_of(classifier, 2) == "VERSION_STATE_REJECTED")
    info = classifier.GetModelInfo(pb.GetModelInfoRequest(model="mnist"), timeout=5)
    assert info.current_version == 1
    reason = version_row(info, 2).reason
    assert reason.startswith("gate: accuracy 0.")
    assert "below min_accuracy 0.9000" in reason
    assert "/" not in reason  # figures, never a path, for unauthenticated callers
    listed = classifier.ListModels(pb.ListModelsRequest(), timeout=5).models[0]
    assert version_row(listed, 2).reason == reason
    for _ in range(20):
        assert served(classifier) == 1
    row = next(v for v in admin.ListModels(apb.AdminListModelsRequest(), metadata=AUTH).models[0]
               .versions if v.version == 2)
    assert pb.VersionState.Name(row.state) == "VERSION_STATE_REJECTED"
    index = oip.RepositoryIndex(opb.RepositoryIndexRequest(), timeout=5)
    v2 = next(m for m in index.models if m.version == "2")
    assert v2.state == "UNAVAILABLE"
    assert v2.reason == reason
    assert server.sample("mnist_gate_rejected_versions_total",
                         {"model": "mnist", "reason": "gate"}) == 1
    assert (repo / "mnist" / "2").is_dir()  # stays on disk
    # Not evaluated again on later scans while neither its files nor the gate change.
    time.sleep(0.3)
    assert server.sample("mnist_gate_rejected_versions_total",
                         {"model": "mnist", "reason": "gate"}) == 1
    # Loading it by hand is refused with the figures.
    with pytest.raises(grpc.RpcError) as e:
        admin.LoadVersion(apb.AdminLoadVersionRequest(model="mnist", version=2), metadata=AUTH)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "below min_accuracy" in str(e.value.details())


def test_forced_promotion_serves_a_rejected_version_and_records_it(
    repo: Path, server: ServerThread, stubs: tuple[Any, Any, Any]
) -> None:
    classifier, admin, _ = stubs
    write_version(repo, "mnist", 2, make_model(seed=2))
    wait_for(lambda: state_of(classifier, 2) == "VERSION_STATE_REJECTED")
    with pytest.raises(grpc.RpcError) as e:
        admin.PromoteVersion(apb.AdminPromoteVersionRequest(model="mnist", version=2),
                             metadata=AUTH)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert served(classifier) == 1
    reply = admin.PromoteVersion(
        apb.AdminPromoteVersionRequest(model="mnist", version=2, force=True), metadata=AUTH
    )
    assert reply.current_version == 2
    assert reply.current_pinned
    row = next(v for v in reply.versions if v.version == 2)
    assert row.reason == "forced"
    assert "below min_accuracy" in row.detail
    assert served(classifier) == 2
    info = classifier.GetModelInfo(pb.GetModelInfoRequest(model="mnist"), timeout=5)
    assert info.current_pinned
    assert version_row(info, 2).reason == "forced"


def test_max_drop_against_the_current_version(
    repo: Path, start: Callable[..., ServerThread], tmp_path: Path
) -> None:
    # min_accuracy 0 and max_drop 0.05: only the comparison with version 1 can refuse.
    write_gate(repo, make_model(seed=1), min_accuracy=0.0, max_drop=0.05)
    server = start(repo, rescan_interval_s=0.05)
    with grpc.insecure_channel(server.target) as channel:
        classifier = pb_grpc.ClassifierStub(channel)
        write_version(repo, "mnist", 2, make_model(seed=2))
        wait_for(lambda: state_of(classifier, 2) == "VERSION_STATE_REJECTED")
        info = classifier.GetModelInfo(pb.GetModelInfoRequest(model="mnist"), timeout=5)
        assert "below current version 1's 1.0000 (max_drop 0.0500)" in version_row(info, 2).reason
        # A version as good as the current one passes and becomes current.
        write_version(repo, "mnist", 3, make_model(seed=1))
        wait_for(lambda: served(classifier) == 3)


def test_gate_hot_reloads_and_a_rejected_version_is_judged_again(
    repo: Path, server: ServerThread, stubs: tuple[Any, Any, Any]
) -> None:
    classifier, _, _ = stubs
    write_version(repo, "mnist", 2, make_model(seed=2))
    wait_for(lambda: state_of(classifier, 2) == "VERSION_STATE_REJECTED")
    write_gate(repo, make_model(seed=1), min_accuracy=0.0)  # lower the bar
    wait_for(lambda: served(classifier) == 2)


@pytest.mark.parametrize(
    "damage",
    [
        lambda g: (g / "gate.json").write_text("{not json"),
        lambda g: (g / "gate.json").write_text('{"min_accuracy": 7}'),
        lambda g: (g / "gate.json").write_text('{"min_accuracy": 0.5, "surprise": 1}'),
        lambda g: (g / "gate.json").write_bytes(b" " * (gates.MAX_GATE_JSON_BYTES + 1)),
        lambda g: (g / "eval.npz").write_bytes(b"PK\x03\x04 cut short"),
        lambda g: (g / "eval.npz").unlink(),
        lambda g: np.savez(g / "eval.npz", images=np.zeros((3, 784), np.float32),
                           labels=np.zeros(3, np.uint8)),
        lambda g: np.savez(g / "eval.npz", images=np.zeros((3, 784), np.uint8),
                           labels=np.full(3, 12, np.uint8)),
        lambda g: np.savez(g / "eval.npz", images=np.zeros((3, 784), np.uint8),
                           labels=np.array([{"x": 1}] * 3, dtype=object)),
        lambda g: ((g / "gate.json").unlink(), os.mkfifo(g / "gate.json")),
        lambda g: ((g / "eval.npz").unlink(), os.symlink("/etc/passwd", g / "eval.npz")),
        lambda g: np.savez(g / "eval.npz", images=np.zeros((gates.MAX_GATE_IMAGES + 1, 784),
                                                           np.uint8),
                           labels=np.zeros(gates.MAX_GATE_IMAGES + 1, np.uint8)),
    ],
    ids=["json", "range", "unknown_key", "json_too_big", "truncated_npz", "missing_npz",
         "float_images", "label_range", "pickle", "fifo", "symlink_out", "too_many_images"],
)
def test_broken_gate_holds_new_versions_and_keeps_serving(
    repo: Path, server: ServerThread, stubs: tuple[Any, Any, Any],
    damage: Callable[[Path], None],
) -> None:
    classifier, admin, _ = stubs
    damage(repo / "mnist" / "gate")
    write_version(repo, "mnist", 2, make_model(seed=1))  # a good model: the gate is the fault
    wait_for(lambda: state_of(classifier, 2) == "VERSION_STATE_REJECTED")
    info = classifier.GetModelInfo(pb.GetModelInfoRequest(model="mnist"), timeout=5)
    assert version_row(info, 2).reason == "gate_invalid"
    for _ in range(5):
        assert served(classifier) == 1
    row = next(v for v in admin.ListModels(apb.AdminListModelsRequest(), metadata=AUTH).models[0]
               .versions if v.version == 2)
    assert "gate is unusable" in row.detail
    assert server.sample("mnist_gate_rejected_versions_total",
                         {"model": "mnist", "reason": "gate_invalid"}) == 1
    # Fixing the gate releases the held version.
    write_gate(repo, make_model(seed=1))
    wait_for(lambda: served(classifier) == 2)


def test_cold_start_with_a_broken_gate_still_serves(
    repo: Path, start: Callable[..., ServerThread]
) -> None:
    (repo / "mnist" / "gate" / "gate.json").write_text("[]")
    server = start(repo)
    with grpc.insecure_channel(server.target) as channel:
        assert served(pb_grpc.ClassifierStub(channel)) == 1


def test_cold_start_rejects_below_min_accuracy_and_serves_the_next(
    repo: Path, start: Callable[..., ServerThread]
) -> None:
    write_version(repo, "mnist", 2, make_model(seed=2))
    server = start(repo)
    with grpc.insecure_channel(server.target) as channel:
        classifier = pb_grpc.ClassifierStub(channel)
        assert served(classifier) == 1
        assert state_of(classifier, 2) == "VERSION_STATE_REJECTED"


def test_the_issue_repro_a_one_epoch_model_no_longer_replaces_the_default(
    tmp_path: Path, start: Callable[..., ServerThread], capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 15 as a new user met it: a model trained for one epoch on the real digits is
    published next to the committed default; its committed gate keeps it from serving."""
    import os
    import shutil

    from conftest import skip_or_fail

    from trainer.cli import main as train_main

    root = Path(__file__).resolve().parent.parent
    data = Path(os.environ.get("MNIST_DATA_DIR", root.parent / "shared" / "data" / "mnist"))
    if not (data / "train-images-idx3-ubyte.gz").exists():
        skip_or_fail(f"no MNIST training set in {data} (set MNIST_DATA_DIR)")
    repo = tmp_path / "models"
    shutil.copytree(root / "models" / "mnist", repo / "mnist")
    server = start(repo, rescan_interval_s=0.05)
    with grpc.insecure_channel(server.target) as channel:
        classifier = pb_grpc.ClassifierStub(channel)
        assert served(classifier) == 1
        assert train_main(["--data-dir", str(data), "--model-dir", str(repo), "--epochs", "1",
                           "--quiet"]) == 0
        capsys.readouterr()
        wait_for(lambda: state_of(classifier, 2) == "VERSION_STATE_REJECTED", 30)
        info = classifier.GetModelInfo(pb.GetModelInfoRequest(model="mnist"), timeout=5)
        reason = version_row(info, 2).reason
        assert "below min_accuracy 0.9500" in reason
        assert info.current_version == 1
        assert served(classifier) == 1
