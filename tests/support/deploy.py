"""Shared by the deployment tests: where the tools are, and the nginx config rendered for 127.0.0.1.

The compose files are the source of truth; tests change only what cannot hold outside Docker
(the DNS name `server` becomes 127.0.0.1 ports, /tmp paths become the test's own directory)
and say so in one place, here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

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


def docker_compose(*args: str) -> subprocess.CompletedProcess[str]:
    """`docker compose <args>` on the repository's compose file, with the plugin from .tools/."""
    docker = tool("docker")
    if not (DOCKER_CONFIG / "cli-plugins" / "docker-compose").exists():
        tool("docker-compose")  # skips/fails with the install hint
    env = {**os.environ, "DOCKER_CONFIG": str(DOCKER_CONFIG)}
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
) -> Path:
    """deploy/nginx/*.conf with 127.0.0.1 upstreams; returns the main config's path.

    Changed and nothing else: the listen port; the DNS-resolved `server` entry becomes one
    static entry per port with the same parameters (minus `resolve`); /tmp paths move into
    `dest`; the health port moves off 8081; and for nginx older than 1.25.1 (Debian 12 ships
    1.22) `http2 on;` is spelled as the `listen ... http2` parameter it replaced.
    """
    dest.mkdir(parents=True, exist_ok=True)
    conf = (NGINX_DIR / "nginx.conf").read_text()
    listen = f"listen 127.0.0.1:{listen_port}"
    if version < (1, 25, 1):
        conf = _replace_once(conf, "        http2 on;\n", "", "nginx.conf")
        listen += " http2"
    conf = _replace_once(conf, "listen 50051;", listen + ";", "nginx.conf")
    conf = _replace_once(conf, "listen 8081;", f"listen 127.0.0.1:{health_port};", "nginx.conf")
    conf = conf.replace("/tmp/mnist-lb", str(dest / "lb"))
    if os.geteuid() == 0:  # workers would drop to `nobody` and lose access to `dest`
        conf = "user root;\n" + conf
    (dest / "nginx.conf").write_text(conf)

    upstreams = (NGINX_DIR / "upstreams.conf").read_text()
    upstreams = re.sub(r"\n\s*resolver [^;]*;", "", upstreams)
    entry = re.search(r"( *)server server:50051 resolve( [^;]*)?;\n", upstreams)
    assert entry, "deploy/nginx/upstreams.conf: expected `server server:50051 resolve ...;`"
    indent, params = entry.group(1), entry.group(2) or ""
    servers = "".join(f"{indent}server 127.0.0.1:{p}{params};\n" for p in upstream_ports)
    (dest / "upstreams.conf").write_text(upstreams.replace(entry.group(0), servers))
    return dest / "nginx.conf"


def nginx_command(nginx: str, conf: Path) -> list[str]:
    """Foreground nginx on `conf`, errors to stderr, no system paths touched."""
    return [nginx, "-p", str(conf.parent), "-c", str(conf), "-e", "stderr", "-g", "daemon off;"]
