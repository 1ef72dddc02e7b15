"""Triton's model statistics (v2 `ModelStatistics`, HTTP `/v2/models/{name}/stats`).

The numbers are the per-version counts the metrics recording keeps
(service/metrics/version_stats.py: one set of observations feeds Prometheus and these).
`statistics_dict` is a pure function to Triton's JSON shape (HTTP); `statistics_response` the
gRPC message; `versions_for` the registry lookup both share: name "" = every model, version
"" = every loaded version, else the named model, and version number or label, must be loaded
(else NotFound, as Triton answers for a model or version it does not serve).

Under --workers N each worker answers with its own counts (the call reaches one worker),
as Prometheus' per-process view would; with --no-metrics-enabled nothing is recorded and
every count is zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import json_format

from service.dataplane import oip_codec as tensors
from service.errors import NotFound
from service.metrics.version_stats import Duration, VersionStats
from service.pb.inference import grpc_service_pb2 as pb
from service.registry import ModelRegistry, VersionState

_ZERO = {"count": 0, "ns": 0}


def _d(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def version_dict(name: str, version: int, stats: VersionStats | None) -> dict[str, Any]:
    """One version's ModelStatistics as Triton's JSON (zeros before its first request)."""
    s = stats or VersionStats()
    return {
        "name": name,
        "version": str(version),
        "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": _d(s.success), "fail": _d(s.fail), "queue": _d(s.queue),
            "compute_input": dict(_ZERO), "compute_infer": _d(s.compute_infer),
            "compute_output": dict(_ZERO), "cache_hit": dict(_ZERO), "cache_miss": dict(_ZERO),
        },
        "batch_stats": [
            {"batch_size": size, "compute_input": dict(_ZERO), "compute_infer": _d(b),
             "compute_output": dict(_ZERO)}
            for size, b in sorted(s.batches.items())
        ],
        "memory_usage": [],
    }


def statistics_dict(stats: Mapping[tuple[str, int], VersionStats],
                    versions: Sequence[tuple[str, int]]) -> dict[str, Any]:
    """{"model_stats": [...]} for the given (model, version) pairs, in that order."""
    return {"model_stats": [version_dict(n, v, stats.get((n, v))) for n, v in versions]}


def versions_for(registry: ModelRegistry, name: str, version: str) -> list[tuple[str, int]]:
    """The loaded (model, version) pairs a statistics request names."""
    loaded = {
        m.name: sorted(v.version for v in m.versions if v.state is VersionState.AVAILABLE)
        for m in registry.status()
    }
    if not name:
        if version:
            raise NotFound(f"a version ({version!r}) needs a model name")
        return [(n, v) for n in sorted(loaded) for v in loaded[n]]
    if name not in loaded or not loaded[name]:
        raise NotFound(f"unknown model {name!r}; served models: "
                       f"{sorted(n for n, vs in loaded.items() if vs)}")
    if not version:
        return [(name, v) for v in loaded[name]]
    number, label = tensors.parse_version(version)
    sv = registry.resolve(name, number, label)  # NotFound for a version or label not loaded
    return [(sv.name, sv.version)]


def statistics_response(registry: ModelRegistry,
                        stats: Mapping[tuple[str, int], VersionStats],
                        request: pb.ModelStatisticsRequest) -> pb.ModelStatisticsResponse:
    versions = versions_for(registry, request.name, request.version)
    reply = pb.ModelStatisticsResponse()
    json_format.ParseDict(statistics_dict(stats, versions), reply)
    return reply
