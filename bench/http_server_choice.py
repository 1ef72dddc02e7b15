"""Which asyncio HTTP server for the REST front end: httptools (llhttp) under our own
asyncio.Protocol (service/frontends/http/server.py) vs aiohttp's web server, measured side by side.

Both serve the same route with the same trivial handler (read the body, answer a fixed
1-image v2 reply), one process each pinned to CPU 0, driven by the same h2load on CPU 1, in
alternating rounds. What differs is only the server library: its parsing, dispatch and
response writing. Reported: req/s, p50, and the server's CPU per request (from /proc: the
steadiest figure on a shared machine).

    flock /tmp/mnist-bench.lock .venv/bin/python bench/http_server_choice.py --rounds 3

aiohttp is not a dependency of the project: `pip install aiohttp` into the venv first (the
bench says so if it is missing), and remove it afterwards (tests/test_lock.py checks the venv
is the lock).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import common  # noqa: F401  (puts the repository root on sys.path)
import h2load
from common import cpu_s, free_port, pin, stop

REPLY = json.dumps({"model_name": "mnist", "model_version": "1", "outputs": [
    {"name": "probabilities", "datatype": "FP32", "shape": [1, 10], "data": [0.1] * 10},
    {"name": "predicted_class", "datatype": "INT64", "shape": [1], "data": [0]}]}).encode()
BODY = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 784],
                               "data": [0] * 784}]}).encode()
PATH = "/v2/models/mnist/infer"


class _FixedApi:
    """A RestApi whose infer answers a fixed reply: the server's cost, not the model's."""

    def admit(self, body_bytes: int, binary: bool) -> None:
        pass

    async def infer(self, model: str, version: str, body: bytes, header: str | None) -> Any:
        from service.frontends.http.codec import Reply

        return Reply(REPLY)

    def __getattr__(self, name: str) -> Any:
        raise NotImplementedError(name)


async def _serve_httptools(port: int) -> None:
    from service.frontends.http.server import HttpFrontend, HttpLimits

    frontend = HttpFrontend(_FixedApi(), HttpLimits())  # type: ignore[arg-type]
    await frontend.start("127.0.0.1", port)
    await asyncio.Event().wait()


async def _serve_aiohttp(port: int) -> None:
    from aiohttp import web

    async def infer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=REPLY, content_type="application/json")

    app = web.Application(client_max_size=16 << 20)
    app.router.add_post("/v2/models/{name}/infer", infer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


SERVERS = {"httptools": _serve_httptools, "aiohttp": _serve_aiohttp}


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("server did not listen")


def measure(name: str, connections: int, requests: int) -> dict[str, float]:
    port = free_port()
    proc = subprocess.Popen([*pin(0), sys.executable, __file__, "--serve", name,
                             "--port", str(port)])
    try:
        _wait_port(port, proc)
        url = f"http://127.0.0.1:{port}{PATH}"
        h2load.run(url, BODY, connections=connections, requests=min(requests, 2000))  # warm
        before = cpu_s(proc.pid)
        load = h2load.run(url, BODY, connections=connections, requests=requests)
        used = cpu_s(proc.pid) - before
    finally:
        stop(proc)
    return {"rps": load.rps, "p50_ms": load.p50_ms, "cpu_us": used / load.ok * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", choices=sorted(SERVERS))
    parser.add_argument("--port", type=int)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(SERVERS[args.serve](args.port))
        return
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise SystemExit("aiohttp missing: pip install aiohttp into this venv first") from None
    cells: dict[tuple[str, int], list[dict[str, float]]] = {}
    for _ in range(args.rounds):
        for c in (1, 64):
            for name in SERVERS:
                cells.setdefault((name, c), []).append(measure(name, c, args.requests))
    print("| server | c | req/s median (range) | p50 ms | server CPU µs/request |")
    print("|---|---:|---:|---:|---:|")
    for (name, c), runs in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rps = [r["rps"] for r in runs]
        print(f"| {name} | {c} | {statistics.median(rps):.0f} ({min(rps):.0f}-{max(rps):.0f})"
              f" | {statistics.median(r['p50_ms'] for r in runs):.3f}"
              f" | {statistics.median(r['cpu_us'] for r in runs):.0f} |")


if __name__ == "__main__":
    main()
