"""Runs in .tools/triton-venv (tritonclient[http]), never in the project's venv.

    python http_triton_client.py HOST:PORT IN.npz OUT.npz OUT.json [IMAGE ...]

Drives the REST endpoint with the unmodified Triton HTTP client and records what it saw;
tests/test_http_triton.py starts the server, runs this and checks the record against
Model.predict. Everything recorded is plain data, so the checks live in the test.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np


def main(target: str, in_path: str, out_npz: str, out_json: str, *image_paths: str) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    data = np.load(in_path)
    x, pixels = data["x"], data["pixels"]
    client = httpclient.InferenceServerClient(url=target)
    seen: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("mnist"),
        "v1_ready": client.is_model_ready("mnist", "1"),
        "v9_ready": client.is_model_ready("mnist", "9"),
        "server_metadata": client.get_server_metadata(),
        "model_metadata": client.get_model_metadata("mnist"),
        "index": client.get_model_repository_index(),
    }
    arrays: dict[str, np.ndarray] = {}

    def infer(key: str, array: np.ndarray, datatype: str, binary: bool,
              version: str = "", outputs: Any = None) -> None:
        inp = httpclient.InferInput("images", list(array.shape), datatype)
        inp.set_data_from_numpy(array, binary_data=binary)
        result = client.infer("mnist", [inp], model_version=version, outputs=outputs,
                              request_id=key)
        response = result.get_response()
        seen[key] = {"version": response["model_version"], "id": response.get("id", ""),
                     "outputs": [o["name"] for o in response["outputs"]]}
        for name in ("probabilities", "predicted_class"):
            value = result.as_numpy(name)
            if value is not None:
                arrays[f"{key}.{name}"] = value

    infer("fp32_binary", x, "FP32", True)
    infer("fp32_json", x, "FP32", False)
    infer("uint8_binary_v1", pixels, "UINT8", True, version="1")
    infer("uint8_json", pixels.reshape(-1, 784), "UINT8", False)
    infer("json_outputs", x, "FP32", True, outputs=[
        httpclient.InferRequestedOutput("predicted_class", binary_data=False)])
    # Encoded image files as Triton's image clients send them: a BYTES tensor of np.object_
    # bytes, binary_data=True (Triton's length-prefixed layout after the JSON header).
    files = []
    for path in image_paths:
        with open(path, "rb") as f:
            files.append(f.read())
    infer("images_binary", np.array(files, dtype=np.object_), "BYTES", True)
    infer("images_binary_n1", np.array(files, dtype=np.object_).reshape(-1, 1), "BYTES", True,
          version="1")

    def error(key: str, call: Any) -> None:
        try:
            call()
        except InferenceServerException as e:
            seen[key] = {"status": str(e.status()), "message": e.message()}
        else:
            seen[key] = {"status": "no error", "message": ""}

    def bad_infer(model: str, array: np.ndarray, datatype: str, binary: bool = True) -> Any:
        inp = httpclient.InferInput("images", list(array.shape), datatype)
        inp.set_data_from_numpy(array, binary_data=binary)
        return lambda: client.infer(model, [inp])

    error("err_unknown_model", bad_infer("fashion", x, "FP32"))
    error("err_shape", bad_infer("mnist", x[:, :700].copy(), "FP32"))
    error("err_range", bad_infer("mnist", x * 3, "FP32"))
    error("err_bytes", bad_infer("mnist", np.array([b"\x89PNG"], dtype=np.object_), "BYTES"))
    error("err_bytes_json", bad_infer("mnist", np.array([b"abc"], dtype=np.object_), "BYTES",
                                      binary=False))
    try:  # the client itself refuses an image's bytes in JSON: they are not UTF-8
        bad_infer("mnist", np.array(files[:1], dtype=np.object_), "BYTES", binary=False)
    except Exception as e:  # InferenceServerException (its raise_error), never sent
        seen["err_image_json_client"] = {"status": "client", "message": str(e)}
    else:
        seen["err_image_json_client"] = {"status": "sent", "message": ""}
    error("err_fp64", bad_infer("mnist", x.astype(np.float64), "FP64"))
    seen["config"] = client.get_model_config("mnist")
    seen["stats"] = client.get_inference_statistics("mnist")
    error("err_config", lambda: client.get_model_config("fashion"))
    error("err_metadata", lambda: client.get_model_metadata("fashion"))
    np.savez(out_npz, **arrays)
    with open(out_json, "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
