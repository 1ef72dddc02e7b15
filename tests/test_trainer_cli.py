"""`mnist-train` end to end: options, one-line errors, JSON summary, plots, publishing."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support.data import dead_url, real_mnist_dir, serve, synthetic_digits

from service.model import load_model
from trainer.cli import build_parser, config_from_args, main
from trainer.data import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, write_idx

QUICK = ["--hidden", "16", "--epochs", "2", "--batch-size", "32", "--quiet"]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "data"
    directory.mkdir()
    for (images, labels), (n, seed) in (((TRAIN_IMAGES, TRAIN_LABELS), (300, 1)),
                                        ((TEST_IMAGES, TEST_LABELS), (100, 2))):
        x, y = synthetic_digits(n, seed)
        write_idx(directory / f"{images}.gz", x)
        write_idx(directory / f"{labels}.gz", y)
    return directory


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse exits for --help and bad options
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert flag in out
        assert action.help, f"{action.option_strings} has no help"


@pytest.mark.parametrize(
    ("args", "dropout"),
    [([], 0.1), (["--activation", "sigmoid"], 0.0), (["--activation", "tanh"], 0.0),
     (["--dropout", "0.3"], 0.3), (["--dropout", "0"], 0.0)],
)
def test_dropout_defaults_to_relu_only(args: list[str], dropout: float) -> None:
    """Like --cost, the dropout default follows the activation: it is only defined for relu."""
    assert config_from_args(build_parser().parse_args(args)).dropout == dropout


def test_end_to_end_json_summary_and_published_version(
    capsys: pytest.CaptureFixture[str], data_dir: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    code, out, err = run_cli(capsys, "--data-dir", str(data_dir), "--model-dir", str(models),
                             "--name", "digits", "--json", *QUICK)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert out.count("\n") == 1  # progress went to stderr: stdout is the JSON line alone
    assert summary["version"] == 1
    assert Path(summary["path"]) == models / "digits" / "1"
    model = load_model(models / "digits" / "1")
    assert summary["test_accuracy"] == model.metadata["metrics"]["test_accuracy"] > 0.5
    assert summary["sha256"] == (models / "digits" / "1" / "model.npz.sha256").read_text()[:64]
    assert "confusion matrix" in err
    assert "test accuracy" in err

    code, out, _ = run_cli(capsys, "--data-dir", str(data_dir), "--model-dir", str(models),
                           "--name", "digits", "--json", *QUICK)
    assert json.loads(out)["version"] == 2


def test_human_output_shows_epochs_and_confusion(
    capsys: pytest.CaptureFixture[str], data_dir: Path
) -> None:
    code, out, _ = run_cli(capsys, "--data-dir", str(data_dir), "--no-publish", "--hidden", "8",
                           "--epochs", "2")
    assert code == 0
    assert "epoch   1/2" in out
    assert "epoch   2/2" in out
    assert "val" in out
    assert "test accuracy" in out
    assert len([ln for ln in out.splitlines() if ln.strip().split(" ")[0].isdigit()]) >= 10


def test_same_seed_same_weights_through_the_cli(
    capsys: pytest.CaptureFixture[str], data_dir: Path, tmp_path: Path
) -> None:
    args = ["--data-dir", str(data_dir), "--model-dir", str(tmp_path / "m"), "--seed", "42",
            *QUICK]
    assert run_cli(capsys, *args)[0] == 0
    assert run_cli(capsys, *args)[0] == 0
    a, b = (np.load(tmp_path / "m" / "mnist" / v / "model.npz") for v in ("1", "2"))
    for key in ("W0", "b0", "W1", "b1", "probe_outputs"):
        assert a[key].tobytes() == b[key].tobytes()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hidden", "0"], "--hidden"),
        (["--hidden", "64,abc"], "--hidden"),
        (["--lr", "-0.1"], "--lr"),
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "x"], "--batch-size"),
        (["--validation-fraction", "1.5"], "--validation-fraction"),
        (["--optimizer", "lbfgs"], "--optimizer"),
        (["--rotate", "90"], "--rotate"),
        (["--scale", "-0.1"], "--scale"),
        (["--dropout", "1"], "--dropout"),
        (["--label-smoothing", "0.9"], "--label-smoothing"),
        (["--output", "sigmoid", "--cost", "hinge"], "--cost"),
    ],
)
def test_nonsense_options_get_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, _out, err = run_cli(capsys, *args)
    assert code == 2
    assert err.count("\n") == 1
    assert message in err
    assert err.startswith("mnist-train: error:")


def test_missing_data_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "--data-dir", str(tmp_path / "none"), "--model-dir",
                           str(tmp_path / "m"), *QUICK)
    assert code == 1
    assert err.count("\n") == 1
    assert "no such directory" in err
    assert not (tmp_path / "m" / "mnist").exists() or not os.listdir(tmp_path / "m" / "mnist")


def test_corrupt_data_file_is_one_line_naming_it(
    capsys: pytest.CaptureFixture[str], data_dir: Path, tmp_path: Path
) -> None:
    path = data_dir / f"{TRAIN_IMAGES}.gz"
    path.write_bytes(path.read_bytes()[:500])
    code, _, err = run_cli(capsys, "--data-dir", str(data_dir), "--model-dir",
                           str(tmp_path / "m"), *QUICK)
    assert code == 1
    assert err.count("\n") == 1
    assert str(path) in err
    assert "Traceback" not in err
    assert os.listdir(tmp_path / "m" / "mnist") == []


def test_unwritable_model_dir_fails_before_training(
    capsys: pytest.CaptureFixture[str], data_dir: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "models"
    blocker.write_text("a file where the model directory should be")
    code, out, err = run_cli(capsys, "--data-dir", str(data_dir), "--model-dir", str(blocker),
                             *QUICK)
    assert code == 1
    assert err.count("\n") == 1
    assert "not writable" in err
    assert "epoch" not in out


def test_plot_writes_pngs_next_to_the_version(
    capsys: pytest.CaptureFixture[str], data_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    code, _, err = run_cli(capsys, "--data-dir", str(data_dir), "--model-dir",
                           str(tmp_path / "m"), "--plot", *QUICK)
    assert code == 0, err
    version = tmp_path / "m" / "mnist" / "1"
    for name in ("training_curves.png", "confusion_matrix.png"):
        assert (version / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    load_model(version)  # extra files do not disturb the model


def test_plot_without_matplotlib_says_how_to_install(
    capsys: pytest.CaptureFixture[str], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    code, out, err = run_cli(capsys, "--data-dir", str(data_dir), "--plot", *QUICK)
    assert code == 1
    assert "pip install 'mnist-serving[plot]'" in err
    assert err.count("\n") == 1
    assert "epoch" not in out  # refused before training, not after


def test_download_of_a_wrong_file_is_rejected(
    capsys: pytest.CaptureFixture[str], data_dir: Path, tmp_path: Path
) -> None:
    """The synthetic files are not the real MNIST: their checksums must not pass."""
    target = tmp_path / "fresh"
    with serve(data_dir) as url:
        code, _, err = run_cli(capsys, "--data-dir", str(target), "--download", "--mirror", url,
                               "--no-publish", *QUICK)
    assert code == 1
    assert "sha256" in err
    assert err.count("\n") == 1
    assert list(target.iterdir()) == []


def test_download_without_network(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "--data-dir", str(tmp_path / "d"), "--download", "--mirror",
                           dead_url(), "--no-publish", *QUICK)
    assert code == 1
    assert "no network" in err


def test_console_entry_point_runs(data_dir: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "--data-dir", str(data_dir), "--model-dir",
         str(tmp_path / "m"), "--json", *QUICK],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["version"] == 1


@pytest.mark.slow
def test_real_mnist_end_to_end(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The real 5,000 digits: a small quick recipe must already generalise to the 10k test set."""
    data_dir = real_mnist_dir()
    code, out, err = run_cli(capsys, "--data-dir", str(data_dir), "--model-dir",
                             str(tmp_path / "m"), "--hidden", "128", "--epochs", "8",
                             "--shift", "1", "--json", "--quiet")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["test_accuracy"] > 0.90
    meta = load_model(Path(summary["path"])).metadata
    assert meta["data"]["train_count"] == 5000
    assert meta["data"]["test_count"] == 10000
    assert meta["training"]["train_examples"] == 4500


def test_full_disk_during_publish_is_one_line_and_leaves_nothing(
    capsys: pytest.CaptureFixture[str], data_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    code, _, err = run_cli(capsys, "--data-dir", str(data_dir), "--model-dir",
                           str(tmp_path / "m"), *QUICK)
    assert code == 1
    assert err.count("\n") == 1
    assert "no space left on device" in err
    assert os.listdir(tmp_path / "m" / "mnist") == []


def test_gate_written_from_the_held_out_split_and_read_back_by_the_server(
    capsys: pytest.CaptureFixture[str], data_dir: Path, tmp_path: Path
) -> None:
    from service.promotion.gate import accuracy, load_gate

    models = tmp_path / "models"
    code, out, err = run_cli(capsys, "--data-dir", str(data_dir), "--model-dir", str(models),
                             "--json", "--gate-min-accuracy", "0.2", "--gate-max-drop", "0.05",
                             "--gate-images", "60", *QUICK)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["gate"] == str(models / "mnist" / "gate")
    gate = load_gate(models / "mnist")  # the server's own reader, with its bounds
    assert gate.images.shape == (60, 784)
    assert (gate.min_accuracy, gate.max_drop) == (0.2, 0.05)
    # The gate's images are test images: the model scores on them what it scores on the test.
    model = load_model(models / "mnist" / "1")
    assert accuracy(model, gate) > 0.5
