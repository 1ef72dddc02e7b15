"""Every setting of the service, with its default, in one frozen dataclass.

Each field maps onto a flag (`--max-batch-rows`) and an environment variable
(`MNIST_MAX_BATCH_ROWS`); a flag beats the environment, which beats the default. Units are in
the names. The field's `help` metadata is the flag's --help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mnist_imaging.decode import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_REQUEST_PIXELS,
)

ENV_PREFIX = "MNIST_"
# --fault-injection values (tests/test_fatal.py, tests/test_server.py drive them).
FAULTS = ("", "frontend-death", "selftest")


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    # --- where and how to listen
    model_dir: Path = _opt(Path("models"), "model repository: <name>/<integer version>/")
    host: str = _opt("[::]", "address to listen on for gRPC")
    port: int = _opt(50051, "gRPC port (0 picks a free one)")
    workers: int = _opt(1, "server processes sharing the port with SO_REUSEPORT")
    grace_period_s: float = _opt(10.0, "on SIGTERM, how long in-flight requests may finish")
    drain_delay_s: float = _opt(
        0.0, "on SIGTERM, first keep serving this long with health NOT_SERVING, so balancers "
        "that check health stop sending before new requests are refused (0: at once; a "
        "second signal ends the wait)"
    )
    frontend: str = _opt(
        "core", "'core': Classify and v2 ModelInfer answered on gRPC core's completion queue by "
        "one thread, the rest on asyncio (fastest); 'aio': everything through grpc.aio"
    )
    tls_cert: Path | None = _opt(None, "PEM server certificate; enables TLS with --tls-key")
    tls_key: Path | None = _opt(None, "PEM private key of --tls-cert")
    tls_client_ca: Path | None = _opt(
        None, "PEM CA bundle; when set, clients must present a certificate it signed"
    )
    # --- HTTP/REST (KServe v2 REST, service/frontends/http/server.py), on --host
    http_port: int = _opt(8000, "KServe v2 REST port, beside gRPC (0: no HTTP front end)")
    http_max_connections: int = _opt(
        1024, "HTTP connections open at once at most; one more is answered 503 and closed"
    )
    http_max_header_bytes: int = _opt(
        16384, "HTTP request line and headers together at most (431 past it)"
    )
    http_max_body_bytes: int = _opt(
        16 << 20, "HTTP request body at most (413 past it); a body needs a Content-Length"
    )
    http_read_timeout_s: float = _opt(
        30.0, "an HTTP request must arrive whole this long after its first byte (408 after)"
    )
    http_idle_timeout_s: float = _opt(60.0, "an idle HTTP keep-alive connection is closed after")
    # --- batching
    batching: bool = _opt(True, "coalesce concurrent requests into one forward pass")
    max_batch_rows: int = _opt(256, "most images in one forward pass")
    max_batch_wait_s: float = _opt(
        0.002, "longest a request waits for others to join its batch (never when alone)"
    )
    max_queue_rows: int = _opt(
        8192, "images waiting at most; past it requests fail fast with RESOURCE_EXHAUSTED"
    )
    max_queue_bytes: int = _opt(
        24 << 20, "bytes queued and in-flight requests may hold at most, whatever the number "
        "of callers: each is charged 4 bytes per byte of its message (the most its float32 "
        "rows take) + 2 KiB, checked before it is decoded; past it RESOURCE_EXHAUSTED"
    )
    max_door_wait_s: float = _opt(
        0.05, "core front end, while shedding: longest a Classify/ModelInfer call waits "
        "unread at the door for room before RESOURCE_EXHAUSTED (0: refused at once)"
    )
    max_pending_calls: int = _opt(
        4096, "calls gRPC core may hold before the server takes them (a burst on either front "
        "end; each holds at most 8 KiB of its message); past it gRPC core ends a call CANCELLED. "
        "gRPC's own default cancels past 1,000"
    )
    max_images_per_request: int = _opt(4096, "most images one request may carry")
    inline_forward_max_rows: int = _opt(
        32, "batches formed on the event loop (ClassifyStream; every batch with --frontend aio) "
        "of at most this many rows run there, not in a thread: cheaper than the handoff "
        "(0: always in a thread). Classify on the core front end computes on its own thread"
    )
    # --- encoded images (PNG, JPEG, ...; docs/images.md)
    image_decode_workers: int = _opt(
        2, "processes decoding images sent encoded (mnist.v1 `images`, v2 BYTES); 0 turns "
        "that off (such requests get FAILED_PRECONDITION); needs the `image` extra"
    )
    image_max_bytes: int = _opt(DEFAULT_MAX_BYTES, "largest encoded image, in bytes")
    image_max_request_bytes: int = _opt(
        8 << 20, "most encoded-image bytes one request may carry in all"
    )
    image_max_pixels: int = _opt(
        DEFAULT_MAX_PIXELS, "most pixels (width x height, read from the header before "
        "decoding) one image may have"
    )
    image_max_request_pixels: int = _opt(
        DEFAULT_MAX_REQUEST_PIXELS, "most pixels all images of one request may have together"
    )
    image_decode_timeout_s: float = _opt(
        1.0, "decode time allowed per image: a request of N images gets N times this (or its "
        "deadline, if sooner), then its decoder process is killed and replaced"
    )
    image_max_waiting: int = _opt(
        64, "requests waiting for a decoder at most; past it RESOURCE_EXHAUSTED"
    )
    # --- model versions
    rescan_interval_s: float = _opt(2.0, "how often the repository is rescanned (0: never)")
    version_policy: str = _opt(
        "latest",
        "which versions stay loaded: 'latest', 'latest:N', or 'specific:1,3'; per model as "
        "'mnist=latest:2;fashion=specific:4'",
    )
    version_labels: str = _opt(
        "", "initial labels, e.g. 'mnist:stable=1,canary=2;fashion:stable=4'"
    )
    default_model: str | None = _opt(
        None, "model used when a request names none (default: the only one, or 'mnist')"
    )
    # --- admin API
    admin_enabled: bool = _opt(False, "serve the mnist.v1.Admin service")
    admin_token: str | None = _opt(
        None, "bearer token the admin service requires (required when it is enabled)"
    )
    admin_port: int | None = _opt(None, "serve admin on its own port instead of --port")
    # --- promotion: canary rollback and shadow (docs/versions.md, "Promotion")
    canary_window_images: int = _opt(
        500, "a canary is judged after each window of this many images it answered"
    )
    canary_max_error_rate: float = _opt(
        0.02, "roll a canary back when more than this share of its requests in a window "
        "fail with a server error"
    )
    canary_max_disagreement: float = _opt(
        0.25, "roll a canary back when its top class differs from the current version's on "
        "more than this share of the images rechecked in a window"
    )
    canary_max_divergence: float = _opt(
        0.25, "roll a canary back when its predicted-class distribution is further than this "
        "(total variation, 0..1) from the current version's over a window"
    )
    shadow_queue_batches: int = _opt(
        64, "batches waiting for the second forward pass (shadow, canary checks) at most; "
        "more are dropped and counted in mnist_shadow_dropped_total"
    )
    # --- observability
    metrics_enabled: bool = _opt(True, "export Prometheus metrics over HTTP")
    metrics_host: str = _opt("0.0.0.0", "address for the /metrics endpoint")
    metrics_port: int = _opt(9100, "port for the /metrics endpoint")
    log_level: str = _opt("INFO", "DEBUG, INFO, WARNING or ERROR")
    # --- tests only
    fault_injection: str = _opt(
        "", "TESTS ONLY, never in production: 'frontend-death' (SIGUSR2 kills the gRPC front "
        "end behind the server's back) or 'selftest' (the core front end's startup self-test "
        "fails); see docs/serving.md"
    )

    @property
    def max_message_bytes(self) -> int:
        """Big enough for the largest request allowed (float32 pixels) plus framing."""
        pixels = self.max_images_per_request * 784 * 4
        return max(pixels, self.image_max_request_bytes) + 1024 * 1024


def _base_type(hint: Any) -> type:
    """`int | None` -> int; `Path` -> Path."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (inner,) = (a for a in typing.get_args(hint) if a is not type(None))
        return typing.cast(type, inner)
    return typing.cast(type, hint)


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _convert(kind: type, text: str) -> Any:
    if kind is bool:
        return _parse_bool(text)
    return kind(text)


def _converter(kind: type) -> Callable[[str], Any]:
    return lambda text: _convert(kind, text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field, defaulting to 'not given' so the environment can apply."""
    hints = typing.get_type_hints(Settings)
    for f in dataclasses.fields(Settings):
        kind = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        env = ENV_PREFIX + f.name.upper()
        help_text = f"{f.metadata['help']} [env {env}; default {f.default}]"
        if kind is bool:
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag, dest=f.name, type=_converter(kind), default=None,
                metavar=kind.__name__.upper(), help=help_text,
            )


def load_settings(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Flags, then `MNIST_*` variables, then defaults; a ValueError names the bad one."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(Settings)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        given = getattr(args, f.name, None) if args is not None else None
        if given is not None:
            values[f.name] = given
            continue
        env = ENV_PREFIX + f.name.upper()
        if env in environ and environ[env] != "":
            try:
                values[f.name] = _convert(_base_type(hints[f.name]), environ[env])
            except ValueError as e:
                raise ValueError(f"{env}={environ[env]!r}: {e}") from None
    settings = Settings(**values)
    validate(settings)
    return settings


# gRPC core takes its options as C ints: a bigger one was an OverflowError at start-up.
GRPC_INT_MAX = 2**31 - 1
# Most server processes (--workers) and image decoder processes (--image-decode-workers).
MAX_PROCESSES = 256
MIN_RESCAN_INTERVAL_S = 0.01
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def validate(s: Settings) -> None:
    """Reject nonsense early, with the flag's name in the message."""
    problems: list[str] = []
    positive = ("workers", "max_batch_rows", "max_queue_rows", "max_queue_bytes",
                "max_pending_calls",
                "max_images_per_request", "canary_window_images", "shadow_queue_batches",
                "image_max_bytes", "image_max_request_bytes",
                "image_max_pixels", "image_max_request_pixels", "image_max_waiting",
                "http_max_connections", "http_max_header_bytes", "http_max_body_bytes")
    for name in positive:
        if getattr(s, name) < 1:
            flag = "--" + name.replace("_", "-")
            problems.append(f"{flag} must be at least 1, got {getattr(s, name)}")
    for name in ("grace_period_s", "drain_delay_s", "max_batch_wait_s", "max_door_wait_s",
                 "rescan_interval_s",
                 "inline_forward_max_rows", "image_decode_workers", "image_decode_timeout_s",
                 "http_port"):
        if getattr(s, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(s, name)}")
    for name in ("canary_max_error_rate", "canary_max_disagreement", "canary_max_divergence"):
        if not 0 <= getattr(s, name) <= 1:
            problems.append(f"--{name.replace('_', '-')} must be in 0..1, got {getattr(s, name)}")
    for name in ("http_read_timeout_s", "http_idle_timeout_s"):
        if getattr(s, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be > 0, got {getattr(s, name)}")
    # NaN passes every comparison above, and an infinite wait overflows where it becomes an int.
    for f in dataclasses.fields(s):
        value = getattr(s, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
    # Ports wrap modulo 65536 in gRPC core (70000 listened on 4464): refuse them instead.
    for name in ("port", "http_port", "metrics_port", "admin_port"):
        value = getattr(s, name)
        if value is not None and not 0 <= value <= 65535:
            problems.append(f"--{name.replace('_', '-')} must be in 0..65535, got {value}")
    # Each is a process of ~30-60 MiB: 5,000 decoder processes took this 24 GiB VM to the OOM
    # killer before the server listened.
    for name in ("workers", "image_decode_workers"):
        if getattr(s, name) > MAX_PROCESSES:
            problems.append(f"--{name.replace('_', '-')} must be at most {MAX_PROCESSES}, "
                            f"got {getattr(s, name)}")
    # A scan reads the repository's directories: 1 us between scans kept a core at 100%.
    if 0 < s.rescan_interval_s < MIN_RESCAN_INTERVAL_S:
        problems.append(f"--rescan-interval-s must be 0 (never) or at least "
                        f"{MIN_RESCAN_INTERVAL_S}, got {s.rescan_interval_s}")
    if s.max_pending_calls > GRPC_INT_MAX:
        problems.append(f"--max-pending-calls must be at most {GRPC_INT_MAX}, "
                        f"got {s.max_pending_calls}")
    if s.max_message_bytes > GRPC_INT_MAX:
        problems.append(
            f"--max-images-per-request {s.max_images_per_request} and --image-max-request-bytes "
            f"{s.image_max_request_bytes} need a {s.max_message_bytes}-byte gRPC message, past "
            f"gRPC's {GRPC_INT_MAX}")
    if s.log_level.upper() not in LOG_LEVELS:  # an unknown one was INFO, silently
        problems.append(f"--log-level must be one of {', '.join(LOG_LEVELS)}, "
                        f"got {s.log_level!r}")
    if s.frontend not in ("core", "aio"):
        problems.append(f"--frontend must be 'core' or 'aio', got {s.frontend!r}")
    if s.fault_injection not in FAULTS:
        problems.append(f"--fault-injection must be one of {FAULTS}, got {s.fault_injection!r}")
    if (s.tls_cert is None) != (s.tls_key is None):
        problems.append("--tls-cert and --tls-key go together")
    if s.tls_client_ca is not None and s.tls_cert is None:
        problems.append("--tls-client-ca needs --tls-cert and --tls-key")
    from service.registry.version_policy import (  # a leaf, like this one
        parse_labels,
        parse_policies,
    )

    for parse, value in ((parse_policies, s.version_policy), (parse_labels, s.version_labels)):
        try:
            parse(value)
        except ValueError as e:
            problems.append(str(e))
    if s.admin_enabled and not s.admin_token:
        problems.append("--admin-enabled needs --admin-token (or MNIST_ADMIN_TOKEN)")
    if problems:
        raise ValueError("; ".join(problems))


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """The CLI entry: flags + environment -> Settings, exiting with a one-line error if bad."""
    parser = argparse.ArgumentParser(
        prog="mnist-serve",
        description="Serve MNIST-style classifiers from a model repository over gRPC, with "
        "dynamic batching, hot swap of new versions, health checks and Prometheus metrics.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return load_settings(args)
    except ValueError as e:
        parser.error(str(e))
