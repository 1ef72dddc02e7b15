"""The Grafana dashboard's path, and traffic that makes every series it reads exist."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from service.pb.mnist.v1 import classifier_pb2_grpc as pb_grpc
from support.metrics_util import ROOT, poll
from support.servers import ServerThread, make_model, uint8_request, write_version

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "mnist-serving.json"


def traffic_with_swap_and_rejection(server: ServerThread, repo: Path) -> None:
    """Requests (good and bad), a hot swap to v2 and a rejected v3, so every series exists."""
    rng = np.random.default_rng(0)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        stub.Classify(uint8_request(rng.integers(0, 256, (3, 784))), timeout=10)
        with pytest.raises(grpc.RpcError) as bad:
            stub.Classify(uint8_request(np.zeros(100)), timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        write_version(repo, "mnist", 2, make_model(seed=2))
        poll(lambda: True if stub.Classify(uint8_request(np.zeros((1, 784))), timeout=10)
             .version == 2 else None, "the hot swap to version 2")
        broken = repo / "mnist" / ".tmp-3"
        broken.mkdir()
        (broken / "model.npz").write_bytes(b"not a zip")
        (broken / "model.npz.sha256").write_text("0" * 64 + "\n")
        broken.rename(repo / "mnist" / "3")
        poll(lambda: True if server.sample(
            "mnist_model_loads_total", {"model": "mnist", "result": "failure"}) >= 1 else None,
            "version 3 to be rejected")
        stub.Classify(uint8_request(rng.integers(0, 256, (5, 784))), timeout=10)
