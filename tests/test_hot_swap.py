"""Hot swap under load through a real server, and memory across many swaps.

The load test runs 64 concurrent clients against a real gRPC server for ~32 s while new
versions are published with the trainer's atomic publish and the newest is deleted again
(a rollback) over and over. It proves: no request fails; every answer names a version that
was loaded during that request and carries exactly that version's probabilities; and while
only publishes happen, each client sees versions in non-decreasing order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ServerThread, float_request, probabilities
from procs import stop_process
from versions_util import publish_tiny, rss_bytes, tiny_model

from service.metrics import Metrics
from service.pb.mnist.v1 import admin_pb2 as apb
from service.pb.mnist.v1 import admin_pb2_grpc as apb_grpc
from service.pb.mnist.v1 import classifier_pb2_grpc as pb_grpc
from service.registry import ModelRegistry

CLIENTS = 64
DURATION_S = 32.0
MIN_PUBLISHES = 20
MIN_REMOVALS = 20
X = np.random.default_rng(11).random((1, 784), dtype=np.float32)


class _Lifetimes(logging.Handler):
    """When each version number was loaded and unloaded, from the registry's own log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.events: list[tuple[float, str, int]] = []
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        msg, args = record.msg, record.args
        if not isinstance(args, tuple) or len(args) < 2:
            return
        kind = "load" if "loaded in" in msg else "unload" if msg.endswith("unloaded") else ""
        if kind:
            with self._lock:
                self.events.append((record.created, kind, int(args[1])))

    def intervals(self, end: float) -> dict[int, list[tuple[float, float]]]:
        out: dict[int, list[tuple[float, float]]] = {}
        open_: dict[int, float] = {}
        for t, kind, v in sorted(self.events):
            if kind == "load":
                open_.setdefault(v, t)
            elif v in open_:
                out.setdefault(v, []).append((open_.pop(v), t))
        for v, t in open_.items():
            out.setdefault(v, []).append((t, end))
        return out


@dataclass
class _Answer:
    sent: float
    received: float
    version: int
    probs: np.ndarray  # type: ignore[type-arg]
    phase_sent: int
    phase_received: int


@pytest.mark.slow
def test_swap_under_load(tmp_path: Path, start: Callable[..., ServerThread]) -> None:
    repo = tmp_path / "models"
    on_disk: dict[int, int] = {}  # version -> seed of what is on disk now
    ever: dict[int, set[int]] = {}  # version -> every seed published under that number
    next_seed = iter(range(1, 10_000))

    def publish() -> int:
        seed = next(next_seed)
        v = publish_tiny(repo, seed=seed)
        on_disk[v] = seed
        ever.setdefault(v, set()).add(seed)
        return v

    publish()
    lifetimes = _Lifetimes()
    reg_log = logging.getLogger("service.registry")
    old_level = reg_log.level
    reg_log.setLevel(logging.INFO)
    reg_log.addHandler(lifetimes)
    server = start(repo, rescan_interval_s=0.05, max_batch_wait_s=0.001)
    # phase: even = only publishes happen; odd = a removal (rollback) is in progress.
    phase = [0]
    answers: list[list[_Answer]] = [[] for _ in range(CLIENTS)]
    failures: list[str] = []
    counts = {"publishes": 0, "removals": 0}

    def current() -> int:
        return server.run(lambda: server.running.registry.resolve().version)

    def wait_current(v: int) -> None:
        deadline = time.monotonic() + 30
        while current() != v:
            assert time.monotonic() < deadline, f"version {v} never became current"
            time.sleep(0.01)

    def churn(stop: threading.Event) -> None:
        while not stop.is_set():
            for _ in range(2):  # two publishes in a row: a forward-only stretch
                wait_current(publish())
                counts["publishes"] += 1
                stop.wait(0.3)  # let clients see it: the ordering check needs long stretches
            phase[0] += 1
            newest = max(on_disk)
            shutil.rmtree(repo / "mnist" / str(newest))
            del on_disk[newest]
            wait_current(max(on_disk))
            counts["removals"] += 1
            phase[0] += 1

    async def client(i: int, stub: pb_grpc.ClassifierStub, stop: threading.Event) -> None:
        request = float_request(X)
        while not stop.is_set():
            p0, t0 = phase[0], time.time()
            try:
                reply = await stub.Classify(request, timeout=30)
            except grpc.RpcError as e:
                failures.append(f"client {i}: {e.code()} {e.details()}")
                continue
            answers[i].append(
                _Answer(t0, time.time(), int(reply.version), probabilities(reply)[0], p0,
                        phase[0])
            )

    async def load(stop: threading.Event) -> None:
        channels = [grpc.aio.insecure_channel(server.target) for _ in range(4)]
        try:
            stubs = [pb_grpc.ClassifierStub(c) for c in channels]
            await asyncio.gather(
                *(client(i, stubs[i % len(stubs)], stop) for i in range(CLIENTS))
            )
        finally:
            for c in channels:
                await c.close()

    stop = threading.Event()
    churner_error: list[BaseException] = []

    def churner() -> None:
        try:
            churn(stop)
        except BaseException as e:  # surfaced below; the load must stop either way
            churner_error.append(e)
            stop.set()

    t = threading.Thread(target=churner, daemon=True)
    started = time.monotonic()
    try:
        t.start()
        timer = threading.Timer(DURATION_S, stop.set)
        timer.start()
        asyncio.run(load(stop))
        timer.cancel()
        t.join(60)
    finally:
        stop.set()
        reg_log.removeHandler(lifetimes)
        reg_log.setLevel(old_level)
    elapsed = time.monotonic() - started
    assert not churner_error, churner_error
    assert not failures, f"{len(failures)} failed requests, e.g. {failures[:3]}"
    assert elapsed >= 30
    assert counts["publishes"] >= MIN_PUBLISHES, counts
    assert counts["removals"] >= MIN_REMOVALS, counts

    outputs = {s: tiny_model(s).predict(X)[0] for ss in ever.values() for s in ss}
    spans = lifetimes.intervals(time.time())
    total = compared = 0
    for i, mine in enumerate(answers):
        assert mine, f"client {i} got no answers"
        total += len(mine)
        prev: _Answer | None = None
        for a in mine:
            overlaps = any(s <= a.received and a.sent <= e for s, e in spans.get(a.version, []))
            assert overlaps, f"version {a.version} was not loaded during a request: {a}"
            if prev is not None and prev.phase_sent == a.phase_received and a.phase_sent % 2 == 0:
                assert a.version >= prev.version, f"client {i} went back: {prev} -> {a}"
                compared += 1
            prev = a
        # Every answer is exactly what some model published under its number computes (the
        # reply's version label is the model that really answered). Numbers are reused after
        # a removal, so any seed ever published under that number is allowed.
        for a in mine[:: max(1, len(mine) // 50)]:
            candidates = [outputs[s] for s in ever[a.version]]
            assert any(np.allclose(a.probs, c, atol=1e-6) for c in candidates), a
    print(f"swap under load: {total} answers, {compared} ordered pairs checked, {counts}")
    assert total > CLIENTS * 10
    assert compared > total // 4, "the forward-only stretches must cover most answers"


@pytest.mark.slow
def test_memory_across_200_swaps(tmp_path: Path) -> None:
    """Load, swap and unload 200 versions; the process must not keep the old ones."""
    repo = tmp_path / "models"

    async def cycle(reg: ModelRegistry, seed: int) -> None:
        v = publish_tiny(repo, seed=seed, hidden=256)  # ~0.8 MB of weights a version
        await reg.rescan()  # load + validate + swap; the previous version is released
        assert reg.resolve().version == v
        for old in (repo / "mnist").iterdir():
            if old.name.isdigit() and int(old.name) < v:
                shutil.rmtree(old)

    async def go() -> tuple[int, int]:
        reg = ModelRegistry(repo, Metrics.disabled(), rescan_interval_s=0)
        for seed in range(20):  # warm up allocator pools and imports
            await cycle(reg, seed)
        before = rss_bytes()
        for seed in range(20, 220):
            await cycle(reg, seed)
        await reg.close()
        return before, rss_bytes()

    before, after = asyncio.run(go())
    # 200 leaked versions would be ~160 MB; allow allocator noise.
    assert after - before < 40 * 1024 * 1024, f"RSS grew {(after - before) / 2**20:.1f} MiB"


def test_sighup_and_admin_port_in_the_real_process(tmp_path: Path) -> None:
    """`python -m service` wires SIGHUP to a rescan and serves Admin on its own port."""
    repo = tmp_path / "models"
    publish_tiny(repo, seed=1)
    log = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
    env.update(PYTHONUNBUFFERED="1", MNIST_ADMIN_TOKEN="t0ken", MNIST_HTTP_PORT="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--model-dir", str(repo), "--host", "127.0.0.1",
         "--port", "0", "--no-metrics-enabled", "--rescan-interval-s", "0",
         "--admin-enabled", "--admin-port", "0"],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        ports: dict[str, int] = {}
        while len(ports) < 2:
            text = log.read_text(errors="replace")
            for key, pattern in (("main", r"event=listening .*port=(\d+)"),
                                 ("admin", r"event=admin_listening port=(\d+)")):
                if m := re.search(pattern, text):
                    ports[key] = int(m.group(1))
            assert proc.poll() is None, f"server exited:\n{text}"
            assert time.monotonic() < deadline, f"server did not start:\n{text}"
            time.sleep(0.05)
        with grpc.insecure_channel(f"127.0.0.1:{ports['main']}") as ch:
            stub = pb_grpc.ClassifierStub(ch)
            assert stub.Classify(float_request(X), timeout=10).version == 1
            publish_tiny(repo, seed=2)
            time.sleep(0.3)
            assert stub.Classify(float_request(X), timeout=10).version == 1, "no interval scan"
            proc.send_signal(signal.SIGHUP)
            while stub.Classify(float_request(X), timeout=10).version != 2:
                assert time.monotonic() < deadline + 30, log.read_text()
                time.sleep(0.05)
        with grpc.insecure_channel(f"127.0.0.1:{ports['admin']}") as ch:
            reply = apb_grpc.AdminStub(ch).SetCurrentVersion(
                apb.AdminSetCurrentVersionRequest(model="mnist", version=1),
                metadata=(("authorization", "Bearer t0ken"),), timeout=10,
            )
        assert reply.current_version == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        stop_process(proc, signal.SIGKILL)
