"""A small Python client for mnist.v1.Classifier.

    with ClassifierClient("127.0.0.1:50051") as client:
        result = client.classify(images)  # uint8 0..255 or float 0..1; (n, 28, 28) or (n, 784)
        result.labels, result.probabilities, result.model, result.version

Images go over the wire packed (uint8 as is, floats as float32 little-endian), so a client
never builds per-pixel protobuf fields. gRPC failures become `ClientError` with a one-line
message (the CLI prints it as is).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from service.model import INPUT_SIZE
from service.pb.mnist.v1 import classifier_pb2 as pb
from service.pb.mnist.v1 import classifier_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
# Room for 4096 float32 images per request, like the server's default.
MAX_MESSAGE_BYTES = 4096 * INPUT_SIZE * 4 + 1024 * 1024


class ClientError(Exception):
    """A request that failed; `code` is the gRPC status (None for local input errors)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


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


def unpack(
    response: pb.ClassifyResponse,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """(labels, probabilities) from either response form."""
    if response.probabilities_f32le:
        probs = np.frombuffer(response.probabilities_f32le, dtype="<f4").reshape(-1, 10)
        return np.asarray(response.labels, dtype=np.int64), probs.astype(np.float32)
    probs = np.array([list(p.probabilities) for p in response.predictions],
                     dtype=np.float32).reshape(-1, 10)
    return np.array([p.label for p in response.predictions], dtype=np.int64), probs


def _read(path: Path | str | bytes | None) -> bytes | None:
    if path is None or isinstance(path, bytes):
        return path
    return Path(path).read_bytes()


class ClassifierClient:
    """A channel to one server; thread-safe (gRPC channels are)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout_s: float = 30.0,
        tls: bool = False,
        tls_ca: Path | str | bytes | None = None,
        tls_cert: Path | str | bytes | None = None,
        tls_key: Path | str | bytes | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if tls or tls_ca is not None or tls_cert is not None:
            creds = grpc.ssl_channel_credentials(_read(tls_ca), _read(tls_key), _read(tls_cert))
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.ClassifierStub(self._channel)  # type: ignore[no-untyped-call]

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
            code = e.code()
            details = e.details() or str(code)
            if code == grpc.StatusCode.UNAVAILABLE and (
                "connect" in details.lower() or "failed to" in details.lower()
            ):
                raise ClientError(f"cannot reach server at {self.target}: {details}",
                                  code) from None
            raise ClientError(f"{code.name}: {details}", code) from None

    def classify(
        self,
        images: npt.ArrayLike,
        *,
        model: str = "",
        version: int = 0,
        label: str = "",
        timeout_s: float | None = None,
    ) -> Classification:
        pixels, encoding, n = encode_images(images)
        request = pb.ClassifyRequest(
            pixels=pixels, encoding=encoding, image_count=n,  # type: ignore[arg-type]
            model=model, version=version, version_label=label, packed_output=True,
        )
        response = self._call(self._stub.Classify, request, timeout_s)
        return Classification(*unpack(response), response.model, int(response.version))

    def models(self, timeout_s: float | None = None) -> list[pb.ModelInfo]:
        response = self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout_s)
        return list(response.models)

    def model_info(self, model: str = "", timeout_s: float | None = None) -> pb.ModelInfo:
        info: pb.ModelInfo = self._call(
            self._stub.GetModelInfo, pb.GetModelInfoRequest(model=model), timeout_s
        )
        return info
