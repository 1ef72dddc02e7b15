"""Prove the core front end on the running grpcio before serving with it.

`core.CoreServer` is built on grpcio's private `cygrpc` layer: a grpcio release may
change it in ways `core.unavailable_reason()` (a check of the names it uses) cannot see.
So before the server listens, `core_frontend_problem` starts a throwaway CoreServer on
loopback with the real Classify and health servicers and makes one real round trip through
each lane: Classify on the polling thread (a malformed request, answered by the handler
with INVALID_ARGUMENT, and, when a model is loaded, one image answered with a prediction)
and health Check on the asyncio loop. Any deviation -- an exception, a wrong status, a
timeout -- is the reason the server serves through grpc.aio instead (service/server.py).

The throwaway server has its own batcher and records no metrics, so a self-test leaves no
trace in /metrics besides `mnist_frontend_info`. It listens on 127.0.0.1:0 without TLS
whatever the real server's settings: it tests grpcio and this code base, not the network.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.api import servicer as classifier
from service.batching import Batcher
from service.frontends import core, grpc_frontend
from service.frontends.core import CoreServer, FastCall
from service.metrics import Metrics
from service.pb.mnist.v1 import classifier_pb2 as pb
from service.registry import ModelRegistry

log = logging.getLogger(__name__)

# The whole self-test; a loopback round trip takes milliseconds.
SELFTEST_TIMEOUT_S = 10.0
_CLASSIFY = classifier.CLASSIFY_PATH
_CHECK = "/grpc.health.v1.Health/Check"


class SelfTestFailed(Exception):
    """A lane answered, but not what it should have."""


async def core_frontend_problem(
    registry: ModelRegistry, *, options: list[tuple[str, object]], max_batch_rows: int,
    max_queue_rows: int, broken: bool = False,
) -> str | None:
    """None when the core front end works on this grpcio; else why it does not. The batcher
    bounds are the server's; `broken` is --fault-injection selftest."""
    reason = core.unavailable_reason()
    if reason is not None:
        return reason
    try:
        await asyncio.wait_for(
            _round_trips(registry, options, max_batch_rows, max_queue_rows, broken),
            SELFTEST_TIMEOUT_S)
    except TimeoutError:
        return f"no answer within {SELFTEST_TIMEOUT_S} s"
    except Exception as e:  # whatever broke, the answer is "do not use it"
        return f"{type(e).__name__}: {e}"
    return None


def _broken_classify(call: FastCall, raw: bytes) -> None:
    """--fault-injection selftest: a fast lane that fails every call (as a grpcio whose
    private layer changed meaning might)."""
    raise RuntimeError("fault injected into the self-test (--fault-injection selftest)")


async def _round_trips(
    registry: ModelRegistry, options: list[tuple[str, object]], max_batch_rows: int,
    max_queue_rows: int, broken: bool,
) -> None:
    metrics = Metrics.disabled()
    batcher = Batcher(registry, metrics, max_batch_rows=max_batch_rows,
                      max_batch_wait_s=0.0, max_queue_rows=max_queue_rows)
    servicer = classifier.ClassifierServicer(registry, batcher, metrics, max_images=1)
    # Built as the server builds its own: the data plane's fast lanes plugged in.
    server = CoreServer(options)
    classifier.add_to_server(servicer, server)
    grpc_frontend.plug_fast_lanes(server, servicer.fast_methods(), [batcher.run_queued])
    if broken:
        server.add_fast_method(_CLASSIFY, _broken_classify)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    if port == 0:
        raise OSError("cannot listen on 127.0.0.1:0")
    await batcher.start()
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            served = [s.name for s in registry.status() if s.current_version]
            await _check_lanes(channel, served[0] if served else None)
    finally:
        await server.stop(0)
        await batcher.close()


async def _check_lanes(channel: grpc.aio.Channel, model: str | None) -> None:
    classify = channel.unary_unary(_CLASSIFY)  # bytes in, bytes out
    try:
        await classify(b"", timeout=SELFTEST_TIMEOUT_S)
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
            raise SelfTestFailed(
                f"Classify of an empty request: expected INVALID_ARGUMENT, got "
                f"{e.code().name} ({e.details()})"
            ) from None
    else:
        raise SelfTestFailed("Classify of an empty request: expected INVALID_ARGUMENT, got OK")
    if model is not None:  # named: with several models there may be no default one
        request = pb.ClassifyRequest(pixels=bytes(784), encoding=pb.ENCODING_UINT8,
                                     model=model)
        raw = await classify(request.SerializeToString(), timeout=SELFTEST_TIMEOUT_S)
        reply = pb.ClassifyResponse.FromString(raw)
        if len(reply.predictions) != 1:
            raise SelfTestFailed(
                f"Classify of one image: expected 1 prediction, got {len(reply.predictions)}"
            )
    check = channel.unary_unary(
        _CHECK, request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    answer = await check(health_pb2.HealthCheckRequest(service=""), timeout=SELFTEST_TIMEOUT_S)
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        # The throwaway health servicer starts SERVING for '' (grpc_health's default).
        raise SelfTestFailed(f"health Check: expected SERVING, got {answer.status}")
