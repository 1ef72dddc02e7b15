"""`mnist-client`: classify files, evaluate a test set, list models, against a running server.

    mnist-client classify digit.png more.npy t10k-images-idx3-ubyte.gz
    mnist-client eval --data-dir ../shared/data/mnist
    mnist-client models
    (--target host:port, --json, TLS options before the command)

Every failure is one line on stderr and a non-zero exit: 1 for a failed request or bad input
file, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from service import admin_cli
from service.client import DEFAULT_TARGET, MAX_MESSAGE_BYTES, ClassifierClient, ClientError
from service.model import INPUT_SIZE
from service.pb.mnist.v1 import classifier_pb2 as pb
from service.pb.mnist.v1 import classifier_pb2_grpc as pb_grpc

IDX_IMAGES_MAGIC = b"\x00\x00\x08\x03"
GZIP_MAGIC = b"\x1f\x8b"


class InputError(Exception):
    """An input file that cannot be turned into images; the message names it."""


def load_inputs(path: Path) -> npt.NDArray[Any]:
    """(n, 28, 28) uint8 or float images from a .npy, an IDX file (optionally .gz) or an image."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise InputError(f"{path}: not a readable .npy array ({e})") from None
        if arr.size == 0 or arr.size % INPUT_SIZE or arr.dtype.kind not in "uif":
            raise InputError(
                f"{path}: expected images of {INPUT_SIZE} pixels (shape (n, 28, 28) or "
                f"(n, 784)), got shape {arr.shape} dtype {arr.dtype}"
            )
        if arr.dtype.kind in "ui":
            if arr.min() < 0 or arr.max() > 255:
                raise InputError(f"{path}: integer pixels must be 0..255")
            arr = arr.astype(np.uint8)
        images: npt.NDArray[Any] = arr.reshape(-1, 28, 28)
        return images
    if head == IDX_IMAGES_MAGIC or (head[:2] == GZIP_MAGIC and "idx" in path.name):
        from trainer.data import DataError, read_images

        try:
            return read_images(path)
        except DataError as e:
            raise InputError(str(e)) from None
    from service.images import ImageError, load_image

    try:
        return load_image(path)[None]
    except ImageError as e:
        raise InputError(str(e)) from None


def _client(args: argparse.Namespace) -> ClassifierClient:
    return ClassifierClient(
        args.target, timeout_s=args.timeout_s, tls=args.tls, tls_ca=args.tls_ca,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_server_name=args.tls_server_name,
    )


def cmd_classify(args: argparse.Namespace) -> int:
    inputs = [(Path(f), load_inputs(Path(f))) for f in args.files]
    rows: list[dict[str, Any]] = []
    with _client(args) as client:
        for path, images in inputs:
            for start in range(0, len(images), args.batch_size):
                chunk = images[start: start + args.batch_size]
                result = client.classify(chunk, model=args.model, version=args.version,
                                         label=args.label)
                for i, (label, probs) in enumerate(
                        zip(result.labels.tolist(), result.probabilities, strict=True)):
                    rows.append({
                        "file": str(path), "index": start + i, "label": label,
                        "confidence": round(float(probs.max()), 6),
                        "probabilities": [round(float(p), 6) for p in probs],
                        "model": result.model, "version": result.version,
                    })
    if args.json:
        print(json.dumps(rows))
        return 0
    many = len(rows) > 1
    for r in rows:
        name = f"{r['file']}[{r['index']}]  " if many else ""
        print(f"{name}{r['label']} ({r['confidence']:.3f})  model {r['model']} "
              f"version {r['version']}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.models()
    if args.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps([MessageToDict(m) for m in models]))
        return 0
    if not models:
        print("no models")
    for m in models:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(m.labels.items())) or "-"
        acc = m.training_metrics.get("test_accuracy")
        acc_text = f"  test_accuracy {acc:.4f}" if acc is not None else ""
        print(f"{m.name}  current {m.current_version or '-'}  labels {labels}{acc_text}")
        for v in m.versions:
            state = pb.VersionState.Name(v.state).removeprefix("VERSION_STATE_")
            reason = f"  ({v.reason})" if v.reason else ""
            print(f"  version {v.version}  {state}{reason}")
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
    done = 0
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    if creds is not None:
        channel = grpc.aio.secure_channel(args.target, creds, options=options)
    else:
        channel = grpc.aio.insecure_channel(args.target, options=options)
    progress = sys.stderr.isatty() and not args.json

    async with channel:
        stub = pb_grpc.ClassifierStub(channel)  # type: ignore[no-untyped-call]
        queue = list(reversed(starts))

        async def worker() -> None:
            nonlocal done
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
                done += len(chunk)
                if progress:
                    print(f"\r{done}/{n} images", end="", file=sys.stderr, flush=True)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - t0
    if progress:
        print(file=sys.stderr)
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
        creds = None
        if args.tls or args.tls_ca:
            creds = grpc.ssl_channel_credentials(*(
                Path(p).read_bytes() if p else None
                for p in (args.tls_ca, args.tls_key, args.tls_cert)
            ))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnist-client", description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=DEFAULT_TARGET, help="server host:port")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="per-request deadline")
    parser.add_argument("--model", default="", help="model name (default: server's default)")
    parser.add_argument("--version", type=int, default=0, help="model version (0: current)")
    parser.add_argument("--label", default="", help="version label, e.g. stable")
    parser.add_argument("--tls", action="store_true", help="use TLS with the system roots")
    parser.add_argument("--tls-ca", help="PEM CA bundle to verify the server")
    parser.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", help="PEM key of --tls-cert")
    parser.add_argument("--tls-server-name", help="expected server name, if not the host")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("classify", help="classify .npy, IDX or image (PNG/JPEG) files")
    c.add_argument("files", nargs="+")
    c.add_argument("--batch-size", type=int, default=256, help="images per request")
    c.set_defaults(run=cmd_classify)
    e = sub.add_parser("eval", help="accuracy and throughput on an IDX test set")
    e.add_argument("--data-dir", required=True, help="directory with t10k-*-ubyte[.gz]")
    e.add_argument("--batch-size", type=int, default=256, help="images per request")
    e.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    e.add_argument("--limit", type=int, default=0, help="only the first N images")
    e.set_defaults(run=cmd_eval)
    m = sub.add_parser("models", help="models, versions, states and labels")
    m.set_defaults(run=cmd_models)
    admin_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "batch_size", 1) < 1 or getattr(args, "concurrency", 1) < 1:
        print("mnist-client: --batch-size and --concurrency must be at least 1", file=sys.stderr)
        return 2
    try:
        return int(args.run(args))
    except (ClientError, InputError) as e:
        print(f"mnist-client: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
