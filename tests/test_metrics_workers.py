"""`--workers 2`: the metrics of both worker processes add up on the supervisor's /metrics, and
a worker that dies leaves no stale gauges (each worker's count snapshots plus prometheus-client
multiprocess mode for the model-lifecycle metrics, service/metrics/multiprocess.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import uint8_request
from metrics_util import ROOT, free_port, poll, samples, scrape
from procs import stop_process

from service.pb.mnist.v1 import classifier_pb2_grpc as pb_grpc

OK = (("code", "OK"), ("method", "Classify"), ("model", "mnist"), ("version", "1"))


def listening_pids(log: Path) -> set[int]:
    return {int(p) for p in re.findall(r"event=listening .*pid=(\d+)", log.read_text())}


def snapshot(directory: Path, pid: int) -> dict[str, Any]:
    """One worker's own count snapshot (service/metrics/multiprocess.py)."""
    doc: dict[str, Any] = json.loads((directory / f"mnist_counts_{pid}.json").read_text())
    return doc


def requests_recorded_by(directory: Path, pid: int) -> float:
    """The OK Classify count in one worker's own snapshot."""
    rows = snapshot(directory, pid)["totals"].get("mnist_requests", [])
    return sum(float(value) for labels, value in rows if labels[3] == "OK")


@pytest.mark.slow
def test_two_workers_add_up_and_a_killed_worker_leaves_no_stale_gauges(
    model_repo: Path, tmp_path: Path
) -> None:
    port, metrics_port = free_port(), free_port()
    shared = tmp_path / "prometheus-multiproc"
    log = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
    env.update(PYTHONUNBUFFERED="1", PROMETHEUS_MULTIPROC_DIR=str(shared), MNIST_HTTP_PORT="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--model-dir", str(model_repo), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "2", "--metrics-host", "127.0.0.1",
         "--metrics-port", str(metrics_port), "--rescan-interval-s", "0.5",
         "--grace-period-s", "2"],
        cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    try:
        pids = poll(lambda: sorted(listening_pids(log)) if len(listening_pids(log)) == 2
                    else None, "two workers listening", deadline_s=60)
        # 16 separate connections (no shared subchannel pool), so SO_REUSEPORT spreads them
        # over both workers; all on one worker would take odds of 1 in 32768.
        sizes = []
        rng = np.random.default_rng(3)
        for i in range(16):
            with grpc.insecure_channel(
                f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
            ) as channel:
                stub = pb_grpc.ClassifierStub(channel)
                for _ in range(3):
                    n = 1 + i % 3
                    stub.Classify(uint8_request(rng.integers(0, 256, (n, 784))), timeout=20)
                    sizes.append(n)

        # Workers write their counts every 0.5 s: the scrape catches up within a second.
        merged = poll(lambda: m if (m := samples(scrape(metrics_port))).get(
            ("mnist_requests_total", OK)) == 48 else None, "48 requests on /metrics", 10)
        assert merged[("mnist_images_total", OK)] == sum(sizes)
        assert sum(v for (name, labels), v in merged.items()
                   if name == "mnist_predictions_total") == sum(sizes)
        # Gauges: versions are the max over workers (not 2), in-flight the sum (all done).
        assert merged[("mnist_model_current_version", (("model", "mnist"),))] == 1
        assert merged[("mnist_model_version_loaded", (("model", "mnist"), ("version", "1")))] == 1
        assert merged[("mnist_inflight_requests", ())] == 0
        per_worker = [requests_recorded_by(shared, pid) for pid in pids]
        assert all(n > 0 for n in per_worker), f"one worker served everything: {per_worker}"
        assert sum(per_worker) == 48

        dead = pids[0]
        assert list(shared.glob(f"gauge_live*_{dead}.db")), "a worker has live gauge files"
        assert snapshot(shared, dead)["live"], "a worker's snapshot has live gauges"
        os.kill(dead, signal.SIGKILL)
        poll(lambda: True if not list(shared.glob(f"gauge_live*_{dead}.db"))
             and not snapshot(shared, dead)["live"] else None,
             "the supervisor to drop the killed worker's live gauges", deadline_s=30)
        assert requests_recorded_by(shared, dead) == per_worker[0]  # its counts stay
        poll(lambda: True if len(listening_pids(log) - set(pids)) == 1 else None,
             "the supervisor to restart the killed worker", deadline_s=60)
        after = samples(scrape(metrics_port))
        assert after[("mnist_requests_total", OK)] == 48  # counts survive their process
        assert after[("mnist_inflight_requests", ())] == 0
        assert after[("mnist_model_current_version", (("model", "mnist"),))] == 1
    finally:
        stop_process(proc, grace_s=30)
    assert proc.returncode == 0, log.read_text()[-3000:]
