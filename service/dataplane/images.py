"""Encoded images on the request path: check a request's image fields, decode them off-thread.

The one hook each API has ("if the request carries encoded images, decode them here, then go
on with pixels") calls into this module:

    blobs = images.classify_blobs(request, max_images)      # mnist.v1: checks, no decoding
    blobs = images.v2_blobs(request, max_images)            # v2: a BYTES input, else None
    x = await decoder.decode(blobs, deadline_s)             # float32 (n, 784), like pixels

Decoding runs in mnist_imaging's decoder processes, each driven by one thread of a small pool
owned here: never on the event loop, never on gRPC core's polling thread (the fast lane hands
such requests to the loop with `start_soon`). Every cost a caller controls is bounded before
any work: bytes per image and per request, image count, requests waiting for a decoder
(RESOURCE_EXHAUSTED past it); pixels per image (from the header) and decode time are bounded
in the decoder. Without Pillow, or with --image-decode-workers 0, the server starts and serves
pixels as ever, and refuses encoded images with FAILED_PRECONDITION saying why.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import struct
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from mnist_imaging.decode import FORMATS, ImageLimits, available
from service.config import Settings
from service.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidInput,
    Overloaded,
)
from service.metrics import Metrics
from service.model import Array, pixels_to_input
from service.pb.inference import grpc_service_pb2 as v2
from service.pb.mnist.v1 import classifier_pb2 as pb

log = logging.getLogger(__name__)

V2_INPUT = "images"
_Element = TypeVar("_Element")


@dataclass(frozen=True, slots=True)
class ImageSettings:
    """What the decoder uses of Settings, and nothing more (the --image-* flags)."""

    limits: ImageLimits
    max_request_bytes: int
    decode_timeout_s: float
    max_waiting: int
    decode_workers: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageSettings:
        return cls(ImageLimits(max_bytes=settings.image_max_bytes,
                               max_pixels=settings.image_max_pixels,
                               max_request_pixels=settings.image_max_request_pixels),
                   settings.image_max_request_bytes, settings.image_decode_timeout_s,
                   settings.image_max_waiting, settings.image_decode_workers)


class ImageDecoder:
    """The server's decoder processes and the bounds around them."""

    def __init__(self, settings: ImageSettings, metrics: Metrics) -> None:
        self._metrics = metrics
        self._limits = settings.limits
        self._max_request_bytes = settings.max_request_bytes
        self._timeout_s = settings.decode_timeout_s
        self._max_waiting = settings.max_waiting
        self._waiting = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: Any = None
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        # The loop holds tasks weakly; these futures hold them (through their callbacks).
        self._tasks: set[concurrent.futures.Future[None]] = set()
        self.unavailable: str | None = None
        if settings.decode_workers == 0:
            self.unavailable = ("this server does not decode encoded images "
                                "(--image-decode-workers 0): send pixels instead")
        elif not available():
            self.unavailable = ("this server was installed without the 'image' extra "
                                "(Pillow), so it cannot decode encoded images: send pixels "
                                "instead")
        else:
            from mnist_imaging.pool import DecoderPool

            self._pool = DecoderPool(settings.decode_workers, self._limits)
            self._threads = concurrent.futures.ThreadPoolExecutor(
                settings.decode_workers, thread_name_prefix="image-decode"
            )
        self._workers = settings.decode_workers if self._pool is not None else 0

    @classmethod
    def off(cls, metrics: Metrics | None = None) -> ImageDecoder:
        return cls(ImageSettings.from_settings(Settings(image_decode_workers=0)),
                   metrics or Metrics.disabled())

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the fast lane hands image requests to (start_server calls it)."""
        self._loop = loop
        log.info("event=image_decoding status=%s workers=%d max_bytes=%d max_pixels=%d%s",
                 "on" if self.unavailable is None else "off", self._workers,
                 self._limits.max_bytes, self._limits.max_pixels,
                 "" if self.unavailable is None else f" reason={self.unavailable!r}")

    def check(self, blobs: Sequence[bytes], max_images: int) -> None:
        """Everything cheap, before a request is queued for decoding."""
        if self.unavailable is not None:
            raise FailedPrecondition(self.unavailable)
        n = len(blobs)
        if n > max_images:
            raise InvalidInput(f"{n} images in one request: at most {max_images} allowed")
        total = 0
        for i, blob in enumerate(blobs):
            if not blob:
                self._refused("empty")
                raise InvalidInput(f"image {i} is empty: expected the bytes of an encoded image")
            if len(blob) > self._limits.max_bytes:
                self._refused("too_large")
                raise InvalidInput(f"image {i} is {len(blob)} bytes: at most "
                                   f"{self._limits.max_bytes} bytes allowed per image")
            total += len(blob)
        if total > self._max_request_bytes:
            self._refused("too_large")
            raise InvalidInput(f"{total} bytes of encoded images in one request: at most "
                               f"{self._max_request_bytes} allowed")

    def _refused(self, reason: str) -> None:
        self._metrics.image_decoded(0.0, ("unknown", reason))

    def start_soon(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` on the event loop, from any thread (the fast lane's polling thread)."""
        assert self._loop is not None, "ImageDecoder.bind() was not called"
        future = asyncio.run_coroutine_threadsafe(work, self._loop)
        self._tasks.add(future)
        future.add_done_callback(self._tasks.discard)

    async def decode(self, blobs: Sequence[bytes], deadline_s: float | None) -> Array:
        """The images as the model's float32 rows (n, 784) in 0..1, as if sent as pixels."""
        from mnist_imaging.pool import DecodeFailed

        if self._pool is None or self._threads is None:
            raise FailedPrecondition(self.unavailable or "image decoding is off")
        if self._waiting >= self._max_waiting:
            raise Overloaded(f"{self._waiting} requests are waiting for an image decoder: "
                             "retry with backoff")
        timeout_s, by_deadline = self._timeout_s * len(blobs), False
        if deadline_s is not None and deadline_s < timeout_s:
            timeout_s, by_deadline = deadline_s, True
        started = time.perf_counter()
        self._waiting += 1
        try:
            loop = asyncio.get_running_loop()
            pixels = await loop.run_in_executor(
                self._threads, self._pool.decode, list(blobs), timeout_s
            )
        except DecodeFailed as e:
            fmt = e.format if e.format in FORMATS else "unknown"
            self._metrics.image_decoded(time.perf_counter() - started, (fmt, e.reason))
            if e.reason == "timeout" and by_deadline:
                raise DeadlineExceeded("the deadline passed while the images were decoded") \
                    from None
            where = f"image {e.index}: " if e.index is not None else ""
            raise InvalidInput(f"{where}{e}") from None
        finally:
            self._waiting -= 1
        self._metrics.image_decoded(time.perf_counter() - started)
        return pixels_to_input(pixels)

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
        if self._pool is not None:
            self._pool.close()


def classify_blobs(request: pb.ClassifyRequest) -> list[bytes]:
    """mnist.v1: the encoded images of a request that carries them; the shape rules only."""
    if request.pixels or request.encoding != pb.ENCODING_UNSPECIFIED:
        raise InvalidInput(
            "a request carries pixels (with encoding) or encoded images, not both: got "
            f"{len(request.pixels)} bytes of pixels, encoding {int(request.encoding)} and "
            f"{len(request.images)} image(s)"
        )
    if request.image_count and request.image_count != len(request.images):
        raise InvalidInput(f"image_count is {request.image_count} but images holds "
                           f"{len(request.images)} image(s)")
    return list(request.images)


def v2_blobs(request: v2.ModelInferRequest) -> list[bytes] | None:
    """v2 over gRPC: the encoded images of a request whose input is BYTES (as Triton's image
    clients send: one element per file, shape [N] or [N, 1]); None for any other request."""
    if len(request.inputs) != 1 or request.inputs[0].datatype != "BYTES":
        return None
    tensor = request.inputs[0]
    dims = tuple(tensor.shape)
    check_bytes_input(tensor.name, dims)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1 or tensor.contents.ListFields():
            raise InvalidInput("raw_input_contents: expected 1 entry holding the BYTES input, "
                               f"got {len(request.raw_input_contents)}")
        blobs = split_bytes_tensor(request.raw_input_contents[0], dims[0])
    else:
        others = [f.name for f, _ in tensor.contents.ListFields() if f.name != "bytes_contents"]
        if others:
            raise InvalidInput(f"input {V2_INPUT!r} is BYTES: expected its values in "
                               f"bytes_contents, got {', '.join(others)}")
        blobs = list(tensor.contents.bytes_contents)
    return matching_count(dims, blobs)


def check_bytes_input(name: str, dims: Sequence[int]) -> int:
    """v2, any wire: the number of images a BYTES input of this name and shape declares."""
    if name != V2_INPUT:
        raise InvalidInput(f"expected an input named {V2_INPUT!r}, got {name!r}")
    if not (len(dims) == 1 or (len(dims) == 2 and dims[1] == 1)) or dims[0] < 1:
        raise InvalidInput(f"input {V2_INPUT!r} is BYTES (encoded images): expected shape "
                           f"[N] or [N, 1] with N >= 1, got {list(dims)}")
    return int(dims[0])


def matching_count(dims: Sequence[int], blobs: list[_Element]) -> list[_Element]:
    """`blobs` (files, or a wire's form of them), when there are as many as the (checked)
    shape `dims` declares."""
    if len(blobs) != dims[0]:
        raise InvalidInput(f"input {V2_INPUT!r}: shape {list(dims)} says {dims[0]} image(s), "
                           f"got {len(blobs)}")
    return blobs


def split_bytes_tensor(data: bytes | memoryview, most: int) -> list[bytes]:
    """Triton's raw BYTES layout, the same on gRPC (`raw_input_contents`) and HTTP (the binary
    tensor data extension): each element is a little-endian u32 length, then its bytes. Stops
    past `most` elements (the shape's count): a caller's element count bounds the loop."""
    out: list[bytes] = []
    view = memoryview(data)
    at = 0
    while at < len(view) and len(out) <= most:
        if at + 4 > len(view):
            raise InvalidInput(f"raw BYTES input: {len(view) - at} stray byte(s) at offset "
                               f"{at}: expected a 4-byte length")
        (size,) = struct.unpack_from("<I", view, at)
        at += 4
        if at + size > len(view):
            raise InvalidInput(f"raw BYTES input: element {len(out)} declares {size} bytes, "
                               f"{len(view) - at} remain")
        out.append(bytes(view[at: at + size]))
        at += size
    return out
