"""End to end on real data: the committed model over the service scores exactly its metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from support.servers import skip_or_fail

from mnist_client.cli import main
from service.model import load_model

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "mnist" / "1"


def data_dir() -> Path:
    return Path(os.environ.get("MNIST_DATA_DIR", ROOT.parent / "shared" / "data" / "mnist"))


@pytest.mark.slow
def test_whole_test_set_through_the_service_matches_recorded_accuracy(
    start: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    if not (data_dir() / "t10k-images-idx3-ubyte.gz").exists() and not (
        data_dir() / "t10k-images-idx3-ubyte"
    ).exists():
        skip_or_fail(f"no MNIST test set in {data_dir()} (set MNIST_DATA_DIR)")
    if not MODEL.is_dir():
        skip_or_fail(f"no committed default model at {MODEL}")
    recorded = load_model(MODEL).metadata["metrics"]["test_accuracy"]
    server = start(ROOT / "models")
    assert main(["--target", server.target, "--json", "eval", "--data-dir", str(data_dir()),
                 "--batch-size", "500", "--concurrency", "4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 10_000
    assert summary["models"] == ["mnist version 1"]
    assert summary["correct"] == round(recorded * 10_000), (summary, recorded)
