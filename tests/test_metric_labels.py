"""No metric series from a caller-chosen string (issue 11, part 5).

Before: an unauthenticated v2 ModelInfer naming any model, with a label as its version,
created a `mnist_batch_queue_rows` series per name (5,000 requests: a 50 MB /metrics page),
and admin calls labelled request metrics with the model they named. Here thousands of
requests with random model names, versions and labels, over the v2 API, the native API and
admin, leave the number of series where a first handful put it, and no random name appears.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from support.servers import ServerThread, make_model, uint8_request, write_version

from service.metrics import UNKNOWN, Metrics
from service.pb.inference import grpc_service_pb2 as oip_pb
from service.pb.inference import grpc_service_pb2_grpc as oip_grpc
from service.pb.mnist.v1 import admin_pb2, admin_pb2_grpc
from service.pb.mnist.v1 import classifier_pb2_grpc as pb_grpc

TOKEN = "label-test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
Tensor = oip_pb.ModelInferRequest.InferInputTensor


def _series(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {(s.name, tuple(sorted(s.labels.items())))
            for family in registry.collect() for s in family.samples}


def _label_values(registry: CollectorRegistry) -> set[str]:
    return {v for _, labels in _series(registry) for _, v in labels}


def _random_calls(channel: grpc.Channel, n: int, rng: np.random.Generator) -> list[str]:
    """n calls of each kind naming random models, versions and labels; the names used."""
    v2 = oip_grpc.GRPCInferenceServiceStub(channel)
    native = pb_grpc.ClassifierStub(channel)
    admin = admin_pb2_grpc.AdminStub(channel)
    x = np.zeros((1, 784), np.float32)
    names: list[str] = []
    codes: list[grpc.StatusCode] = []

    def one(i: int) -> None:
        model = "m" + secrets.token_hex(6)
        label = "l" + secrets.token_hex(6)
        names.extend((model, label))
        version = str(int(rng.integers(2, 10**9)))
        calls: list[Callable[[], object]] = [
            # a v2 label as version: before the fix this queued under the caller's name
            lambda: v2.ModelInfer(oip_pb.ModelInferRequest(
                model_name=model if i % 2 else "mnist", model_version=label,
                inputs=[Tensor(name="images", datatype="FP32", shape=[1, 784])],
                raw_input_contents=[x.tobytes()]), timeout=10),
            lambda: v2.ModelInfer(oip_pb.ModelInferRequest(
                model_name=model, model_version=version,
                inputs=[Tensor(name="images", datatype="FP32", shape=[1, 784])],
                raw_input_contents=[x.tobytes()]), timeout=10),
            lambda: native.Classify(uint8_request(
                np.zeros((1, 784), np.uint8), model=model if i % 2 else "mnist",
                version_label=label), timeout=10),
            lambda: native.Classify(uint8_request(
                np.zeros((1, 784), np.uint8), model="mnist", version=int(version)), timeout=10),
            lambda: admin.SetCurrentVersion(admin_pb2.AdminSetCurrentVersionRequest(
                model=model, version=int(version)), metadata=AUTH, timeout=10),
            lambda: admin.LoadVersion(admin_pb2.AdminLoadVersionRequest(
                model=model if i % 2 else "mnist", version=int(version)), metadata=AUTH,
                timeout=10),
            lambda: admin.SetLabel(admin_pb2.AdminSetLabelRequest(
                model=model, label="stable", version=1), metadata=AUTH, timeout=10),
            lambda: admin.SetCurrentVersion(admin_pb2.AdminSetCurrentVersionRequest(
                model=model, version=1), timeout=10),  # unauthenticated
        ]
        for call in calls:
            try:
                call()
            except grpc.RpcError as e:
                codes.append(e.code())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(n)))
    assert not {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN} & set(codes)
    return names


@pytest.mark.parametrize("frontend", ["core", "aio"])
def test_random_names_versions_and_labels_create_no_series(
    tmp_path: Path, start: Callable[..., ServerThread], frontend: str
) -> None:
    repo = tmp_path / "models"
    write_version(repo, "mnist", 1, make_model(seed=1))
    server = start(repo, frontend=frontend, admin_enabled=True, admin_token=TOKEN)
    registry = server.metrics.registry
    rng = np.random.default_rng(0)
    with grpc.insecure_channel(server.target) as channel:
        # Every kind of call once: the series the bounded labels allow exist after this.
        _random_calls(channel, 8, rng)
        before = _series(registry)
        page_before = len(generate_latest(registry))
        names = _random_calls(channel, 500, rng)  # 4,000 calls with 1,000 random names
        after = _series(registry)
        page_after = len(generate_latest(registry))
    assert after == before, f"new series: {sorted(after - before)[:5]}"
    assert not set(names) & _label_values(registry)
    assert page_after < page_before * 1.05, (page_before, page_after)
    # The unknown names were counted, under the fixed label.
    assert any(dict(labels).get("model") == UNKNOWN for name, labels in after
               if name == "mnist_requests_total")
    # And the server still answers, counted under the model it loaded.
    with grpc.insecure_channel(server.target) as channel:
        pb_grpc.ClassifierStub(channel).Classify(
            uint8_request(np.zeros((2, 784), np.uint8)), timeout=10)
    assert server.sample("mnist_requests_total", {
        "method": "Classify", "model": "mnist", "version": "1", "code": "OK"}) >= 1


def test_metrics_label_only_what_was_loaded() -> None:
    """The unit rule: model and version labels come from version_available, else UNKNOWN."""
    registry = CollectorRegistry()
    m = Metrics(registry, process_metrics=False)
    m.version_available("mnist", 2, 0.01)
    m.request_done("Classify", "mnist", "2", "OK", 1, 0.001)
    m.request_done("Classify", "mnist", "7", "NOT_FOUND", 0, 0.001)
    m.request_done("Classify", "evil" * 50, "2", "NOT_FOUND", 0, 0.001)
    m.request_done("Admin.LoadVersion", "x/../y", "", "NOT_FOUND", 0, 0.001)
    m.set_queue_rows("not-loaded", 5)
    m.set_queue_rows("mnist", 3)

    def requests(model: str, version: str, code: str, method: str = "Classify") -> float | None:
        return registry.get_sample_value("mnist_requests_total", {
            "method": method, "model": model, "version": version, "code": code})

    assert requests("mnist", "2", "OK") == 1
    assert requests("mnist", UNKNOWN, "NOT_FOUND") == 1
    assert requests(UNKNOWN, UNKNOWN, "NOT_FOUND") == 1
    assert requests(UNKNOWN, "", "NOT_FOUND", "Admin.LoadVersion") == 1
    assert registry.get_sample_value("mnist_batch_queue_rows", {"model": UNKNOWN}) == 5
    assert registry.get_sample_value("mnist_batch_queue_rows", {"model": "mnist"}) == 3
    # The per-label-set cache stays bounded too (it holds the bounded key, not the caller's).
    for i in range(1000):
        m.request_done("Classify", f"n{i}", str(i), "NOT_FOUND", 0, 0.001)
    assert len(m._request_children) <= 5
