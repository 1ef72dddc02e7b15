"""The Admin service through a real server on 127.0.0.1: auth, each call, errors, own port."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from support.servers import ServerThread, float_request, make_model, write_version

from service.pb.mnist.v1 import admin_pb2 as apb
from service.pb.mnist.v1 import admin_pb2_grpc as apb_grpc
from service.pb.mnist.v1 import classifier_pb2 as pb
from service.pb.mnist.v1 import classifier_pb2_grpc as pb_grpc

TOKEN = "s3cret-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
X = np.random.default_rng(5).random((1, 784), dtype=np.float32)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    for v in (1, 2, 3):
        write_version(repo, "mnist", v, make_model(seed=v))
    return repo


@pytest.fixture
def admin_server(repo: Path, start: Callable[..., ServerThread]) -> ServerThread:
    return start(repo, admin_enabled=True, admin_token=TOKEN, rescan_interval_s=0)


@pytest.fixture
def stubs(admin_server: ServerThread) -> Iterator[tuple[apb_grpc.AdminStub, Any]]:
    with grpc.insecure_channel(admin_server.target) as channel:
        yield apb_grpc.AdminStub(channel), pb_grpc.ClassifierStub(channel)


def served_version(classifier: Any, **fields: Any) -> int:
    return int(classifier.Classify(float_request(X, **fields), timeout=10).version)


def states(reply: apb.AdminModelStatus) -> dict[int, str]:
    return {v.version: pb.VersionState.Name(v.state) for v in reply.versions}


@pytest.mark.parametrize(
    ("metadata", "why"),
    [
        ((), "none was given"),
        ((("authorization", "Bearer wrong"),), "wrong"),
        ((("authorization", TOKEN),), "wrong"),  # missing the Bearer scheme
        ((("authorization", f"bearer  {TOKEN}x"),), "wrong"),
    ],
)
def test_requires_the_bearer_token(
    stubs: tuple[apb_grpc.AdminStub, Any], metadata: Any, why: str
) -> None:
    admin, classifier = stubs
    with pytest.raises(grpc.RpcError) as e:
        admin.SetCurrentVersion(
            apb.AdminSetCurrentVersionRequest(model="mnist", version=1), metadata=metadata
        )
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert why in e.value.details()
    assert served_version(classifier) == 3, "nothing changed, and the service still serves"


def test_list_models_and_rescan(
    stubs: tuple[apb_grpc.AdminStub, Any], repo: Path
) -> None:
    admin, classifier = stubs
    (m,) = admin.ListModels(apb.AdminListModelsRequest(), metadata=AUTH).models
    assert (m.name, m.current_version, m.policy, m.current_pinned) == ("mnist", 3, "latest", False)
    assert states(m) == {
        1: "VERSION_STATE_UNLOADED", 2: "VERSION_STATE_UNLOADED", 3: "VERSION_STATE_AVAILABLE"
    }
    write_version(repo, "mnist", 4, make_model(seed=4))
    (m,) = admin.Rescan(apb.AdminRescanRequest(), metadata=AUTH).models  # no interval: only this
    assert m.current_version == 4
    assert served_version(classifier) == 4


def test_failed_version_shows_reason(stubs: tuple[apb_grpc.AdminStub, Any], repo: Path) -> None:
    admin, classifier = stubs
    bad = write_version(repo, "mnist", 4, make_model(seed=4))
    (bad / "model.npz.sha256").write_text("0" * 64 + "  model.npz\n")
    (m,) = admin.Rescan(apb.AdminRescanRequest(), metadata=AUTH).models
    (v4,) = [v for v in m.versions if v.version == 4]
    assert v4.state == pb.VERSION_STATE_FAILED
    assert v4.reason == "checksum"
    assert "sha256" in v4.detail
    assert served_version(classifier) == 3
    # An explicit load retries it, and says why it still fails.
    with pytest.raises(grpc.RpcError) as e:
        admin.LoadVersion(apb.AdminLoadVersionRequest(model="mnist", version=4), metadata=AUTH)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "checksum" in e.value.details()


def test_rollback_with_set_current_then_clear(stubs: tuple[apb_grpc.AdminStub, Any]) -> None:
    admin, classifier = stubs
    reply = admin.SetCurrentVersion(
        apb.AdminSetCurrentVersionRequest(model="mnist", version=2), metadata=AUTH
    )
    assert (reply.current_version, reply.current_pinned) == (2, True)
    assert served_version(classifier) == 2
    assert served_version(classifier, version=3) == 3
    reply = admin.SetCurrentVersion(
        apb.AdminSetCurrentVersionRequest(model="mnist", version=0), metadata=AUTH
    )
    assert (reply.current_version, reply.current_pinned) == (3, False)
    assert served_version(classifier) == 3


def test_labels_load_unload(stubs: tuple[apb_grpc.AdminStub, Any]) -> None:
    admin, classifier = stubs
    reply = admin.SetLabel(
        apb.AdminSetLabelRequest(model="mnist", label="stable", version=1), metadata=AUTH
    )
    assert dict(reply.labels) == {"stable": 1}
    assert served_version(classifier, version_label="stable") == 1
    reply = admin.SetLabel(
        apb.AdminSetLabelRequest(model="mnist", label="stable", version=2), metadata=AUTH
    )
    assert served_version(classifier, version_label="stable") == 2
    assert states(reply)[1] == "VERSION_STATE_UNLOADED", "moving the label released 1"
    reply = admin.LoadVersion(apb.AdminLoadVersionRequest(model="mnist", version=1), metadata=AUTH)
    assert states(reply)[1] == "VERSION_STATE_AVAILABLE"
    assert served_version(classifier, version=1) == 1
    reply = admin.UnloadVersion(
        apb.AdminUnloadVersionRequest(model="mnist", version=1), metadata=AUTH
    )
    (v1,) = [v for v in reply.versions if v.version == 1]
    assert (v1.state, v1.reason) == (pb.VERSION_STATE_UNLOADED, "admin_unloaded")
    with pytest.raises(grpc.RpcError) as e:
        served_version(classifier, version=1)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("call", "request_", "code", "needle"),
    [
        ("LoadVersion", apb.AdminLoadVersionRequest(model="nope", version=1),
         grpc.StatusCode.NOT_FOUND, "unknown model"),
        ("LoadVersion", apb.AdminLoadVersionRequest(model="mnist", version=9),
         grpc.StatusCode.NOT_FOUND, "no version 9"),
        ("LoadVersion", apb.AdminLoadVersionRequest(model="", version=1),
         grpc.StatusCode.INVALID_ARGUMENT, "model is required"),
        ("UnloadVersion", apb.AdminUnloadVersionRequest(model="mnist", version=3),
         grpc.StatusCode.FAILED_PRECONDITION, "only loaded version"),
        ("SetLabel", apb.AdminSetLabelRequest(model="mnist", label="Stable!", version=1),
         grpc.StatusCode.INVALID_ARGUMENT, "lowercase word"),
        ("SetLabel", apb.AdminSetLabelRequest(model="mnist", label="gone", version=0),
         grpc.StatusCode.NOT_FOUND, "no label 'gone'"),
        ("SetCurrentVersion", apb.AdminSetCurrentVersionRequest(model="mnist", version=-2),
         grpc.StatusCode.INVALID_ARGUMENT, "got -2"),
    ],
)
def test_bad_requests_get_clear_errors(
    stubs: tuple[apb_grpc.AdminStub, Any], call: str, request_: Any, code: Any, needle: str
) -> None:
    admin, classifier = stubs
    with pytest.raises(grpc.RpcError) as e:
        getattr(admin, call)(request_, metadata=AUTH)
    assert e.value.code() == code
    assert needle in e.value.details()
    assert served_version(classifier) == 3


def test_garbage_request_bytes_are_invalid_argument(admin_server: ServerThread) -> None:
    with grpc.insecure_channel(admin_server.target) as channel:
        call = channel.unary_unary("/mnist.v1.Admin/SetLabel")
        with pytest.raises(grpc.RpcError) as e:
            call(b"\xff\xff\xff", metadata=AUTH, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_admin_is_off_by_default(repo: Path, start: Callable[..., ServerThread]) -> None:
    server = start(repo)
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as e:
        apb_grpc.AdminStub(channel).ListModels(apb.AdminListModelsRequest(), metadata=AUTH)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_admin_on_its_own_port(repo: Path, start: Callable[..., ServerThread]) -> None:
    server = start(repo, admin_enabled=True, admin_token=TOKEN, admin_port=0)
    endpoint = server.running.admin
    assert endpoint is not None
    assert endpoint.port not in (None, server.port)
    with grpc.insecure_channel(server.target) as main:
        with pytest.raises(grpc.RpcError) as e:
            apb_grpc.AdminStub(main).ListModels(apb.AdminListModelsRequest(), metadata=AUTH)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED, "not on the public port"
    with grpc.insecure_channel(f"127.0.0.1:{endpoint.port}") as own:
        reply = apb_grpc.AdminStub(own).ListModels(apb.AdminListModelsRequest(), metadata=AUTH)
        # Reflection there too, so grpcurl works against the operator port.
        db = ProtoReflectionDescriptorDatabase(own)
        assert "mnist.v1.Admin" in set(db.get_services())
        assert db.FindFileContainingSymbol("mnist.v1.Admin").name == "mnist/v1/admin.proto"
    assert reply.models[0].current_version == 3


def test_deleting_newest_rolls_back_through_server(
    stubs: tuple[apb_grpc.AdminStub, Any], repo: Path
) -> None:
    admin, classifier = stubs
    shutil.rmtree(repo / "mnist" / "3")
    (m,) = admin.Rescan(apb.AdminRescanRequest(), metadata=AUTH).models
    assert m.current_version == 2
    assert served_version(classifier) == 2
