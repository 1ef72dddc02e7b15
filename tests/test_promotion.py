"""Canary, shadow, promotion and automatic rollback on real servers (127.0.0.1, port 0).

Version 1 (seed 1) is current and held (`set-current --hold`), version 2 is the candidate.
Every figure is counted from real answers: the version each response names, the
probabilities it carries, the server's own metrics.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import ServerThread, make_model, uint8_request, write_version

from mnist_client.cli import main as client_main
from service.model import INPUT_SIZE, NUM_CLASSES, Model, build_model, pixels_to_input
from service.pb.inference import grpc_service_pb2 as opb
from service.pb.inference import grpc_service_pb2_grpc as opb_grpc
from service.pb.mnist.v1 import admin_pb2 as apb
from service.pb.mnist.v1 import admin_pb2_grpc as apb_grpc
from service.pb.mnist.v1 import classifier_pb2 as pb
from service.pb.mnist.v1 import classifier_pb2_grpc as pb_grpc

TOKEN = "promo-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
IMAGES = np.random.default_rng(21).integers(0, 256, (64, INPUT_SIZE), dtype=np.uint8)
QUIET = {"canary_max_divergence": 1.0, "canary_max_disagreement": 1.0}  # never roll back


def constant_model(cls: int) -> Model:
    """A model that answers `cls` for every image: the broken canary."""
    base = make_model(seed=9)
    rng = np.random.default_rng(9)
    b1 = np.zeros(NUM_CLASSES)
    b1[cls] = 20.0
    return build_model(
        [rng.normal(0, 0.1, (INPUT_SIZE, 8)).astype(np.float32), np.zeros((8, NUM_CLASSES))],
        [np.zeros(8), b1], ["relu"], "softmax", dict(base.metadata),
        rng.random((4, INPUT_SIZE), dtype=np.float32),
    )


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    write_version(repo, "mnist", 1, make_model(seed=1))
    write_version(repo, "mnist", 2, make_model(seed=2))
    return repo


class Stubs:
    def __init__(self, channel: grpc.Channel) -> None:
        self.classifier = pb_grpc.ClassifierStub(channel)
        self.admin = apb_grpc.AdminStub(channel)
        self.oip = opb_grpc.GRPCInferenceServiceStub(channel)

    def classify(self, i: int = 0, **fields: Any) -> pb.ClassifyResponse:
        return self.classifier.Classify(uint8_request(IMAGES[i % len(IMAGES)][None], **fields),
                                        timeout=10)

    def hold(self, version: int) -> None:
        self.admin.SetCurrentVersion(
            apb.AdminSetCurrentVersionRequest(model="mnist", version=version, hold=True),
            metadata=AUTH,
        )

    def canary(self, version: int, percent: float = 10.0) -> apb.AdminModelStatus:
        return self.admin.SetCanary(
            apb.AdminSetCanaryRequest(model="mnist", version=version, percent=percent),
            metadata=AUTH,
        )


def serve(start: Callable[..., ServerThread], repo: Path, **overrides: Any) -> ServerThread:
    return start(repo, admin_enabled=True, admin_token=TOKEN, rescan_interval_s=0, **overrides)


@pytest.fixture
def stubs_for() -> Iterator[Callable[[ServerThread], Stubs]]:
    channels: list[grpc.Channel] = []

    def make(server: ServerThread) -> Stubs:
        channel = grpc.insecure_channel(server.target)
        channels.append(channel)
        return Stubs(channel)

    yield make
    for c in channels:
        c.close()


def in_threads(n: int, fn: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            fn(k)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]


def test_ten_percent_canary_gets_ten_percent_and_a_key_always_the_same_version(
    repo: Path, start: Callable[..., ServerThread], stubs_for: Callable[[ServerThread], Stubs]
) -> None:
    server = serve(start, repo, **QUIET)
    s = stubs_for(server)
    s.hold(1)
    reply = s.canary(2, 10)
    assert (reply.current_version, reply.canary_version, reply.canary_percent) == (1, 2, 10)
    counts: Counter[int] = Counter()
    lock = threading.Lock()

    def unkeyed(k: int) -> None:
        mine = Counter(s.classify(i).version for i in range(k, 10_000, 8))
        with lock:
            counts.update(mine)

    in_threads(8, unkeyed)
    assert sum(counts.values()) == 10_000
    assert set(counts) == {1, 2}
    assert 800 <= counts[2] <= 1200, counts  # 10% +- 2% of 10,000

    by_key: dict[str, set[int]] = {}
    for k in range(600):
        key = f"user-{k}"
        by_key[key] = {s.classify(j, routing_key=key).version for j in range(3)}
    assert all(len(v) == 1 for v in by_key.values())  # the same key: the same version
    share = sum(v == {2} for v in by_key.values()) / len(by_key)
    assert 0.06 <= share <= 0.14, share
    # The v2 API routes by its "routing_key" parameter with the same hash.
    for key in list(by_key)[:40]:
        request = opb.ModelInferRequest(model_name="mnist")
        request.parameters["routing_key"].string_param = key
        t = request.inputs.add(name="images", datatype="UINT8", shape=[1, INPUT_SIZE])
        request.raw_input_contents.append(IMAGES[0].tobytes())
        assert t.name == "images"
        answer = s.oip.ModelInfer(request, timeout=10)
        assert {int(answer.model_version)} == by_key[key]
    # A request naming a version or a label is never diverted.
    assert {s.classify(i, version=1).version for i in range(200)} == {1}
    info = s.classifier.GetModelInfo(pb.GetModelInfoRequest(model="mnist"), timeout=5)
    assert (info.canary_version, info.canary_percent, info.current_pinned) == (2, 10, True)


def test_promote_makes_the_canary_current(
    repo: Path, start: Callable[..., ServerThread], stubs_for: Callable[[ServerThread], Stubs]
) -> None:
    server = serve(start, repo, **QUIET)
    s = stubs_for(server)
    s.hold(1)
    s.canary(2, 50)
    reply = s.admin.PromoteVersion(apb.AdminPromoteVersionRequest(model="mnist", version=2),
                                   metadata=AUTH)
    assert (reply.current_version, reply.canary_version) == (2, 0)
    assert {s.classify(i).version for i in range(100)} == {2}


def test_pin_is_shown_in_the_client_models_listing(
    repo: Path, start: Callable[..., ServerThread], stubs_for: Callable[[ServerThread], Stubs],
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = serve(start, repo, **QUIET)
    s = stubs_for(server)
    assert client_main(["--target", server.target, "models"]) == 0
    assert "pinned" not in capsys.readouterr().out
    s.hold(1)
    s.canary(2, 10)
    assert client_main(["--target", server.target, "models"]) == 0
    out = capsys.readouterr().out
    assert "mnist  current 1  (pinned: set-current MODEL 0 lifts it)" in out
    assert "canary 2 at 10%" in out
    s.admin.SetCurrentVersion(apb.AdminSetCurrentVersionRequest(model="mnist", version=0),
                              metadata=AUTH)
    assert client_main(["--target", server.target, "models"]) == 0
    out = capsys.readouterr().out
    assert "pinned" not in out
    assert "canary" not in out


def test_shadow_answers_are_compared_and_never_returned(
    repo: Path, start: Callable[..., ServerThread], stubs_for: Callable[[ServerThread], Stubs]
) -> None:
    server = serve(start, repo)
    s = stubs_for(server)
    s.hold(1)
    reply = s.admin.SetShadow(apb.AdminSetShadowRequest(model="mnist", version=2),
                              metadata=AUTH)
    assert reply.shadow_version == 2
    current, shadow = make_model(seed=1), make_model(seed=2)
    x = pixels_to_input(IMAGES)
    expected = current.predict(x)
    for i in range(len(IMAGES)):
        r = s.classify(i)
        assert r.version == 1
        np.testing.assert_allclose(next(p.probabilities for p in r.predictions), expected[i],
                                   rtol=1e-5, atol=1e-6)
    agree = int(np.count_nonzero(np.argmax(expected, 1) == np.argmax(shadow.predict(x), 1)))

    def compared() -> tuple[float, float]:
        return (server.sample("mnist_shadow_compared_total", {"model": "mnist", "result": "agree"}),
                server.sample("mnist_shadow_compared_total",
                              {"model": "mnist", "result": "disagree"}))

    deadline = time.monotonic() + 10
    while sum(compared()) < len(IMAGES):
        assert time.monotonic() < deadline, compared()
        time.sleep(0.02)
    assert server.sample("mnist_shadow_dropped_total", {"model": "mnist"}) == 0
    assert compared() == (agree, len(IMAGES) - agree)
    assert 0 < agree < len(IMAGES)  # a real comparison: the two versions differ somewhat
    for role in ("current", "candidate"):
        assert server.sample("mnist_shadow_confidence_count",
                             {"model": "mnist", "role": role}) == len(IMAGES)


def test_shadow_queue_is_bounded_and_counts_what_it_drops(
    repo: Path, start: Callable[..., ServerThread], stubs_for: Callable[[ServerThread], Stubs]
) -> None:
    """A queue of one batch under 8 concurrent clients: copies are dropped, answers are not."""
    server = serve(start, repo, shadow_queue_batches=1)
    s = stubs_for(server)
    s.hold(1)
    s.admin.SetShadow(apb.AdminSetShadowRequest(model="mnist", version=2), metadata=AUTH)
    big = np.random.default_rng(1).integers(0, 256, (512, INPUT_SIZE), dtype=np.uint8)

    def load(k: int) -> None:
        for _ in range(30):
            r = s.classifier.Classify(uint8_request(big), timeout=30)
            assert r.version == 1

    in_threads(8, load)
    sent = 8 * 30 * 512

    def accounted() -> tuple[float, float]:
        return (sum(server.sample("mnist_shadow_compared_total",
                                  {"model": "mnist", "result": r}) for r in ("agree", "disagree")),
                server.sample("mnist_shadow_dropped_total", {"model": "mnist"}))

    deadline = time.monotonic() + 20
    while sum(accounted()) < sent:  # every image either recomputed or dropped, none lost
        assert time.monotonic() < deadline, accounted()
        time.sleep(0.05)
    compared, dropped = accounted()
    assert compared + dropped == sent
    assert dropped > 0
    assert compared > 0


def test_broken_canary_is_rolled_back_within_its_window_under_load(
    repo: Path, start: Callable[..., ServerThread], stubs_for: Callable[[ServerThread], Stubs]
) -> None:
    current = make_model(seed=1)
    rare = int(np.argmin(np.bincount(np.argmax(current.predict(pixels_to_input(IMAGES)), 1),
                                     minlength=NUM_CLASSES)))
    write_version(repo, "mnist", 3, constant_model(rare))
    window = 200
    server = serve(start, repo, canary_window_images=window)
    s = stubs_for(server)
    s.hold(1)
    s.canary(3, 20)
    answers: Counter[int] = Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def load(k: int) -> None:
        mine: Counter[int] = Counter()
        deadline = time.monotonic() + 60
        i = k
        while not stop.is_set() and time.monotonic() < deadline:
            mine[s.classify(i).version] += 1  # raises (fails the test) on any failed request
            i += 8
        with lock:
            answers.update(mine)

    def watch(_: int) -> None:
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                info = s.classifier.GetModelInfo(pb.GetModelInfoRequest(model="mnist"),
                                                 timeout=5)
                if info.canary_version == 0:
                    return
                time.sleep(0.02)
        finally:
            time.sleep(0.3)  # keep the load on past the rollback
            stop.set()

    in_threads(9, lambda k: watch(k) if k == 8 else load(k))
    status = s.admin.ListModels(apb.AdminListModelsRequest(), metadata=AUTH).models[0]
    assert status.canary_version == 0
    assert status.current_version == 1
    assert "rolled back automatically" in status.rollout_note
    assert server.sample("mnist_canary_rollbacks_total",
                         {"model": "mnist", "reason": "disagreement"}) + server.sample(
        "mnist_canary_rollbacks_total", {"model": "mnist", "reason": "divergence"}) == 1
    # Judged on its first window: the canary answered about one window, not more than two.
    assert window <= answers[3] <= 2 * window, answers
    assert answers[1] > answers[3]
    assert {s.classify(i).version for i in range(100)} == {1}  # out of traffic


def test_a_canary_whose_requests_fail_is_rolled_back_for_its_error_rate(
    repo: Path, tmp_path: Path
) -> None:
    """The error-rate signal, through the monitor's injected request counts (a real registry
    and real forwards; only the count of failed requests is supplied: a loaded version's
    forward cannot be made to fail from outside)."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from service.metrics import Metrics
    from service.promotion.monitor import PromotionMonitor, Thresholds
    from service.registry import ModelRegistry

    failed = {"errors": 0.0, "total": 0.0}

    async def go() -> None:
        metrics = Metrics(CollectorRegistry())
        registry = ModelRegistry(repo, metrics, rescan_interval_s=0)
        await registry.start()
        await registry.set_current_version("mnist", 1, hold=True)
        await registry.set_canary("mnist", 2, 50)
        monitor = PromotionMonitor(
            registry, metrics, thresholds=Thresholds(64, 0.05, 1.0, 1.0),
            errors=lambda model, version: (failed["errors"], failed["total"]),
        )
        try:
            x = pixels_to_input(IMAGES)
            current, canary = registry.resolve("mnist", 1), registry.resolve("mnist", 2)
            failed["total"] += 100  # the window opens at 0 / 100
            monitor.observe(current, x, current.model.predict(x))
            failed["errors"], failed["total"] = 10.0, 200.0  # 10 of the next 100 failed
            monitor.observe(canary, x, canary.model.predict(x))  # 64 images: judged
            for _ in range(100):
                if registry.canary_of("mnist") is None:
                    break
                await asyncio.sleep(0.02)
            status = registry.model_status("mnist")
            assert status.canary_version == 0
            assert "error rate 0.100 > 0.05 over 100 requests" in status.rollout_note
            assert metrics.registry.get_sample_value(
                "mnist_canary_rollbacks_total", {"model": "mnist", "reason": "errors"}) == 1
        finally:
            monitor.close()
            await registry.close()

    asyncio.run(go())


def test_the_client_library_and_cli_send_the_routing_key(
    repo: Path, start: Callable[..., ServerThread], stubs_for: Callable[[ServerThread], Stubs],
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from mnist_client.client import ClassifierClient

    server = serve(start, repo, **QUIET)
    s = stubs_for(server)
    s.hold(1)
    s.canary(2, 50)
    keys = [f"k{i}" for i in range(40)]
    expected = {k: s.classify(0, routing_key=k).version for k in keys}
    assert set(expected.values()) == {1, 2}
    with ClassifierClient(server.target) as client:
        for k in keys:
            assert client.classify(IMAGES[:1], routing_key=k).version == expected[k]
    image = tmp_path / "digit.npy"
    np.save(image, IMAGES[:1].reshape(1, 28, 28))
    for k in keys[:10]:
        assert client_main(["--target", server.target, "--json", "--routing-key", k,
                            "classify", str(image)]) == 0
        assert f'"version": {expected[k]}' in capsys.readouterr().out
