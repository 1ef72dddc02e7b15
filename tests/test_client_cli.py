"""mnist-client as a user runs it: inputs, streaming, progress, pipes, options, model cards.

Real servers on loopback (conftest), the CLI in-process where the terminal does not matter and
as a real subprocess where it does (stdin, a pty for stderr, a pipe closed by `head`).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from support.procs import free_port
from support.servers import ServerThread, make_model, write_version

from mnist_client.cli import main
from mnist_client.images import preprocess
from service.model import pixels_to_input

ROOT = Path(__file__).resolve().parents[1]
COMMITTED_MODELS = ROOT / "models"


def digits(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def expected_labels(images: np.ndarray) -> list[int]:
    return [int(x) for x in make_model(seed=1).predict(pixels_to_input(images)).argmax(axis=1)]


def idx_bytes(images: np.ndarray) -> bytes:
    n = len(images)
    return bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28)) + \
        images.tobytes()


def png_bytes(canvas: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(canvas).save(out, format="PNG")
    return out.getvalue()


def a_one() -> np.ndarray:
    canvas = np.full((60, 40), 250, np.uint8)
    canvas[10:50, 15:22] = 10  # a dark "1" on white paper
    return canvas


def cli(*argv: str, target: str, stdin: bytes = b"", stderr: int | None = subprocess.PIPE,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "mnist_client.cli", "--target", target, *argv],
        input=stdin, stdout=subprocess.PIPE, stderr=stderr, cwd=ROOT, timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def committed(start: Callable[..., ServerThread], tmp_path: Path) -> ServerThread:
    """A server on a copy of the committed default model (real trainer metadata)."""
    repo = tmp_path / "committed"
    shutil.copytree(COMMITTED_MODELS, repo)
    return start(repo)


# --- inputs: directories, globs, stdin


def test_classify_a_directory_and_a_glob(server: ServerThread, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    scans = tmp_path / "scans"
    (scans / "more").mkdir(parents=True)
    images = digits(3, seed=7)
    np.save(scans / "b.npy", images)
    (scans / "a.png").write_bytes(png_bytes(a_one()))
    (scans / "more" / "c-idx3-ubyte").write_bytes(idx_bytes(images[:1]))
    (scans / "notes.txt").write_text("not an input")  # skipped: not a format classify reads
    np.save(scans / ".hidden.npy", images)  # skipped: hidden
    assert main(["--target", server.target, "--json", "classify", str(scans)]) == 0
    rows = json.loads(capsys.readouterr().out)
    one = expected_labels(preprocess(a_one())[None])
    assert [(Path(r["file"]).relative_to(scans).as_posix(), r["index"], r["label"])
            for r in rows] == [
        ("a.png", 0, one[0]),
        *(("b.npy", i, label) for i, label in enumerate(expected_labels(images))),
        ("more/c-idx3-ubyte", 0, expected_labels(images[:1])[0]),
    ]
    # A quoted glob (the shell left it alone) is expanded by the client.
    assert main(["--target", server.target, "classify", str(tmp_path / "s*" / "*.npy")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in lines] == [f"{scans / 'b.npy'}[{i}]" for i in range(3)]
    assert main(["--target", server.target, "classify", str(tmp_path / "nothing-*.npy")]) == 1
    assert "nothing-*.npy: no file matches" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--target", server.target, "classify", str(empty)]) == 1
    assert f"{empty}: no image" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["png", "npy", "idx", "idx.gz"])
def test_classify_stdin(server: ServerThread, kind: str) -> None:
    images = digits(4, seed=3)
    buf = io.BytesIO()
    np.save(buf, images)
    data, labels = {
        "png": (png_bytes(a_one()), expected_labels(preprocess(a_one())[None])),
        "npy": (buf.getvalue(), expected_labels(images)),
        "idx": (idx_bytes(images), expected_labels(images)),
        "idx.gz": (gzip.compress(idx_bytes(images)), expected_labels(images)),
    }[kind]
    done = cli("--json", "classify", "-", target=server.target, stdin=data)
    assert done.returncode == 0, done.stderr.decode()
    rows = json.loads(done.stdout)
    assert [(r["file"], r["label"]) for r in rows] == [("-", label) for label in labels]


def test_stdin_that_is_no_image_is_one_error_line(server: ServerThread) -> None:
    done = cli("classify", "-", target=server.target, stdin=b"hello")
    assert done.returncode == 1
    [line] = done.stderr.decode().splitlines()
    assert line.startswith("mnist-client: -: not an image (5 bytes starting 68656c6c6f): expected")


# --- streaming, progress, pipes


def test_results_before_a_bad_input_are_printed_then_the_error(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "good.npy", digits(2))
    (tmp_path / "bad.png").write_text("no image")
    code = main(["--target", server.target, "--json", "classify", str(tmp_path / "good.npy"),
                 str(tmp_path / "bad.png"), str(tmp_path / "good.npy")])
    out, err = capsys.readouterr()
    assert code == 1
    assert f"{tmp_path / 'bad.png'}: not an image" in err
    assert out.count('"label"') == 2  # good.npy's answers came out before the error ...
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)  # ... and the array is left open: a partial answer never parses


def big_job(tmp_path: Path) -> Path:
    path = tmp_path / "many.npy"
    np.save(path, digits(300, seed=9))
    return path


def test_no_progress_when_stderr_is_not_a_terminal(server: ServerThread, tmp_path: Path) -> None:
    done = cli("classify", str(big_job(tmp_path)), "--batch-size", "50",
               target=server.target)
    assert done.returncode == 0
    assert done.stderr == b""
    assert len(done.stdout.splitlines()) == 300


def test_progress_on_a_terminal(server: ServerThread, tmp_path: Path) -> None:
    primary, secondary = os.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "mnist_client.cli", "--target", server.target, "classify",
             str(big_job(tmp_path)), "--batch-size", "50"],
            stdout=subprocess.PIPE, stderr=secondary, stdin=subprocess.DEVNULL, cwd=ROOT,
        )
        os.close(secondary)
        out, _ = process.communicate(timeout=120)
        shown = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the child closed its end and everything was read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(primary)
    assert process.returncode == 0
    assert len(out.splitlines()) == 300  # results on stdout, untouched by the bar
    assert b"300/300 images 100%" in shown
    assert shown.endswith(b"\r\x1b[K")  # and the bar is erased at the end
    no_bar = subprocess.run(
        [sys.executable, "-m", "mnist_client.cli", "--target", server.target, "--no-progress",
         "classify", str(big_job(tmp_path))], stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, cwd=ROOT, timeout=120)
    assert no_bar.stderr == b""


def test_a_closed_pipe_ends_quietly(server: ServerThread, tmp_path: Path) -> None:
    """`mnist-client classify ... | head -1`: one line, no BrokenPipeError traceback."""
    path = tmp_path / "lots.npy"
    np.save(path, digits(5000, seed=1))  # ~300 KB of output: far more than a pipe holds
    client = subprocess.Popen(
        [sys.executable, "-m", "mnist_client.cli", "--target", server.target, "classify",
         str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert client.stdout is not None
    assert client.stderr is not None
    head = subprocess.Popen(["head", "-1"], stdin=client.stdout, stdout=subprocess.PIPE)
    client.stdout.close()  # head holds the only read end now
    first, _ = head.communicate(timeout=120)
    err = client.stderr.read().decode()
    client.stderr.close()
    assert client.wait(timeout=120) == 1
    assert first.decode().startswith(f"{path}[0]  ")
    assert len(first.splitlines()) == 1
    assert err == "", err


# --- options


def test_global_options_after_the_command(server: ServerThread, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "x.npy", digits(2))
    assert main(["classify", str(tmp_path / "x.npy"), "--json", "--target", server.target,
                 "--timeout-s", "5"]) == 0
    assert [r["label"] for r in json.loads(capsys.readouterr().out)] == \
        expected_labels(digits(2))
    # Given before the command, a value is not reset by the command's parser.
    assert main(["--target", server.target, "--json", "models"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "mnist"
    assert main(["models", "--target", server.target]) == 0
    assert "mnist  current 1" in capsys.readouterr().out
    # The admin commands take them too (this server has no admin service: a clean refusal).
    assert main(["rescan", "--target", server.target, "--json", "--admin-token", "t"]) == 1
    assert "Rescan: UNIMPLEMENTED" in capsys.readouterr().err


def test_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["classify", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "images per request (default: 256)" in text
    assert "requests in flight (default: 4)" in text
    assert "per-request deadline, seconds (default: 30.0)" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "(default: 127.0.0.1:50051)" in " ".join(capsys.readouterr().out.split())


def test_mnist_target_sets_the_target(server: ServerThread) -> None:
    done = cli("models", target=server.target)  # --target given: the variable is overridden
    assert done.returncode == 0
    bare = subprocess.run(
        [sys.executable, "-m", "mnist_client.cli", "models"], capture_output=True,
        cwd=ROOT, timeout=120,
        env={**os.environ, "MNIST_TARGET": server.target})
    assert bare.returncode == 0, bare.stderr.decode()
    assert "mnist  current 1  labels -  test_accuracy 0.5000" in bare.stdout.decode()
    down = f"127.0.0.1:{free_port()}"
    failed = subprocess.run(
        [sys.executable, "-m", "mnist_client.cli", "--timeout-s", "3", "models"],
        capture_output=True, cwd=ROOT, timeout=120,
        env={**os.environ, "MNIST_TARGET": down})
    assert failed.returncode == 1
    assert f"cannot reach server at {down}" in failed.stderr.decode()


# --- models and show


def test_json_models_is_compact_and_full_on_request(
    committed: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--target", committed.target, "--json", "models"]) == 0
    out = capsys.readouterr().out
    assert len(out) < 1000, f"{len(out)} bytes for one version"
    [model] = json.loads(out)
    assert model["current_version"] == 1
    assert model["versions"] == [{"version": 1, "state": "AVAILABLE"}]
    assert model["training_metrics"]["test_accuracy"] == pytest.approx(0.9797)
    assert model["layer_sizes"] == [784, 128, 128, 10]
    assert main(["--target", committed.target, "--json", "models", "--full"]) == 0
    [full] = json.loads(capsys.readouterr().out)
    assert len(full["metadata"]["metrics"]["history"]) == 200  # an object, not a string
    assert full["metadata"]["training"]["optimizer"] == "adam"


def test_show_prints_a_model_card(committed: ServerThread,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", committed.target, "show", "mnist", "1"]) == 0
    card = capsys.readouterr().out
    assert card.startswith("mnist version 1 (current)\n")
    assert "architecture MLP 784-128-128-10, relu, relu -> softmax, 118,282 parameters" in card
    assert "5,000 training images, 4,500 train / 500 validation, 10,000 test images" in card
    assert "adam, learning rate 0.001 (cosine), batch 64, 200 epochs, best epoch 145" in card
    assert "accuracy     test 0.9797, validation 0.9860" in card
    assert "confusion matrix (10,000 images; rows: true class, columns: predicted)" in card
    rows = {line.split()[0]: line.split()[1:] for line in card.splitlines()[-10:]}
    assert rows["0"][0] == "969"
    assert rows["9"][9] == "967"
    assert main(["--target", committed.target, "show", "mnist", "2"]) == 1
    assert "mnist version 2 is not in the repository" in capsys.readouterr().err


def test_show_survives_odd_metadata(model_repo: Path, start: Callable[..., ServerThread],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Metadata comes from a model file: fields of the wrong type are left out, no traceback."""
    model = make_model(seed=2)
    meta = dict(model.metadata)
    meta["metrics"] = {"test_accuracy": "high", "confusion_matrix": [[1, 2], [3]],
                       "per_class_accuracy": [0.5]}
    meta["training"] = {"optimizer": {"odd": 1}, "learning_rate": "fast", "epochs_run": None,
                        "seed": [1]}
    meta["data"] = {"train_count": True, "test_count": "many"}
    from dataclasses import replace

    write_version(model_repo, "mnist", 2, replace(model, metadata=meta))
    server = start(model_repo)
    assert main(["--target", server.target, "show", "mnist"]) == 0
    card = capsys.readouterr().out
    assert card.startswith("mnist version 2 (current)\n")
    assert "confusion matrix: not recorded" in card
    assert "accuracy" not in card
    assert "training " not in card
    assert "optimizer" not in card
    assert "fast" not in card


# --- the README, followed as written


def readme_examples() -> list[tuple[str, str]]:
    """`mnist-client ...   # → output` lines of the README: command and what it prints."""
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^mnist-client (.+?)\s+# → (.+)$", text, flags=re.MULTILINE)


def test_readme_examples_print_what_the_readme_says(
    committed: ServerThread, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    examples = readme_examples()
    assert examples, "the README shows no `# → output` example"
    monkeypatch.chdir(ROOT)
    for command, shown in examples:
        assert main(["--target", committed.target, *shlex.split(command)]) == 0, command
        out = capsys.readouterr().out
        assert " ".join(out.split()) == " ".join(shown.split()), command


def test_a_second_server_on_a_busy_port_says_so_in_one_line(
    model_repo: Path, tmp_path: Path
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
        env["MNIST_HTTP_PORT"] = "0"  # only the port under test may be busy
        for flags, what in (
            (["--port", str(port), "--no-metrics-enabled"], f"--port 127.0.0.1:{port}"),
            (["--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", str(port)],
             f"--metrics-port 127.0.0.1:{port}"),
        ):
            done = subprocess.run(
                [sys.executable, "-m", "service", "--model-dir", str(model_repo),
                 "--host", "127.0.0.1", *flags], cwd=ROOT, env=env, timeout=120,
                capture_output=True)
            err = done.stderr.decode()
            assert done.returncode == 1, err
            assert "Traceback" not in err
            assert err.splitlines()[-1] == (
                f"mnist-serve: cannot listen: {what} already in use by another process: stop "
                "it or choose another port")


def test_a_host_that_cannot_be_listened_on_says_so_in_one_line(model_repo: Path) -> None:
    """It printed a traceback ending in `OSError: cannot listen on 999.1.1.1:0`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
    done = subprocess.run(
        [sys.executable, "-m", "service", "--model-dir", str(model_repo), "--host", "999.1.1.1",
         "--port", "0", "--http-port", "0", "--no-metrics-enabled"],
        cwd=ROOT, env=env, timeout=120, capture_output=True)
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == "mnist-serve: cannot start: cannot listen on 999.1.1.1:0"
