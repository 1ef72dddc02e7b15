"""Shared by the deployment tests: where the tools are, the nginx config rendered for 127.0.0.1,
and a REST client with the retry policy docs/deployment.md asks of clients behind the balancer.

The compose files are the source of truth; tests change only what cannot hold outside Docker
(the DNS name `server` becomes 127.0.0.1 ports, /tmp paths become the test's own directory)
and say so in one place, here.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from support.procs import free_port

ROOT = Path(__file__).resolve().parents[2]  # the repository (this is tests/support/)
TOOLS_BIN = ROOT / ".tools" / "bin"
DOCKER_CONFIG = ROOT / ".tools" / "docker"
NGINX_DIR = ROOT / "deploy" / "nginx"
COMPOSE_FILE = ROOT / "docker-compose.yml"


def tool(name: str) -> str:
    """Path of a tool installed by scripts/install-test-tools.sh; skip (never in CI) if absent."""
    found = TOOLS_BIN / name
    if found.exists():
        return str(found)
    on_path = shutil.which(name)
    if on_path:
        return on_path
    message = f"{name} not installed: run scripts/install-test-tools.sh"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def docker_compose(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`docker compose <args>` on the repository's compose file, with the plugin from .tools/;
    `env` adds variables for the file's interpolation."""
    docker = tool("docker")
    if not (DOCKER_CONFIG / "cli-plugins" / "docker-compose").exists():
        tool("docker-compose")  # skips/fails with the install hint
    env = {**os.environ, **(env or {}), "DOCKER_CONFIG": str(DOCKER_CONFIG)}
    return subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_FILE), *args],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )


def nginx_version(nginx: str) -> tuple[int, ...]:
    out = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=True).stderr
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out)
    assert match, f"cannot read the nginx version from {out!r}"
    return tuple(int(g) for g in match.groups())


def _replace_once(text: str, old: str, new: str, what: str) -> str:
    count = text.count(old)
    assert count == 1, f"expected {old!r} once in {what}, found it {count} times"
    return text.replace(old, new)


def render_nginx(
    dest: Path,
    listen_port: int,
    health_port: int,
    upstream_ports: list[int],
    version: tuple[int, ...],
    *,
    http_port: int | None = None,
    http_upstream_ports: list[int] | None = None,
) -> Path:
    """deploy/nginx/*.conf with 127.0.0.1 upstreams; returns the main config's path.

    Changed and nothing else: the gRPC and REST listen ports (50051 -> `listen_port`, 8000 ->
    `http_port`); each DNS-resolved `server server:<port>` entry becomes one static entry per
    port with the same parameters (minus `resolve`): the gRPC upstream gets `upstream_ports`,
    the REST one `http_upstream_ports`; /tmp paths move into `dest`; the health port moves off
    8081; and for nginx older than 1.25.1 (Debian 12 ships 1.22) `http2 on;` is spelled as the
    `listen ... http2` parameter it replaced. Callers that send no REST traffic may leave the
    REST side out: it then listens on a free port with `upstream_ports` as its upstreams.
    """
    if http_port is None:
        http_port = free_port()
    if http_upstream_ports is None:
        http_upstream_ports = upstream_ports
    dest.mkdir(parents=True, exist_ok=True)
    conf = (NGINX_DIR / "nginx.conf").read_text()
    listen = f"listen 127.0.0.1:{listen_port}"
    if version < (1, 25, 1):
        conf = _replace_once(conf, "        http2 on;\n", "", "nginx.conf")
        listen += " http2"
    conf = _replace_once(conf, "listen 50051;", listen + ";", "nginx.conf")
    conf = _replace_once(conf, "listen 8000;", f"listen 127.0.0.1:{http_port};", "nginx.conf")
    conf = _replace_once(conf, "listen 8081;", f"listen 127.0.0.1:{health_port};", "nginx.conf")
    conf = conf.replace("/tmp/mnist-lb", str(dest / "lb"))
    if os.geteuid() == 0:  # workers would drop to `nobody` and lose access to `dest`
        conf = "user root;\n" + conf
    (dest / "nginx.conf").write_text(conf)

    upstreams = (NGINX_DIR / "upstreams.conf").read_text()
    upstreams = re.sub(r"\n\s*resolver [^;]*;", "", upstreams)
    for port, ports in ((50051, upstream_ports), (8000, http_upstream_ports)):
        entry = re.search(rf"( *)server server:{port} resolve( [^;]*)?;\n", upstreams)
        assert entry, f"deploy/nginx/upstreams.conf: expected `server server:{port} resolve ...;`"
        indent, params = entry.group(1), entry.group(2) or ""
        servers = "".join(f"{indent}server 127.0.0.1:{p}{params};\n" for p in ports)
        upstreams = upstreams.replace(entry.group(0), servers)
    (dest / "upstreams.conf").write_text(upstreams)
    return dest / "nginx.conf"


def nginx_command(nginx: str, conf: Path) -> list[str]:
    """Foreground nginx on `conf`, errors to stderr, no system paths touched."""
    return [nginx, "-p", str(conf.parent), "-c", str(conf), "-e", "stderr", "-g", "daemon off;"]


# The client side of the REST retry policy docs/deployment.md asks for behind the balancer:
# infer is a pure function of its input, so a request that got no answer (connection reset or
# closed) or the balancer's 502/503 is sent again, up to 3 attempts, 10 ms then 20 ms apart.
# Nothing else is retried (400/404/413 are final; 429 means back off).
REST_RETRY_STATUSES = (502, 503)
REST_ATTEMPTS = 3


@dataclass
class RestReply:
    status: int
    body: bytes
    content_type: str

    def json(self) -> Any:
        return json.loads(self.body)


class RestClient:
    """KServe v2 REST over one kept-alive HTTP/1.1 connection (http.client), with the retry
    above when `retry` is true; `retried` keeps why each retry happened."""

    def __init__(self, port: int, *, retry: bool = True, timeout_s: float = 10.0) -> None:
        self.port = port
        self.retry = retry
        self.timeout_s = timeout_s
        self.retried: list[str] = []
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> RestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _once(self, method: str, path: str, body: bytes | None,
              headers: dict[str, str]) -> RestReply:
        if self._conn is None:
            self._conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                    timeout=self.timeout_s)
        try:
            self._conn.request(method, path, body=body, headers=headers)
            reply = self._conn.getresponse()
            data = reply.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        if reply.will_close:
            self.close()
        return RestReply(reply.status, data, reply.getheader("Content-Type", ""))

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> RestReply:
        attempts = REST_ATTEMPTS if self.retry else 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                reply = self._once(method, path, body, headers or {})
            except (OSError, http.client.HTTPException) as e:
                if last:
                    raise
                self.retried.append(f"{type(e).__name__}: {e}")
            else:
                if reply.status not in REST_RETRY_STATUSES or last:
                    return reply
                self.retried.append(f"{reply.status}: {reply.body[:200]!r}")
            time.sleep(0.01 * 2**attempt)
        raise AssertionError("unreachable")

    def infer(self, images: npt.NDArray[np.uint8], model: str = "mnist") -> RestReply:
        """One v2 infer of uint8 [N, 28, 28] images as Triton's binary tensor data, asking
        for `predicted_class` only (as JSON)."""
        pixels = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), 784)
        header = json.dumps({
            "inputs": [{"name": "images", "datatype": "UINT8", "shape": list(pixels.shape),
                        "parameters": {"binary_data_size": pixels.nbytes}}],
            "outputs": [{"name": "predicted_class"}],
        }).encode()
        return self.request(
            "POST", f"/v2/models/{model}/infer", header + pixels.tobytes(),
            {"Inference-Header-Content-Length": str(len(header)),
             "Content-Type": "application/octet-stream"},
        )

    def classes(self, images: npt.NDArray[np.uint8]) -> list[int]:
        reply = self.infer(images)
        assert reply.status == 200, (reply.status, reply.body[:300])
        (output,) = reply.json()["outputs"]
        assert output["name"] == "predicted_class"
        return [int(c) for c in output["data"]]
