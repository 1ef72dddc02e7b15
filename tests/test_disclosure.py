"""Callers never see a server filesystem path (issue 11, part 5); the log keeps them.

Before: the unauthenticated v2 RepositoryIndex answered a failed version's full message,
with the absolute path of its files and the target of a `model.npz` symlink pointing outside
the repository. Here a repository with such versions is read through every reply that
describes versions or errors: v2 RepositoryIndex, native ListModels and GetModelInfo, admin
ListModels / LoadVersion, and Classify of a failed version.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from support.servers import ServerThread, make_model, uint8_request, write_version

from service.errors import redact_paths
from service.pb.inference import grpc_service_pb2 as oip_pb
from service.pb.inference import grpc_service_pb2_grpc as oip_grpc
from service.pb.mnist.v1 import admin_pb2, admin_pb2_grpc
from service.pb.mnist.v1 import classifier_pb2 as pb
from service.pb.mnist.v1 import classifier_pb2_grpc as pb_grpc

TOKEN = "disclosure-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
_ABSOLUTE = re.compile(r"(?<![\w.~/-])/[A-Za-z0-9_.-]+/")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    write_version(repo, "mnist", 1, make_model(seed=1))
    outside = tmp_path / "outside-secret"
    outside.mkdir()
    (outside / "target.npz").write_bytes(b"not a zip archive at all")
    v2 = repo / "mnist" / "2"
    v2.mkdir()
    (v2 / "model.npz").symlink_to(outside / "target.npz")
    v3 = repo / "mnist" / "3"
    v3.mkdir()
    (v3 / "model.npz").write_bytes(b"PK\x03\x04 damaged")
    return repo


def _texts(server: ServerThread) -> dict[str, str]:
    """Every caller-visible reply that describes versions or errors, as text."""
    out: dict[str, str] = {}
    with grpc.insecure_channel(server.target) as ch:
        v2 = oip_grpc.GRPCInferenceServiceStub(ch)
        out["RepositoryIndex"] = str(v2.RepositoryIndex(oip_pb.RepositoryIndexRequest()))
        native = pb_grpc.ClassifierStub(ch)
        out["ListModels"] = str(native.ListModels(pb.ListModelsRequest()))
        out["GetModelInfo"] = str(native.GetModelInfo(pb.GetModelInfoRequest(model="mnist")))
        admin = admin_pb2_grpc.AdminStub(ch)
        out["Admin.ListModels"] = str(admin.ListModels(admin_pb2.AdminListModelsRequest(),
                                                       metadata=AUTH))
        for version in (2, 3):
            for name, call in (
                ("Admin.LoadVersion", lambda v=version: admin.LoadVersion(
                    admin_pb2.AdminLoadVersionRequest(model="mnist", version=v),
                    metadata=AUTH, timeout=10)),
                ("Classify", lambda v=version: native.Classify(
                    uint8_request(np.zeros((1, 784), np.uint8), version=v), timeout=10)),
            ):
                with pytest.raises(grpc.RpcError) as caught:
                    call()
                out[f"{name} v{version}"] = f"{caught.value.code()} {caught.value.details()}"
    return out


def test_no_reply_names_a_server_path(
    repo: Path, tmp_path: Path, start: Callable[..., ServerThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("INFO"):
        server = start(repo, version_policy="latest:3", admin_enabled=True, admin_token=TOKEN)
        texts = _texts(server)
    for what, text in texts.items():
        assert str(tmp_path) not in text, f"{what} names a server path:\n{text}"
        assert "outside-secret" not in text, f"{what} names the symlink's target:\n{text}"
        assert not _ABSOLUTE.search(text), f"{what}:\n{text}"
    # RepositoryIndex gives the short reason code of each failed version.
    index = texts["RepositoryIndex"]
    assert re.search(r'version: "2"\s+state: "UNAVAILABLE"\s+reason: "[a-z_]+"', index), index
    assert re.search(r'version: "3"\s+state: "UNAVAILABLE"\s+reason: "[a-z_]+"', index), index
    # The operator still finds the paths in the log.
    assert str(repo) in caplog.text


def test_redact_paths_keeps_what_is_not_a_path() -> None:
    assert redact_paths("/srv/models/mnist/3/model.npz: damaged") == "<path>: damaged"
    assert redact_paths("shape (784, 10) 1/2 a/b 'x' -- latest:2") == \
        "shape (784, 10) 1/2 a/b 'x' -- latest:2"
    assert redact_paths("corrupt: '/home/u/x.npz' and (/etc/y)") == \
        "corrupt: '<path>' and (<path>)"
