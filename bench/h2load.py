"""One HTTP load generator for the REST benchmarks: Debian's `h2load` (nghttp2-client) over
HTTP/1.1, closed loop, `c` connections, one request in flight on each.

The same generator drives every server compared (ours, aiohttp, MLServer), so its own cost
is the same on each side. Latency percentiles come from h2load's per-request log (start,
status, microseconds to the end of the response); req/s from the requests finished over the
wall time of the run. `apt-get install nghttp2-client` (scripts/install-bench-tools.sh).
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Load:
    requests: int
    ok: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


def h2load() -> str:
    path = shutil.which("h2load")
    if path is None:
        raise SystemExit("h2load not found: apt-get install nghttp2-client "
                         "(scripts/install-bench-tools.sh)")
    return path


def run(url: str, body: bytes, *, connections: int, requests: int,
        headers: dict[str, str] | None = None, cpu: int | None = 1,
        timeout_s: float = 300) -> Load:
    """`requests` POSTs of `body` to `url` over `connections` HTTP/1.1 connections."""
    with tempfile.TemporaryDirectory(prefix="h2load-") as tmp:
        data, log = Path(tmp) / "body", Path(tmp) / "log"
        data.write_bytes(body)
        cmd = [h2load(), "--h1", "-n", str(requests), "-c", str(connections), "-m", "1",
               "-d", str(data), "--log-file", str(log), "-H", "Content-Type: application/json"]
        for k, v in (headers or {}).items():
            cmd += ["-H", f"{k}: {v}"]
        if cpu is not None and shutil.which("taskset"):
            cmd = ["taskset", "-c", str(cpu), *cmd]
        out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=timeout_s,
                             check=True).stdout
        rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    starts = [int(r[0]) for r in rows]
    ends = [int(r[0]) + int(r[2]) for r in rows]
    ok = [r for r in rows if r[1] == "200"]
    if len(ok) < len(rows) or not rows:
        raise SystemExit(f"h2load: {len(rows) - len(ok)} of {len(rows)} not 200:\n{out}")
    latencies = sorted(int(r[2]) / 1000 for r in rows)
    return Load(
        requests=len(rows), ok=len(ok), seconds=(max(ends) - min(starts)) / 1e6,
        p50_ms=statistics.median(latencies),
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    )
