"""A tiny HTTP/1.1 client for the REST front end's tests: raw bytes in, (status, headers,
body) out, over one real socket, so a test can send what no well-behaved client would."""

from __future__ import annotations

import json
import socket
import weakref
from dataclasses import dataclass
from typing import Any, BinaryIO


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


_READERS: weakref.WeakKeyDictionary[socket.socket, BinaryIO] = weakref.WeakKeyDictionary()


def read_response(sock: socket.socket, *, head_only: bool = False) -> Response:
    """The next response on `sock` (Content-Length framed; responses to pipelined requests
    arrive back to back, so one buffered reader per socket keeps what follows this one)."""
    reader = _READERS.get(sock)
    if reader is None:
        reader = _READERS[sock] = sock.makefile("rb")
    status_line = reader.readline()
    if not status_line:
        raise EOFError("connection closed before a response")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        key, _, value = line.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()
    length = 0 if head_only or status == 100 else int(headers.get("content-length", "0"))
    body = reader.read(length)
    if len(body) < length:
        raise EOFError("connection closed inside the body")
    return Response(status, headers, body)


def exchange(port: int, raw: bytes, timeout: float = 10.0, *, head_only: bool = False) -> Response:
    """Send `raw` on a new connection and read one response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        return read_response(sock, head_only=head_only)


def request(port: int, method: str, path: str, body: bytes = b"",
            headers: dict[str, str] | None = None) -> Response:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n")
    return exchange(port, head.encode() + body, head_only=method == "HEAD")


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the server has closed `sock` (reads EOF), within the socket's timeout."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    return True
