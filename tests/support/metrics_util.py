"""Helpers for the metrics tests: the real Prometheus tools, scraping, PromQL metric names.

`prometheus` and `promtool` come from scripts/install-test-tools.sh (Debian's package,
unpacked into .tools/bin). Without them a test skips locally and fails in CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.procs import free_port

ROOT = Path(__file__).resolve().parents[2]  # the repository (this is tests/support/)
TOOLS_BIN = ROOT / ".tools" / "bin"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
T = TypeVar("T")


def tool(name: str) -> Path:
    """Path of a test tool, or skip (fail in CI) naming the script that installs it."""
    path = TOOLS_BIN / name
    if path.exists():
        return path
    found = shutil.which(name)
    if found:
        return Path(found)
    message = f"{name} not found in {TOOLS_BIN}: run scripts/install-test-tools.sh"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: nothing may skip)")
    pytest.skip(message)


def http_get(url: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as reply:
        return str(reply.read().decode())


def scrape(port: int) -> str:
    return http_get(f"http://127.0.0.1:{port}/metrics")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Exposition text -> {(sample name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text) for s in fam.samples
    }


def sample_names(text: str) -> set[str]:
    return {name for name, _ in samples(text)}


def poll(fn: Callable[[], T | None], what: str, deadline_s: float = 30.0,
         every_s: float = 0.2) -> T:
    """Call `fn` until it returns something not None, or fail after `deadline_s`, naming `what`."""
    end = time.monotonic() + deadline_s
    last: Any = None
    while True:
        try:
            got = fn()
            if got is not None:
                return got
        except (OSError, urllib.error.URLError, KeyError, ValueError) as e:
            last = e
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline_s} s waiting for {what} (last error: {last})")
        time.sleep(every_s)


class Prometheus:
    """A real Prometheus server on 127.0.0.1, scraping the given targets every second."""

    def __init__(self, workdir: Path, targets: list[str], scrape_interval_s: float = 1.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        interval = f"{int(scrape_interval_s * 1000)}ms"
        config.write_text(
            "global:\n"
            f"  scrape_interval: {interval}\n"
            f"  scrape_timeout: {interval}\n"
            "scrape_configs:\n"
            "  - job_name: mnist\n"
            "    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n"
        )
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                str(tool("prometheus")),
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )
        try:
            poll(self._ready, "Prometheus to become ready", deadline_s=30)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool | None:
        if self.proc.poll() is not None:
            pytest.fail(f"prometheus exited with {self.proc.returncode}: {self.log()}")
        return True if "Ready" in http_get(f"{self.url}/-/ready", 2) else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; the API's `result` list. A PromQL error raises AssertionError."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            body = json.loads(http_get(url))
        except urllib.error.HTTPError as e:
            raise AssertionError(f"query {promql!r} failed: {e.read().decode()}") from None
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def scalar(self, promql: str) -> float | None:
        """The single value of an instant query, or None while it has no result yet."""
        result = self.query(promql)
        if not result:
            return None
        assert len(result) == 1, f"{promql!r} gave {len(result)} series: {result}"
        return float(result[0]["value"][1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._log.close()


@contextmanager
def running_prometheus(workdir: Path, targets: list[str]) -> Iterator[Prometheus]:
    prom = Prometheus(workdir, targets)
    try:
        yield prom
    finally:
        prom.stop()


# --- PromQL: which metric names an expression reads

_PROMQL_WORDS = {
    # aggregation operators and their modifiers
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "and", "or", "unless", "offset", "inf", "nan", "atan2",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"' r"|'(?:[^'\\]|\\.)*'")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions or keywords.

    Strings, label matchers, ranges and label lists (`by (...)`) are cut out first; what is
    left followed by `(` is a function. Grafana variables (`$model`) and numbers are skipped.
    """
    text = _STRING.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        word = m.group()
        before = text[m.start() - 1] if m.start() else " "
        after = text[m.end():].lstrip()[:1]
        if before in "$." or before.isdigit() or after == "(" or word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets, variables, annotations."""
    out: list[str] = []

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dashboard.get("panels", [])):
        out.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
    for var in dashboard.get("templating", {}).get("list", []):
        q = var.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if var.get("type") == "query" and q:
            m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", q)
            out.append(m.group(1) if m else q)
    for ann in dashboard.get("annotations", {}).get("list", []):
        if ann.get("expr"):
            out.append(ann["expr"])
    return out


def grafana_to_promql(expr: str) -> str:
    """Substitute the Grafana variables the dashboard uses so Prometheus can run the query."""
    return (
        expr.replace("$__rate_interval", "5s")
        .replace("$__range", "1m")
        .replace("$model", ".*")
        .replace("$job", ".*")
    )
