"""Runs in .tools/triton-venv (tritonclient + protobuf<7), never in the project's venv.

    python oip_triton_stats_client.py descriptor OUT.json
        what tritonclient's own compiled model_config.proto declares (proto_shape.py)
    python oip_triton_stats_client.py drive HOST:PORT OUT.json
        Triton's ModelConfig and ModelStatistics through the unmodified gRPC client, around
        a known set of inference requests; records what it saw as JSON

tests/test_oip_triton_stats.py starts the server, runs this as a subprocess and checks the
results. Everything recorded is plain data, so the checks live in the test, not here.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
from proto_shape import proto_shape  # beside this script


def descriptor(out_path: str) -> None:
    from tritonclient.grpc import model_config_pb2

    with open(out_path, "w") as f:
        json.dump(proto_shape(model_config_pb2.DESCRIPTOR), f)


def drive(target: str, out_path: str) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url=target)
    facts: dict[str, Any] = {}

    def call(name: str, fn: Any) -> None:
        try:
            facts[name] = {"status": "OK", "value": fn()}
        except InferenceServerException as e:
            facts[name] = {"status": str(e.status()).removeprefix("StatusCode."),
                           "message": str(e.message())}

    def infer(images: int, version: str = "") -> None:
        x = np.full((images, 784), 0.5, np.float32)
        inp = grpcclient.InferInput("images", [images, 784], "FP32")
        inp.set_data_from_numpy(x)
        client.infer("mnist", [inp], model_version=version, client_timeout=30)

    call("config", lambda: client.get_model_config("mnist", as_json=True))
    call("config_v1", lambda: client.get_model_config("mnist", "1", as_json=True))
    call("config_unknown_model", lambda: client.get_model_config("fashion"))
    call("config_unknown_version", lambda: client.get_model_config("mnist", "9"))
    call("config_bad_version", lambda: client.get_model_config("mnist", " 1"))
    call("stats_before", lambda: client.get_inference_statistics("mnist", "2", as_json=True))

    facts["t0_ms"] = int(time.time() * 1000)
    for images in (1, 2, 3):
        infer(images)  # the current version, 2
    infer(4, version="1")
    bad = grpcclient.InferInput("images", [1, 784], "FP32")
    bad.set_data_from_numpy(np.full((1, 784), 7.0, np.float32))  # out of 0..1
    call("bad_infer", lambda: client.infer("mnist", [bad], model_version="2"))
    facts["t1_ms"] = int(time.time() * 1000)

    # The batcher records a batch right after answering it: wait for the last one.
    deadline = time.monotonic() + 10
    while True:
        got = client.get_inference_statistics("mnist", "2", as_json=True)
        if int(got["model_stats"][0].get("inference_count", 0)) >= 6 \
                or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    call("stats_v2", lambda: client.get_inference_statistics("mnist", "2", as_json=True))
    call("stats_model", lambda: client.get_inference_statistics("mnist", as_json=True))
    call("stats_all", lambda: client.get_inference_statistics(as_json=True))
    call("stats_unknown_model", lambda: client.get_inference_statistics("fashion"))
    call("stats_unknown_version", lambda: client.get_inference_statistics("mnist", "9"))
    call("stats_version_without_model", lambda: client.get_inference_statistics("", "1"))
    call("stats_bad_version", lambda: client.get_inference_statistics("mnist", "x" * 65))
    infer(1)  # and the server still serves
    client.close()
    with open(out_path, "w") as f:
        json.dump(facts, f)


if __name__ == "__main__":
    if sys.argv[1] == "descriptor":
        descriptor(sys.argv[2])
    else:
        drive(sys.argv[2], sys.argv[3])
