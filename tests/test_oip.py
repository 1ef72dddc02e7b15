"""The v2 (Open Inference Protocol) endpoint, driven over a real channel with our own stub.

The server is the real one (`start_server` via conftest), serving mnist.v1 and
inference.GRPCInferenceService on one port. Answers are checked against `Model.predict` on
the same inputs, so a decoding or encoding slip (byte order, row order, wrong version) fails.
The Triton-client interoperability proof is tests/test_oip_triton.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from support.numerics import assert_probabilities
from support.servers import ServerThread, make_model, write_version

from service.model import Model, pixels_to_input
from service.pb.inference import grpc_service_pb2 as pb
from service.pb.inference import grpc_service_pb2_grpc as pb_grpc
from service.pb.mnist.v1 import classifier_pb2 as native_pb
from service.pb.mnist.v1 import classifier_pb2_grpc as native_grpc

Tensor = pb.ModelInferRequest.InferInputTensor
TOKEN = "s3cret-token"


@pytest.fixture
def server(repo: Path, start: Callable[..., ServerThread]) -> ServerThread:
    return start(repo, version_policy="latest:2", admin_enabled=True, admin_token=TOKEN)


@pytest.fixture
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 784), dtype=np.float32)


def raw_request(x: np.ndarray, datatype: str = "FP32", shape: Any = None, **kw: Any) -> Any:
    shape = list(x.shape) if shape is None else shape
    return pb.ModelInferRequest(
        model_name=kw.pop("model_name", "mnist"),
        inputs=[Tensor(name="images", datatype=datatype, shape=shape)],
        raw_input_contents=[x.tobytes()],
        **kw,
    )


def raw_outputs(reply: Any) -> dict[str, np.ndarray]:
    dtypes = {"FP32": "<f4", "INT64": "<i8"}
    assert len(reply.raw_output_contents) == len(reply.outputs)
    return {
        o.name: np.frombuffer(data, dtype=dtypes[o.datatype]).reshape(tuple(o.shape))
        for o, data in zip(reply.outputs, reply.raw_output_contents, strict=True)
    }


def typed_outputs(reply: Any) -> dict[str, np.ndarray]:
    assert not reply.raw_output_contents
    out = {}
    for o in reply.outputs:
        if o.datatype == "FP32":
            out[o.name] = np.array(o.contents.fp32_contents, np.float32).reshape(tuple(o.shape))
        else:
            out[o.name] = np.array(o.contents.int64_contents, np.int64).reshape(tuple(o.shape))
    return out


def expect_error(call: Callable[[], Any], code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err: Any = info.value
    assert err.code() == code, err.details()
    for fragment in fragments:
        assert fragment in err.details()
    return str(err.details())


# --- health and metadata --------------------------------------------------------------------


def test_server_live_ready_and_metadata(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest()).live is True
    assert stub.ServerReady(pb.ServerReadyRequest()).ready is True
    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "mnist-serving"
    assert meta.version
    assert list(meta.extensions) == ["model_repository"]


def test_server_not_ready_without_models(
    tmp_path: Path, start: Callable[..., ServerThread]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    server = start(empty)
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ServerLive(pb.ServerLiveRequest()).live is True
        assert stub.ServerReady(pb.ServerReadyRequest()).ready is False
        assert stub.ModelReady(pb.ModelReadyRequest(name="mnist")).ready is False
        expect_error(
            lambda: stub.ModelInfer(raw_request(images(1))), grpc.StatusCode.NOT_FOUND, "mnist"
        )


@pytest.mark.parametrize(
    ("name", "version", "ready"),
    [("mnist", "", True), ("mnist", "1", True), ("mnist", "2", True), ("", "", True),
     ("mnist", "3", False), ("fashion", "", False), ("mnist", "no-such-label", False)],
)
def test_model_ready(
    stub: pb_grpc.GRPCInferenceServiceStub, name: str, version: str, ready: bool
) -> None:
    assert stub.ModelReady(pb.ModelReadyRequest(name=name, version=version)).ready is ready


def test_model_ready_rejects_unreadable_version(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    expect_error(
        lambda: stub.ModelReady(pb.ModelReadyRequest(name="mnist", version="0")),
        grpc.StatusCode.INVALID_ARGUMENT, "model_version", "'0'",
    )


def test_model_metadata_describes_tensors_and_versions(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="mnist"))
    assert meta.name == "mnist"
    assert sorted(meta.versions) == ["1", "2"]
    assert meta.platform == "numpy_mlp"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("images", "FP32", [-1, 784])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("probabilities", "FP32", [-1, 10]), ("predicted_class", "INT64", [-1]),
    ]
    expect_error(
        lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="fashion")),
        grpc.StatusCode.NOT_FOUND, "'fashion'",
    )
    expect_error(
        lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="mnist", version="7")),
        grpc.StatusCode.NOT_FOUND, "7",
    )


# --- inference ------------------------------------------------------------------------------


def test_infer_raw_fp32_matches_predict_and_answers_raw(
    stub: pb_grpc.GRPCInferenceServiceStub, models: dict[int, Model]
) -> None:
    x = images(5)
    reply = stub.ModelInfer(raw_request(x, id="req-7"))
    assert (reply.model_name, reply.model_version, reply.id) == ("mnist", "2", "req-7")
    out = raw_outputs(reply)
    expected = models[2].predict(x.copy())
    assert_probabilities(out["probabilities"], models[2], x)
    np.testing.assert_array_equal(out["predicted_class"], expected.argmax(axis=1))


def test_infer_typed_fp32_answers_typed(
    stub: pb_grpc.GRPCInferenceServiceStub, models: dict[int, Model]
) -> None:
    x = images(3, seed=1)
    request = pb.ModelInferRequest(
        model_name="mnist",
        inputs=[Tensor(name="images", datatype="FP32", shape=[3, 784],
                       contents=pb.InferTensorContents(fp32_contents=x.ravel().tolist()))],
    )
    out = typed_outputs(stub.ModelInfer(request))
    expected = models[2].predict(x.copy())
    assert_probabilities(out["probabilities"], models[2], x)
    np.testing.assert_array_equal(out["predicted_class"], expected.argmax(axis=1))


def test_infer_uint8_raw_and_typed_28x28(
    stub: pb_grpc.GRPCInferenceServiceStub, models: dict[int, Model]
) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    expected = models[2].predict(pixels_to_input(pixels))
    raw = raw_outputs(stub.ModelInfer(raw_request(pixels, "UINT8")))
    typed_req = pb.ModelInferRequest(
        model_name="mnist",
        inputs=[Tensor(name="images", datatype="UINT8", shape=[4, 28, 28],
                       contents=pb.InferTensorContents(uint_contents=pixels.ravel().tolist()))],
    )
    typed = typed_outputs(stub.ModelInfer(typed_req))
    for out in (raw, typed):
        assert_probabilities(out["probabilities"], models[2], pixels_to_input(pixels))
        np.testing.assert_array_equal(out["predicted_class"], expected.argmax(axis=1))


def test_infer_honours_model_version(
    stub: pb_grpc.GRPCInferenceServiceStub, models: dict[int, Model]
) -> None:
    x = images(8, seed=4)
    for version in (1, 2):
        reply = stub.ModelInfer(raw_request(x, model_version=str(version)))
        assert reply.model_version == str(version)
        assert_probabilities(raw_outputs(reply)["probabilities"], models[version], x)
    # The two versions really answer differently, so the check above can tell them apart.
    assert not np.allclose(models[1].predict(x.copy()), models[2].predict(x.copy()))


def test_infer_with_version_label(
    repo: Path, start: Callable[..., ServerThread], models: dict[int, Model]
) -> None:
    server = start(repo, version_policy="latest:2", version_labels="mnist:stable=1")
    x = images(2)
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        reply = stub.ModelInfer(raw_request(x, model_version="stable"))
        assert reply.model_version == "1"
        assert_probabilities(raw_outputs(reply)["probabilities"], models[1], x)
        assert stub.ModelReady(pb.ModelReadyRequest(name="mnist", version="stable")).ready
        expect_error(
            lambda: stub.ModelInfer(raw_request(x, model_version="beta")),
            grpc.StatusCode.NOT_FOUND, "'beta'",
        )


def test_requested_outputs_only(
    stub: pb_grpc.GRPCInferenceServiceStub, models: dict[int, Model]
) -> None:
    x = images(2)
    wanted = [pb.ModelInferRequest.InferRequestedOutputTensor(name="predicted_class")]
    reply = stub.ModelInfer(raw_request(x, outputs=wanted))
    out = raw_outputs(reply)
    assert list(out) == ["predicted_class"]
    np.testing.assert_array_equal(
        out["predicted_class"], models[2].predict(x.copy()).argmax(axis=1)
    )


def _bad(**changes: Any) -> pb.ModelInferRequest:
    x = images(2)
    request = raw_request(x)
    for key, value in changes.items():
        if key == "datatype":
            request.inputs[0].datatype = value
        elif key == "shape":
            del request.inputs[0].shape[:]
            request.inputs[0].shape.extend(value)
        elif key == "name":
            request.inputs[0].name = value
        elif key == "raw":
            del request.raw_input_contents[:]
            request.raw_input_contents.extend(value)
        elif key == "contents":
            del request.raw_input_contents[:]
            request.inputs[0].contents.CopyFrom(value)
        elif key == "also_contents":
            request.inputs[0].contents.CopyFrom(value)
        elif key == "extra_input":
            request.inputs.append(Tensor(name="mask", datatype="FP32", shape=[1]))
        elif key == "outputs":
            request.outputs.add(name=value)
        else:
            setattr(request, key, value)
    return request


NAN = images(2)
NAN[1, 17] = np.nan
BAD_REQUESTS = {
    "datatype": (_bad(datatype="INT32"), "expected datatype FP32 or UINT8, got 'INT32'"),
    "shape": (_bad(shape=[2, 783]), "expected shape [N, 784] or [N, 28, 28], got [2, 783]"),
    "rank": (_bad(shape=[1568]), "got [1568]"),
    "zero images": (_bad(shape=[0, 784], raw=[b""]), "expected at least 1 image"),
    "byte size": (_bad(shape=[3, 784]), "expected 9408 bytes for shape [3, 784] FP32, got 6272"),
    "uint8 byte size": (
        _bad(datatype="UINT8"), "expected 1568 bytes for shape [2, 784] UINT8, got 6272"
    ),
    "input name": (_bad(name="input__0"), "expected an input named 'images', got 'input__0'"),
    "two inputs": (_bad(extra_input=True), "expected exactly 1 input"),
    "two raw entries": (_bad(raw=[b"", b""]), "expected 1 entry"),
    "raw and typed": (
        _bad(also_contents=pb.InferTensorContents(fp32_contents=[0.5])),
        "both contents and raw_input_contents",
    ),
    "typed count": (
        _bad(contents=pb.InferTensorContents(fp32_contents=[0.5] * 10)),
        "expected 1568 values for shape [2, 784], got 10",
    ),
    "typed wrong field": (
        _bad(contents=pb.InferTensorContents(int_contents=[1] * 1568)),
        "expected its values in fp32_contents, got int_contents",
    ),
    "uint8 over 255": (
        _bad(datatype="UINT8", contents=pb.InferTensorContents(uint_contents=[256] * 1568)),
        "expected values 0..255, got 256",
    ),
    "NaN": (raw_request(NAN), "image 1 pixel 17 is nan"),
    "out of range": (raw_request(images(1) + 1.0), "expected finite float32 pixels in 0.0..1.0"),
    "unknown output": (_bad(outputs="logits"), "unknown output 'logits'"),
    "version zero": (_bad(model_version="0"), "model_version"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_are_invalid_argument_and_service_keeps_serving(
    stub: pb_grpc.GRPCInferenceServiceStub, case: str
) -> None:
    request, fragment = BAD_REQUESTS[case]
    expect_error(lambda: stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT, fragment)
    assert stub.ModelInfer(raw_request(images(1))).model_version == "2"


def test_too_many_images(repo: Path, start: Callable[..., ServerThread]) -> None:
    server = start(repo, max_images_per_request=4)
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        expect_error(
            lambda: stub.ModelInfer(raw_request(images(5))),
            grpc.StatusCode.INVALID_ARGUMENT, "5 images in one request: at most 4",
        )


def test_unknown_model_or_version_is_not_found(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    expect_error(
        lambda: stub.ModelInfer(raw_request(images(1), model_name="fashion")),
        grpc.StatusCode.NOT_FOUND, "unknown model 'fashion'",
    )
    expect_error(
        lambda: stub.ModelInfer(raw_request(images(1), model_version="9")),
        grpc.StatusCode.NOT_FOUND, "no loaded version 9",
    )


def test_malformed_bytes_are_invalid_argument(channel: grpc.Channel) -> None:
    for method in ("ModelInfer", "ModelMetadata"):
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        expect_error(
            lambda call=call: call(b"\xff\xff\xff"), grpc.StatusCode.INVALID_ARGUMENT,
            "not a valid inference.",
        )


def test_requests_are_counted_like_native_ones(
    stub: pb_grpc.GRPCInferenceServiceStub, server: ServerThread
) -> None:
    ok = {"method": "ModelInfer", "model": "mnist", "version": "2", "code": "OK"}
    stub.ModelInfer(raw_request(images(3)))
    stub.ModelInfer(raw_request(images(2), model_version="1"))
    expect_error(lambda: stub.ModelInfer(_bad(shape=[2, 783])), grpc.StatusCode.INVALID_ARGUMENT)
    assert server.sample("mnist_requests_total", ok) == 1
    assert server.sample("mnist_images_total", ok) == 3
    assert server.sample("mnist_requests_total", {**ok, "version": "1"}) == 1
    bad = {**ok, "code": "INVALID_ARGUMENT"}
    assert server.sample("mnist_requests_total", bad) == 1
    duration = {"method": "ModelInfer", "model": "mnist"}
    assert server.sample("mnist_request_duration_seconds_count", duration) == 3


def test_same_port_as_native_api_and_same_answers(
    channel: grpc.Channel, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    x = images(4, seed=9)
    native = native_grpc.ClassifierStub(channel).Classify(
        native_pb.ClassifyRequest(pixels=x.tobytes(), encoding=native_pb.ENCODING_FLOAT32_LE)
    )
    v2 = raw_outputs(stub.ModelInfer(raw_request(x)))
    assert native.version == 2
    np.testing.assert_array_equal(
        np.array([list(p.probabilities) for p in native.predictions], np.float32),
        v2["probabilities"],
    )


def test_reflection_lists_the_v2_service(channel: grpc.Channel) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")]))
    names = [s.name for r in replies for s in r.list_services_response.service]
    assert "inference.GRPCInferenceService" in names


# --- model-repository extension -------------------------------------------------------------


def auth(token: str = TOKEN) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def version_param(v: Any) -> dict[str, pb.ModelRepositoryParameter]:
    if isinstance(v, int):
        return {"version": pb.ModelRepositoryParameter(int64_param=v)}
    return {"version": pb.ModelRepositoryParameter(string_param=v)}


def index(stub: pb_grpc.GRPCInferenceServiceStub, ready: bool = False) -> list[tuple[str, ...]]:
    reply = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=ready))
    return [(m.name, m.version, m.state) for m in reply.models]


def test_repository_index_reports_versions_and_failures(
    repo: Path, start: Callable[..., ServerThread]
) -> None:
    broken = repo / "mnist" / "3"
    broken.mkdir()
    (broken / "model.npz").write_bytes(b"not a zip")
    (broken / "model.npz.sha256").write_text("0" * 64 + "  model.npz\n")
    server = start(repo, version_policy="latest:2")
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        states = dict(((n, v), s) for n, v, s in index(stub))
        assert states[("mnist", "3")] == "UNAVAILABLE"
        assert states[("mnist", "2")] == "READY"
        reply = stub.RepositoryIndex(pb.RepositoryIndexRequest())
        reason = next(m.reason for m in reply.models if m.version == "3")
        assert reason  # says why version 3 is not served
        assert all(s == "READY" for _, _, s in index(stub, ready=True))
        expect_error(
            lambda: stub.RepositoryIndex(pb.RepositoryIndexRequest(repository_name="other")),
            grpc.StatusCode.NOT_FOUND, "unknown repository 'other'",
        )


def test_repository_load_unload_need_the_admin_token(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    load = pb.RepositoryModelLoadRequest(model_name="mnist")
    expect_error(lambda: stub.RepositoryModelLoad(load), grpc.StatusCode.UNAUTHENTICATED,
                 "none was given")
    expect_error(lambda: stub.RepositoryModelLoad(load, metadata=auth("wrong")),
                 grpc.StatusCode.UNAUTHENTICATED, "the token given is wrong")
    unload = pb.RepositoryModelUnloadRequest(model_name="mnist", parameters=version_param(1))
    expect_error(lambda: stub.RepositoryModelUnload(unload), grpc.StatusCode.UNAUTHENTICATED)
    assert ("mnist", "1", "READY") in index(stub)


def test_repository_control_is_off_without_admin(model_repo: Path, start: Any) -> None:
    server = start(model_repo)
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        expect_error(
            lambda: stub.RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(model_name="mnist"), metadata=auth()),
            grpc.StatusCode.FAILED_PRECONDITION, "--admin-enabled",
        )


def test_repository_unload_then_load_a_version(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    unload = pb.RepositoryModelUnloadRequest(model_name="mnist", parameters=version_param(1))
    stub.RepositoryModelUnload(unload, metadata=auth())
    assert ("mnist", "1", "UNAVAILABLE") in index(stub)
    assert stub.ModelReady(pb.ModelReadyRequest(name="mnist", version="1")).ready is False
    expect_error(
        lambda: stub.ModelInfer(raw_request(images(1), model_version="1")),
        grpc.StatusCode.NOT_FOUND,
    )
    load = pb.RepositoryModelLoadRequest(model_name="mnist", parameters=version_param("1"))
    stub.RepositoryModelLoad(load, metadata=auth())
    assert ("mnist", "1", "READY") in index(stub)
    assert stub.ModelInfer(raw_request(images(1), model_version="1")).model_version == "1"


def test_repository_load_rescans_and_refuses_what_cannot_serve(
    stub: pb_grpc.GRPCInferenceServiceStub, repo: Path
) -> None:
    write_version(repo, "fashion", 1, make_model(seed=5))
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="fashion"), metadata=auth())
    assert stub.ModelReady(pb.ModelReadyRequest(name="fashion")).ready is True
    expect_error(
        lambda: stub.RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name="digits"), metadata=auth()),
        grpc.StatusCode.NOT_FOUND, "'digits'",
    )
    expect_error(
        lambda: stub.RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name="mnist", parameters=version_param(9)),
            metadata=auth()),
        grpc.StatusCode.NOT_FOUND, "no version 9",
    )


@pytest.mark.parametrize(
    ("params", "code", "fragment"),
    [
        ({}, grpc.StatusCode.FAILED_PRECONDITION, "expected parameter 'version'"),
        (version_param("two"), grpc.StatusCode.INVALID_ARGUMENT, "got string_param 'two'"),
        (version_param(2), grpc.StatusCode.FAILED_PRECONDITION, ""),
    ],
)
def test_repository_unload_refusals(
    repo: Path, start: Callable[..., ServerThread], params: Any, code: grpc.StatusCode,
    fragment: str,
) -> None:
    # Policy 'latest' keeps only version 2 loaded: unloading it would leave nothing to serve.
    server = start(repo, admin_enabled=True, admin_token=TOKEN)
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        request = pb.RepositoryModelUnloadRequest(model_name="mnist", parameters=params)
        expect_error(lambda: stub.RepositoryModelUnload(request, metadata=auth()), code, fragment)
        assert stub.ModelReady(pb.ModelReadyRequest(name="mnist")).ready is True


def test_raw_input_with_an_empty_contents_message_is_accepted(
    stub: pb_grpc.GRPCInferenceServiceStub, models: dict[int, Model]
) -> None:
    """Some clients set `contents: {}` next to raw bytes; only values in both are ambiguous."""
    x = images(2)
    request = raw_request(x)
    request.inputs[0].contents.SetInParent()
    assert request.inputs[0].HasField("contents")
    out = raw_outputs(stub.ModelInfer(request))
    assert_probabilities(out["probabilities"], models[2], x)


def test_parameters_are_accepted_and_triton_only_rpcs_are_unimplemented(
    channel: grpc.Channel, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    request = raw_request(images(1))
    request.parameters["priority"].int64_param = 1
    request.inputs[0].parameters["binary_data_size"].int64_param = 3136
    request.outputs.add(name="probabilities").parameters["classification"].int64_param = 2
    assert [o.name for o in stub.ModelInfer(request).outputs] == ["probabilities"]
    # (ModelConfig and ModelStatistics are served: tests/test_oip_triton_stats.py)
    trace = channel.unary_unary("/inference.GRPCInferenceService/TraceSetting")
    expect_error(lambda: trace(b""), grpc.StatusCode.UNIMPLEMENTED)
