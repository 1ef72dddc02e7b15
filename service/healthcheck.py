"""Exit 0 when the local server answers the standard gRPC health check with SERVING.

The container HEALTHCHECK (and an exec probe where a platform has no native gRPC probe) runs
this instead of a TCP probe: a port that accepts connections says nothing about whether a model
is loaded or the server is draining after SIGTERM, and the health service knows both. It reads
the same `MNIST_*` variables as the server, so it checks the port the server really listens on,
over TLS when the server serves TLS.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.config import load_settings

_WILDCARDS = ("", "[::]", "::", "0.0.0.0")


def default_target(environ: Mapping[str, str]) -> str:
    """Where the server of this environment listens, seen from the same host."""
    settings = load_settings(None, environ)
    host = "127.0.0.1" if settings.host in _WILDCARDS else settings.host
    return f"{host}:{settings.port}"


def check(target: str, service: str = "", timeout_s: float = 2.0,
          credentials: grpc.ChannelCredentials | None = None,
          server_name: str | None = None) -> str:
    """The serving status name (SERVING, NOT_SERVING, ...) the server reports for `service`;
    over TLS with `credentials`, verifying the certificate for `server_name` if given."""
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    channel = (grpc.secure_channel(target, credentials, options=options)
               if credentials is not None else grpc.insecure_channel(target))
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def tls_credentials(args: argparse.Namespace,
                    environ: Mapping[str, str]) -> grpc.ChannelCredentials | None:
    """TLS when asked, or when the server of this environment serves TLS (MNIST_TLS_CERT):
    verified against --tls-ca, else the server's own certificate (right when it is
    self-signed); --tls-cert/--tls-key when the server requires client certificates."""
    server_cert = load_settings(None, environ).tls_cert
    if args.tls is False or (args.tls is None and server_cert is None):
        return None
    ca = args.tls_ca or server_cert
    if ca is None:
        raise ValueError("--tls needs --tls-ca (or MNIST_TLS_CERT)")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    return grpc.ssl_channel_credentials(
        Path(ca).read_bytes(),
        Path(args.tls_key).read_bytes() if args.tls_key else None,
        Path(args.tls_cert).read_bytes() if args.tls_cert else None,
    )


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mnist-healthcheck",
        description="Exit 0 if the server's gRPC health service says SERVING, 1 otherwise.",
    )
    parser.add_argument("--target", help="host:port (default: from MNIST_HOST/MNIST_PORT)")
    parser.add_argument("--service", default="", help="health service name ('' = the server)")
    parser.add_argument("--timeout-s", type=float, default=2.0, help="deadline of the check")
    parser.add_argument("--tls", action=argparse.BooleanOptionalAction, default=None,
                        help="check over TLS (default: when MNIST_TLS_CERT is set, as the "
                        "server then serves TLS)")
    parser.add_argument("--tls-ca", help="PEM bundle to verify the server with (default: "
                        "MNIST_TLS_CERT itself, right for a self-signed certificate)")
    parser.add_argument("--tls-cert", help="PEM client certificate, when the server requires "
                        "one (MNIST_TLS_CLIENT_CA)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-server-name", help="name to verify in the server's certificate "
                        "(default: the target's host)")
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ
    try:
        target = args.target or default_target(env)
        credentials = tls_credentials(args, env)
    except (ValueError, OSError) as e:
        print(f"healthcheck: bad settings: {e}", file=sys.stderr)
        return 2
    try:
        status = check(target, args.service, args.timeout_s, credentials, args.tls_server_name)
    except grpc.RpcError as e:
        print(f"healthcheck: {target}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(f"healthcheck: {target}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
