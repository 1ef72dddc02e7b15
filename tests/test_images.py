"""Encoded images sent to a real server: same pixels as the CLI, every bad image named.

Servers are real (conftest: 127.0.0.1 port 0), on both front ends where the request path
differs (the core front end hands image requests from gRPC core's polling thread to the event
loop). Expected answers come from the CLI's own preprocessing (mnist_client.images) and
`Model.predict`, so a server that preprocessed differently, or decoded a different image,
fails.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from support.images import BAD, a_digit, cli_pixels, encoded
from support.procs import free_port, stop_process
from support.servers import ServerThread, make_model, uint8_request

from service.model import pixels_to_input
from service.pb.inference import grpc_service_pb2 as v2
from service.pb.inference import grpc_service_pb2_grpc as v2_grpc
from service.pb.mnist.v1 import classifier_pb2 as pb
from service.pb.mnist.v1 import classifier_pb2_grpc as pb_grpc

FRONTENDS = ["core", "aio"]


@pytest.fixture(params=FRONTENDS)
def server(request: pytest.FixtureRequest, model_repo: Path,
           start: Callable[..., ServerThread]) -> ServerThread:
    return start(model_repo, frontend=request.param)


@pytest.fixture
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.ClassifierStub:
    return pb_grpc.ClassifierStub(channel)


def probs(response: pb.ClassifyResponse) -> np.ndarray:
    return np.array([list(p.probabilities) for p in response.predictions], dtype=np.float32)


def refused(stub: pb_grpc.ClassifierStub, request: pb.ClassifyRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(request, timeout=30)
    return info.value


# --- the same pixels as the CLI


def test_classify_images_gives_the_cli_pixels_answer(stub: pb_grpc.ClassifierStub) -> None:
    files = [encoded(a_digit(0)), encoded(a_digit(1), "JPEG", quality=90),
             encoded(a_digit(2), "BMP"), encoded(a_digit(3), "WEBP", lossless=True),
             encoded(a_digit(4), "GIF"), encoded(a_digit(5), "PPM")]
    pixels = np.stack([cli_pixels(f) for f in files])
    by_image = stub.Classify(pb.ClassifyRequest(images=files, request_id="img"), timeout=30)
    by_pixels = stub.Classify(uint8_request(pixels), timeout=30)
    assert by_image.request_id == "img"
    np.testing.assert_array_equal(probs(by_image), probs(by_pixels))
    expected = make_model(seed=1).predict(pixels_to_input(pixels))
    np.testing.assert_allclose(probs(by_image), expected, rtol=1e-5, atol=1e-6)
    assert [p.label for p in by_image.predictions] == list(expected.argmax(axis=1))


def test_v2_bytes_input_raw_and_typed(channel: grpc.Channel) -> None:
    files = [encoded(a_digit(6)), encoded(a_digit(7), "JPEG")]
    expected = make_model(seed=1).predict(pixels_to_input(np.stack([cli_pixels(f)
                                                                     for f in files])))
    stub = v2_grpc.GRPCInferenceServiceStub(channel)
    tensor = v2.ModelInferRequest.InferInputTensor
    raw = b"".join(struct.pack("<I", len(f)) + f for f in files)  # Triton's BYTES layout
    reply = stub.ModelInfer(v2.ModelInferRequest(
        model_name="mnist", inputs=[tensor(name="images", datatype="BYTES", shape=[2, 1])],
        raw_input_contents=[raw]), timeout=30)
    got = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(2, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    typed = stub.ModelInfer(v2.ModelInferRequest(
        model_name="mnist", inputs=[tensor(name="images", datatype="BYTES", shape=[2],
                                           contents=v2.InferTensorContents(
                                               bytes_contents=files))]), timeout=30)
    got = np.array(typed.outputs[0].contents.fp32_contents, np.float32).reshape(2, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(v2.ModelInferRequest(
            model_name="mnist", inputs=[tensor(name="images", datatype="BYTES", shape=[2])],
            raw_input_contents=[raw[:-3]]), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "element 1 declares" in (info.value.details() or "")
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(v2.ModelInferRequest(
            model_name="mnist", inputs=[tensor(name="images", datatype="BYTES", shape=[1])],
            raw_input_contents=[struct.pack("<I", 9) + b"not a png"]), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 0: not an image" in (info.value.details() or "")


def test_stream_carries_images_and_names_a_bad_one(stub: pb_grpc.ClassifierStub) -> None:
    good = encoded(a_digit(8))
    requests = [pb.ClassifyRequest(images=[good], request_id="a"),
                pb.ClassifyRequest(images=[b"GIF89a-broken"], request_id="b"),
                pb.ClassifyRequest(images=[good], request_id="c")]
    replies = list(stub.ClassifyStream(iter(requests), timeout=30))
    assert [r.WhichOneof("result") for r in replies] == ["response", "error", "response"]
    assert replies[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert replies[1].error.request_id == "b"




@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_image_is_named_and_the_server_keeps_serving(
    case: str, stub: pb_grpc.ClassifierStub, server: ServerThread
) -> None:
    make, reason, words, fmt = BAD[case]
    good = encoded(a_digit(2))
    error = refused(stub, pb.ClassifyRequest(images=[good, make()]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    details = error.details() or ""
    assert "image 1" in details, details
    assert words in details, details
    failures = server.sample("mnist_image_decode_failures_total",
                             {"format": fmt, "reason": reason})
    assert failures == 1, (case, reason)
    assert len(stub.Classify(pb.ClassifyRequest(images=[good]), timeout=30).predictions) == 1


def test_mixed_pixels_and_images_is_refused(stub: pb_grpc.ClassifierStub) -> None:
    request = uint8_request(np.zeros((1, 28, 28), np.uint8))
    request.images.append(encoded(a_digit(0)))
    error = refused(stub, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not both" in (error.details() or "")
    error = refused(stub, pb.ClassifyRequest(images=[encoded(a_digit(0))], image_count=2))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image_count is 2 but images holds 1" in (error.details() or "")


def test_request_limits_count_and_bytes(model_repo: Path,
                                        start: Callable[..., ServerThread]) -> None:
    server = start(model_repo, max_images_per_request=3, image_max_request_bytes=4000)
    good = encoded(a_digit(0))
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        many = refused(stub, pb.ClassifyRequest(images=[good] * 4))
        assert many.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "4 images in one request: at most 3" in (many.details() or "")
        heavy = refused(stub, pb.ClassifyRequest(images=[good, b"\x89PNG" + b"0" * 3900, good]))
        assert heavy.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "bytes of encoded images in one request: at most 4000" in (heavy.details() or "")


def test_a_decode_over_its_time_limit_is_killed_and_the_next_one_works(
    model_repo: Path, start: Callable[..., ServerThread]
) -> None:
    """A decoder process past --image-decode-timeout-s is killed and replaced."""
    server = start(model_repo, image_decode_timeout_s=0.001, image_decode_workers=1,
                   image_max_bytes=8 << 20)
    noisy = np.random.default_rng(0).integers(0, 256, (2000, 2000), dtype=np.uint8)
    slow = encoded(noisy)  # ~4 MB of noise: far more than a millisecond to decode
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        error = refused(stub, pb.ClassifyRequest(images=[slow]))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "took longer than" in (error.details() or ""), error.details()
    assert server.sample("mnist_image_decode_failures_total",
                         {"format": "unknown", "reason": "timeout"}) == 1


def test_decoding_off_answers_failed_precondition_and_pixels_still_work(
    model_repo: Path, start: Callable[..., ServerThread]
) -> None:
    server = start(model_repo, image_decode_workers=0)
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        error = refused(stub, pb.ClassifyRequest(images=[encoded(a_digit(0))]))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "send pixels instead" in (error.details() or "")
        assert len(stub.Classify(uint8_request(np.zeros((2, 28, 28), np.uint8)),
                                 timeout=30).predictions) == 2


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_a_flood_of_slow_images_does_not_starve_pixel_requests(
    frontend: str, model_repo: Path, start: Callable[..., ServerThread]
) -> None:
    """Decoders busy with big images, and more waiting than allowed: pixel requests are
    answered meanwhile, and the excess image requests are refused, not queued for ever."""
    server = start(model_repo, frontend=frontend, image_decode_workers=1, image_max_waiting=2,
                   image_max_pixels=1 << 24, image_max_bytes=8 << 20,
                   image_max_request_bytes=32 << 20, image_decode_timeout_s=60)
    noisy = np.random.default_rng(1).integers(0, 256, (1500, 1500), dtype=np.uint8)
    slow = pb.ClassifyRequest(images=[encoded(noisy)] * 2)
    done = threading.Event()
    with grpc.insecure_channel(server.target) as ch, ThreadPoolExecutor(8) as pool:
        stub = pb_grpc.ClassifierStub(ch)

        def image_call() -> grpc.StatusCode:
            try:
                stub.Classify(slow, timeout=120)
                return grpc.StatusCode.OK
            except grpc.RpcError as e:
                return e.code()
            finally:
                done.set()

        images = [pool.submit(image_call) for _ in range(8)]
        answered_while_decoding = 0
        for _ in range(20):
            reply = stub.Classify(uint8_request(np.zeros((1, 28, 28), np.uint8)), timeout=30)
            assert len(reply.predictions) == 1
            if not all(f.done() for f in images):
                answered_while_decoding += 1
        codes = [f.result() for f in images]
    assert answered_while_decoding > 0
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert grpc.StatusCode.OK in codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_a_server_without_pillow_starts_and_says_why_it_refuses_images(
    model_repo: Path, tmp_path: Path
) -> None:
    """Pillow is an optional extra: hidden from a real server process, which must start,
    serve pixels, and answer encoded images with FAILED_PRECONDITION."""
    port = free_port()
    hide_pillow = ("import sys; sys.modules['PIL'] = None; "
                   "from service.__main__ import main; sys.exit(main())")
    log = (tmp_path / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-c", hide_pillow, "--model-dir", str(model_repo), "--host",
         "127.0.0.1", "--port", str(port), "--no-metrics-enabled"],
        stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1],
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=60)
            stub = pb_grpc.ClassifierStub(ch)
            pixels = stub.Classify(uint8_request(np.zeros((1, 28, 28), np.uint8)),
                                   timeout=30, wait_for_ready=True)
            assert len(pixels.predictions) == 1
            error = refused(stub, pb.ClassifyRequest(images=[encoded(a_digit(0))]))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "without the 'image' extra (Pillow)" in (error.details() or "")
    finally:
        assert stop_process(process) == 0
        log.close()


def test_many_images_in_one_request(stub: pb_grpc.ClassifierStub) -> None:
    files = [encoded(a_digit(s, size=(40, 30))) for s in range(1000)]
    reply = stub.Classify(pb.ClassifyRequest(images=files, packed_output=True), timeout=120)
    expected = make_model(seed=1).predict(
        pixels_to_input(np.stack([cli_pixels(f) for f in files])))
    assert list(reply.labels) == list(expected.argmax(axis=1))


def test_a_request_has_a_pixel_budget_for_all_its_images(
    model_repo: Path, start: Callable[..., ServerThread]
) -> None:
    """Each image within --image-max-pixels, but together past --image-max-request-pixels."""
    server = start(model_repo, image_max_pixels=1_000_000, image_max_request_pixels=2_500_000)
    big = encoded(np.full((1000, 1000), 255, np.uint8))  # 1 Mpx, a few kB
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        assert len(stub.Classify(pb.ClassifyRequest(images=[big] * 2), timeout=60)
                   .predictions) == 2
        error = refused(stub, pb.ClassifyRequest(images=[big] * 3))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.details() or ""
    assert details.startswith("image 2: PNG image of 1000x1000"), details
    assert "2500000-pixel budget for all its images" in details


def test_a_request_id_that_is_not_utf8_is_refused_and_the_server_goes_on(
    channel: grpc.Channel, stub: pb_grpc.ClassifierStub
) -> None:
    body = pb.ClassifyRequest(images=[encoded(a_digit(0))]).SerializeToString()
    body += b"\x3a\x02\xff\xfe"  # field 7 (request_id), 2 bytes that are not UTF-8
    classify = channel.unary_unary("/mnist.v1.Classifier/Classify")
    with pytest.raises(grpc.RpcError) as info:
        classify(body, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(stub.Classify(pb.ClassifyRequest(images=[encoded(a_digit(0))]),
                             timeout=30).predictions) == 1
