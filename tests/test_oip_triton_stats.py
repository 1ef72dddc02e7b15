"""Triton's ModelConfig and ModelStatistics (issue 13 §3), checked with the unmodified Triton
gRPC client (tritonclient, in .tools/triton-venv) against a real server on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.proto_shape import proto_shape
from support.servers import ServerThread, make_model, write_version
from support.triton import run_client

from service.api.oip_config import BatchingConfig, model_config, model_config_dict
from service.api.oip_statistics import statistics_dict
from service.metrics.version_stats import VersionStats
from service.pb.inference import model_config_pb2 as mc
from service.registry.version_policy import VersionPolicy

ROOT = Path(__file__).resolve().parent.parent




def test_our_model_config_is_wire_compatible_with_tritons(
    triton_python: Path, tmp_path: Path
) -> None:
    """Every field of our model_config.proto has Triton's number, type and cardinality."""
    out = tmp_path / "triton.json"
    run_client(triton_python, "oip_triton_stats_client.py", "descriptor", str(out))
    theirs = json.loads(out.read_text())
    ours = proto_shape(mc.DESCRIPTOR)
    for name, fields in ours["messages"].items():
        assert name in theirs["messages"], name
        for field, spec in fields.items():
            assert theirs["messages"][name].get(field) == spec, f"{name}.{field}"
    for enum, values in ours["enums"].items():
        assert values == theirs["enums"][enum], enum


def test_config_and_statistics_are_plain_functions_of_their_inputs() -> None:
    """What the HTTP endpoint calls: dicts in Triton's JSON shape, no server needed."""
    batching = BatchingConfig(max_batch_size=64, dynamic=False, preferred_batch_size=8,
                              max_queue_delay_us=500)
    config = model_config_dict("m", VersionPolicy("specific", 1, frozenset({3, 1})), batching)
    assert config["version_policy"] == {"specific": {"versions": [1, 3]}}
    assert "dynamic_batching" not in config  # --no-batching: no dynamic batcher to describe
    assert model_config("m", VersionPolicy(), batching).max_batch_size == 64
    s = VersionStats()
    s.batch_done(3, 0.002, [0.001, 0.003], 1234)
    s.batch_done(3, 0.004, [0.0], 1200)
    s.requests_done(True, [0.01, 0.02, 0.03])
    s.requests_done(False, [0.5])
    got = statistics_dict({("m", 2): s}, [("m", 2), ("m", 3)])["model_stats"]
    assert got[0]["inference_count"] == 6
    assert got[0]["execution_count"] == 2
    assert got[0]["last_inference"] == 1234
    assert got[0]["inference_stats"]["queue"] == {"count": 3, "ns": 4_000_000}
    assert got[0]["inference_stats"]["compute_infer"] == {"count": 3, "ns": 8_000_000}
    assert got[0]["inference_stats"]["success"] == {"count": 3, "ns": 60_000_000}
    assert got[0]["inference_stats"]["fail"] == {"count": 1, "ns": 500_000_000}
    assert got[0]["batch_stats"] == [{
        "batch_size": 3, "compute_input": {"count": 0, "ns": 0},
        "compute_infer": {"count": 2, "ns": 6_000_000}, "compute_output": {"count": 0, "ns": 0},
    }]
    assert got[1]["version"] == "3"
    assert got[1]["inference_count"] == 0  # loaded, never asked


def n(d: dict[str, Any], *path: str) -> int:
    """A uint64 of the client's JSON (a string there), 0 when proto3 left it out."""
    for p in path:
        d = d.get(p, {}) if isinstance(d, dict) else {}
    return int(d) if not isinstance(d, dict) else 0


@pytest.mark.slow
def test_triton_client_reads_config_and_statistics(
    triton_python: Path, tmp_path: Path, start: Callable[..., ServerThread]
) -> None:
    repo = tmp_path / "models"
    for v in (1, 2):
        write_version(repo, "mnist", v, make_model(seed=v))
    server = start(repo, version_policy="latest:2", max_batch_rows=32, max_batch_wait_s=0.004,
                   max_images_per_request=512, metrics_enabled=True)
    out = tmp_path / "facts.json"
    run_client(triton_python, "oip_triton_stats_client.py", "drive", server.target, str(out))
    facts = json.loads(out.read_text())

    config = facts["config"]["value"]["config"]
    assert config["name"] == "mnist"
    assert config["platform"] == "numpy_mlp"
    assert config["backend"] == "numpy"
    assert config["max_batch_size"] == 512
    assert config["version_policy"] == {"latest": {"num_versions": 2}}
    assert config["dynamic_batching"]["preferred_batch_size"] == [32]
    assert int(config["dynamic_batching"]["max_queue_delay_microseconds"]) == 4000
    assert config["input"] == [{"name": "images", "data_type": "TYPE_FP32", "dims": ["784"]}]
    assert [(o["name"], o["data_type"], o["dims"]) for o in config["output"]] == [
        ("probabilities", "TYPE_FP32", ["10"]), ("predicted_class", "TYPE_INT64", ["1"])]
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert facts["config_v1"]["value"]["config"]["name"] == "mnist"

    errors = {
        "config_unknown_model": ("NOT_FOUND", "unknown model 'fashion'"),
        "config_unknown_version": ("NOT_FOUND", "no loaded version 9"),
        "config_bad_version": ("INVALID_ARGUMENT", "model_version"),
        "stats_unknown_model": ("NOT_FOUND", "unknown model 'fashion'"),
        "stats_unknown_version": ("NOT_FOUND", "no loaded version 9"),
        "stats_version_without_model": ("NOT_FOUND", "needs a model name"),
        "stats_bad_version": ("INVALID_ARGUMENT", "model_version"),
        "bad_infer": ("INVALID_ARGUMENT", "0.0..1.0"),
    }
    for name, (status, fragment) in errors.items():
        assert facts[name]["status"] == status, (name, facts[name])
        assert fragment in facts[name]["message"], (name, facts[name])

    before = facts["stats_before"]["value"]["model_stats"]
    assert [(s["name"], s["version"]) for s in before] == [("mnist", "2")]
    assert n(before[0], "inference_count") == 0

    (v2,) = facts["stats_v2"]["value"]["model_stats"]
    assert (v2["name"], v2["version"]) == ("mnist", "2")
    assert n(v2, "inference_count") == 1 + 2 + 3
    executions = n(v2, "execution_count")
    assert 1 <= executions <= 3
    stats = v2["inference_stats"]
    assert n(stats, "success", "count") == 3
    assert n(stats, "success", "ns") > 0
    assert n(stats, "queue", "count") == 3
    assert n(stats, "compute_infer", "count") == 3
    assert 0 < n(stats, "compute_infer", "ns") <= n(stats, "success", "ns")
    batches = v2["batch_stats"]
    assert sum(n(b, "compute_infer", "count") for b in batches) == executions
    assert sum(n(b, "batch_size") * n(b, "compute_infer", "count") for b in batches) == 6
    assert facts["t0_ms"] <= n(v2, "last_inference") <= facts["t1_ms"] + 1000

    per_version = {s["version"]: s for s in facts["stats_model"]["value"]["model_stats"]}
    assert sorted(per_version) == ["1", "2"]
    assert n(per_version["1"], "inference_count") == 4
    assert n(per_version["1"], "inference_stats", "success", "count") == 1
    everything = facts["stats_all"]["value"]["model_stats"]
    assert sorted((s["name"], s["version"]) for s in everything) == [("mnist", "1"),
                                                                       ("mnist", "2")]
