"""Triton's model configuration (v2 `ModelConfig`, HTTP `/v2/models/{name}/config`).

Pure functions from what the server knows (a model name, its version policy, the batching
settings) to Triton's `ModelConfig`: as a dict in Triton's JSON shape for the HTTP endpoint,
or as the protobuf message for gRPC. `config_for` adds the one registry lookup both share
(unknown model or version: the same errors, hence statuses, as ModelMetadata).

What is said, and why it is honest:
- platform `numpy_mlp` (the platform ModelMetadata reports) and backend `numpy`: the forward
  pass is a NumPy MLP on the CPU, one instance (`instance_group` KIND_CPU, count 1);
- `max_batch_size`: the images one request may carry (--max-images-per-request); dims are per
  image, as Triton's are when max_batch_size > 0: input `images` FP32 [784] (UINT8 is accepted
  too, the config names the canonical type), outputs `probabilities` FP32 [10] and
  `predicted_class` INT64 [1] reshaped to a scalar per image;
- `dynamic_batching` only with --batching: requests are joined until --max-batch-rows rows
  (the preferred size) or --max-batch-wait-s (the queue delay);
- `version_policy`: the model's policy (--version-policy): latest:N or specific.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format

from service.config import Settings
from service.dataplane import oip_codec as tensors
from service.model import INPUT_SIZE, NUM_CLASSES
from service.pb.inference import grpc_service_pb2 as pb
from service.pb.inference import model_config_pb2 as mc
from service.registry import ModelRegistry
from service.registry.version_policy import VersionPolicy, parse_policy

BACKEND = "numpy"


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    """The settings the configuration reports, and nothing else of Settings."""

    max_batch_size: int
    dynamic: bool
    preferred_batch_size: int
    max_queue_delay_us: int

    @classmethod
    def from_settings(cls, settings: Settings) -> BatchingConfig:
        return cls(
            max_batch_size=settings.max_images_per_request,
            dynamic=settings.batching,
            preferred_batch_size=settings.max_batch_rows,
            max_queue_delay_us=round(settings.max_batch_wait_s * 1_000_000),
        )


def _policy(policy: VersionPolicy) -> dict[str, Any]:
    if policy.kind == "specific":
        return {"specific": {"versions": sorted(policy.versions)}}
    return {"latest": {"num_versions": policy.count}}


def model_config_dict(name: str, policy: VersionPolicy, batching: BatchingConfig) -> dict[str, Any]:
    """Triton's ModelConfig as JSON (field names and enum names as Triton's HTTP API has them)."""
    config: dict[str, Any] = {
        "name": name,
        "platform": tensors.PLATFORM,
        "backend": BACKEND,
        "version_policy": _policy(policy),
        "max_batch_size": batching.max_batch_size,
        "input": [{
            "name": tensors.INPUT_NAME, "data_type": "TYPE_FP32", "format": "FORMAT_NONE",
            "dims": [INPUT_SIZE],
        }],
        "output": [
            {"name": tensors.PROBABILITIES, "data_type": "TYPE_FP32", "dims": [NUM_CLASSES]},
            {"name": tensors.PREDICTED_CLASS, "data_type": "TYPE_INT64", "dims": [1],
             "reshape": {"shape": []}},
        ],
        "instance_group": [{"name": name, "kind": "KIND_CPU", "count": 1}],
    }
    if batching.dynamic:
        config["dynamic_batching"] = {
            "preferred_batch_size": [batching.preferred_batch_size],
            "max_queue_delay_microseconds": batching.max_queue_delay_us,
            "preserve_ordering": False,
        }
    return config


def model_config(name: str, policy: VersionPolicy, batching: BatchingConfig) -> mc.ModelConfig:
    """The same as a protobuf message."""
    message = mc.ModelConfig()
    json_format.ParseDict(model_config_dict(name, policy, batching), message)
    return message


def config_for(registry: ModelRegistry, batching: BatchingConfig, name: str,
               version: str) -> dict[str, Any]:
    """The config of a served model (`version` "" / a number / a label must be loaded)."""
    number, label = tensors.parse_version(version)
    sv = registry.resolve(name, number, label)  # NotFound / Unavailable as ModelMetadata
    policy = next((parse_policy(m.policy) for m in registry.status() if m.name == sv.name),
                  VersionPolicy())
    return model_config_dict(sv.name, policy, batching)


def model_config_response(registry: ModelRegistry, batching: BatchingConfig,
                          request: pb.ModelConfigRequest) -> pb.ModelConfigResponse:
    reply = pb.ModelConfigResponse()
    json_format.ParseDict(config_for(registry, batching, request.name, request.version),
                          reply.config)
    return reply
