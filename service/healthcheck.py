"""Exit 0 when the local server answers the standard gRPC health check with SERVING.

The container HEALTHCHECK (and an exec probe where a platform has no native gRPC probe) runs
this instead of a TCP probe: a port that accepts connections says nothing about whether a model
is loaded or the server is draining after SIGTERM, and the health service knows both. It reads
the same `MNIST_*` variables as the server, so it checks the port the server really listens on.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.config import load_settings

_WILDCARDS = ("", "[::]", "::", "0.0.0.0")


def default_target(environ: Mapping[str, str]) -> str:
    """Where the server of this environment listens, seen from the same host."""
    settings = load_settings(None, environ)
    host = "127.0.0.1" if settings.host in _WILDCARDS else settings.host
    return f"{host}:{settings.port}"


def check(target: str, service: str = "", timeout_s: float = 2.0) -> str:
    """The serving status name (SERVING, NOT_SERVING, ...) the server reports for `service`."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mnist-healthcheck",
        description="Exit 0 if the server's gRPC health service says SERVING, 1 otherwise.",
    )
    parser.add_argument("--target", help="host:port (default: from MNIST_HOST/MNIST_PORT)")
    parser.add_argument("--service", default="", help="health service name ('' = the server)")
    parser.add_argument("--timeout-s", type=float, default=2.0, help="deadline of the check")
    args = parser.parse_args(argv)
    try:
        target = args.target or default_target(os.environ if environ is None else environ)
    except ValueError as e:
        print(f"healthcheck: bad settings: {e}", file=sys.stderr)
        return 2
    try:
        status = check(target, args.service, args.timeout_s)
    except grpc.RpcError as e:
        print(f"healthcheck: {target}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(f"healthcheck: {target}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
