"""The service's few domain errors, and the one place they become gRPC status codes.

Raise these anywhere in the core; servicers call `status_of` and abort with what it gives.
Every message says what was expected and what was received.
"""

from __future__ import annotations

import re

import grpc


class ServiceError(Exception):
    """Base of every error a client may see; `code` is its gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidInput(ServiceError):
    """The request itself is wrong: bad encoding, byte length, shape, range, NaN, empty."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    """No such model, version or label."""

    code = grpc.StatusCode.NOT_FOUND


class Overloaded(ServiceError):
    """The bounded queue is full: retry later rather than wait without bound."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    """Not serving right now: no model loaded yet, or shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed before the work was done; the work was dropped."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(ServiceError):
    """An admin action that the current state does not allow (e.g. unloading the only version)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(ServiceError):
    """Admin call without a valid bearer token."""

    code = grpc.StatusCode.UNAUTHENTICATED


class ModelFileError(ValueError):
    """A model file that must not be served; its `reason` is a bounded slug. The format's
    own error (service/model.py's ModelFormatError) is one; defined here so this map needs
    nothing above the leaves."""

    reason: str = "internal"


# An absolute POSIX path (not the '/' inside '1/2' or 'a/b'): what a caller must not see.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/-])/[^\s'\",;:()\[\]{}<>]*")


def redact_paths(text: str) -> str:
    """`text` with every absolute server path replaced by '<path>' (they stay in the log)."""
    return _ABSOLUTE_PATH.sub("<path>", text)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and details a client gets for an exception: the only such map.

    Details never carry an absolute server path (a file, a symlink's target)."""
    if isinstance(exc, ServiceError):
        return exc.code, redact_paths(str(exc))
    if isinstance(exc, ModelFileError):
        return (grpc.StatusCode.FAILED_PRECONDITION,
                redact_paths(f"model rejected ({exc.reason}): {exc}"))
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
