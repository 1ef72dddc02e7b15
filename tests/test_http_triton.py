"""Interoperability proof: the unmodified Triton HTTP client (tritonclient[http]) against our
REST endpoint, with JSON and binary tensors, as tests/test_oip_triton.py does for gRPC.

The client runs in its own venv (.tools/triton-venv, scripts/install-test-tools.sh) as a
subprocess (tests/support/http_triton_client.py) against the real server on 127.0.0.1; its answers
are compared here with Model.predict on the same inputs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from support.numerics import assert_probabilities
from support.procs import free_port
from support.servers import ServerThread, make_model, write_version
from support.triton import run_client

from mnist_client.images import load_image
from service.model import Model, pixels_to_input

ROOT = Path(__file__).resolve().parent.parent



def test_triton_http_client(triton_python: Path, tmp_path: Path,
                            start: Callable[..., ServerThread]) -> None:
    models: dict[int, Model] = {1: make_model(seed=1), 2: make_model(seed=2)}
    repo = tmp_path / "models"
    for v, m in models.items():
        write_version(repo, "mnist", v, m)
    server = start(repo, version_policy="latest:2", http_port=free_port())
    rng = np.random.default_rng(11)
    x = rng.random((3, 784), dtype=np.float32)
    pixels = rng.integers(0, 256, (2, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", x=x, pixels=pixels)
    files = [ROOT / "docs" / "examples" / f"digit-{d}.png" for d in (7, 2, 1)]
    run_client(triton_python, "http_triton_client.py", f"127.0.0.1:{server.settings.http_port}",
               str(tmp_path / "in.npz"), str(tmp_path / "out.npz"), str(tmp_path / "out.json"),
               *map(str, files))
    seen = json.loads((tmp_path / "out.json").read_text())
    got = dict(np.load(tmp_path / "out.npz"))

    assert (seen["live"], seen["ready"], seen["model_ready"], seen["v1_ready"]) == (
        True, True, True, True)
    assert seen["v9_ready"] is False
    assert seen["server_metadata"]["name"] == "mnist-serving"
    assert seen["model_metadata"]["versions"] == ["1", "2"]
    assert seen["model_metadata"]["inputs"][0]["shape"] == [-1, 784]
    assert {(m["name"], m["version"], m["state"]) for m in seen["index"]} == {
        ("mnist", "1", "READY"), ("mnist", "2", "READY")}

    for key in ("fp32_binary", "fp32_json"):
        assert seen[key]["version"] == "2"
        assert seen[key]["id"] == key
        assert_probabilities(got[f"{key}.probabilities"], models[2], x)
        assert got[f"{key}.predicted_class"].tolist() == (
            got[f"{key}.probabilities"].argmax(axis=1).tolist())
    rows = pixels_to_input(pixels.reshape(2, 784))
    assert seen["uint8_binary_v1"]["version"] == "1"
    assert_probabilities(got["uint8_binary_v1.probabilities"], models[1], rows)
    assert_probabilities(got["uint8_json.probabilities"], models[2], rows)
    assert seen["json_outputs"]["outputs"] == ["predicted_class"]
    assert got["json_outputs.predicted_class"].tolist() == (
        got["fp32_binary.predicted_class"].tolist())

    # Encoded images: the answer of the CLI's own pixels for the same files.
    image_rows = pixels_to_input(np.stack([load_image(f) for f in files]))
    assert seen["images_binary"]["version"] == "2"
    assert_probabilities(got["images_binary.probabilities"], models[2], image_rows)
    assert seen["images_binary_n1"]["version"] == "1"
    assert_probabilities(got["images_binary_n1.probabilities"], models[1], image_rows)
    assert got["images_binary.predicted_class"].tolist() == (
        models[2].predict(image_rows).argmax(axis=1).tolist())
    assert seen["err_image_json_client"]["status"] == "client"
    assert "binary_data=True" in seen["err_image_json_client"]["message"]

    expected = {
        "err_unknown_model": ("404", "unknown model 'fashion'"),
        "err_shape": ("400", "expected shape [N, 784]"),
        "err_range": ("400", "expected finite float32 pixels in 0.0..1.0"),
        "err_bytes": ("400", "image 0: not an image (4 bytes"),
        "err_bytes_json": ("400", 'input parameter "content_type": "base64"'),
        "err_fp64": ("400", "got 'FP64'"),
        "err_config": ("404", "unknown model 'fashion'"),
        "err_metadata": ("404", "unknown model 'fashion'"),
    }
    assert seen["config"]["config"]["name"] == "mnist"
    assert seen["config"]["config"]["max_batch_size"] > 0
    versions = {s["version"]: s for s in seen["stats"]["model_stats"]}
    assert set(versions) == {"1", "2"}
    assert int(versions["2"]["inference_count"]) >= 4  # the fp32 requests above
    for key, (status, fragment) in expected.items():
        assert seen[key]["status"] == status, (key, seen[key])
        assert fragment in seen[key]["message"], (key, seen[key])
