"""The whole server for real: concurrency, health, reflection, overload, fuzz, TLS, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import (
    ServerThread,
    make_model,
    probabilities,
    uint8_request,
    write_version,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from metrics_util import samples, scrape
from numerics import assert_probabilities
from procs import free_port, stop_process

from service.frontends.core import CoreServer
from service.model import pixels_to_input
from service.pb.mnist.v1 import classifier_pb2 as pb
from service.pb.mnist.v1 import classifier_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent


def test_64_concurrent_clients_each_get_their_own_answer(server: ServerThread) -> None:
    model = make_model(seed=1)
    inputs = [np.random.default_rng(i).integers(0, 256, (1 + i % 4, 784), dtype=np.uint8)
              for i in range(64)]

    async def clients() -> list[pb.ClassifyResponse]:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            out: list[pb.ClassifyResponse] = []
            for _ in range(3):
                out = await asyncio.gather(*(stub.Classify(uint8_request(x, request_id=str(i)),
                                                           timeout=20)
                                             for i, x in enumerate(inputs)))
            return out

    responses = asyncio.run(clients())
    for i, (x, r) in enumerate(zip(inputs, responses, strict=True)):
        assert r.request_id == str(i)
        assert_probabilities(probabilities(r), model, pixels_to_input(x))
    forwards = server.sample("mnist_batch_rows_count", {"model": "mnist"})
    assert forwards < 3 * 64, f"{forwards} forwards for 192 concurrent requests: no batching"
    assert server.sample("mnist_requests_total", {"method": "Classify", "model": "mnist",
                                                  "version": "1", "code": "OK"}) == 192


def health_status(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as ch:
        return int(health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5).status)


def wait_for(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def test_health_follows_the_repository(tmp_path: Path, start: Any) -> None:
    server: ServerThread = start(tmp_path)
    serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING)
    assert health_status(server.target) == not_serving
    assert health_status(server.target, "mnist.v1.Classifier") == not_serving
    write_version(tmp_path, "mnist", 1, make_model(seed=1))
    wait_for(lambda: health_status(server.target) == serving)
    assert health_status(server.target, "mnist.v1.Classifier") == serving
    import shutil
    shutil.rmtree(tmp_path / "mnist")
    wait_for(lambda: health_status(server.target) == not_serving)


def test_reflection_lists_the_services(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"mnist.v1.Classifier", "grpc.health.v1.Health"} <= services
        assert db.FindFileContainingSymbol("mnist.v1.Classifier").name == \
            "mnist/v1/classifier.proto"


def test_full_queue_is_resource_exhausted(model_repo: Path, start: Any) -> None:
    server: ServerThread = start(model_repo, max_queue_rows=300, max_images_per_request=256)
    big = np.random.default_rng(0).integers(0, 256, (200, 784), dtype=np.uint8)

    async def flood() -> Counter[str]:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            results = await asyncio.gather(*(stub.Classify(uint8_request(big), timeout=30)
                                             for _ in range(40)), return_exceptions=True)
        codes: Counter[str] = Counter()
        for r in results:
            codes["OK" if isinstance(r, pb.ClassifyResponse) else r.code().name] += 1  # type: ignore[union-attr]
            if isinstance(r, grpc.aio.AioRpcError):
                assert "queue full" in (r.details() or "")
        return codes

    codes = asyncio.run(flood())
    assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes
    with grpc.insecure_channel(server.target) as ch:
        assert len(pb_grpc.ClassifierStub(ch).Classify(uint8_request(big), timeout=10)
                   .predictions) == 200


def _mutations(rng: np.random.Generator, n: int) -> list[bytes]:
    valid = [
        uint8_request(rng.integers(0, 256, (k, 784), dtype=np.uint8), request_id="x")
        .SerializeToString() for k in (1, 2)
    ] + [pb.ClassifyRequest(pixels=rng.random(784, dtype=np.float32).tobytes(),
                            encoding=pb.ENCODING_FLOAT32_LE, version=1,
                            model="mnist").SerializeToString()]
    out: list[bytes] = []
    for i in range(n):
        kind = i % 6
        if kind == 0:  # pure noise
            out.append(rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8).tobytes())
        elif kind == 1:  # flipped bytes in a valid message
            b = bytearray(valid[i % 3])
            for j in rng.integers(0, len(b), 1 + int(rng.integers(0, 8))):
                b[j] = int(rng.integers(0, 256))
            out.append(bytes(b))
        elif kind == 2:  # truncated
            b = valid[i % 3]
            out.append(b[: int(rng.integers(0, len(b)))])
        elif kind == 3:  # valid message plus trailing noise
            out.append(valid[i % 3] + rng.integers(0, 256, 9, dtype=np.uint8).tobytes())
        elif kind == 4:  # odd but well-formed field values
            out.append(pb.ClassifyRequest(
                pixels=rng.integers(0, 256, int(rng.integers(0, 3200)), dtype=np.uint8).tobytes(),
                encoding=int(rng.integers(-3, 5)),  # type: ignore[arg-type]
                image_count=int(rng.integers(0, 2**32)),
                model=["", "mnist", "nope", "\u00e9\u00e9", "m" * 300][i % 5],
                version=int(rng.integers(-(2**62), 2**62)) if i % 2 else 0,
                version_label=["", "stable", "x" * 50][i % 3],
            ).SerializeToString())
        else:  # float pixels with random specials
            x = rng.random(784, dtype=np.float32)
            x[int(rng.integers(0, 784))] = [np.nan, np.inf, -1.0, 2.0, 0.5][i % 5]
            out.append(pb.ClassifyRequest(pixels=x.tobytes(),
                                          encoding=pb.ENCODING_FLOAT32_LE).SerializeToString())
    return out


@pytest.mark.slow
def test_fuzz_never_internal_or_unknown_and_still_serves(server: ServerThread) -> None:
    messages = _mutations(np.random.default_rng(1234), 3000)
    codes: Counter[str] = Counter()
    lock = threading.Lock()
    with grpc.insecure_channel(server.target) as ch:
        raw = ch.unary_unary("/mnist.v1.Classifier/Classify")

        def send(message: bytes) -> None:
            try:
                raw(message, timeout=10)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            with lock:
                codes[code] += 1

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(send, messages))
        stream = ch.stream_stream("/mnist.v1.Classifier/ClassifyStream")
        answers = [pb.ClassifyStreamResponse.FromString(r)
                   for r in stream(iter(messages[:600]), timeout=30)]
        assert len(answers) == 600
        stream_codes = Counter(a.error.code for a in answers if a.WhichOneof("result") == "error")
        stub = pb_grpc.ClassifierStub(ch)
        ok = stub.Classify(uint8_request(np.zeros((1, 784), np.uint8)), timeout=10)
    assert sum(codes.values()) == 3000
    assert not {"UNKNOWN", "INTERNAL"} & set(codes), codes
    assert codes["INVALID_ARGUMENT"] > 1000, codes  # the fuzz reached validation, not just parse
    assert codes["OK"] > 0, codes
    assert not {grpc.StatusCode.UNKNOWN.value[0], grpc.StatusCode.INTERNAL.value[0]} & set(
        stream_codes), stream_codes
    assert len(ok.predictions) == 1


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1")
    return key, cert


def test_tls_and_client_certificates(model_repo: Path, tmp_path: Path, start: Any) -> None:
    skey, scert = _self_signed(tmp_path, "server")
    ckey, ccert = _self_signed(tmp_path, "client")
    server: ServerThread = start(model_repo, tls_cert=scert, tls_key=skey, tls_client_ca=ccert)
    request = uint8_request(np.zeros((1, 784), np.uint8))
    with_cert = grpc.ssl_channel_credentials(scert.read_bytes(), ckey.read_bytes(),
                                             ccert.read_bytes())
    with grpc.secure_channel(server.target, with_cert) as ch:
        assert len(pb_grpc.ClassifierStub(ch).Classify(request, timeout=10).predictions) == 1
    without_cert = grpc.ssl_channel_credentials(scert.read_bytes())
    with grpc.secure_channel(server.target, without_cert) as ch, \
            pytest.raises(grpc.RpcError) as info:
        pb_grpc.ClassifierStub(ch).Classify(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(server.target) as ch, pytest.raises(grpc.RpcError):
        pb_grpc.ClassifierStub(ch).Classify(request, timeout=5)


def test_healthcheck_speaks_tls_when_the_server_does(
    model_repo: Path, tmp_path: Path, start: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from service import healthcheck

    skey, scert = _self_signed(tmp_path, "server")
    ckey, ccert = _self_signed(tmp_path, "client")
    server: ServerThread = start(model_repo, tls_cert=scert, tls_key=skey, tls_client_ca=ccert)
    # The container's environment: the server's own TLS settings switch the check to TLS.
    env = {"MNIST_TLS_CERT": str(scert), "MNIST_TLS_KEY": str(skey),
           "MNIST_TLS_CLIENT_CA": str(ccert)}
    client = ["--tls-cert", str(ccert), "--tls-key", str(ckey)]
    assert healthcheck.main(["--target", server.target, *client], env) == 0
    assert "SERVING" in capsys.readouterr().out
    # Without the client certificate the server refuses the handshake; without TLS, too.
    assert healthcheck.main(["--target", server.target, "--timeout-s", "3"], env) == 1
    assert healthcheck.main(["--target", server.target, "--timeout-s", "3"], {}) == 1
    assert healthcheck.main(["--target", server.target, "--tls-cert", str(ccert)], env) == 2
    assert "go together" in capsys.readouterr().err


def start_subprocess(
    model_dir: Path, log: Path, *extra: str
) -> tuple[subprocess.Popen[bytes], int]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MNIST_PORT", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--model-dir", str(model_dir), "--host", "127.0.0.1",
         "--port", "0", "--no-metrics-enabled", "--grace-period-s", "20", *extra],
        cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        match = re.search(r"event=listening .*port=(\d+)", log.read_text(errors="replace"))
        if match:
            return proc, int(match.group(1))
        if proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{log.read_text()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"server did not start:\n{log.read_text()}")


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_exits_zero(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    # A wide model makes each 256-image forward take a noticeable time, so requests queue.
    write_version(repo, "mnist", 1, make_model(seed=1, hidden=4096))
    metrics_port = free_port()
    proc, port = start_subprocess(
        repo, tmp_path / "server.log", "--metrics-enabled", "--metrics-host", "127.0.0.1",
        "--metrics-port", str(metrics_port),
    )

    calls = 16

    def received() -> float:
        """Requests the server holds or has answered: all must be in before SIGTERM."""
        inflight = samples(scrape(metrics_port))[("mnist_inflight_requests", ())]
        return inflight + len(finished)

    try:
        request = uint8_request(np.random.default_rng(0).integers(0, 256, (256, 784), np.uint8))
        target = f"127.0.0.1:{port}"
        finished: list[float] = []

        def call(stub: pb_grpc.ClassifierStub) -> pb.ClassifyResponse:
            response = stub.Classify(request, timeout=60)
            finished.append(time.monotonic())
            return response

        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            stub.Classify(request, timeout=30)  # warm up, and the channel is connected
            with ThreadPoolExecutor(calls) as pool:
                futures = [pool.submit(call, stub) for _ in range(calls)]
                # Every request must be inside the server (not merely sent: a request that
                # reaches a server already shutting down is refused, which is not a drain
                # failure); signal at once, while most are still queued behind the slow
                # forwards (one 256-row forward of this model takes tens of milliseconds).
                wait_for(lambda: received() >= calls, 30)
                signalled = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                results = [f.result() for f in futures]
        assert all(len(r.predictions) == 256 for r in results)
        assert max(finished) > signalled, "nothing was in flight at SIGTERM: test proves nothing"
        assert proc.wait(30) == 0
        log = (tmp_path / "server.log").read_text()
        assert "event=signal action=drain" in log
        assert "event=stopped" in log
        with grpc.insecure_channel(target) as ch, pytest.raises(grpc.RpcError) as info:
            pb_grpc.ClassifierStub(ch).Classify(request, timeout=2)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                     grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        stop_process(proc, signal.SIGKILL)


def test_drain_delay_goes_unready_keeps_serving_then_drains(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_version(repo, "mnist", 1, make_model(seed=1))
    log = tmp_path / "server.log"
    # A long delay, ended by a second SIGTERM: the test never waits for it to run out.
    proc, port = start_subprocess(repo, log, "--drain-delay-s", "60")
    target = f"127.0.0.1:{port}"
    request = uint8_request(np.zeros((1, 784), np.uint8))

    def health() -> int:
        with grpc.insecure_channel(target) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=5)
            return int(reply.status)

    try:
        assert health() == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "event=signal action=unready" in log.read_text(), 10)
        assert health() == health_pb2.HealthCheckResponse.NOT_SERVING
        with grpc.insecure_channel(target) as ch:  # a new connection is still served
            assert pb_grpc.ClassifierStub(ch).Classify(request, timeout=10).version == 1
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        text = log.read_text()
        assert text.index("action=unready") < text.index("action=drain") < text.index(
            "event=stopped")
    finally:
        stop_process(proc, signal.SIGKILL)


def test_empty_model_dir_starts_not_serving_then_serves(tmp_path: Path) -> None:
    repo = tmp_path / "does-not-exist-yet"
    proc, port = start_subprocess(repo, tmp_path / "server.log", "--rescan-interval-s", "0.1")
    try:
        target = f"127.0.0.1:{port}"
        assert health_status(target) == health_pb2.HealthCheckResponse.NOT_SERVING
        write_version(repo, "mnist", 1, make_model(seed=1))
        wait_for(lambda: health_status(target) == health_pb2.HealthCheckResponse.SERVING, 30)
        with grpc.insecure_channel(target) as ch:
            r = pb_grpc.ClassifierStub(ch).Classify(uint8_request(np.zeros((1, 784), np.uint8)),
                                                    timeout=10)
        assert r.version == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        stop_process(proc, signal.SIGKILL)


@pytest.mark.slow
def test_workers_share_the_port_and_stop_cleanly(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_version(repo, "mnist", 1, make_model(seed=1))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    log = tmp_path / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--model-dir", str(repo), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "2", "--no-metrics-enabled",
         "--rescan-interval-s", "0"],  # never on a timer: only SIGHUP rescans
        cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )

    def versions_seen() -> set[int]:
        seen = set()
        for _ in range(20):  # fresh connections: the kernel spreads them over both
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                r = pb_grpc.ClassifierStub(ch).Classify(
                    uint8_request(np.zeros((1, 784), np.uint8)), timeout=10)
                seen.add(r.version)
        return seen

    try:
        wait_for(lambda: len(re.findall(r"event=listening .*pid=(\d+)", log.read_text())) == 2,
                 60)
        pids = set(re.findall(r"event=listening .*pid=(\d+)", log.read_text()))
        assert len(pids) == 2, "two worker processes, each listening on the same port"
        assert versions_seen() == {1}
        # SIGHUP to the supervisor reaches every worker: each rescans and serves version 2.
        write_version(repo, "mnist", 2, make_model(seed=2))
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: log.read_text().count("SIGHUP: rescanning") == 2, 30)
        wait_for(lambda: versions_seen() == {2}, 30)
        assert "event=worker_died" not in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert log.read_text().count("event=stopped") == 2
    finally:
        stop_process(proc, signal.SIGKILL)


def test_core_front_end_is_available_on_the_pinned_grpcio() -> None:
    """frontends/core.py uses grpcio's private layer; if a grpcio upgrade drops what it needs, the
    server silently falls back to grpc.aio at ~0.6 of the rate, so say so here."""
    from service.frontends import core as transport

    assert transport.unavailable_reason() is None


def test_server_falls_back_to_aio_when_the_core_front_end_is_unavailable(
    model_repo: Path, start: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from service.frontends import core as transport

    monkeypatch.setattr(transport, "unavailable_reason", lambda: "grpcio 9.9 has no cygrpc.Server")
    with caplog.at_level("WARNING", logger="service.server"):
        server = start(model_repo)
    assert not isinstance(server.running.grpc_server, transport.CoreServer)
    assert any("frontend_fallback" in r.getMessage() and "9.9" in r.getMessage()
               for r in caplog.records)
    with grpc.insecure_channel(server.target) as ch:
        reply = pb_grpc.ClassifierStub(ch).Classify(uint8_request(np.zeros((2, 784), np.uint8)),
                                                    timeout=10)
    assert len(reply.predictions) == 2


# --- the core front end's startup self-test (service/frontends/selftest.py)

SERVING = health_pb2.HealthCheckResponse.SERVING


def _frontend_info(server: ServerThread) -> dict[str, float]:
    return {f: server.sample("mnist_frontend_info", {"frontend": f}) for f in ("core", "aio")}


@pytest.mark.parametrize("models", [["mnist"], [], ["a", "b"]])
def test_core_front_end_serves_once_its_self_test_passes(
    tmp_path: Path, start: Any, caplog: pytest.LogCaptureFixture, models: list[str]
) -> None:
    """With one model, none, or two and no default one (a request naming none fails)."""
    repo = tmp_path / "models"
    repo.mkdir()
    for name in models:
        write_version(repo, name, 1, make_model(seed=1))
    with caplog.at_level("INFO", logger="service.server"):
        server = start(repo)
    assert server.running.frontend == "core"
    assert "event=frontend_selftest result=ok frontend=core" in caplog.text
    assert _frontend_info(server) == {"core": 1.0, "aio": 0.0}
    # The self-test leaves no trace in the request metrics.
    assert server.sample("mnist_requests_total", {"method": "Classify", "model": "",
                                                  "version": "", "code": "INVALID_ARGUMENT"}) == 0
    if models:
        with grpc.insecure_channel(server.target) as ch:
            reply = pb_grpc.ClassifierStub(ch).Classify(
                uint8_request(np.zeros((2, 784), np.uint8), model=models[0]), timeout=10)
        assert len(reply.predictions) == 2


def test_a_failed_self_test_serves_through_grpc_aio_and_says_why(
    model_repo: Path, start: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="service.server"):
        server = start(model_repo, fault_injection="selftest")
    assert server.running.frontend == "aio"
    assert not isinstance(server.running.grpc_server, CoreServer)
    assert re.search(r"event=frontend_fallback frontend=aio grpcio=\S+ reason=.*Classify of an "
                     r"empty request: expected INVALID_ARGUMENT, got INTERNAL", caplog.text)
    assert _frontend_info(server) == {"core": 0.0, "aio": 1.0}
    with grpc.insecure_channel(server.target) as ch:
        reply = pb_grpc.ClassifierStub(ch).Classify(
            uint8_request(np.zeros((3, 784), np.uint8)), timeout=10)
        assert len(reply.predictions) == 3
        assert health_status(server.target) == SERVING


# --- malformed health and reflection requests: INVALID_ARGUMENT on both front ends

_MALFORMED = b"\xff\xff\xff\xff"  # a truncated varint tag: no protobuf parser accepts it


@pytest.mark.parametrize("frontend", ["core", "aio"])
@pytest.mark.parametrize(("method", "kind"), [
    ("/grpc.health.v1.Health/Check", "unary"),
    ("/grpc.health.v1.Health/Watch", "server_stream"),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "bidi"),
])
def test_malformed_health_and_reflection_requests_are_invalid_argument(
    model_repo: Path, start: Any, frontend: str, method: str, kind: str
) -> None:
    server = start(model_repo, frontend=frontend)
    assert server.running.frontend == frontend
    with grpc.insecure_channel(server.target) as ch:
        calls = {
            "unary": lambda: ch.unary_unary(method)(_MALFORMED, timeout=5),
            "server_stream": lambda: list(ch.unary_stream(method)(_MALFORMED, timeout=5)),
            "bidi": lambda: list(ch.stream_stream(method)(iter([_MALFORMED]), timeout=5)),
        }
        with pytest.raises(grpc.RpcError) as caught:
            calls[kind]()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        # Well-formed requests still work, and so does the server.
        assert health_status(server.target) == SERVING
        db = ProtoReflectionDescriptorDatabase(ch)
        assert "grpc.health.v1.Health" in set(db.get_services())
