"""Every Prometheus metric of the service (docs/metrics.md lists them).

- definitions.py   names, help, labels and buckets of every metric
- counts.py        the counts the service keeps itself (plain numbers, NumPy bucket arrays)
- recording.py     `Metrics`: what the service calls on the request path; records into counts
- lifecycle.py     model-lifecycle metrics (prometheus_client objects)
- version_stats.py per-version counts in Triton's terms (ModelStatistics)
- collector.py     a custom Collector emitting metric families from the counts at scrape time
- multiprocess.py  `--workers N`: per-worker count snapshots summed by the supervisor
- exporter.py      the /metrics HTTP endpoint (404 on any other path)
"""

from service.metrics.definitions import (
    BATCH_ROWS_BUCKETS,
    CONFIDENCE_BUCKETS,
    LATENCY_BUCKETS_S,
    LOAD_BUCKETS_S,
    NUM_CLASSES,
    UNKNOWN,
)
from service.metrics.exporter import (
    EXPORTER_PID_ENV,
    Exporter,
    exposition_registry,
    serve_metrics,
    start_exporter,
)
from service.metrics.multiprocess import (
    MULTIPROC_ENV,
    multiprocess_dir,
    prepare_multiprocess,
    worker_exited,
)
from service.metrics.recording import Metrics

__all__ = [
    "BATCH_ROWS_BUCKETS",
    "CONFIDENCE_BUCKETS",
    "EXPORTER_PID_ENV",
    "LATENCY_BUCKETS_S",
    "LOAD_BUCKETS_S",
    "MULTIPROC_ENV",
    "NUM_CLASSES",
    "UNKNOWN",
    "Exporter",
    "Metrics",
    "exposition_registry",
    "multiprocess_dir",
    "prepare_multiprocess",
    "serve_metrics",
    "start_exporter",
    "worker_exited",
]
