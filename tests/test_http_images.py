"""Encoded images over REST (KServe v2 over HTTP), on a real server: a BYTES input `images`
as Triton's binary layout or as base64 strings in JSON gives exactly the answer gRPC's
Classify gives for the same file; every bad image is a 400 naming it, counted as on gRPC, and
the server keeps serving. The unmodified Triton HTTP client's proof is in
tests/test_http_triton.py; docs/oip.md's curl example with a PNG runs in
tests/test_http_docs.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from support.http_client import Response, request
from support.images import BAD, a_digit, encoded
from support.procs import free_port
from support.servers import ServerThread

from service.batching import REQUEST_OVERHEAD_BYTES, Batcher
from service.config import Settings
from service.dataplane import DataPlane, InferPipeline
from service.dataplane.images import ImageDecoder, ImageSettings
from service.errors import Overloaded
from service.frontends.http.api import RestInferPipeline, wire_equivalent
from service.metrics import Metrics
from service.pb.mnist.v1 import classifier_pb2 as pb
from service.pb.mnist.v1 import classifier_pb2_grpc as pb_grpc
from service.registry import ModelRegistry

ROOT = Path(__file__).resolve().parent.parent
INFER = "/v2/models/mnist/infer"


def layout(files: list[bytes]) -> bytes:
    """Triton's BYTES layout: each element a little-endian u32 length, then its bytes."""
    return b"".join(struct.pack("<I", len(f)) + f for f in files)


def binary_infer(port: int, files: list[bytes], *, shape: list[int] | None = None,
                 raw: bytes | None = None, **tensor_params: Any) -> Response:
    data = layout(files) if raw is None else raw
    head = json.dumps({
        "inputs": [{"name": "images", "datatype": "BYTES",
                    "shape": [len(files)] if shape is None else shape,
                    "parameters": {"binary_data_size": len(data), **tensor_params}}],
        "parameters": {"binary_data_output": True}}).encode()
    return request(port, "POST", INFER, head + data,
                   {"Inference-Header-Content-Length": str(len(head))})


def base64_doc(files: list[bytes], **tensor: Any) -> dict[str, Any]:
    doc = {"name": "images", "datatype": "BYTES", "shape": [len(files)],
           "parameters": {"content_type": "base64"},
           "data": [base64.b64encode(f).decode() for f in files]}
    doc.update(tensor)
    return {"inputs": [{k: v for k, v in doc.items() if v is not None}]}


def json_infer(port: int, doc: dict[str, Any]) -> Response:
    return request(port, "POST", INFER, json.dumps(doc).encode())


def binary_probabilities(reply: Response, n: int) -> np.ndarray:
    assert reply.status == 200, reply.body[:300]
    head = int(reply.headers["inference-header-content-length"])
    doc = json.loads(reply.body[:head])
    assert doc["outputs"][0]["name"] == "probabilities"
    size = doc["outputs"][0]["parameters"]["binary_data_size"]
    return np.frombuffer(reply.body[head:head + size], "<f4").reshape(n, 10)


def json_probabilities(reply: Response, n: int) -> np.ndarray:
    assert reply.status == 200, reply.body[:300]
    out = {o["name"]: o for o in reply.json()["outputs"]}
    return np.array(out["probabilities"]["data"], np.float32).reshape(n, 10)


@pytest.fixture
def server(model_repo: Path, start: Callable[..., ServerThread]) -> ServerThread:
    return start(model_repo, http_port=free_port())


@pytest.fixture
def port(server: ServerThread) -> int:
    port: int = server.settings.http_port
    return port


def classify(server: ServerThread, files: list[bytes]) -> np.ndarray:
    with grpc.insecure_channel(server.target) as ch:
        reply = pb_grpc.ClassifierStub(ch).Classify(pb.ClassifyRequest(images=files),
                                                     timeout=30)
    return np.array([list(p.probabilities) for p in reply.predictions], np.float32)


def some_files() -> list[bytes]:
    return [(ROOT / "docs" / "examples" / "digit-7.png").read_bytes(),
            encoded(a_digit(1), "JPEG", quality=90), encoded(a_digit(2)),
            encoded(a_digit(3), "WEBP", lossless=True)]


# --- the same answer as gRPC Classify


def test_binary_and_base64_json_give_grpc_classify_s_answer(server: ServerThread,
                                                             port: int) -> None:
    files = some_files()
    expected = classify(server, files)
    n = len(files)
    np.testing.assert_array_equal(binary_probabilities(binary_infer(port, files), n), expected)
    np.testing.assert_array_equal(
        binary_probabilities(binary_infer(port, files, shape=[n, 1]), n), expected)
    np.testing.assert_array_equal(json_probabilities(json_infer(port, base64_doc(files)), n),
                                  expected)
    nested = base64_doc(files, shape=[n, 1])
    nested["inputs"][0]["data"] = [[s] for s in nested["inputs"][0]["data"]]
    reply = json_infer(port, nested)
    np.testing.assert_array_equal(json_probabilities(reply, n), expected)
    classes = {o["name"]: o for o in reply.json()["outputs"]}["predicted_class"]["data"]
    assert classes == expected.argmax(axis=1).tolist()


def test_images_are_counted_as_rest_requests_and_decodes(server: ServerThread,
                                                          port: int) -> None:
    assert binary_infer(port, some_files()[:2]).status == 200
    ok = {"method": "REST ModelInfer", "model": "mnist", "version": "1", "code": "OK"}
    assert server.sample("mnist_requests_total", ok) == 1
    assert server.sample("mnist_images_total", ok) == 2
    assert server.sample("mnist_image_decode_duration_seconds_count", {"result": "ok"}) == 1


# --- every bad image: 400 naming it and what is wrong, counted, and the server goes on


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("form", ["binary", "base64"])
def test_a_bad_image_is_a_400_naming_it_and_the_server_keeps_serving(
    case: str, form: str, server: ServerThread, port: int
) -> None:
    make, reason, words, fmt = BAD[case]
    good = encoded(a_digit(2))
    files = [good, make()]
    reply = (binary_infer(port, files) if form == "binary"
             else json_infer(port, base64_doc(files)))
    assert reply.status == 400, (reply.status, reply.body[:300])
    error = reply.json()["error"]
    assert "image 1" in error, error
    assert words in error, error
    assert server.sample("mnist_image_decode_failures_total",
                         {"format": fmt, "reason": reason}) == 1
    bad = {"method": "REST ModelInfer", "model": "mnist", "version": "1",
           "code": "INVALID_ARGUMENT"}
    assert server.sample("mnist_requests_total", bad) == 1
    assert binary_infer(port, [good]).status == 200


# --- malformed BYTES inputs: REST's own parsing, each a 400 with a reason

GOOD = base64.b64encode(encoded(a_digit(0))).decode()
PNG = encoded(a_digit(0))


def _json(**tensor: Any) -> dict[str, Any]:
    return base64_doc([PNG], **tensor)


MALFORMED_JSON: list[tuple[dict[str, Any], str]] = [
    (_json(parameters=None), 'expected its \'data\' as base64 strings with the input '
                             'parameter "content_type": "base64"'),
    (_json(parameters={"content_type": "str"}), "got content_type 'str'"),
    (_json(data=["not base64!"]), "image 0: not base64"),
    (_json(data=["aGk"]), "image 0: not base64 (Incorrect padding"),
    (_json(data=[GOOD[:40] + "\n" + GOOD[40:]]), "image 0: not base64"),
    (_json(data=["Grüße"]), "image 0: not base64"),
    (_json(data=[7]), "data[0]: expected a base64 string, got 7"),
    (_json(data="aGk="), "expected a list of base64 strings"),
    (_json(data=[GOOD, GOOD]), "shape [1] says 1 image(s), got 2"),
    (_json(shape=[1, 2]), "expected shape [N] or [N, 1] with N >= 1, got [1, 2]"),
    (_json(shape=[0], data=[]), "expected shape [N] or [N, 1] with N >= 1, got [0]"),
    (_json(name="pixels"), "expected an input named 'images', got 'pixels'"),
    (_json(data=[""]), "image 0 is empty"),
    (_json(shape=[5000], data=[GOOD] * 5000), "5000 images in one request: at most 4096"),
]


@pytest.mark.parametrize(("doc", "expected"), MALFORMED_JSON,
                         ids=[str(i) for i in range(len(MALFORMED_JSON))])
def test_malformed_base64_inputs_are_400(port: int, doc: dict[str, Any],
                                         expected: str) -> None:
    reply = json_infer(port, doc)
    assert reply.status == 400, (reply.status, reply.body[:300])
    assert expected in reply.json()["error"], reply.json()
    assert json_infer(port, base64_doc([PNG])).status == 200


def test_malformed_binary_layouts_are_400(port: int) -> None:
    two = layout([PNG, PNG])
    cases = [
        (binary_infer(port, [PNG, PNG], raw=two[:-3]), "element 1 declares"),
        (binary_infer(port, [PNG], raw=two[:4 + len(PNG) + 2]), "2 stray byte(s)"),
        (binary_infer(port, [PNG], raw=two), "shape [1] says 1 image(s), got 2"),
        (binary_infer(port, [PNG], content_type="base64"),
         "parameter 'content_type' describes JSON 'data'"),
        (binary_infer(port, [PNG], raw=layout([b""])), "image 0 is empty"),
    ]
    for reply, expected in cases:
        assert reply.status == 400, (reply.status, reply.body[:300])
        assert expected in reply.json()["error"], (expected, reply.json())
    assert binary_infer(port, [PNG]).status == 200


def test_image_limits_are_gRPC_s(model_repo: Path, start: Callable[..., ServerThread]) -> None:
    port = start(model_repo, http_port=free_port(), max_images_per_request=3,
                 image_max_request_bytes=4000, image_max_bytes=3000).settings.http_port
    many = binary_infer(port, [PNG] * 4)
    assert (many.status, many.json()["error"]) == (
        400, "4 images in one request: at most 3 allowed")
    filler = b"\x89PNG" + b"0" * 2500  # each under 3000 bytes, together over 4000
    heavy = json_infer(port, base64_doc([PNG, filler, filler]))
    assert heavy.status == 400
    assert "bytes of encoded images in one request: at most 4000" in heavy.json()["error"]
    big = binary_infer(port, [b"\x89PNG" + b"0" * 3000])
    assert big.status == 400
    assert "image 0 is 3004 bytes: at most 3000 bytes allowed per image" in big.json()["error"]


def test_decoding_off_is_a_400_saying_send_pixels(model_repo: Path,
                                                  start: Callable[..., ServerThread]) -> None:
    port = start(model_repo, http_port=free_port(),
                 image_decode_workers=0).settings.http_port
    reply = binary_infer(port, [PNG])
    assert reply.status == 400  # FAILED_PRECONDITION, by the one status table
    assert "send pixels instead" in reply.json()["error"]


def test_decoded_rows_are_charged_when_queued(model_repo: Path) -> None:
    """A REST body of images is admitted by its bytes before parsing; the rows decoded from
    it (3136 bytes an image, far more than a small PNG) are charged when queued. Here the
    body fits the queue's byte bound and its rows do not: refused after decoding."""
    files = [PNG] * 3
    data = layout(files)
    head = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [3],
                                   "parameters": {"binary_data_size": len(data)}}]}).encode()
    body = head + data
    wire = wire_equivalent(len(body), True)
    rows = 3 * 784 * 4
    assert 4 * wire < rows  # the premise: the body's charge is below its rows'
    held = 784 * 4 + REQUEST_OVERHEAD_BYTES  # one queued image, never computed
    bound = held + 4 * wire + REQUEST_OVERHEAD_BYTES  # the body just fits at admission
    metrics = Metrics(CollectorRegistry())
    registry = ModelRegistry(model_repo, metrics, rescan_interval_s=0)
    decoder = ImageDecoder(ImageSettings.from_settings(Settings(image_decode_workers=1)), metrics)

    async def scenario() -> None:
        await registry.start()
        # Never started: what is queued stays queued, holding its charge.
        batcher = Batcher(registry, Metrics.disabled(), max_batch_rows=256,
                          max_batch_wait_s=0.0, max_queue_rows=10_000, max_queue_bytes=bound)
        waiting = asyncio.ensure_future(batcher.submit(np.zeros((1, 784), np.float32)))
        await asyncio.sleep(0)
        plane = DataPlane(batcher, metrics, decoder)
        pipeline = RestInferPipeline(InferPipeline(registry, max_images=8, images=decoder),
                                     "mnist", "", str(len(head)), 8)
        with pytest.raises(Overloaded, match="bytes held by queued requests"):
            # (bounded: were it admitted, it would wait for a batch that never runs)
            await asyncio.wait_for(plane.call(pipeline, body, None, wire_bytes=wire), 60)
        waiting.cancel()

    try:
        asyncio.run(scenario())
    finally:
        decoder.close()
    assert metrics.registry.get_sample_value(
        "mnist_image_decode_duration_seconds_count", {"result": "ok"}) == 1  # decoded first
