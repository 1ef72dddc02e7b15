"""The Classifier API over a real server: answers, bad input, model info, streaming."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import (
    ServerThread,
    float_request,
    make_model,
    probabilities,
    uint8_request,
    write_version,
)
from numerics import assert_probabilities

from service.model import load_model, pixels_to_input
from service.pb.mnist.v1 import classifier_pb2 as pb
from service.pb.mnist.v1 import classifier_pb2_grpc as pb_grpc


@pytest.fixture(params=["core", "aio"])
def start(request: pytest.FixtureRequest,
          start: Callable[..., ServerThread]) -> Callable[..., ServerThread]:
    """Every test here runs on both front ends: Classify on gRPC core's polling thread
    (service/frontends/core.py, the default) and everything through plain grpc.aio."""

    def factory(model_dir: Path, **overrides: Any) -> ServerThread:
        overrides.setdefault("frontend", request.param)
        return start(model_dir, **overrides)

    return factory


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 784), dtype=np.uint8)


def expect_error(call: Any, request: Any, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=10)
    err = info.value
    assert err.code() == code, err.details()
    for fragment in fragments:
        assert fragment in err.details(), (fragment, err.details())
    return str(err.details())


def test_uint8_answers_equal_direct_forward(
    stub: pb_grpc.ClassifierStub, model_repo: Path
) -> None:
    pixels = images(5)
    response = stub.Classify(uint8_request(pixels, request_id="r1"), timeout=10)
    model = load_model(model_repo / "mnist" / "1")
    expected = model.predict(pixels_to_input(pixels))
    assert (response.model, response.version, response.request_id) == ("mnist", 1, "r1")
    assert_probabilities(probabilities(response), model, pixels_to_input(pixels))
    assert [p.label for p in response.predictions] == expected.argmax(axis=1).tolist()


def test_packed_output_equals_per_image_output(stub: pb_grpc.ClassifierStub) -> None:
    pixels = images(9, seed=4)
    plain = stub.Classify(uint8_request(pixels), timeout=10)
    packed = stub.Classify(uint8_request(pixels, packed_output=True, request_id="p"), timeout=10)
    assert len(packed.predictions) == 0
    assert (packed.model, packed.version, packed.request_id) == ("mnist", 1, "p")
    assert list(packed.labels) == [p.label for p in plain.predictions]
    got = np.frombuffer(packed.probabilities_f32le, dtype="<f4").reshape(9, 10)
    np.testing.assert_array_equal(got, probabilities(plain))


def test_float32_answers_equal_direct_forward(
    stub: pb_grpc.ClassifierStub, model_repo: Path
) -> None:
    x = np.random.default_rng(3).random((7, 784), dtype=np.float32)
    response = stub.Classify(float_request(x, image_count=7), timeout=10)
    assert_probabilities(probabilities(response), load_model(model_repo / "mnist" / "1"), x)


def test_named_version_answers_from_that_version(
    model_repo: Path, start: Any
) -> None:
    write_version(model_repo, "other", 3, make_model(seed=9))
    server = start(model_repo, default_model="mnist")
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        response = stub.Classify(uint8_request(images(2), model="other", version=3), timeout=10)
    assert (response.model, response.version) == ("other", 3)
    assert_probabilities(probabilities(response), make_model(seed=9), pixels_to_input(images(2)))


BAD_INPUT = [
    ("wrong byte length", pb.ClassifyRequest(pixels=b"\0" * 785, encoding=pb.ENCODING_UINT8),
     grpc.StatusCode.INVALID_ARGUMENT, ["785 bytes", "multiple of 784"]),
    ("float length", pb.ClassifyRequest(pixels=b"\0" * 784, encoding=pb.ENCODING_FLOAT32_LE),
     grpc.StatusCode.INVALID_ARGUMENT, ["784 bytes", "multiple of 3136"]),
    ("no encoding", pb.ClassifyRequest(pixels=b"\0" * 784),
     grpc.StatusCode.INVALID_ARGUMENT, ["encoding is not set", "ENCODING_UINT8"]),
    ("unknown encoding", pb.ClassifyRequest(pixels=b"\0" * 784, encoding=7),  # type: ignore[arg-type]
     grpc.StatusCode.INVALID_ARGUMENT, ["unknown encoding 7", "ENCODING_FLOAT32_LE"]),
    ("empty", pb.ClassifyRequest(encoding=pb.ENCODING_UINT8),
     grpc.StatusCode.INVALID_ARGUMENT, ["empty request", "got 0 bytes"]),
    ("count mismatch", uint8_request(images(2), image_count=3),
     grpc.StatusCode.INVALID_ARGUMENT, ["image_count is 3", "2 image(s)"]),
    ("too many", uint8_request(images(9)),
     grpc.StatusCode.INVALID_ARGUMENT, ["9 images", "at most 8"]),
    ("nan", float_request(np.where(np.arange(784) == 5, np.nan, 0.5).reshape(1, 784)),
     grpc.StatusCode.INVALID_ARGUMENT, ["image 0 pixel 5 is nan", "finite"]),
    ("inf", float_request(np.where(np.arange(1568) == 800, np.inf, 0.5).reshape(2, 784)),
     grpc.StatusCode.INVALID_ARGUMENT, ["image 1 pixel 16 is inf"]),
    ("above 1", float_request(np.where(np.arange(784) == 3, 255.0, 0.5).reshape(1, 784)),
     grpc.StatusCode.INVALID_ARGUMENT, ["pixel 3 is 255.0", "0.0..1.0"]),
    ("below 0", float_request(np.full((1, 784), -0.5)),
     grpc.StatusCode.INVALID_ARGUMENT, ["is -0.5", "784 bad pixel(s)"]),
    ("unknown model", uint8_request(images(1), model="nope"),
     grpc.StatusCode.NOT_FOUND, ["unknown model 'nope'", "mnist"]),
    ("unknown version", uint8_request(images(1), version=42),
     grpc.StatusCode.NOT_FOUND, ["no loaded version 42", "[1]"]),
]


@pytest.mark.parametrize(("case", "request_", "code", "fragments"), BAD_INPUT,
                         ids=[c[0] for c in BAD_INPUT])
def test_bad_input_status_and_message(
    model_repo: Path, start: Any, case: str, request_: pb.ClassifyRequest,
    code: grpc.StatusCode, fragments: list[str],
) -> None:
    server: ServerThread = start(model_repo, max_images_per_request=8)
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        expect_error(stub.Classify, request_, code, *fragments)
        # Counted with its code, and the server keeps serving.
        assert server.sample("mnist_requests_total",
                             {"method": "Classify", "model": "", "version": "",
                              "code": code.name}) == 1
        assert len(stub.Classify(uint8_request(images(1)), timeout=10).predictions) == 1


def test_unparseable_bytes_are_invalid_argument(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as ch:
        raw = ch.unary_unary("/mnist.v1.Classifier/Classify")
        with pytest.raises(grpc.RpcError) as info:
            raw(b"\xff\xff\xff", timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid mnist.v1.ClassifyRequest" in info.value.details()


def test_stream_answers_in_order_and_reports_bad_messages_in_place(
    stub: pb_grpc.ClassifierStub, model_repo: Path
) -> None:
    model = load_model(model_repo / "mnist" / "1")
    good = [images(i + 1, seed=i) for i in range(20)]
    requests = [uint8_request(g, request_id=f"g{i}") for i, g in enumerate(good)]
    requests.insert(5, pb.ClassifyRequest(request_id="bad", encoding=pb.ENCODING_UINT8))
    out = list(stub.ClassifyStream(iter(requests), timeout=20))
    assert len(out) == 21
    assert out[5].WhichOneof("result") == "error"
    assert out[5].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert out[5].error.request_id == "bad"
    assert "empty request" in out[5].error.message
    answers = [o for i, o in enumerate(out) if i != 5]
    for i, (o, g) in enumerate(zip(answers, good, strict=True)):
        assert o.response.request_id == f"g{i}"
        assert_probabilities(probabilities(o.response), model, pixels_to_input(g))


def test_model_info_and_list(stub: pb_grpc.ClassifierStub) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.name == "mnist"
    assert info.current_version == 1
    assert [(v.version, v.state) for v in info.versions] == [(1, pb.VERSION_STATE_AVAILABLE)]
    assert list(info.input.shape) == [28, 28]
    assert list(info.class_labels) == [str(i) for i in range(10)]
    assert info.training_metrics["test_accuracy"] == pytest.approx(0.5)
    assert info.training_metrics["nested.loss"] == pytest.approx(0.25)
    assert list(info.layer_sizes) == [784, 32, 10]
    listed = stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert [m.name for m in listed.models] == ["mnist"]
    expect_error(stub.GetModelInfo, pb.GetModelInfoRequest(model="zzz"),
                 grpc.StatusCode.NOT_FOUND, "unknown model 'zzz'")


def test_no_model_is_unavailable_not_a_crash(tmp_path: Path, start: Any) -> None:
    server = start(tmp_path)  # empty repository
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        expect_error(stub.Classify, uint8_request(images(1)), grpc.StatusCode.UNAVAILABLE,
                     "no model is loaded")
        assert list(stub.ListModels(pb.ListModelsRequest(), timeout=10).models) == []
