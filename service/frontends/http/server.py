"""The HTTP/REST front end (KServe v2 REST): an asyncio server on the gRPC server's loop.

An adapter, nothing more: it reads HTTP/1.1 requests off sockets (httptools, the llhttp
parser uvicorn uses; docs/oip.md says why this and not aiohttp), hands them to the routes
(service/frontends/http/routes.py: path -> `RestApi` call -> reply, and the one gRPC code -> HTTP
status table), and writes the replies. It runs on the same event loop as grpc.aio
and submits to the same Batcher, so a REST request and a gRPC one can share a forward pass.

Everything a caller controls is bounded here, before the service sees it:
- connections: at most `max_connections` open; one more is answered 503 and closed;
- headers: `max_header_bytes` for the request line and headers together (431 past it);
- body: a Content-Length is required for a body (411 otherwise: no chunked bodies, no
  smuggling), at most `max_body_bytes` (413), and an infer body passes the batcher's byte
  admission *before* it is read (429/503, and the connection is closed unread); the bodies
  being read at once, all connections together, stay under `max_reading_bytes` (503);
- time: a request must arrive whole within `read_timeout_s` of its first byte (408: a
  slowloris holds a connection that long at most), and an idle keep-alive connection is
  closed after `idle_timeout_s`;
- pipelining: one request at a time per connection; reading pauses while it is served;
- replies a caller does not read: while the connection's unsent replies are past the
  transport's high-water mark (64 KiB) nothing more is read or served on it (without that, a
  caller that pipelined requests and never read grew the server's memory without bound).
Malformed HTTP is 400 and the connection closes; a malformed body is the codec's 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from dataclasses import dataclass

import httptools

from service.api import oip
from service.batching import Batcher
from service.config import Settings
from service.errors import ServiceError, status_of
from service.frontends.http import codec as http_codec
from service.frontends.http.api import OipRestApi, RestApi
from service.frontends.http.routes import (
    HTTP_STATUS,
    HttpError,
    Request,
    error_reply,
    error_response,
    route,
)
from service.metrics import Metrics
from service.registry import ModelRegistry

log = logging.getLogger(__name__)

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(frozen=True)
class HttpLimits:
    max_connections: int = 1024
    max_header_bytes: int = 16 << 10
    max_body_bytes: int = 16 << 20
    max_reading_bytes: int = 64 << 20
    read_timeout_s: float = 30.0
    idle_timeout_s: float = 60.0


class HttpFrontend:
    """Listens, counts connections and bodies being read, stops gracefully."""

    def __init__(self, api: RestApi, limits: HttpLimits) -> None:
        self.api = api
        self.limits = limits
        self.connections: set[_Connection] = set()
        self.reading_bytes = 0  # Content-Length of the bodies being read right now
        self.stopping = False
        self.served = asyncio.Event()  # set whenever a request's reply is written
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Listen on host:port (gRPC's '[::]' means every address, IPv4 and IPv6)."""
        bind: str | None = host.strip("[]")
        if bind in ("::", "0.0.0.0", ""):
            bind = None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), bind, port, reuse_port=reuse_port or None, backlog=1024
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def unsent_bytes(self) -> int:
        """Reply bytes written and not yet sent, all connections together (call on the loop)."""
        return sum(c.unsent_bytes for c in self.connections)

    async def stop(self, grace_s: float | None) -> None:
        """Refuse new connections, let requests being served finish within `grace_s`, then
        close every connection (idle keep-alive ones at once)."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close_if_idle()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (grace_s or 0.0)
        while any(c.busy for c in self.connections) and loop.time() < deadline:
            self.served.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.served.wait(), deadline - loop.time())
        for conn in list(self.connections):
            conn.abort()
        if self._server is not None:
            await self._server.wait_closed()


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: parse, bound, queue, serve one request at a time."""

    def __init__(self, frontend: HttpFrontend) -> None:
        self._frontend = frontend
        self._api = frontend.api
        self._limits = frontend.limits
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._timer: asyncio.TimerHandle | None = None
        self._queue: deque[Request] = deque()
        self.busy = False  # a request is being served (its reply not yet written)
        self._closed = False
        self._write_paused = False  # the caller is not reading its replies: wait for it
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._charged = 0  # this request's share of frontend.reading_bytes
        self._reading = False

    @property
    def unsent_bytes(self) -> int:
        return 0 if self._transport is None else self._transport.get_write_buffer_size()

    # --- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if len(self._frontend.connections) >= self._limits.max_connections:
            transport.write(error_response(
                503, f"too many connections: at most {self._limits.max_connections}",
                close=True))
            self._close()
            return
        self._frontend.connections.add(self)
        self._arm(self._limits.idle_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._frontend.connections.discard(self)
        self._uncharge()
        if self._timer is not None:
            self._timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            self._parser.feed_data(data)
        except HttpError as e:
            self._fail(e)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            self._fail(cause if isinstance(cause, HttpError) else
                       HttpError(400, f"malformed HTTP request: {e}", close=True))
        except httptools.HttpParserUpgrade:
            self._fail(HttpError(400, "protocol upgrade is not supported", close=True))
        except httptools.HttpParserError as e:
            self._fail(HttpError(400, f"malformed HTTP request: {e}", close=True))
        else:
            self._serve_queued()

    def eof_received(self) -> bool | None:
        return None  # close our side too once replies are written

    def pause_writing(self) -> None:
        """The transport holds more unsent replies than its high-water mark: stop reading
        and serving until the caller has read them (asyncio calls resume_writing)."""
        self._write_paused = True
        if self._transport is not None and not self._closed:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._serve_queued()

    # --- httptools callbacks (run inside feed_data)

    def on_message_begin(self) -> None:
        self._reset()
        self._reading = True
        self._arm(self._limits.read_timeout_s)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_header(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header(len(name) + len(value) + 4)
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self._headers[key] = f"{self._headers[key]},{text}" if key in self._headers else text

    def _count_header(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self._limits.max_header_bytes:
            raise HttpError(431, f"request line and headers: at most "
                            f"{self._limits.max_header_bytes} bytes", close=True)

    def on_headers_complete(self) -> None:
        headers = self._headers
        if "transfer-encoding" in headers:
            raise HttpError(411, "chunked request bodies are not accepted: expected a "
                            "Content-Length", close=True)
        length_text = headers.get("content-length", "0").strip()
        if not (length_text.isascii() and length_text.isdigit()):
            raise HttpError(400, f"Content-Length: expected a byte count, got "
                            f"{length_text[:32]!r}", close=True)
        length = int(length_text)
        if length > self._limits.max_body_bytes:
            raise HttpError(413, f"request body of {length} bytes: at most "
                            f"{self._limits.max_body_bytes} allowed", close=True)
        if length:
            if self._frontend.reading_bytes + length > self._limits.max_reading_bytes:
                raise HttpError(503, "server busy reading other requests; retry later",
                                close=True)
            if self._url.split(b"?", 1)[0].endswith(b"/infer"):
                try:  # refuse before reading the body, at the cost of the headers only
                    self._api.admit(length, http_codec.HEADER_LENGTH in headers)
                except ServiceError as e:
                    code, details = status_of(e)
                    raise HttpError(HTTP_STATUS.get(code, 500), details, close=True) from None
            self._frontend.reading_bytes += length
            self._charged = length
            if headers.get("expect", "").lower() == "100-continue":
                assert self._transport is not None
                self._transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._reading = False
        self._uncharge()  # the body is in memory now: the codec's admission takes over
        try:
            method = self._parser.get_method().decode("ascii")
            path = httptools.parse_url(self._url).path.decode("latin-1")
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
            raise HttpError(400, "malformed request target", close=True) from None
        self._queue.append(Request(method, path, self._headers, b"".join(self._body),
                                    self._parser.should_keep_alive()))
        if self._transport is not None:
            self._transport.pause_reading()  # one request at a time: the rest waits unread

    # --- serving

    def _serve_queued(self) -> None:
        while self._queue and not self.busy and not self._closed and not self._write_paused:
            request = self._queue.popleft()
            infer = route(self._api, request)
            if isinstance(infer, bytes):
                self._reply(request, infer)
                continue
            self.busy = True
            self._disarm()
            task = self._loop.create_task(infer)
            task.add_done_callback(functools.partial(self._served, request))
            return
        if (not self._queue and not self.busy and not self._closed and not self._write_paused
                and self._transport):
            self._transport.resume_reading()
            if not self._reading:
                self._arm(self._limits.idle_timeout_s)

    def _served(self, request: Request, task: asyncio.Task[bytes]) -> None:
        self.busy = False
        self._frontend.served.set()
        if task.cancelled():
            self._close()
            return
        error = task.exception()
        reply = task.result() if error is None else error_reply(error)
        self._reply(request, reply)
        self._serve_queued()

    def _reply(self, request: Request, reply: bytes) -> None:
        if self._closed or self._transport is None:
            return
        close = not request.keep_alive or self._frontend.stopping
        if close and b"\r\nConnection: close\r\n" not in reply[:256]:
            reply = reply.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
        if request.method == "HEAD":
            reply = reply[: reply.index(b"\r\n\r\n") + 4]
        self._transport.write(reply)
        if close:
            self._close()

    def _fail(self, error: HttpError) -> None:
        if self._transport is not None and not self._closed:
            self._transport.write(error_response(error.status, str(error), close=True))
        self._close()

    # --- timers and closing

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self._loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        if self.busy:
            return
        if self._reading:
            self._fail(HttpError(408, f"request not received within "
                                 f"{self._limits.read_timeout_s:g} s", close=True))
        else:
            self._close()

    def _uncharge(self) -> None:
        self._frontend.reading_bytes -= self._charged
        self._charged = 0

    def close_if_idle(self) -> None:
        if not self.busy and not self._queue:
            self._close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        self._closed = True

    def _close(self) -> None:
        if not self._closed and self._transport is not None:
            self._closed = True
            self._disarm()
            self._transport.close()
        self._closed = True


async def start(
    settings: Settings,
    *,
    registry: ModelRegistry,
    batcher: Batcher,
    metrics: Metrics,
    servicer: oip.InferenceServicer | None,
) -> HttpFrontend:
    """Build the REST front end over the v2 servicer's data plane (`OipRestApi`) and listen on
    --http-port."""
    if servicer is None:
        raise RuntimeError("the v2 servicer is registered before the REST front end starts")
    api = OipRestApi(registry=registry, batcher=batcher, metrics=metrics, servicer=servicer,
                     max_images=settings.max_images_per_request)
    frontend = HttpFrontend(api, limits_of(settings))
    try:
        port = await frontend.start(settings.host, settings.http_port,
                                    reuse_port=settings.workers > 1)
    except OSError as e:  # no errno: service/__main__.py then names the busy port
        raise OSError(f"cannot listen on --http-port {settings.host}:{settings.http_port}: "
                      f"{e.strerror or e}") from None
    log.info("event=http_listening address=%s port=%d", settings.host, port)
    return frontend


def limits_of(settings: Settings) -> HttpLimits:
    return HttpLimits(
        max_connections=settings.http_max_connections,
        max_header_bytes=settings.http_max_header_bytes,
        max_body_bytes=settings.http_max_body_bytes,
        # Bodies being read count against the same byte budget as the batcher's queue.
        max_reading_bytes=settings.max_queue_bytes,
        read_timeout_s=settings.http_read_timeout_s,
        idle_timeout_s=settings.http_idle_timeout_s,
    )
