"""Runs in .tools/triton-venv (tritonclient + protobuf<7), never in the project's venv.

    python oip_triton_client.py descriptor OUT.json
        what tritonclient's own compiled grpc_service.proto declares (proto_shape.py)
    python oip_triton_client.py drive HOST:PORT IN.npz OUT.npz TOKEN
        drive the server with the unmodified Triton gRPC client; record what it saw

tests/test_oip_triton.py starts the server, runs this as a subprocess and checks the results
against Model.predict. Everything recorded is plain data (arrays, strings, bools), so the
checks live in the test, not here.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
from proto_shape import proto_shape  # beside this script


def descriptor(out_path: str) -> None:
    from tritonclient.grpc import service_pb2

    with open(out_path, "w") as f:
        json.dump(proto_shape(service_pb2.DESCRIPTOR), f)


def drive(target: str, in_path: str, out_path: str, token: str) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    data = np.load(in_path)
    x, pixels = data["x"], data["pixels"]
    client = grpcclient.InferenceServerClient(url=target)
    out: dict[str, Any] = {}
    facts: dict[str, Any] = {}

    def infer(name: str, array: np.ndarray, datatype: str, version: str = "",
              outputs: list[str] | None = None, model: str = "mnist") -> None:
        inp = grpcclient.InferInput("images", list(array.shape), datatype)
        inp.set_data_from_numpy(array)
        requested = [grpcclient.InferRequestedOutput(o) for o in outputs] if outputs else None
        result = client.infer(model, [inp], model_version=version, outputs=requested,
                              request_id=name, client_timeout=30)
        response = result.get_response()
        facts[name] = {
            "model_version": response.model_version,
            "id": response.id,
            "outputs": [o.name for o in response.outputs],
        }
        for o in response.outputs:
            out[f"{name}/{o.name}"] = result.as_numpy(o.name)

    def error(name: str, call: Any) -> None:
        try:
            call()
            facts[name] = {"status": "OK", "message": ""}
        except InferenceServerException as e:
            facts[name] = {"status": str(e.status()), "message": str(e.message())}

    facts["live"] = client.is_server_live()
    facts["ready"] = client.is_server_ready()
    facts["model_ready"] = client.is_model_ready("mnist")
    facts["model_ready_v1"] = client.is_model_ready("mnist", "1")
    facts["model_ready_unknown"] = client.is_model_ready("fashion")
    facts["server_metadata"] = client.get_server_metadata(as_json=True)
    facts["model_metadata"] = client.get_model_metadata("mnist", as_json=True)
    facts["repository_index"] = client.get_model_repository_index(as_json=True)

    infer("fp32", x, "FP32")
    infer("uint8", pixels, "UINT8")
    infer("fp32_v1", x, "FP32", version="1")
    infer("only_class", x, "FP32", outputs=["predicted_class"])

    bad_shape = np.zeros((2, 783), np.float32)
    error("unknown_model", lambda: infer("e1", x, "FP32", model="fashion"))
    error("unknown_version", lambda: infer("e2", x, "FP32", version="9"))
    error("bad_shape", lambda: infer("e3", bad_shape, "FP32"))
    error("bad_datatype", lambda: infer("e4", x.astype(np.float64), "FP64"))
    error("bad_range", lambda: infer("e5", x * 2 + 1, "FP32"))
    error("unknown_output", lambda: infer("e6", x, "FP32", outputs=["logits"]))
    error("load_no_token", lambda: client.load_model("mnist"))
    auth = {"authorization": f"Bearer {token}"}
    error("load_with_token", lambda: client.load_model("mnist", headers=auth))
    error("unload_whole_model", lambda: client.unload_model("mnist", headers=auth))
    # After every error, the server still answers.
    infer("after_errors", x, "FP32")
    client.close()

    out["facts"] = np.frombuffer(json.dumps(facts).encode(), dtype=np.uint8)
    np.savez(out_path, **out)


if __name__ == "__main__":
    if sys.argv[1] == "descriptor":
        descriptor(sys.argv[2])
    else:
        drive(*sys.argv[2:6])
