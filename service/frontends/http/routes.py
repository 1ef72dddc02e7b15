"""The KServe v2 REST routes: a parsed HTTP request -> the `RestApi` call -> reply bytes.

The routing half of the HTTP front end (service/frontends/http/server.py owns the sockets, framing
and bounds): which path and method call which `RestApi` operation, how replies are framed,
and the one table from the service's gRPC codes to HTTP statuses. No business logic: every
answer comes from the `RestApi` (service/frontends/http/api.py).
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import grpc

from service.errors import ServiceError, status_of
from service.frontends.http import codec as http_codec
from service.frontends.http.api import RestApi

log = logging.getLogger(__name__)

# gRPC code -> HTTP status, after google.rpc.Code's mapping (KServe's REST protocol names
# 400/404/500 only; Triton's HTTP server uses 400, 404, 500, 501 and 503 the same way).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,  # queue full: retry later (with backoff)
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,  # no model yet, shutting down: try another replica
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
    411: "Length Required", 413: "Content Too Large", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 499: "Client Closed Request",
    500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
    504: "Gateway Timeout",
}
class HttpError(Exception):
    """An HTTP-level refusal (framing, limits, routing): status, message, close after?"""

    def __init__(self, status: int, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.close = close


@dataclass(slots=True)
class Request:
    """One HTTP request, read whole."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


def response(status: int, body: bytes, content_type: str, *, close: bool,
              extra: str = "") -> bytes:
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{extra}"
            f"{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n")
    return head.encode("latin-1") + body


def _json(status: int, doc: Any, *, close: bool = False) -> bytes:
    return response(status, http_codec.dumps(doc), http_codec.JSON_TYPE, close=close)


def error_response(status: int, message: str, *, close: bool = False) -> bytes:
    return response(status, http_codec.error_body(message), http_codec.JSON_TYPE, close=close)


def error_reply(error: BaseException) -> bytes:
    if isinstance(error, HttpError):
        return error_response(error.status, str(error), close=error.close)
    if not isinstance(error, ServiceError):
        log.error("REST request failed", exc_info=error)
    code, details = status_of(error)
    return error_response(HTTP_STATUS.get(code, 500), details)


# --- routes ---------------------------------------------------------------------------------


def _need(request: Request, *methods: str) -> None:
    method = "GET" if request.method == "HEAD" else request.method
    if method not in methods:
        raise HttpError(405, f"{request.method} {request.path[:128]}: expected "
                        f"{' or '.join(methods)}")


def route(api: RestApi, request: Request) -> bytes | Coroutine[Any, Any, bytes]:
    """The reply for a request, or for infer the coroutine that makes it."""
    parts = [unquote(s) for s in request.path.split("/")[1:]]
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()  # a trailing slash
    try:
        if parts == ["v2", "health", "live"]:
            _need(request, "GET")
            return _json(200, {"live": True})
        if parts == ["v2", "health", "ready"]:
            _need(request, "GET")
            ready = api.ready()
            return _json(200 if ready else 503, {"ready": ready})
        if parts == ["v2"]:
            _need(request, "GET")
            return _json(200, api.server_metadata())
        if parts == ["v2", "repository", "index"]:
            _need(request, "POST")
            return _json(200, api.repository_index(request.body))
        if parts == ["v2", "models", "stats"]:
            _need(request, "GET")
            return _json(200, api.model_statistics("", ""))
        if len(parts) >= 3 and parts[:2] == ["v2", "models"]:
            model, rest, version = parts[2], parts[3:], ""
            if len(rest) >= 2 and rest[0] == "versions":
                version, rest = rest[1], rest[2:]
            if rest == ["infer"]:
                _need(request, "POST")
                return _infer(api, model, version, request)
            _need(request, "GET")
            if not rest:
                return _json(200, api.model_metadata(model, version))
            if rest == ["ready"]:
                ready = api.model_ready(model, version)
                return _json(200 if ready else 503, {"name": model, "ready": ready})
            if rest == ["config"]:
                return _json(200, api.model_config(model, version))
            if rest == ["stats"]:
                return _json(200, api.model_statistics(model, version))
        raise HttpError(404, f"no route {request.method} {request.path[:128]!r}: see "
                        "docs/oip.md for the KServe v2 REST routes served")
    except (HttpError, ServiceError) as e:
        return error_reply(e)


async def _infer(api: RestApi, model: str, version: str, request: Request) -> bytes:
    reply = await api.infer(model, version, request.body,
                            request.headers.get(http_codec.HEADER_LENGTH))
    extra = ("" if reply.json_bytes is None
             else f"Inference-Header-Content-Length: {reply.json_bytes}\r\n")
    return response(200, reply.body, reply.content_type, close=False, extra=extra)
