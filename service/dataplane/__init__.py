"""The one request path every front end adapts to (docs/architecture.md, "The data plane").

Per API a pipeline (`ClassifyPipeline`, `InferPipeline`): parse + validate + resolve -> `Job`,
`Job.encode(prediction)` -> reply bytes; `DataPlane` runs a job against the batcher on the
event loop (`call`) or as a front end's fast lane (`fast_method`); `RequestScope` does the
accounting of every request, whatever served it. Nothing here imports a front end.
"""

from service.dataplane.classify import ClassifyJob, ClassifyPipeline
from service.dataplane.infer import InferJob, InferPipeline, InferRequest, grpc_encoder
from service.dataplane.job import Job, Pipeline, Responder
from service.dataplane.plane import DataPlane, FastGate, FastHandler, FastMethod
from service.dataplane.scope import RequestMetrics, RequestScope

__all__ = [
    "ClassifyJob", "ClassifyPipeline", "DataPlane", "FastGate", "FastHandler", "FastMethod",
    "InferJob", "InferPipeline", "InferRequest", "Job", "Pipeline", "RequestMetrics",
    "RequestScope", "Responder", "grpc_encoder",
]
