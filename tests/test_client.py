"""The Python client and mnist-client against a real server; MNIST-style image preprocessing."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from support.numerics import assert_probabilities
from support.procs import free_port
from support.servers import ServerThread, make_model

from mnist_client.cli import main
from mnist_client.client import ClassifierClient, ClientError
from mnist_client.images import preprocess
from service.model import pixels_to_input


def digits(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def write_idx_images(path: Path, images: np.ndarray) -> None:
    header = struct.pack(">BBBBIII", 0, 0, 8, 3, *images.shape)
    data = header + images.tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    data = struct.pack(">BBBBI", 0, 0, 8, 1, len(labels)) + labels.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_client_classify_uint8_and_float(server: ServerThread) -> None:
    model = make_model(seed=1)
    images = digits(3)
    with ClassifierClient(server.target) as client:
        r = client.classify(images)
        f = client.classify(images.astype(np.float64) / 255.0)
    expected = model.predict(pixels_to_input(images))
    assert_probabilities(r.probabilities, model, pixels_to_input(images))
    assert_probabilities(f.probabilities, model, pixels_to_input(images))
    assert r.labels.tolist() == expected.argmax(axis=1).tolist()
    assert (r.model, r.version) == ("mnist", 1)


def test_client_models_and_errors(server: ServerThread) -> None:
    with ClassifierClient(server.target) as client:
        assert [m.name for m in client.models()] == ["mnist"]
        assert client.model_info().current_version == 1
        with pytest.raises(ClientError, match="NOT_FOUND: unknown model 'x'"):
            client.classify(digits(1), model="x")
        with pytest.raises(ClientError, match=r"multiple of 784 pixels .* shape \(5,\)"):
            client.classify(np.zeros(5, np.uint8))


def test_client_server_down_is_one_clear_error() -> None:
    target = f"127.0.0.1:{free_port()}"
    with ClassifierClient(target, timeout_s=3) as client, \
            pytest.raises(ClientError, match=f"cannot reach server at {target}"):
        client.classify(digits(1))


def test_cli_classify_npy_idx_and_png(server: ServerThread, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    model = make_model(seed=1)
    images = digits(2, seed=5)
    np.save(tmp_path / "two.npy", images)
    write_idx_images(tmp_path / "t-idx3-ubyte.gz", images)
    canvas = np.full((60, 40), 250, np.uint8)
    canvas[10:50, 15:22] = 10  # a dark "1" on white paper
    Image.fromarray(canvas).save(tmp_path / "one.png")

    assert main(["--target", server.target, "classify", str(tmp_path / "one.png")]) == 0
    line = capsys.readouterr().out.strip()
    expected_png = model.predict(pixels_to_input(preprocess(canvas)))[0]
    assert line == (f"{int(expected_png.argmax())} ({expected_png.max():.3f})  "
                    "model mnist version 1")

    assert main(["--target", server.target, "--json", "classify", str(tmp_path / "two.npy"),
                 str(tmp_path / "t-idx3-ubyte.gz")]) == 0
    rows = json.loads(capsys.readouterr().out)
    expected = model.predict(pixels_to_input(images)).argmax(axis=1).tolist()
    assert [r["label"] for r in rows] == expected * 2
    assert [r["index"] for r in rows] == [0, 1, 0, 1]


def test_cli_errors_name_the_problem(server: ServerThread, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "notes.png"
    bogus.write_text("not really a png")
    assert main(["--target", server.target, "classify", str(bogus)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mnist-client: {bogus}: not an image")
    assert len(err.strip().splitlines()) == 1
    down = f"127.0.0.1:{free_port()}"
    np.save(tmp_path / "x.npy", digits(1))
    assert main(["--target", down, "--timeout-s", "3", "classify", str(tmp_path / "x.npy")]) == 1
    assert f"cannot reach server at {down}" in capsys.readouterr().err
    assert main(["--target", server.target, "classify", str(tmp_path / "missing.npy")]) == 1
    assert "missing.npy: cannot read" in capsys.readouterr().err


def test_cli_eval_and_models(server: ServerThread, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    model = make_model(seed=1)
    images = digits(1000, seed=2)
    predicted = model.predict(pixels_to_input(images)).argmax(axis=1)
    labels = predicted.copy()
    labels[:100] = (labels[:100] + 1) % 10  # exactly 900 right
    write_idx_images(tmp_path / "t10k-images-idx3-ubyte", images)
    write_idx_labels(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    assert main(["--target", server.target, "--json", "eval", "--data-dir", str(tmp_path),
                 "--batch-size", "64", "--concurrency", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["correct"] == 900
    assert summary["accuracy"] == pytest.approx(0.9)
    assert summary["requests"] == 16
    assert summary["models"] == ["mnist version 1"]
    assert main(["--target", server.target, "models"]) == 0
    out = capsys.readouterr().out
    assert "mnist  current 1  labels -  test_accuracy 0.5000" in out
    assert "version 1  AVAILABLE" in out


def test_preprocess_is_mnist_style() -> None:
    canvas = np.full((200, 300), 230, np.uint8)  # light paper
    canvas[20:120, 200:230] = 20  # dark stroke, far from the centre, 100x30
    out = preprocess(canvas)
    assert out.shape == (28, 28)
    assert out.dtype == np.uint8
    assert out[0].max() == 0  # background is black
    assert out.max() > 200  # ink is white
    ys, xs = np.nonzero(out > 25)
    assert xs.max() - xs.min() + 1 <= 12  # the 100x30 stroke keeps its aspect ratio
    assert ys.max() - ys.min() + 1 <= 21  # fits the 20x20 box (+1 for resampling fringe)
    assert ys.max() - ys.min() + 1 >= 18  # and is scaled up to it along the long side
    mass = out.astype(np.float64)
    cy = (np.indices(out.shape)[0] * mass).sum() / mass.sum()
    cx = (np.indices(out.shape)[1] * mass).sum() / mass.sum()
    assert abs(cy - 13.5) <= 1.0
    assert abs(cx - 13.5) <= 1.0
