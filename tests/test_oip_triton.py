"""Interoperability proof: the unmodified Triton Python client (tritonclient[grpc]) against us.

tritonclient needs protobuf < 7 and the project uses 7, so it lives in its own venv,
.tools/triton-venv, made by scripts/install-test-tools.sh (`./dev test` runs it). The client
runs as a subprocess (tests/support/oip_triton_client.py) against the real server on 127.0.0.1;
its answers are compared here with Model.predict on the same inputs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from support.numerics import assert_probabilities
from support.proto_shape import proto_shape
from support.servers import ServerThread, make_model, write_version
from support.triton import run_client

from service.model import Model, pixels_to_input
from service.pb.inference import grpc_service_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "triton-test-token"




def test_our_proto_is_wire_compatible_with_tritons(triton_python: Path, tmp_path: Path) -> None:
    """Every field we declare has Triton's number, type and cardinality; every RPC its types.

    Triton's file has more (shared memory, statistics, ...); those RPCs answer UNIMPLEMENTED
    here. Ours must be a subset, and nothing Triton's clients use may be missing.
    """
    out = tmp_path / "triton.json"
    run_client(triton_python, "oip_triton_client.py", "descriptor", str(out))
    theirs = json.loads(out.read_text())
    ours = proto_shape(pb.DESCRIPTOR)
    assert ours["package"] == theirs["package"] == "inference"
    service = "GRPCInferenceService"
    for rpc, types in ours["services"][service].items():
        assert theirs["services"][service][rpc] == types, rpc
    for name, fields in ours["messages"].items():
        assert name in theirs["messages"], name
        for field, spec in fields.items():
            assert theirs["messages"][name].get(field) == spec, f"{name}.{field}"
    # The messages the client library fills in or reads must be complete, field for field.
    for name in ("ModelInferRequest", "ModelInferRequest.InferInputTensor",
                 "ModelInferResponse", "ModelInferResponse.InferOutputTensor",
                 "InferTensorContents", "ModelMetadataResponse", "RepositoryIndexResponse"):
        assert set(ours["messages"][name]) == set(theirs["messages"][name]), name


@pytest.fixture
def models() -> dict[int, Model]:
    return {1: make_model(seed=11), 2: make_model(seed=12)}


@pytest.mark.slow
def test_triton_client_end_to_end(
    triton_python: Path, tmp_path: Path, models: dict[int, Model],
    start: Callable[..., ServerThread],
) -> None:
    repo = tmp_path / "models"
    for v, m in models.items():
        write_version(repo, "mnist", v, m)
    server = start(repo, version_policy="latest:2", admin_enabled=True, admin_token=TOKEN)
    rng = np.random.default_rng(7)
    x = rng.random((6, 784), dtype=np.float32)
    pixels = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    inputs, results = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(inputs, x=x, pixels=pixels)

    run_client(triton_python, "oip_triton_client.py", "drive", server.target, str(inputs),
               str(results), TOKEN)

    out = dict(np.load(results))
    facts = json.loads(out.pop("facts").tobytes())

    assert facts["live"] is True
    assert facts["ready"] is True
    assert facts["model_ready"] is True
    assert facts["model_ready_v1"] is True
    assert facts["model_ready_unknown"] is False
    assert facts["server_metadata"]["name"] == "mnist-serving"
    assert facts["server_metadata"]["extensions"] == ["model_repository"]
    meta = facts["model_metadata"]
    assert meta["name"] == "mnist"
    assert sorted(meta["versions"]) == ["1", "2"]
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": ["-1", "784"]}]
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "predicted_class"]
    index = {(m["name"], m["version"]): m["state"]
             for m in facts["repository_index"]["models"]}
    assert index == {("mnist", "1"): "READY", ("mnist", "2"): "READY"}

    expected = {
        "fp32": (models[2], x),
        "uint8": (models[2], pixels_to_input(pixels)),
        "fp32_v1": (models[1], x),
        "after_errors": (models[2], x),
    }
    for name, (model, inputs) in expected.items():
        assert facts[name]["model_version"] == ("1" if name == "fp32_v1" else "2"), name
        assert facts[name]["id"] == name
        assert_probabilities(out[f"{name}/probabilities"], model, inputs)
        want = model.predict(inputs.copy())
        np.testing.assert_array_equal(out[f"{name}/predicted_class"], want.argmax(axis=1))
        assert out[f"{name}/predicted_class"].dtype == np.int64
    assert facts["only_class"]["outputs"] == ["predicted_class"]
    np.testing.assert_array_equal(
        out["only_class/predicted_class"], models[2].predict(x.copy()).argmax(axis=1)
    )

    errors = {
        "unknown_model": ("NOT_FOUND", "unknown model 'fashion'"),
        "unknown_version": ("NOT_FOUND", "no loaded version 9"),
        "bad_shape": ("INVALID_ARGUMENT", "got [2, 783]"),
        "bad_datatype": ("INVALID_ARGUMENT", "expected datatype FP32 or UINT8, got 'FP64'"),
        "bad_range": ("INVALID_ARGUMENT", "expected finite float32 pixels in 0.0..1.0"),
        "unknown_output": ("INVALID_ARGUMENT", "unknown output 'logits'"),
        "load_no_token": ("UNAUTHENTICATED", "authorization"),
        "load_with_token": ("OK", ""),
        "unload_whole_model": ("FAILED_PRECONDITION", "expected parameter 'version'"),
    }
    for name, (status, fragment) in errors.items():
        got = facts[name]
        assert got["status"].removeprefix("StatusCode.") == status, (name, got)
        assert fragment in got["message"], (name, got)
