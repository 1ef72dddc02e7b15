"""The gRPC front end, chosen by the server: the completion-queue server or plain grpc.aio.

Both are `grpc.aio.Server`s on which the servicers register their handlers the same way. The
completion-queue one also answers the data plane's fast methods on its polling thread and runs
the batcher's idle hook there (`plug_fast_lanes`); grpc.aio serves the same RPCs through the
servicers' coroutines (the same pipelines, through `DataPlane.call`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grpc

from service.dataplane import FastMethod
from service.frontends.core import CoreServer

CORE = "core"
AIO = "aio"


def build(kind: str, options: Iterable[tuple[str, Any]]) -> grpc.aio.Server:
    """A server of `kind` ('core' or 'aio'), not started."""
    if kind == AIO:
        return grpc.aio.server(options=list(options))
    if kind != CORE:
        raise ValueError(f"frontend: expected {CORE!r} or {AIO!r}, got {kind!r}")
    return CoreServer(options)


def plug_fast_lanes(server: grpc.aio.Server, fast_methods: Mapping[str, FastMethod],
                    idle_hooks: Iterable[Callable[[], float | None]]) -> None:
    """On the completion-queue server, answer `fast_methods` (method path -> gate and
    handler) on its polling thread and run `idle_hooks` there after each turn; before start.
    On grpc.aio nothing: the servicers' coroutines serve those methods."""
    if not isinstance(server, CoreServer):
        return
    for path, method in fast_methods.items():
        server.add_fast_method(path, method.handler, gate=method.gate)
    for hook in idle_hooks:
        server.add_idle_hook(hook)
