"""The KServe v2 REST front end, over real sockets to a real server (conftest's start_server).

Answers are checked against `Model.predict` on the same pixels; every malformed request must
get its 4xx with a clear message and leave the server serving. The Triton HTTP client's proof
is tests/test_http_triton.py; the docs' curl examples run in tests/test_http_docs.py.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.http_client import Response, closed_by_peer, exchange, read_response, request
from support.numerics import assert_probabilities
from support.procs import free_port
from support.servers import ServerThread

from service.model import Model, pixels_to_input


def start_http(start: Callable[..., ServerThread], repo: Path, **overrides: Any) -> ServerThread:
    settings: dict[str, Any] = {"version_policy": "latest:2",
                                "version_labels": "mnist:stable=1", "http_port": free_port()}
    settings.update(overrides)
    return start(repo, **settings)


@pytest.fixture
def server(repo: Path, start: Callable[..., ServerThread]) -> ServerThread:
    return start_http(start, repo)


@pytest.fixture
def port(server: ServerThread) -> int:
    port: int = server.settings.http_port
    return port


def infer_json(x: np.ndarray, datatype: str = "FP32", **extra: Any) -> bytes:
    data = x.astype(np.uint8 if datatype == "UINT8" else np.float32).ravel().tolist()
    doc = {"inputs": [{"name": "images", "datatype": datatype, "shape": list(x.shape),
                       "data": data}], **extra}
    return json.dumps(doc).encode()


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 784), dtype=np.float32)


def post_infer(port: int, body: bytes, path: str = "/v2/models/mnist/infer",
               headers: dict[str, str] | None = None) -> Response:
    return request(port, "POST", path, body, headers)


# --- health, metadata, repository ------------------------------------------------------------


def test_health_and_server_metadata(port: int) -> None:
    assert request(port, "GET", "/v2/health/live").json() == {"live": True}
    assert request(port, "GET", "/v2/health/ready").json() == {"ready": True}
    meta = request(port, "GET", "/v2")
    assert meta.status == 200
    assert meta.headers["content-type"] == "application/json"
    assert meta.json()["name"] == "mnist-serving"
    assert meta.json()["extensions"] == ["model_repository"]


def test_not_ready_without_models(tmp_path: Path, start: Callable[..., ServerThread]) -> None:
    (tmp_path / "empty").mkdir()
    port = start_http(start, tmp_path / "empty", version_labels="").settings.http_port
    reply = request(port, "GET", "/v2/health/ready")
    assert (reply.status, reply.json()) == (503, {"ready": False})
    assert request(port, "GET", "/v2/health/live").status == 200


def test_model_metadata_and_readiness(port: int) -> None:
    meta = request(port, "GET", "/v2/models/mnist").json()
    assert meta["versions"] == ["1", "2"]
    assert meta["platform"] == "numpy_mlp"
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 784]}]
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "predicted_class"]
    assert request(port, "GET", "/v2/models/mnist/versions/1").status == 200
    assert request(port, "GET", "/v2/models/mnist/versions/1/ready").json()["ready"] is True
    assert request(port, "GET", "/v2/models/mnist/ready").status == 200
    for path in ("/v2/models/mnist/versions/9/ready", "/v2/models/nope/ready"):
        reply = request(port, "GET", path)
        assert (reply.status, reply.json()["ready"]) == (503, False), path
    missing = request(port, "GET", "/v2/models/fashion")
    assert missing.status == 404
    assert "unknown model 'fashion'" in missing.json()["error"]
    assert request(port, "GET", "/v2/models/mnist/versions/9").status == 404
    bad = request(port, "GET", "/v2/models/mnist/versions/0")
    assert bad.status == 400
    assert "model_version" in bad.json()["error"]


def test_repository_index(port: int) -> None:
    everything = request(port, "POST", "/v2/repository/index").json()
    assert {(m["name"], m["version"], m["state"]) for m in everything} == {
        ("mnist", "1", "READY"), ("mnist", "2", "READY")}
    assert len(request(port, "POST", "/v2/repository/index", b'{"ready": true}').json()) == 2
    bad = request(port, "POST", "/v2/repository/index", b'{"ready": "yes"}')
    assert bad.status == 400
    assert "'ready'" in bad.json()["error"]


def test_config_and_stats_are_triton_s_documents_shared_with_grpc(port: int) -> None:
    config = request(port, "GET", "/v2/models/mnist/config")
    assert config.status == 200, config.json()
    body = config.json()["config"]
    assert body["name"] == "mnist"
    assert body["max_batch_size"] > 0
    assert [i["name"] for i in body["input"]] == ["images"]
    before = request(port, "GET", "/v2/models/mnist/versions/2/stats").json()
    x = np.zeros((3, 784), np.float32).tolist()
    infer = request(port, "POST", "/v2/models/mnist/versions/2/infer", json.dumps(
        {"inputs": [{"name": "images", "datatype": "FP32", "shape": [3, 784], "data": x}]}
    ).encode())
    assert infer.status == 200, infer.json()
    after = request(port, "GET", "/v2/models/mnist/versions/2/stats").json()

    def count(doc: dict[str, Any]) -> int:
        (stats,) = doc["model_stats"]
        assert (stats["name"], stats["version"]) == ("mnist", "2")
        return int(stats.get("inference_count", 0))

    assert count(after) - count(before) == 3  # the REST request counted in Triton's terms
    everything = request(port, "GET", "/v2/models/stats").json()["model_stats"]
    assert {(m["name"], m["version"]) for m in everything} == {("mnist", "1"), ("mnist", "2")}
    for path in ("/v2/models/nope/config", "/v2/models/nope/stats",
                 "/v2/models/mnist/versions/9/config"):
        assert request(port, "GET", path).status == 404, path


def test_unknown_route_and_wrong_method(port: int) -> None:
    reply = request(port, "GET", "/v1/models/mnist:predict")
    assert reply.status == 404
    assert "no route" in reply.json()["error"]
    assert request(port, "GET", "/v2/models/mnist/infer").status == 405
    assert request(port, "POST", "/v2/health/live").status == 405
    head = request(port, "HEAD", "/v2/health/live")
    assert head.status == 200
    assert head.body == b""


# --- inference ------------------------------------------------------------------------------


def test_infer_json_fp32_matches_predict(port: int, models: dict[int, Model]) -> None:
    x = images(3)
    reply = post_infer(port, infer_json(x, id="req-7"))
    assert reply.status == 200, reply.body
    doc = reply.json()
    assert (doc["model_name"], doc["model_version"], doc["id"]) == ("mnist", "2", "req-7")
    out = {o["name"]: o for o in doc["outputs"]}
    assert out["probabilities"]["shape"] == [3, 10]
    probabilities = np.array(out["probabilities"]["data"], np.float32).reshape(3, 10)
    assert_probabilities(probabilities, models[2], x)
    assert out["predicted_class"]["datatype"] == "INT64"
    assert out["predicted_class"]["data"] == probabilities.argmax(axis=1).tolist()


def test_infer_uint8_28x28_version_and_label(port: int, models: dict[int, Model]) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    for path, version in (("/v2/models/mnist/versions/1/infer", 1),
                          ("/v2/models/mnist/versions/stable/infer", 1),
                          ("/v2/models/mnist/infer", 2)):
        doc = post_infer(port, infer_json(pixels, "UINT8"), path).json()
        assert doc["model_version"] == str(version), path
        got = np.array(doc["outputs"][0]["data"], np.float32).reshape(2, 10)
        assert_probabilities(got, models[version], pixels_to_input(pixels.reshape(2, 784)))


def binary_body(x: np.ndarray, datatype: str, **doc: Any) -> tuple[bytes, int]:
    raw = x.tobytes()
    head = json.dumps({"inputs": [{"name": "images", "datatype": datatype,
                                   "shape": list(x.shape),
                                   "parameters": {"binary_data_size": len(raw)}}], **doc})
    return head.encode() + raw, len(head)


def split_binary(reply: Response) -> tuple[dict[str, Any], dict[str, bytes]]:
    n = int(reply.headers["inference-header-content-length"])
    doc = json.loads(reply.body[:n])
    blobs, at = {}, n
    for out in doc["outputs"]:
        size = out.get("parameters", {}).get("binary_data_size")
        if size is not None:
            blobs[out["name"]] = reply.body[at:at + size]
            at += size
    assert at == len(reply.body)
    return doc, blobs


def test_infer_binary_in_and_out(port: int, models: dict[int, Model]) -> None:
    x = images(4, seed=5)
    body, n = binary_body(x, "FP32", parameters={"binary_data_output": True})
    reply = post_infer(port, body, headers={"Inference-Header-Content-Length": str(n)})
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == "application/octet-stream"
    _, blobs = split_binary(reply)
    probabilities = np.frombuffer(blobs["probabilities"], "<f4").reshape(4, 10)
    assert_probabilities(probabilities, models[2], x)
    classes = np.frombuffer(blobs["predicted_class"], "<i8")
    assert classes.tolist() == probabilities.argmax(axis=1).tolist()


def test_requested_outputs_mix_binary_and_json(port: int) -> None:
    pixels = np.zeros((1, 784), np.uint8)
    body, n = binary_body(pixels, "UINT8", outputs=[
        {"name": "predicted_class"},
        {"name": "probabilities", "parameters": {"binary_data": True}}])
    reply = post_infer(port, body, headers={"Inference-Header-Content-Length": str(n)})
    doc, blobs = split_binary(reply)
    assert [o["name"] for o in doc["outputs"]] == ["predicted_class", "probabilities"]
    assert "data" in doc["outputs"][0]
    assert list(blobs) == ["probabilities"]


# --- every malformed request: a 4xx naming the problem, and the server keeps serving ---------

GOOD = {"name": "images", "datatype": "FP32", "shape": [1, 784], "data": [0.0] * 784}


def _doc(**changes: Any) -> bytes:
    tensor = {**GOOD, **changes}
    return json.dumps({"inputs": [{k: v for k, v in tensor.items() if v is not None}]}).encode()


BAD_BODIES: list[tuple[bytes, dict[str, str], str]] = [
    (b"", {}, "not valid JSON"),
    (b"{", {}, "not valid JSON"),
    (b"\xff\xfe\x00garbage", {}, "not valid JSON"),
    (b"[" * 100_000, {}, "not valid JSON"),
    (b"[]", {}, "expected a JSON object"),
    (b'{"inputs": {}}', {}, "exactly 1 input"),
    (b'{"inputs": []}', {}, "exactly 1 input"),
    (b'{"inputs": [1]}', {}, "expected a JSON object"),
    (b'{"inputs": [{"name": "images"}]}', {}, "'name' and 'datatype'"),
    (_doc(name="pixels"), {}, "expected an input named 'images'"),
    (_doc(datatype="FP64"), {}, "expected datatype FP32 or UINT8, got 'FP64'"),
    (_doc(datatype="BYTES", data=["aGk="]), {}, "BYTES (encoded images): expected shape [N]"),
    (_doc(shape=[1, 783]), {}, "expected shape [N, 784]"),
    (_doc(shape="1,784"), {}, "list of integers"),
    (_doc(shape=[True, 784]), {}, "list of integers"),
    (_doc(shape=[0, 784], data=[]), {}, "at least 1 image"),
    (_doc(data=[0.0] * 783), {}, "expected 784 values"),
    (_doc(data=[[0.0] * 392, [0.0] * 391]), {}, "not a regular array"),
    (_doc(data=["0.5"] * 784), {}, "expected its data as numbers"),
    (_doc(data=[None] * 784), {}, "expected its data as numbers"),
    (_doc(data=[True] * 784), {}, "expected its data as numbers"),
    (_doc(data=[{"a": 1}] * 784), {}, "expected its data as numbers"),
    (_doc(data=[10**30] * 784), {}, "expected its data as numbers"),
    (_doc(data=[1e300] * 784), {}, "expected finite float32 pixels in 0.0..1.0"),
    (_doc(data=[2.0] * 784), {}, "expected finite float32 pixels in 0.0..1.0"),
    (_doc(data=None), {}, "expected 'data' or binary data"),
    (_doc(datatype="UINT8", data=[256] * 784), {}, "expected values 0..255, got 256"),
    (_doc(datatype="UINT8", data=[-1] * 784), {}, "expected values 0..255, got -1"),
    (_doc(datatype="UINT8", data=[0.5] * 784), {}, "integers 0..255"),
    (b'{"id": 7, "inputs": []}', {}, "'id': expected a string"),
    (b'{"parameters": [], "inputs": []}', {}, "expected a JSON object"),
    (_doc()[:-1] + b', "outputs": [{"name": "logits"}]}', {}, "unknown output 'logits'"),
    (_doc()[:-1] + b', "outputs": [{"name": "predicted_class", "parameters": '
     b'{"classification": 3}}]}', {}, "classification extension is not supported"),
    (_doc()[:-1] + b', "parameters": {"binary_data_output": "yes"}}', {}, "true or false"),
    (_doc(), {"Inference-Header-Content-Length": "99999"}, "Inference-Header-Content-Length"),
    (_doc(), {"Inference-Header-Content-Length": "-1"}, "Inference-Header-Content-Length"),
    (_doc() + b"\x00" * 8, {"Inference-Header-Content-Length": str(len(_doc()))},
     "no 'binary_data_size'"),
    (_doc(data=None, parameters={"binary_data_size": 3136}), {}, "binary_data_size"),
    (_doc(parameters={"binary_data_size": 3136}), {}, "both 'data' and binary"),
]


@pytest.mark.parametrize(("body", "headers", "expected"), BAD_BODIES,
                         ids=[str(i) for i in range(len(BAD_BODIES))])
def test_malformed_bodies_are_400_with_a_reason(port: int, body: bytes,
                                                 headers: dict[str, str], expected: str) -> None:
    reply = post_infer(port, body, headers=headers)
    assert reply.status == 400, (reply.status, reply.body)
    assert expected in reply.json()["error"], reply.json()
    assert post_infer(port, _doc()).status == 200  # still serving


def test_binary_size_must_match_shape(port: int) -> None:
    x = images(1)
    body, n = binary_body(x[:, :700], "FP32")
    body = body.replace(b'"shape": [1, 700]', b'"shape": [1, 784]')
    reply = post_infer(port, body, headers={"Inference-Header-Content-Length": str(n)})
    assert reply.status == 400
    assert "expected 3136 bytes" in reply.json()["error"]


def test_unknown_model_is_404_and_too_many_images_400(
    repo: Path, start: Callable[..., ServerThread]
) -> None:
    port = start_http(start, repo, max_images_per_request=2).settings.http_port
    reply = post_infer(port, _doc(), "/v2/models/fashion/infer")
    assert reply.status == 404
    assert "unknown model 'fashion'" in reply.json()["error"]
    assert post_infer(port, _doc(), "/v2/models/mnist/versions/9/infer").status == 404
    big = post_infer(port, infer_json(images(3)))
    assert big.status == 400
    assert "at most 2 allowed" in big.json()["error"]


def test_requests_counted_under_their_own_method(server: ServerThread, port: int) -> None:
    post_infer(port, infer_json(images(2)))
    post_infer(port, b"{")
    labels = {"method": "REST ModelInfer", "model": "mnist", "version": "2", "code": "OK"}
    assert server.sample("mnist_requests_total", labels) == 1
    assert server.sample("mnist_images_total", labels) == 2
    bad = {"method": "REST ModelInfer", "model": "mnist", "version": "2",
           "code": "INVALID_ARGUMENT"}
    assert server.sample("mnist_requests_total", bad) == 1


# --- HTTP framing and limits ----------------------------------------------------------------


def test_malformed_http_is_400_and_closed(port: int) -> None:
    for raw in (b"NOT HTTP AT ALL\r\n\r\n", b"GET /v2 HTTP/1.1\r\nBad Header\r\n\r\n",
                b"GET /v2 HTTP/9.9\r\n\r\n",
                b"POST /v2/models/mnist/infer HTTP/1.1\r\nContent-Length: x\r\n\r\n"):
        assert exchange(port, raw).status == 400, raw


def test_header_limit(repo: Path, start: Callable[..., ServerThread]) -> None:
    port = start_http(start, repo, http_max_header_bytes=1024).settings.http_port
    reply = exchange(port, b"GET /v2 HTTP/1.1\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
    assert reply.status == 431
    assert exchange(port, b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n\r\n").status == 431


def test_body_limit_and_chunked_refused_before_reading(
    repo: Path, start: Callable[..., ServerThread]
) -> None:
    port = start_http(start, repo, http_max_body_bytes=1000).settings.http_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # Only the headers are sent: the refusal must not wait for a body.
        sock.sendall(b"POST /v2/models/mnist/infer HTTP/1.1\r\nContent-Length: 5000\r\n\r\n")
        reply = read_response(sock)
        assert reply.status == 413
        assert "at most 1000" in reply.json()["error"]
    chunked = exchange(port, b"POST /v2/models/mnist/infer HTTP/1.1\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert chunked.status == 411


def test_bodies_being_read_are_bounded_together(
    repo: Path, start: Callable[..., ServerThread]
) -> None:
    port = start_http(start, repo, max_queue_bytes=10_000).settings.http_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
        slow.sendall(b"POST /v2/models/mnist/infer HTTP/1.1\r\nContent-Length: 8000\r\n\r\n")
        time.sleep(0.2)  # its 8000 bytes are now reserved while it dribbles
        reply = post_infer(port, b" " * 3000)
        assert reply.status == 503
        assert "busy reading" in reply.json()["error"]
    assert post_infer(port, _doc()).status == 200  # released when the slow one went away


def test_slowloris_gets_408_and_idle_connections_close(
    repo: Path, start: Callable[..., ServerThread]
) -> None:
    port = start_http(start, repo, http_read_timeout_s=0.5,
                      http_idle_timeout_s=0.5).settings.http_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /v2 HTTP/1.1\r\nX-Slow: ")
        started = time.monotonic()
        reply = read_response(sock)
        assert reply.status == 408
        assert time.monotonic() - started < 5
    with socket.create_connection(("127.0.0.1", port), timeout=10) as idle:
        assert closed_by_peer(idle)


def test_connection_limit(repo: Path, start: Callable[..., ServerThread]) -> None:
    port = start_http(start, repo, http_max_connections=2).settings.http_port
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    try:
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
            reply = read_response(extra)
            assert reply.status == 503
            assert "too many connections" in reply.json()["error"]
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    assert request(port, "GET", "/v2/health/live").status == 200


def test_keep_alive_and_pipelining_answer_in_order(port: int) -> None:
    body = _doc()
    infer = (b"POST /v2/models/mnist/infer HTTP/1.1\r\nContent-Length: "
             + str(len(body)).encode() + b"\r\n\r\n" + body)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(infer + b"GET /v2/health/live HTTP/1.1\r\n\r\n" + infer
                     + b"GET /nope HTTP/1.1\r\n\r\n")
        statuses = [read_response(sock) for _ in range(4)]
    assert [r.status for r in statuses] == [200, 200, 200, 404]
    assert statuses[1].json() == {"live": True}


def test_a_caller_that_never_reads_its_replies_cannot_grow_the_servers_memory(
    server: ServerThread, port: int
) -> None:
    """Pipelined requests whose replies are never read: the server used to read and answer
    them all, holding every unsent reply (107 MB of requests grew it by 210 MB). Now it stops
    reading that connection once 64 KiB of replies wait, and serves everyone else."""
    chunk = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n" * 2000
    sent = 0
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.settimeout(2.0)
        with contextlib.suppress(TimeoutError):  # the server stopped reading: sending stalls
            while sent < 8 << 20:
                sock.sendall(chunk)
                sent += len(chunk)
        http = server.running.http
        assert http is not None
        unsent = server.run(http.unsent_bytes)
        assert unsent <= 1 << 20, f"{unsent} bytes of replies held after {sent} bytes sent"
        assert sent < 8 << 20, "the server kept reading a connection whose replies wait"
        assert request(port, "GET", "/v2/health/live").status == 200  # others are served
        # The caller reads at last: the replies come, in order, and the rest is served.
        first = read_response(sock)
        assert first.status == 200
        assert first.json() == {"live": True}


def test_expect_100_continue(port: int) -> None:
    body = _doc()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/mnist/infer HTTP/1.1\r\nExpect: 100-continue\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        assert read_response(sock).status == 100
        sock.sendall(body)
        assert read_response(sock).status == 200


def test_stop_closes_the_http_port(repo: Path, start: Callable[..., ServerThread]) -> None:
    server = start_http(start, repo)
    port = server.settings.http_port
    assert request(port, "GET", "/v2/health/live").status == 200
    server.call(server.running.stop(1.0))
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_busy_http_port_is_one_clear_line(model_repo: Path) -> None:
    import os
    import subprocess
    import sys

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**os.environ, "MNIST_HTTP_PORT": str(port)}
        done = subprocess.run(
            [sys.executable, "-m", "service", "--model-dir", str(model_repo), "--host",
             "127.0.0.1", "--port", "0", "--no-metrics-enabled"],
            env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"--http-port 127.0.0.1:{port} already in use" in done.stderr
    assert "Traceback" not in done.stderr
