"""A fixed set of decoder processes, each driven by one thread; a slow one is killed.

Why processes: a time limit on decoding must be enforceable, and a C decoder running in a
thread cannot be stopped (Python can only stop a thread between bytecodes, and libpng is
one call). A process can be killed at its deadline and replaced; a crash or an exploit in
a decoder stays in it. The price, measured by bench/image_bench.py, is one socket round trip
per request (not per image: a request's images travel together).

`decode()` blocks: the server calls it from its own small thread pool (one thread per
process, service/dataplane/images.py), never from the event loop or gRPC's polling thread.
"""

from __future__ import annotations

import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from mnist_imaging.decode import REASONS, ImageLimits
from mnist_imaging.preprocess import FIELD, Uint8Array
from mnist_imaging.worker import FAILED, OK, READY

PIXELS = FIELD * FIELD
# A decoder process's start-up (interpreter, NumPy, Pillow) on a host under heavy load.
STARTUP_TIMEOUT_S = 30.0
_ROOT = str(Path(__file__).resolve().parents[1])  # where `mnist_imaging` is importable from


class DecodeFailed(Exception):
    """One request's images could not be decoded; `reason` is one of decode.REASONS."""

    def __init__(self, reason: str, message: str, index: int | None = None,
                 image_format: str = "unknown") -> None:
        super().__init__(message)
        self.reason = reason
        self.index = index
        self.format = image_format


class _Worker:
    """One decoder process and the server's end of its socket."""

    def __init__(self, limits: ImageLimits) -> None:
        self._limits = limits
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._ready = False
        self.restarts = 0

    def start(self) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
        env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = "1"  # it does no matrix math
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "mnist_imaging.worker", str(theirs.fileno()),
             str(self._limits.max_bytes), str(self._limits.max_pixels),
             str(self._limits.max_request_pixels)],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,  # a terminal's Ctrl-C is the server's to handle
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        self._ready = False

    def stop(self) -> None:
        if self._conn is not None:
            self._conn.close()  # EOF: the worker returns
            self._conn = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def _replace(self) -> None:
        """Kill (SIGKILL: a decoder stuck in C ignores anything gentler) and start anew."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self.restarts += 1
        self.start()

    def _await_ready(self) -> None:
        """Wait for a fresh process's imports (seconds on a loaded host), so a request's time
        limit measures its decoding, never an interpreter starting; bounded all the same."""
        assert self._conn is not None
        if self._ready:
            return
        if not self._conn.poll(STARTUP_TIMEOUT_S) or self._conn.recv_bytes(16) != READY:
            self._replace()
            raise DecodeFailed("crashed", "the image decoder did not start")
        self._ready = True

    def run(self, blobs: Sequence[bytes], timeout_s: float) -> Uint8Array:
        if self._proc is None or self._proc.poll() is not None or self._conn is None:
            self._replace()
        assert self._conn is not None
        n = len(blobs)
        try:
            self._await_ready()
            self._conn.send_bytes(struct.pack("<I", n))
            for blob in blobs:
                self._conn.send_bytes(blob)
            if not self._conn.poll(max(0.0, timeout_s)):
                self._replace()
                raise DecodeFailed("timeout", f"decoding took longer than {timeout_s:.3g} s: "
                                              "the image is too costly to decode")
            reply = self._conn.recv_bytes(1 + n * PIXELS + 4096)
        except (EOFError, OSError) as e:
            self._replace()
            raise DecodeFailed("crashed", "the image decoder failed on this image "
                                          f"({type(e).__name__})") from None
        return _parse(reply, n)


def _parse(reply: bytes, n: int) -> Uint8Array:
    """The worker's answer, trusted no further than its shape."""
    if reply[:1] == OK and len(reply) == 1 + n * PIXELS:
        return np.frombuffer(reply, dtype=np.uint8, offset=1).reshape(n, FIELD, FIELD)
    if reply[:1] == FAILED and len(reply) >= 5:
        (index,) = struct.unpack("<I", reply[1:5])
        parts = reply[5:].decode("utf-8", "replace").split("\0", 2)
        if len(parts) == 3 and parts[0] in REASONS and index < n:
            return_reason, image_format, message = parts
            raise DecodeFailed(return_reason, message, index, image_format)
    raise DecodeFailed("crashed", "the image decoder answered nonsense")


class DecoderPool:
    """`workers` decoder processes; `decode` runs one request's images in an idle one."""

    def __init__(self, workers: int, limits: ImageLimits) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.limits = limits
        self._all = [_Worker(limits) for _ in range(workers)]
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        for w in self._all:
            w.start()
            self._idle.put(w)

    @property
    def restarts(self) -> int:
        """Processes replaced so far (killed at a time limit, or died)."""
        return sum(w.restarts for w in self._all)

    def decode(self, blobs: Sequence[bytes], timeout_s: float) -> Uint8Array:
        """(n, 28, 28) uint8 for `blobs`, or DecodeFailed; blocks (call it from a thread)."""
        worker = self._idle.get()
        try:
            if self._closed:
                raise DecodeFailed("crashed", "the image decoders are shut down")
            return worker.run(blobs, timeout_s)
        finally:
            self._idle.put(worker)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        deadline = time.monotonic() + 5.0
        for w in self._all:
            if time.monotonic() < deadline:
                w.stop()
