"""What the service exports: every metric's name, help, labels and buckets, in one place.

Names are `mnist_<what>_<unit>` in base units (docs/metrics.md lists them). Two kinds:

- `HOT` families are recorded on the request path into counts the service keeps itself
  (service/metrics/recording.py) and emitted at scrape time by a custom collector
  (service/metrics/collector.py), the prometheus_client maintainers' advice for recording in
  bulk (client_python issues #279, #911, PR #1124: "better served with a custom collector").
- the model-lifecycle metrics (loads, versions, front end) change a few times a day and stay
  ordinary prometheus_client metrics, created in `lifecycle_metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# 100 microseconds to ~10 seconds, roughly x2.5 apart.
LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)
BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
LOAD_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
NUM_CLASSES = 10
CLASS_LABELS = tuple(str(c) for c in range(NUM_CLASSES))
# The model or version label of a request naming what this process never loaded.
UNKNOWN = "unknown"

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True, slots=True)
class Family:
    """One exported metric family. `name` is without the `_total` a counter's samples get."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


REQUESTS = Family(
    "mnist_requests", "counter", "RPCs finished, by method, model, version and gRPC code.",
    ("method", "model", "version", "code"),
)
IMAGES = Family(
    "mnist_images", "counter",
    "Images in finished RPCs, by method, model, version and gRPC code.",
    ("method", "model", "version", "code"),
)
REQUEST_DURATION = Family(
    "mnist_request_duration_seconds", "histogram",
    "RPC time from receipt to reply (end to end inside the server), by method and model.",
    ("method", "model"), LATENCY_BUCKETS_S,
)
QUEUE_WAIT = Family(
    "mnist_batch_queue_wait_seconds", "histogram", "Time a request waited in the batch queue.",
    ("model",), LATENCY_BUCKETS_S,
)
FORWARD_DURATION = Family(
    "mnist_forward_duration_seconds", "histogram", "Time of one batched forward pass.",
    ("model",), LATENCY_BUCKETS_S,
)
BATCH_ROWS = Family(
    "mnist_batch_rows", "histogram", "Images in one batched forward pass.",
    ("model",), BATCH_ROWS_BUCKETS,
)
PREDICTIONS = Family(
    "mnist_predictions", "counter", "Predicted class of each image answered, by version.",
    ("model", "version", "class"),
)
CONFIDENCE = Family(
    "mnist_prediction_confidence_ratio", "histogram",
    "Top-class probability of each image answered, by version.",
    ("model", "version"), CONFIDENCE_BUCKETS,
)
# Gauges of live state: summed over live workers in multiprocess mode.
INFLIGHT = Family("mnist_inflight_requests", "gauge", "RPCs being handled right now.")
QUEUE_ROWS = Family(
    "mnist_batch_queue_rows", "gauge", "Images waiting in the batch queue.", ("model",),
)
QUEUE_BYTES = Family(
    "mnist_batch_queue_bytes", "gauge",
    "Bytes charged by queued and in-flight requests (bounded by --max-queue-bytes).",
)
HOT = (REQUESTS, IMAGES, REQUEST_DURATION, QUEUE_WAIT, FORWARD_DURATION, BATCH_ROWS,
       PREDICTIONS, CONFIDENCE, INFLIGHT, QUEUE_ROWS, QUEUE_BYTES)
