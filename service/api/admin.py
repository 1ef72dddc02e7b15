"""The mnist.v1.Admin servicer: authenticate, decode, call the registry, encode. Nothing else.

Off unless `settings.admin_enabled`. Every call must carry `authorization: Bearer <token>`;
the token is compared with `hmac.compare_digest`, so the time a wrong guess takes says
nothing about how much of it was right. Requests arrive as raw bytes and are parsed here,
so a malformed one is INVALID_ARGUMENT rather than gRPC's INTERNAL (as in the Classifier).

`add_to_server` either registers on the main server or, with `settings.admin_port`, builds
a second grpc.aio server for it (an operator port that can stay on a private network); the
returned `AdminEndpoint` starts and stops whichever it made.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_reflection.v1alpha import reflection

from service.api.malformed import enable_reflection
from service.config import Settings
from service.dataplane.codec import VERSION_STATES
from service.errors import InvalidInput, ServiceError, Unauthenticated, redact_paths, status_of
from service.metrics import Metrics
from service.pb.mnist.v1 import admin_pb2 as pb
from service.registry import ModelRegistry, ModelStatus

log = logging.getLogger(__name__)

SERVICE_NAME = "mnist.v1.Admin"

def encode_status(status: ModelStatus) -> pb.AdminModelStatus:
    return pb.AdminModelStatus(
        name=status.name,
        current_version=status.current_version or 0,
        current_pinned=status.current_pinned,
        policy=status.policy,
        versions=[
            pb.AdminVersionStatus(
                version=v.version, state=VERSION_STATES[v.state], reason=v.reason,
                detail=redact_paths(v.detail),  # no server paths to callers; the log has them
                labels=list(v.labels),
            )
            for v in status.versions
        ],
        labels=dict(status.labels),
        canary_version=status.canary_version,
        canary_percent=status.canary_percent,
        shadow_version=status.shadow_version,
        rollout_note=redact_paths(status.rollout_note),
    )


def _model_name(model: str) -> str:
    if not model:
        raise InvalidInput("model is required (the model's directory name), got ''")
    return model


def authenticate(context: grpc.aio.ServicerContext, expected: bytes) -> None:
    """The admin bearer-token rule; also guards the v2 repository load/unload (oip.py)."""
    given = b""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            given = value.encode() if isinstance(value, str) else bytes(value)
            break
    if not hmac.compare_digest(given, expected):
        raise Unauthenticated(
            "admin calls need metadata 'authorization: Bearer <token>' with the server's "
            "--admin-token; " + ("the token given is wrong" if given else "none was given")
        )


class AdminServicer:
    """One method per RPC; each checks the token first, then only translates."""

    def __init__(self, registry: ModelRegistry, metrics: Metrics, token: str) -> None:
        if not token:
            raise ValueError("the admin service needs a non-empty token")
        self._registry = registry
        self._metrics = metrics
        self._expected = f"Bearer {token}".encode()

    def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        authenticate(context, self._expected)

    async def _call(
        self,
        method: str,
        request_type: type[Message],
        raw: bytes,
        context: grpc.aio.ServicerContext,
        action: Callable[[Any], Awaitable[Message]],
    ) -> Message:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        model = ""
        try:
            self._authenticate(context)
            try:
                request = request_type.FromString(raw)
            except DecodeError as e:
                raise InvalidInput(f"request is not a valid {request_type.__name__}: {e}") from None
            model = getattr(request, "model", "")
            reply = await action(request)
            log.info("event=admin method=%s request=%s", method, _one_line(request))
            return reply
        except Exception as e:
            if not isinstance(e, ServiceError):
                log.exception("admin %s failed unexpectedly", method)
            code, details = status_of(e)
            # Failed authentication is logged too (never the token): it may be an attack.
            log.warning("event=admin_refused method=%s code=%s %s", method, code.name, details)
            await context.abort(code, details)
            raise AssertionError("unreachable: abort raises") from None
        finally:
            self._metrics.request_done(
                f"Admin.{method}", model, "", code.name, 0, time.perf_counter() - started
            )

    async def ListModels(self, raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        async def act(_: pb.AdminListModelsRequest) -> Message:
            return pb.AdminListModelsResponse(
                models=[encode_status(s) for s in self._registry.status()]
            )

        return await self._call("ListModels", pb.AdminListModelsRequest, raw, context, act)

    async def LoadVersion(self, raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        async def act(r: pb.AdminLoadVersionRequest) -> Message:
            return encode_status(
                await self._registry.load_version(_model_name(r.model), r.version)
            )

        return await self._call("LoadVersion", pb.AdminLoadVersionRequest, raw, context, act)

    async def UnloadVersion(self, raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        async def act(r: pb.AdminUnloadVersionRequest) -> Message:
            return encode_status(
                await self._registry.unload_version(_model_name(r.model), r.version)
            )

        return await self._call("UnloadVersion", pb.AdminUnloadVersionRequest, raw, context, act)

    async def SetCurrentVersion(self, raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        async def act(r: pb.AdminSetCurrentVersionRequest) -> Message:
            if r.version < 0:
                raise InvalidInput(f"version must be positive, or 0 to clear; got {r.version}")
            return encode_status(
                await self._registry.set_current_version(
                    _model_name(r.model), r.version, hold=r.hold
                )
            )

        return await self._call(
            "SetCurrentVersion", pb.AdminSetCurrentVersionRequest, raw, context, act
        )

    async def SetLabel(self, raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        async def act(r: pb.AdminSetLabelRequest) -> Message:
            if r.version < 0:
                raise InvalidInput(f"version must be positive, or 0 to remove; got {r.version}")
            return encode_status(
                await self._registry.set_label(_model_name(r.model), r.label, r.version)
            )

        return await self._call("SetLabel", pb.AdminSetLabelRequest, raw, context, act)

    async def Rescan(self, raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        async def act(_: pb.AdminRescanRequest) -> Message:
            await self._registry.rescan()
            return pb.AdminListModelsResponse(
                models=[encode_status(s) for s in self._registry.status()]
            )

        return await self._call("Rescan", pb.AdminRescanRequest, raw, context, act)

    async def PromoteVersion(self, raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        async def act(r: pb.AdminPromoteVersionRequest) -> Message:
            return encode_status(await self._registry.promote_version(
                _model_name(r.model), r.version, force=r.force
            ))

        return await self._call("PromoteVersion", pb.AdminPromoteVersionRequest, raw, context,
                                act)

    async def SetCanary(self, raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        async def act(r: pb.AdminSetCanaryRequest) -> Message:
            return encode_status(
                await self._registry.set_canary(_model_name(r.model), r.version, r.percent)
            )

        return await self._call("SetCanary", pb.AdminSetCanaryRequest, raw, context, act)

    async def SetShadow(self, raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        async def act(r: pb.AdminSetShadowRequest) -> Message:
            return encode_status(
                await self._registry.set_shadow(_model_name(r.model), r.version)
            )

        return await self._call("SetShadow", pb.AdminSetShadowRequest, raw, context, act)


def _one_line(request: Message) -> str:
    return " ".join(str(request).split()) or "{}"


_RESPONSES: Mapping[str, type[Message]] = {
    "ListModels": pb.AdminListModelsResponse,
    "LoadVersion": pb.AdminModelStatus,
    "UnloadVersion": pb.AdminModelStatus,
    "SetCurrentVersion": pb.AdminModelStatus,
    "SetLabel": pb.AdminModelStatus,
    "Rescan": pb.AdminListModelsResponse,
    "PromoteVersion": pb.AdminModelStatus,
    "SetCanary": pb.AdminModelStatus,
    "SetShadow": pb.AdminModelStatus,
}


def _handler(servicer: AdminServicer) -> grpc.GenericRpcHandler:
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name), response_serializer=reply.SerializeToString
        )
        for name, reply in _RESPONSES.items()
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


@dataclass(eq=False)
class AdminEndpoint:
    """Where the admin service listens: the main server (`server` None) or its own."""

    server: grpc.aio.Server | None
    port: int | None

    async def start(self) -> None:
        if self.server is not None:
            await self.server.start()
            log.info("event=admin_listening port=%s", self.port)

    async def stop(self, grace_s: float | None) -> None:
        if self.server is not None:
            await self.server.stop(grace_s)


def add_to_server(
    server: grpc.aio.Server,
    registry: ModelRegistry,
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> AdminEndpoint | None:
    """Register the Admin service if enabled; None when it is off.

    With `settings.admin_port` set, a second server is created and bound here (with the same
    TLS `credentials` as the main port when given) and the caller starts/stops it through
    the endpoint; otherwise Admin shares `server` and the endpoint's start/stop do nothing.
    """
    if not settings.admin_enabled:
        return None
    if not settings.admin_token:
        raise ValueError("--admin-enabled needs --admin-token (or MNIST_ADMIN_TOKEN)")
    handler = _handler(
        AdminServicer(registry, metrics or Metrics.disabled(), settings.admin_token)
    )
    if settings.admin_port is None:
        server.add_generic_rpc_handlers((handler,))
        return AdminEndpoint(None, None)
    own = grpc.aio.server()
    own.add_generic_rpc_handlers((handler,))
    # grpcurl on the operator port lists and describes Admin, as on the main port.
    enable_reflection((SERVICE_NAME, reflection.SERVICE_NAME), own)
    address = f"{settings.host}:{settings.admin_port}"
    port = (
        own.add_secure_port(address, credentials)
        if credentials is not None
        else own.add_insecure_port(address)
    )
    if port == 0:
        raise OSError(f"cannot listen for admin on {address}")
    return AdminEndpoint(own, port)
