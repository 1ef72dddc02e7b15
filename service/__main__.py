"""`mnist-serve` / `python -m service`: flags and MNIST_* variables -> Settings -> serve()."""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Sequence
from typing import Any


def main(argv: Sequence[str] | None = None) -> None:
    from service.config import parse_args
    from service.server import serve

    settings = parse_args(argv)
    try:
        serve(settings)
    except OSError as e:
        # Not listening is the operator's to fix (a second server, e.g. `./dev serve` still
        # running; a host name that does not resolve; a port below 1024 without the right):
        # one line that says which, not a traceback.
        busy = _ports_in_use(settings, metrics=e.errno == errno.EADDRINUSE)
        if not busy:
            sys.exit(f"mnist-serve: cannot start: {e}")
        sys.exit(f"mnist-serve: cannot listen: {'; '.join(busy)} already in use by another "
                 "process: stop it or choose another port")


def _ports_in_use(settings: Any, *, metrics: bool) -> list[str]:
    """'--flag host:port' for each port another process holds right now. Only the metrics
    exporter's bind raises with an errno (gRPC's does not), and it binds first, so the other
    ports are probed only when it is not the one that failed (the process's own exporter is
    still listening then)."""
    if metrics:
        wanted = [("--metrics-port", settings.metrics_host, settings.metrics_port)]
    else:
        wanted = [("--port", settings.host, settings.port),
                  ("--admin-port", settings.host, settings.admin_port),
                  ("--http-port", settings.host, settings.http_port)]
    busy = []
    for flag, host, port in wanted:
        if not port:
            continue
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                flags=socket.AI_PASSIVE)[0]
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                busy.append(f"{flag} {host}:{port}")
    return busy


if __name__ == "__main__":
    main()
