"""Settings: flags beat MNIST_* variables beat defaults; nonsense is rejected by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service.config import Settings, load_settings, parse_args, validate

ROOT = Path(__file__).resolve().parent.parent


def test_flag_beats_environment_beats_default() -> None:
    import argparse

    from service.config import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    env = {"MNIST_MAX_BATCH_ROWS": "64", "MNIST_BATCHING": "false", "MNIST_PORT": "7000"}
    s = load_settings(parser.parse_args(["--port", "9000"]), env)
    assert s.port == 9000  # flag wins
    assert s.max_batch_rows == 64  # environment
    assert s.batching is False
    assert s.max_batch_wait_s == Settings().max_batch_wait_s  # default
    assert s.inline_forward_max_rows == Settings().inline_forward_max_rows


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ValueError, match="MNIST_MAX_BATCH_ROWS='many'"):
        load_settings(None, {"MNIST_MAX_BATCH_ROWS": "many"})


@pytest.mark.parametrize(("field", "value", "message"), [
    ("max_batch_rows", 0, "--max-batch-rows must be at least 1, got 0"),
    ("max_batch_wait_s", -1.0, "--max-batch-wait-s must be >= 0, got -1.0"),
    ("inline_forward_max_rows", -2, "--inline-forward-max-rows must be >= 0, got -2"),
    ("tls_cert", Path("c.pem"), "--tls-cert and --tls-key go together"),
    # gRPC takes these as C ints; past 2**31 - 1 the server died with an OverflowError.
    ("max_pending_calls", 2**31, "--max-pending-calls must be at most 2147483647, got 2147483648"),
    ("max_images_per_request", 10_000_000,
     "--max-images-per-request 10000000 and --image-max-request-bytes"),
    # NaN passed every bound; inf died with an OverflowError in the v2 config.
    ("max_door_wait_s", float("nan"), "--max-door-wait-s must be a finite number, got nan"),
    ("max_batch_wait_s", float("inf"), "--max-batch-wait-s must be a finite number, got inf"),
    ("grace_period_s", float("-inf"), "--grace-period-s must be a finite number, got -inf"),
    # 5,000 decoder processes ran this VM out of memory before the server listened.
    ("image_decode_workers", 5000, "--image-decode-workers must be at most 256, got 5000"),
    ("workers", 257, "--workers must be at most 256, got 257"),
    # A scan every microsecond kept a core at 100%.
    ("rescan_interval_s", 1e-6, "or at least 0.01, got 1e-06"),
    # An unknown level was INFO, silently.
    ("log_level", "NOPE", "--log-level must be one of DEBUG, INFO, WARNING, ERROR, got 'NOPE'"),
    # gRPC core listened on 70000 - 65536 = 4464.
    ("port", 70000, "--port must be in 0..65535, got 70000"),
    ("http_port", 65536, "--http-port must be in 0..65535, got 65536"),
    ("metrics_port", -1, "--metrics-port must be in 0..65535, got -1"),
    ("admin_port", 99999, "--admin-port must be in 0..65535, got 99999"),
])
def test_validate_names_the_flag(field: str, value: object, message: str) -> None:
    from dataclasses import replace

    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        validate(replace(Settings(), **{field: value}))


def test_max_message_size_fits_the_largest_request() -> None:
    s = Settings(max_images_per_request=100)
    assert s.max_message_bytes >= 100 * 784 * 4


def test_parse_args_exits_with_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(["--workers", "0"])
    assert info.value.code == 2
    assert "--workers must be at least 1, got 0" in capsys.readouterr().err


def test_mnist_serve_help_lists_flags_and_env() -> None:
    out = subprocess.run([sys.executable, "-m", "service", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for text in ("--max-batch-wait-s", "MNIST_MAX_BATCH_WAIT_S", "--inline-forward-max-rows",
                 "--workers", "--tls-client-ca"):
        assert text in out.stdout
