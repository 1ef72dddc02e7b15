"""A decoder process: `python -m mnist_imaging.worker FD MAX_BYTES MAX_PIXELS MAX_REQ_PIXELS`.

Started and killed by mnist_imaging.pool. It reads requests from the socket FD and answers
each with MNIST pixels or the first image's refusal. Image decoding is C code (libpng,
libjpeg, libwebp) fed bytes a stranger chose: here it can be killed when it overruns its time
limit, and a crash or an exploit stays in this process, which imports nothing of the server.

Wire format (multiprocessing.connection framing, no pickle in either direction, so a
compromised decoder cannot make the server run code):
    request:  <u32 n>, then n messages of image bytes
    reply:    b"\\x00" + n x 784 pixel bytes
              b"\\x01" + <u32 index> + reason \\0 format \\0 message (UTF-8)
"""

from __future__ import annotations

import signal
import struct
import sys
from multiprocessing.connection import Connection

from mnist_imaging.decode import ImageError, ImageLimits, to_mnist_counted

OK, FAILED = b"\x00", b"\x01"
READY = b"ready"  # sent once the imports are done: a job's time limit starts after it


def _refusal(index: int, reason: str, image_format: str, message: str) -> bytes:
    text = f"{reason}\0{image_format}\0{message}".encode("utf-8", "replace")
    return FAILED + struct.pack("<I", index) + text


def serve(conn: Connection, limits: ImageLimits) -> None:
    """Answer requests until the server closes its end."""
    while True:
        try:
            (n,) = struct.unpack("<I", conn.recv_bytes(4))
            blobs = [conn.recv_bytes() for _ in range(n)]
        except (EOFError, OSError):
            return
        out = bytearray(OK)
        budget = limits.max_request_pixels
        for i, blob in enumerate(blobs):
            try:
                pixels, cost = to_mnist_counted(blob, limits, pixels_left=budget)
                out += pixels.tobytes()
                budget -= cost
            except ImageError as e:
                message = str(e)
                if e.reason == "too_many_pixels" and budget < limits.max_pixels:
                    message += (f" (what is left of the request's {limits.max_request_pixels}"
                                "-pixel budget for all its images)")
                conn.send_bytes(_refusal(i, e.reason, e.format, message))
                break
            except MemoryError:
                conn.send_bytes(_refusal(i, "too_many_pixels", "unknown",
                                         "out of memory decoding the image"))
                break
            except Exception as e:  # a decoder bug: the image fails, the process lives on
                conn.send_bytes(_refusal(i, "corrupt", "unknown",
                                         f"could not decode ({type(e).__name__})"))
                break
        else:
            conn.send_bytes(bytes(out))


def main(argv: list[str]) -> int:
    fd, max_bytes, max_pixels, max_request_pixels = (int(a) for a in argv)
    # The server owns shutdown: it closes the socket (EOF ends serve) or kills us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from mnist_imaging.decode import _pillow

    _pillow()  # the plugins imported now, not within the first request's time limit
    conn = Connection(fd)
    try:
        conn.send_bytes(READY)
    except OSError:  # the server is gone already (it exited while we started)
        return 0
    serve(conn, ImageLimits(max_bytes=max_bytes, max_pixels=max_pixels,
                                      max_request_pixels=max_request_pixels))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
