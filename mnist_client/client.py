"""Python clients for mnist.v1.Classifier: blocking (`ClassifierClient`) and asyncio
(`AsyncClassifierClient`), the same API shape.

    with ClassifierClient("127.0.0.1:50051") as client:
        result = client.classify(images)  # uint8 0..255 or float 0..1; (n, 28, 28) or (n, 784)
        result.labels, result.probabilities, result.model, result.version
        for result in client.classify_many(batches, concurrency=4):  # in order, 4 in flight
            ...

    async with AsyncClassifierClient(target) as client:
        result = await client.classify(images)
        async for result in client.classify_many(batches, concurrency=4): ...

Both carry by default the retry policy docs/deployment.md asks clients to use (`RetryPolicy`:
Classify and the read-only calls are retried on UNAVAILABLE and on a CANCELLED the server sent),
so a replica stopping behind a balancer costs the caller nothing; `retry=None` turns it off.

Images go over the wire packed (uint8 as is, floats as float32 little-endian), so a client
never builds per-pixel protobuf fields. gRPC failures become `ClientError` with a one-line
message (the CLI prints it as is).

Client-side code: it imports only grpc, numpy and the generated protos, never the server.
"""

from __future__ import annotations

import json
import typing
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
import numpy as np
import numpy.typing as npt

from service.pb.mnist.v1 import classifier_pb2 as pb
from service.pb.mnist.v1 import classifier_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
INPUT_SIZE = 28 * 28
NUM_CLASSES = 10
# Room for 4096 float32 images per request, like the server's default.
MAX_MESSAGE_BYTES = 4096 * INPUT_SIZE * 4 + 1024 * 1024
# Methods that are pure functions of their request, so a retry can never do harm twice.
# ClassifyStream is not among them: a stream that has answered cannot be replayed.
RETRIED_METHODS = ("Classify", "GetModelInfo", "ListModels")


class ClientError(Exception):
    """A request that failed; `code` is the gRPC status (None for local input errors)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's standard retry policy (gRFC A6), applied by the channel itself.

    The defaults are docs/deployment.md's: a replica that has begun a graceful stop refuses an
    RPC that reaches it in the moment before the balancer reads its GOAWAY with CANCELLED, and
    a balancer with no replica to take a call answers UNAVAILABLE; both are safe to retry
    because Classify is a pure function. A CANCELLED the caller caused itself is never retried.
    """

    max_attempts: int = 3
    initial_backoff_s: float = 0.01
    max_backoff_s: float = 0.1
    backoff_multiplier: float = 2.0
    retryable_codes: tuple[str, ...] = ("UNAVAILABLE", "CANCELLED")

    def service_config(self) -> str:
        """The channel's `grpc.service_config` JSON carrying this policy."""
        return json.dumps({"methodConfig": [{
            "name": [{"service": "mnist.v1.Classifier", "method": m} for m in RETRIED_METHODS],
            "retryPolicy": {
                "maxAttempts": self.max_attempts,
                "initialBackoff": f"{self.initial_backoff_s}s",
                "maxBackoff": f"{self.max_backoff_s}s",
                "backoffMultiplier": self.backoff_multiplier,
                "retryableStatusCodes": list(self.retryable_codes),
            },
        }]})


DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True)
class Classification:
    labels: npt.NDArray[np.int64]  # (n,) predicted class per image
    probabilities: npt.NDArray[np.float32]  # (n, 10)
    model: str
    version: int

    @property
    def confidences(self) -> npt.NDArray[np.float32]:
        return typing.cast(npt.NDArray[np.float32], self.probabilities.max(axis=1))


def encode_images(images: npt.ArrayLike) -> tuple[bytes, int, int]:
    """(packed pixels, encoding, image count) for uint8 or float images of 784 pixels each."""
    arr = np.asarray(images)
    if arr.size == 0 or arr.size % INPUT_SIZE:
        raise ClientError(
            f"images must hold a multiple of {INPUT_SIZE} pixels (28x28 each), got shape "
            f"{arr.shape}"
        )
    n = arr.size // INPUT_SIZE
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr).tobytes(), pb.ENCODING_UINT8, n
    if arr.dtype.kind == "f":
        return (np.ascontiguousarray(arr, dtype="<f4").tobytes(), pb.ENCODING_FLOAT32_LE, n)
    raise ClientError(f"images must be uint8 (0..255) or float (0..1), got dtype {arr.dtype}")


def classify_request(
    images: npt.ArrayLike, *, model: str = "", version: int = 0, label: str = "",
    routing_key: str = "",
) -> pb.ClassifyRequest:
    """`routing_key`: while the model has a canary, the same key always reaches the same
    version (empty: the server draws at random)."""
    pixels, encoding, n = encode_images(images)
    return pb.ClassifyRequest(
        pixels=pixels, encoding=encoding, image_count=n,  # type: ignore[arg-type]
        model=model, version=version, version_label=label, packed_output=True,
        routing_key=routing_key,
    )


def unpack(
    response: pb.ClassifyResponse,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """(labels, probabilities) from either response form."""
    if response.probabilities_f32le:
        probs = np.frombuffer(response.probabilities_f32le, dtype="<f4").reshape(-1, NUM_CLASSES)
        return np.asarray(response.labels, dtype=np.int64), probs.astype(np.float32)
    probs = np.array([list(p.probabilities) for p in response.predictions],
                     dtype=np.float32).reshape(-1, NUM_CLASSES)
    return np.array([p.label for p in response.predictions], dtype=np.int64), probs


def classification(response: pb.ClassifyResponse) -> Classification:
    return Classification(*unpack(response), response.model, int(response.version))


def rpc_error(target: str, e: grpc.RpcError) -> ClientError:
    """The one-line ClientError for a failed call (sync or aio)."""
    code: grpc.StatusCode = e.code()
    details = e.details() or code.name
    if code == grpc.StatusCode.UNAVAILABLE and (
        "connect" in details.lower() or "failed to" in details.lower()
    ):
        return ClientError(f"cannot reach server at {target}: {details}", code)
    return ClientError(f"{code.name}: {details}", code)


def channel_options(
    retry: RetryPolicy | None, tls_server_name: str | None = None
) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    if retry is None:
        options.append(("grpc.enable_retries", 0))
    else:
        options += [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", retry.service_config()),
            # gRPC keeps a request for replay only up to this size (256 KiB by default), and
            # silently stops retrying larger ones: a 256-image uint8 request is 200 KB, a
            # 4096-image float one 12.8 MB. The request is held by the caller anyway.
            ("grpc.per_rpc_retry_buffer_size", MAX_MESSAGE_BYTES),
        ]
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    return options


def _read(path: Path | str | bytes | None) -> bytes | None:
    if path is None or isinstance(path, bytes):
        return path
    return Path(path).read_bytes()


def credentials(
    tls: bool,
    tls_ca: Path | str | bytes | None,
    tls_cert: Path | str | bytes | None,
    tls_key: Path | str | bytes | None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials when any TLS option is given, else None (plaintext)."""
    if not (tls or tls_ca is not None or tls_cert is not None):
        return None
    return grpc.ssl_channel_credentials(_read(tls_ca), _read(tls_key), _read(tls_cert))


class _Connection:
    """The channel and stub both clients share; `_api` is `grpc` or `grpc.aio`, whose channel
    constructors take the same arguments."""

    _api: Any = grpc

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = DEFAULT_RETRY,
        tls: bool = False,
        tls_ca: Path | str | bytes | None = None,
        tls_cert: Path | str | bytes | None = None,
        tls_key: Path | str | bytes | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        options = channel_options(retry, tls_server_name)
        creds = credentials(tls, tls_ca, tls_cert, tls_key)
        if creds is not None:
            self._channel = self._api.secure_channel(target, creds, options=options)
        else:
            self._channel = self._api.insecure_channel(target, options=options)
        self._stub = pb_grpc.ClassifierStub(self._channel)  # type: ignore[no-untyped-call]


class ClassifierClient(_Connection):
    """A channel to one server; thread-safe (gRPC channels are)."""


    def __enter__(self) -> ClassifierClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any, timeout_s: float | None) -> Any:
        try:
            return method(request, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as e:
            raise rpc_error(self.target, e) from None

    def classify(
        self,
        images: npt.ArrayLike,
        *,
        model: str = "",
        version: int = 0,
        label: str = "",
        routing_key: str = "",
        timeout_s: float | None = None,
    ) -> Classification:
        request = classify_request(images, model=model, version=version, label=label,
                                   routing_key=routing_key)
        return classification(self._call(self._stub.Classify, request, timeout_s))

    def classify_many(
        self,
        batches: Iterable[npt.ArrayLike],
        *,
        concurrency: int = 4,
        model: str = "",
        version: int = 0,
        label: str = "",
        routing_key: str = "",
        timeout_s: float | None = None,
    ) -> Iterator[Classification]:
        """One Classification per batch, in input order, with up to `concurrency` in flight.

        Each batch is its own unary Classify call, so each is retried on its own and, behind
        an L7 balancer, spread over the replicas (a ClassifyStream is pinned to one replica and
        loses everything in flight when that replica stops). `batches` is read lazily: at most
        `concurrency` batches are held (sent or answered, not yet yielded), so memory stays
        bounded for any input size. A failed batch raises ClientError; breaking out of the loop
        cancels the calls still in flight.
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        pending: deque[grpc.Future | ClientError] = deque()
        source = iter(batches)
        timeout = timeout_s or self.timeout_s
        try:
            while True:
                while len(pending) < concurrency:
                    try:
                        batch = next(source)
                    except StopIteration:
                        break
                    try:
                        request = classify_request(
                            batch, model=model, version=version, label=label,
                            routing_key=routing_key)
                    except ClientError as e:
                        pending.append(e)  # raised in its turn, after the batches before it
                        continue
                    pending.append(self._stub.Classify.future(request, timeout=timeout))
                if not pending:
                    return
                call = pending.popleft()
                if isinstance(call, ClientError):
                    raise call
                try:
                    response = call.result()
                except grpc.RpcError as e:
                    raise rpc_error(self.target, e) from None
                yield classification(response)
        finally:
            for call in pending:
                if not isinstance(call, ClientError):
                    call.cancel()

    def models(self, timeout_s: float | None = None) -> list[pb.ModelInfo]:
        response = self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout_s)
        return list(response.models)

    def model_info(self, model: str = "", timeout_s: float | None = None) -> pb.ModelInfo:
        info: pb.ModelInfo = self._call(
            self._stub.GetModelInfo, pb.GetModelInfoRequest(model=model), timeout_s
        )
        return info


class AsyncClassifierClient(_Connection):
    """The asyncio client (grpc.aio): ClassifierClient's API with `await` / `async for`.

    Create it inside the event loop that uses it (grpc.aio channels belong to one loop).
    """

    _api = grpc.aio


    async def __aenter__(self) -> AsyncClassifierClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any, timeout_s: float | None) -> Any:
        try:
            return await method(request, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as e:
            raise rpc_error(self.target, e) from None

    async def classify(
        self,
        images: npt.ArrayLike,
        *,
        model: str = "",
        version: int = 0,
        label: str = "",
        routing_key: str = "",
        timeout_s: float | None = None,
    ) -> Classification:
        request = classify_request(images, model=model, version=version, label=label,
                                   routing_key=routing_key)
        return classification(await self._call(self._stub.Classify, request, timeout_s))

    async def classify_many(
        self,
        batches: Iterable[npt.ArrayLike] | AsyncIterable[npt.ArrayLike],
        *,
        concurrency: int = 4,
        model: str = "",
        version: int = 0,
        label: str = "",
        routing_key: str = "",
        timeout_s: float | None = None,
    ) -> AsyncIterator[Classification]:
        """ClassifierClient.classify_many for asyncio; `batches` may be an async iterable."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        source = _aiter(batches)
        pending: deque[Any] = deque()  # started grpc.aio calls (awaitable) or a ClientError
        timeout = timeout_s or self.timeout_s
        try:
            while True:
                while len(pending) < concurrency:
                    try:
                        batch = await anext(source)
                    except StopAsyncIteration:
                        break
                    try:
                        request = classify_request(
                            batch, model=model, version=version, label=label,
                            routing_key=routing_key)
                    except ClientError as e:
                        pending.append(e)
                        continue
                    pending.append(self._stub.Classify(request, timeout=timeout))
                if not pending:
                    return
                call = pending.popleft()
                if isinstance(call, ClientError):
                    raise call
                try:
                    response = await call
                except grpc.RpcError as e:
                    raise rpc_error(self.target, e) from None
                yield classification(response)
        finally:
            for call in pending:
                if not isinstance(call, ClientError):
                    call.cancel()

    async def models(self, timeout_s: float | None = None) -> list[pb.ModelInfo]:
        response = await self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout_s)
        return list(response.models)

    async def model_info(self, model: str = "", timeout_s: float | None = None) -> pb.ModelInfo:
        info: pb.ModelInfo = await self._call(
            self._stub.GetModelInfo, pb.GetModelInfoRequest(model=model), timeout_s
        )
        return info


async def _aiter(items: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
