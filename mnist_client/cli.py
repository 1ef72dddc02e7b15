"""`mnist-client`: classify images, evaluate a test set, list and describe models, against a
running server.

    mnist-client classify digit.png more.npy t10k-images-idx3-ubyte.gz scans/ 'batch-*.npy'
    cat digit.png | mnist-client classify -
    mnist-client eval --data-dir ../shared/data/mnist
    mnist-client models [--full]
    mnist-client show mnist 1

Options (--target, --json, TLS, ...) go before or after the command; MNIST_TARGET sets the
default target. Results are printed as they arrive, with a progress bar on stderr when it is
a terminal. Every failure is one line on stderr and a non-zero exit: 1 for a failed request,
a bad input file or a closed output pipe, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import grpc
import numpy as np
import numpy.typing as npt

from mnist_client import admin_cli
from mnist_client.card import card, state_name, summary
from mnist_client.client import (
    DEFAULT_RETRY,
    DEFAULT_TARGET,
    Classification,
    ClassifierClient,
    ClientError,
    channel_options,
    credentials,
)
from mnist_client.inputs import InputError, expand
from mnist_client.progress import Progress
from service.pb.mnist.v1 import classifier_pb2 as pb
from service.pb.mnist.v1 import classifier_pb2_grpc as pb_grpc

TARGET_ENV = "MNIST_TARGET"


def _client(args: argparse.Namespace) -> ClassifierClient:
    return ClassifierClient(
        args.target, timeout_s=args.timeout_s, tls=args.tls, tls_ca=args.tls_ca,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_server_name=args.tls_server_name,
    )


def _progress(args: argparse.Namespace, total: int | None, needed: bool) -> Progress:
    return Progress(total, sys.stderr,
                    enabled=needed and not args.no_progress and sys.stderr.isatty())


def cmd_classify(args: argparse.Namespace) -> int:
    """Stream: read a source when its turn comes, keep --concurrency requests in flight, print
    each result as soon as it and those before it are in. If a source cannot be read, what
    came before it is still printed, then the error (and --json leaves the array unclosed, so
    a partial answer never parses as a complete one)."""
    sources = expand(args.files, sys.stdin.buffer)
    counts = [s.count() for s in sources]
    total = None if None in counts else sum(c for c in counts if c is not None)
    progress = _progress(args, total, needed=total is None or total > args.batch_size)
    origin: deque[tuple[str, int, int]] = deque()  # per batch sent: source name, start, size
    failed: list[InputError] = []

    def batches() -> Iterator[npt.NDArray[Any]]:
        for source in sources:
            try:
                images = source.load()
            except InputError as e:
                failed.append(e)
                return
            for start in range(0, len(images), args.batch_size):
                origin.append((source.name, start, len(images)))
                yield images[start: start + args.batch_size]

    writer = ResultWriter(sys.stdout, progress, as_json=args.json, prefix_names=total != 1)
    try:
        with _client(args) as client:
            for result in client.classify_many(
                batches(), concurrency=args.concurrency, model=args.model,
                version=args.version, label=args.label, routing_key=args.routing_key,
            ):
                name, start, size = origin.popleft()
                writer.write(result, name, start, size)
                progress.advance(len(result.labels))
    finally:
        progress.close()  # an error message then starts on a clean line
    if failed:
        raise failed[0]
    writer.finish()
    return 0


class ResultWriter:
    """Prints answered batches as they come: text lines, or rows of one JSON array."""

    def __init__(self, out: TextIO, progress: Progress, *, as_json: bool,
                 prefix_names: bool) -> None:
        self.out = out
        self.progress = progress
        self.as_json = as_json
        self.prefix_names = prefix_names
        self.clear_bar = out.isatty()  # the bar shares the terminal: erase it first
        self.rows = 0

    def write(self, result: Classification, name: str, start: int, size: int) -> None:
        parts: list[str] = []
        probs = result.probabilities
        for i, label in enumerate(result.labels.tolist()):
            confidence = float(probs[i].max())
            if self.as_json:
                row = {"file": name, "index": start + i, "label": label,
                       "confidence": round(confidence, 6),
                       "probabilities": [round(float(p), 6) for p in probs[i]],
                       "model": result.model, "version": result.version}
                parts.append(("," if self.rows else "[") + "\n" + json.dumps(row))
            else:
                where = ""
                if self.prefix_names:
                    where = f"{name}[{start + i}]  " if size > 1 else f"{name}  "
                parts.append(f"{where}{label} ({confidence:.3f})  model {result.model} "
                             f"version {result.version}\n")
            self.rows += 1
        if self.clear_bar:
            self.progress.clear()
        self.out.write("".join(parts))
        self.out.flush()

    def finish(self) -> None:
        if self.as_json:
            self.out.write("\n]\n" if self.rows else "[]\n")


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.models()
    if args.json:
        print(json.dumps([summary(m, full=args.full) for m in models]))
        return 0
    if not models:
        print("no models")
    for m in models:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(m.labels.items())) or "-"
        acc = m.training_metrics.get("test_accuracy")
        acc_text = f"  test_accuracy {acc:.4f}" if acc is not None else ""
        pinned = "  (pinned: set-current MODEL 0 lifts it)" if m.current_pinned else ""
        print(f"{m.name}  current {m.current_version or '-'}{pinned}  labels {labels}{acc_text}")
        if m.canary_version:
            print(f"  canary {m.canary_version} at {m.canary_percent:g}%")
        if m.shadow_version:
            print(f"  shadow {m.shadow_version}")
        for v in m.versions:
            reason = f"  ({v.reason})" if v.reason else ""
            print(f"  version {v.version}  {state_name(v.state)}{reason}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.model_info(args.name)
    wanted = args.show_version or info.current_version
    if not info.current_version:
        raise ClientError(f"{info.name} has no servable version")
    if wanted != info.current_version:
        states = {v.version: state_name(v.state) for v in info.versions}
        raise ClientError(
            f"{info.name} version {wanted} is {states.get(wanted, 'not in the repository')}; "
            f"the server describes its current version only ({info.current_version}): "
            f"`mnist-client set-current {info.name} {wanted}` makes it current"
        )
    if args.json:
        print(json.dumps(summary(info, full=True)))
    else:
        print(card(info))
    return 0


async def _eval(
    args: argparse.Namespace, images: npt.NDArray[np.uint8], creds: grpc.ChannelCredentials | None
) -> dict[str, Any]:
    """Send the set in --batch-size chunks with --concurrency requests in flight."""
    n = len(images)
    predicted = np.full(n, -1, dtype=np.int64)
    latencies: list[float] = []
    versions: set[tuple[str, int]] = set()
    starts = list(range(0, n, args.batch_size))
    options = channel_options(DEFAULT_RETRY, args.tls_server_name)
    if creds is not None:
        channel = grpc.aio.secure_channel(args.target, creds, options=options)
    else:
        channel = grpc.aio.insecure_channel(args.target, options=options)
    progress = _progress(args, n, needed=len(starts) > 1)

    async with channel:
        stub = pb_grpc.ClassifierStub(channel)  # type: ignore[no-untyped-call]
        queue = list(reversed(starts))

        async def worker() -> None:
            while queue:
                s = queue.pop()
                chunk = images[s: s + args.batch_size]
                request = pb.ClassifyRequest(
                    pixels=chunk.tobytes(), encoding=pb.ENCODING_UINT8,
                    image_count=len(chunk), model=args.model, version=args.version,
                    version_label=args.label, packed_output=True)
                t0 = time.perf_counter()
                response = await stub.Classify(request, timeout=args.timeout_s)
                latencies.append(time.perf_counter() - t0)
                predicted[s: s + len(chunk)] = response.labels
                versions.add((response.model, int(response.version)))
                progress.advance(len(chunk))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - t0
    progress.close()
    lat = np.array(latencies)
    return {"predicted": predicted, "elapsed_s": elapsed, "versions": sorted(versions),
            "p50_s": float(np.median(lat)), "p99_s": float(np.percentile(lat, 99)),
            "requests": len(latencies)}


def cmd_eval(args: argparse.Namespace) -> int:
    from trainer.data import TEST_IMAGES, TEST_LABELS, DataError, load_pair

    try:
        images, labels, _ = load_pair(Path(args.data_dir), TEST_IMAGES, TEST_LABELS)
    except DataError as e:
        raise InputError(str(e)) from None
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    try:
        creds = credentials(args.tls, args.tls_ca, args.tls_cert, args.tls_key)
        out = asyncio.run(_eval(args, np.ascontiguousarray(images), creds))
    except grpc.aio.AioRpcError as e:
        raise ClientError(_rpc_message(args.target, e), e.code()) from None
    correct = int((out["predicted"] == labels).sum())
    n = len(labels)
    summary = {
        "images": n, "correct": correct, "accuracy": correct / n,
        "models": [f"{m} version {v}" for m, v in out["versions"]],
        "elapsed_s": round(out["elapsed_s"], 4),
        "images_per_s": round(n / out["elapsed_s"], 1),
        "requests": out["requests"], "batch_size": args.batch_size,
        "concurrency": args.concurrency,
        "latency_p50_ms": round(out["p50_s"] * 1e3, 3),
        "latency_p99_ms": round(out["p99_s"] * 1e3, 3),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"accuracy {summary['accuracy']:.4f} ({correct}/{n})  "
              f"{', '.join(summary['models'])}")
        print(f"{summary['images_per_s']:.0f} images/s in {summary['elapsed_s']:.2f} s  "
              f"({summary['requests']} requests of {args.batch_size}, concurrency "
              f"{args.concurrency}; latency p50 {summary['latency_p50_ms']:.2f} ms, "
              f"p99 {summary['latency_p99_ms']:.2f} ms)")
    return 0


def _rpc_message(target: str, e: grpc.aio.AioRpcError) -> str:
    details = e.details() or e.code().name
    if e.code() == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach server at {target}: {details}"
    return f"{e.code().name}: {details}"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (except empty ones), keeps the description's layout."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        empty = action.default in (None, False, "", argparse.SUPPRESS)
        if "default" in text or empty or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def _global_options(parser: argparse.ArgumentParser, *, after_command: bool) -> None:
    """Options every command takes. Given again after the command, they are the same options
    with no default of their own, so a value given before the command is not reset."""
    target = os.environ.get(TARGET_ENV) or DEFAULT_TARGET
    group = parser.add_argument_group("options of every command (before or after it)")

    def add(*flags: str, default: Any, help: str, **kw: Any) -> None:
        if after_command:
            shown = f" (default: {default})" if default not in (None, False, "") else ""
            group.add_argument(*flags, default=argparse.SUPPRESS, help=help + shown, **kw)
        else:
            group.add_argument(*flags, default=default, help=help, **kw)

    add("--target", default=target, help=f"server host:port (or set ${TARGET_ENV})")
    add("--json", default=False, action="store_true", help="machine-readable output")
    add("--timeout-s", default=30.0, type=float, help="per-request deadline, seconds")
    add("--model", default="", help="model name (default: the server's default model)")
    add("--version", default=0, type=int, help="model version (default 0: the current one)")
    add("--label", default="", help="version label, e.g. stable")
    add("--routing-key", default="", help="canary routing key: while a model has a canary, the "
        "same key always reaches the same version (default: the server draws at random)")
    add("--no-progress", default=False, action="store_true",
        help="no progress bar, even on a terminal")
    add("--tls", default=False, action="store_true", help="use TLS with the system roots")
    add("--tls-ca", default=None, help="PEM CA bundle to verify the server")
    add("--tls-cert", default=None, help="PEM client certificate (mutual TLS)")
    add("--tls-key", default=None, help="PEM key of --tls-cert")
    add("--tls-server-name", default=None, help="expected server name, if not the host")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-client", description=__doc__, formatter_class=HelpFormatter
    )
    _global_options(parser, after_command=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, after_command=True)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common],
                              formatter_class=HelpFormatter)

    c = command("classify", "classify .npy, IDX or image (PNG/JPEG) files, directories, globs "
                            "or stdin (-)")
    c.add_argument("files", nargs="+", metavar="INPUT",
                   help="a file, a directory (its image, .npy and IDX files), a glob, or - "
                        "for stdin")
    c.add_argument("--batch-size", type=int, default=256, help="images per request")
    c.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    c.set_defaults(run=cmd_classify)
    e = command("eval", "accuracy and throughput on an IDX test set")
    e.add_argument("--data-dir", required=True, help="directory with t10k-*-ubyte[.gz]")
    e.add_argument("--batch-size", type=int, default=256, help="images per request")
    e.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    e.add_argument("--limit", type=int, default=0, help="only the first N images (0: all)")
    e.set_defaults(run=cmd_eval)
    m = command("models", "models, versions, states and labels")
    m.add_argument("--full", action="store_true",
                   help="with --json: every field, the training metadata included")
    m.set_defaults(run=cmd_models)
    s = command("show", "a model card: architecture, data, training, accuracy, confusion "
                        "matrix")
    s.add_argument("name", metavar="MODEL", help="model name")
    s.add_argument("show_version", metavar="VERSION", type=int, nargs="?", default=0,
                   help="version (default: the current one, the only one the server describes)")
    s.set_defaults(run=cmd_show)
    admin_cli.register(sub, parents=[common], formatter_class=HelpFormatter)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "batch_size", 1) < 1 or getattr(args, "concurrency", 1) < 1:
        print("mnist-client: --batch-size and --concurrency must be at least 1", file=sys.stderr)
        return 2
    try:
        code = int(args.run(args))
        sys.stdout.flush()
        return code
    except (ClientError, InputError) as e:
        print(f"mnist-client: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`mnist-client classify ... | head`): stop quietly. Python's
        # documented advice (library/signal.html, "Note on SIGPIPE"): point stdout at devnull
        # so the interpreter's final flush does not fail again, and exit 1.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
