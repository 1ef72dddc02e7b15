"""The model file format and the one forward pass, shared by the trainer and the service.

The trainer evaluates with `Model.predict` and the service answers with it, so the accuracy
the trainer records is exactly what the service will give. Nothing here imports grpc.

A version directory holds `model.npz` and `model.npz.sha256`. The npz is a plain zip of
`.npy` members, readable with `np.load(path, allow_pickle=False)`:

    W0..W{L-1}     float32 (fan_in, fan_out)   layer weights, x @ W + b
    b0..b{L-1}     float32 (fan_out,)          layer biases
    probe_inputs   float32 (k, 784)            inputs the trainer ran
    probe_outputs  float32 (k, 10)             what the trainer's forward pass gave for them
    metadata       uint8   (n,)                UTF-8 JSON, schema below

docs/model-format.md is the full description.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from service.errors import ModelFileError

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.npz"
CHECKSUM_FILE = "model.npz.sha256"
INPUT_SIZE = 784
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
HIDDEN_ACTIVATIONS = ("relu", "sigmoid", "tanh")
OUTPUT_ACTIVATIONS = ("softmax", "sigmoid")
# Refuse anything bigger before reading it: a 784-4096-4096-10 float32 MLP is ~80 MiB.
MAX_MODEL_BYTES = 256 * 1024 * 1024
# The checksum file is one line ("<64 hex>  model.npz"); anything past this is not one.
MAX_CHECKSUM_BYTES = 4096
# Metadata is rendered into every ListModels / GetModelInfo answer and walked by the
# servicers, so it is bounded in bytes, nesting and string length (a trained model's is
# ~40 KiB, 4 deep, longest string ~200 characters).
MAX_METADATA_BYTES = 256 * 1024
MAX_METADATA_DEPTH = 32
MAX_METADATA_STRING_CHARS = 4096
MAX_LABEL_CHARS = 64
# Integers in metadata must fit an int64 (the servicer turns numbers into doubles/int64).
_METADATA_INT_LIMIT = 2**63
MAX_LAYERS = 64
MAX_PROBES = 1024
# W0..W{L-1}, b0..b{L-1}, probe_inputs, probe_outputs, metadata.
MAX_MEMBERS = 2 * MAX_LAYERS + 3
# Only the methods np.savez (stored) and np.savez_compressed (deflate) write.
_COMPRESSION = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}
# How closely a loaded model must reproduce the outputs the trainer recorded.
PROBE_ATOL = 1e-5
PROBE_RTOL = 1e-4

Array = npt.NDArray[np.float32]
_ARRAY_NAME = re.compile(r"^(W|b)(\d+)$")
_REQUIRED_METADATA: dict[str, type | tuple[type, ...]] = {
    "format_version": int,
    "layer_sizes": list,
    "activations": list,
    "output": str,
    "cost": str,
    "input": dict,
    "labels": list,
    "training": dict,
    "data": dict,
    "metrics": dict,
    "created_at": str,
    "trainer_version": str,
}


# Why a version is not served: the only values of a version's `reason` and of the
# `reason` label of mnist_model_rejected_versions_total. Permanent ones say the files are
# wrong (not retried until they change); transient ones say reading them failed for a
# reason outside the files (retried with backoff). docs/model-format.md explains each.
PERMANENT_REASONS = frozenset({
    "missing_file", "not_a_directory", "not_regular_file", "symlink_loop", "unsafe_path",
    "unreadable", "too_large", "checksum", "not_npz", "truncated", "corrupt", "encrypted",
    "compression", "too_many_members", "duplicate_member", "unexpected_key", "missing_key",
    "pickle", "dtype", "shape", "input_size", "not_finite", "metadata", "probe_mismatch",
    "version_name", "model_name", "internal",
})
TRANSIENT_REASONS = frozenset({"transient_io", "load_timeout", "out_of_memory"})
REASONS = PERMANENT_REASONS | TRANSIENT_REASONS


class ModelFormatError(ModelFileError):
    """A model file that must not be served. `reason` is a short, bounded slug (a metric label).

    The message may name paths: it is for the log and the admin API, never for the
    unauthenticated APIs, which show only `reason`.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason if reason in PERMANENT_REASONS else "internal"


class TransientLoadError(Exception):
    """Reading a version failed for a reason outside its files (EIO, ESTALE, a file that
    changed while being read): the same files may well load if tried again later."""


# --- the forward pass ---------------------------------------------------------------------


def relu(z: Array) -> Array:
    return np.maximum(z, 0, out=z)


def sigmoid(z: Array) -> Array:
    # exp of a large positive -z overflows float32 to inf, and 1/(1+inf) is the right 0.
    with np.errstate(over="ignore"):
        np.negative(z, out=z)
        np.exp(z, out=z)
    z += 1
    return np.reciprocal(z, out=z)


def tanh(z: Array) -> Array:
    return np.tanh(z, out=z)


def softmax(z: Array) -> Array:
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


# In-place activations: each takes the pre-activation it may overwrite and returns it.
ACTIVATIONS: Mapping[str, Callable[[Array], Array]] = MappingProxyType(
    {"relu": relu, "sigmoid": sigmoid, "tanh": tanh, "softmax": softmax}
)


def forward(
    x: Array,
    weights: Sequence[Array],
    biases: Sequence[Array],
    activations: Sequence[str],
    output: str,
) -> Array:
    """Class probabilities (n, 10) for inputs (n, 784) in 0..1: one matrix product per layer.

    A sigmoid output layer (the quadratic-cost recipe) gives independent scores; they are
    normalised to sum to one so every model answers with a distribution.
    """
    a = x
    for w, b, act in zip(weights[:-1], biases[:-1], activations, strict=True):
        z = a @ w
        z += b
        a = ACTIVATIONS[act](z)
    z = a @ weights[-1]
    z += biases[-1]
    out = ACTIVATIONS[output](z)
    if output == "sigmoid":
        out /= out.sum(axis=1, keepdims=True)
    return out


def pixels_to_input(pixels: npt.NDArray[np.uint8]) -> Array:
    """Raw 0..255 pixels, any leading shape, to the model's float32 0..1 input rows."""
    x = pixels.reshape(-1, INPUT_SIZE).astype(np.float32)
    x *= np.float32(1.0 / 255.0)
    return x


# --- the loaded model ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class Model:
    """A validated, immutable model: read-only arrays, safe to share between threads."""

    weights: tuple[Array, ...]
    biases: tuple[Array, ...]
    activations: tuple[str, ...]
    output: str
    probe_inputs: Array
    probe_outputs: Array
    metadata: Mapping[str, Any] = field(repr=False)

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return (self.weights[0].shape[0], *(w.shape[1] for w in self.weights))

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(str(label) for label in self.metadata["labels"])

    def predict(self, x: Array) -> Array:
        """Probabilities (n, 10) for float32 inputs (n, 784) scaled to 0..1."""
        return forward(x, self.weights, self.biases, self.activations, self.output)


def build_model(
    weights: Sequence[npt.ArrayLike],
    biases: Sequence[npt.ArrayLike],
    activations: Sequence[str],
    output: str,
    metadata: Mapping[str, Any],
    probe_inputs: npt.ArrayLike,
) -> Model:
    """A Model from trained arrays; the probe outputs are computed here, by the shared pass."""
    ws = tuple(_parameter(np.asarray(w, dtype=np.float32)) for w in weights)
    bs = tuple(_parameter(np.asarray(b, dtype=np.float32)) for b in biases)
    probes = _frozen(np.asarray(probe_inputs, dtype=np.float32).reshape(-1, INPUT_SIZE))
    outputs = _frozen(forward(probes, ws, bs, activations, output))
    meta = dict(metadata)
    meta.setdefault("format_version", FORMAT_VERSION)
    meta["layer_sizes"] = [ws[0].shape[0], *(int(w.shape[1]) for w in ws)]
    meta["activations"] = list(activations)
    meta["output"] = output
    model = Model(ws, bs, tuple(activations), output, probes, outputs, MappingProxyType(meta))
    _validate(model)
    return model


def _frozen(a: Array) -> Array:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


_SMALLEST_NORMAL = np.finfo(np.float32).tiny  # 1.18e-38


def _parameter(a: Array) -> Array:
    """A weight or bias array as the forward pass uses it: subnormal floats read as zero.

    On x86 CPUs a matrix product over subnormal floats (|w| < 1.18e-38, which training with
    weight decay leaves behind) runs on a slow microcode path: the committed default model had
    3,284 of them, and its 256-row forward took 14 ms instead of 0.49 ms (bench/forward_bench.py)
    -- any model file could slow the server ~30x that way. Their products are below float32's
    resolution of any sum they join, so the answers do not change (probe outputs match to the
    bit); trainer and server both build models through here, so they compute the same thing.
    """
    a = np.asarray(a, dtype=np.float32)
    subnormal = (a != 0) & (np.abs(a) < _SMALLEST_NORMAL)
    if subnormal.any():
        a = np.where(subnormal, np.float32(0), a)
    return _frozen(a)


# --- writing ------------------------------------------------------------------------------


def save_model(model: Model, directory: Path) -> str:
    """Write model.npz and its sha256 into `directory` (which must exist), fsynced.

    The zip is written with fixed timestamps, so the same arrays and metadata give the same
    bytes. Publishing (temp dir + rename) is the trainer's job; this only writes files.
    Returns the sha256 hex digest.
    """
    members: dict[str, np.ndarray[Any, Any]] = {}
    for i, (w, b) in enumerate(zip(model.weights, model.biases, strict=True)):
        members[f"W{i}"] = w
        members[f"b{i}"] = b
    members["probe_inputs"] = model.probe_inputs
    members["probe_outputs"] = model.probe_outputs
    meta = json.dumps(dict(model.metadata), sort_keys=True, separators=(",", ":"))
    members["metadata"] = np.frombuffer(meta.encode("utf-8"), dtype=np.uint8)

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in members.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    _write_synced(directory / WEIGHTS_FILE, data)
    _write_synced(directory / CHECKSUM_FILE, f"{digest}  {WEIGHTS_FILE}\n".encode())
    return digest


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# --- reading and validating ---------------------------------------------------------------


def load_model(directory: Path, *, max_bytes: int = MAX_MODEL_BYTES) -> Model:
    """Load and fully validate the model in a version directory, or raise ModelFormatError.

    Symlinks are followed (to wherever they lead; `repository.load_inside` is the variant
    that keeps them inside the repository). Raises TransientLoadError when reading failed
    for a reason that may pass.
    """
    return load_files(
        Path(os.path.realpath(directory / WEIGHTS_FILE)),
        Path(os.path.realpath(directory / CHECKSUM_FILE)),
        max_bytes=max_bytes,
    )


def load_files(weights: Path, checksum: Path, *, max_bytes: int = MAX_MODEL_BYTES) -> Model:
    """Load and validate `weights` against `checksum`; both are real paths (no final symlink).

    Every exception it raises is a ModelFormatError (the files are wrong) or a
    TransientLoadError (reading them failed); anything else is a bug in this module.
    """
    data = read_regular_file(weights, max_bytes)
    expected = _read_checksum(checksum)
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ModelFormatError(
            "checksum", f"{weights}: sha256 is {actual}, {CHECKSUM_FILE} expects {expected}"
        )
    arrays = _read_npz(data, weights, max_bytes)
    return _from_arrays(arrays, weights)


# errno -> reason for errors that say the file itself is wrong; any other errno (EIO,
# ESTALE, ETIMEDOUT, EMFILE, ...) is transient.
_PERMANENT_ERRNOS: Mapping[int, str] = MappingProxyType({
    errno.ENOENT: "missing_file",
    errno.ENOTDIR: "not_a_directory",
    errno.ELOOP: "symlink_loop",
    errno.EACCES: "unreadable",
    errno.EPERM: "unreadable",
    errno.ENAMETOOLONG: "unreadable",
    errno.EISDIR: "not_regular_file",
    errno.ENXIO: "not_regular_file",  # a socket, or a device with no driver
    errno.ENODEV: "not_regular_file",
})


def os_error(path: Path, e: OSError) -> Exception:
    """The load error an OSError on `path` stands for: permanent by errno, else transient."""
    reason = _PERMANENT_ERRNOS.get(e.errno or 0)
    what = e.strerror or str(e)
    if reason is None:
        code = errno.errorcode.get(e.errno or 0, "?")
        return TransientLoadError(f"{path}: {what} ({code})")
    return ModelFormatError(reason, f"{path}: {what}")


def read_regular_file(path: Path, max_bytes: int, *, too_large: str = "too_large") -> bytes:
    """The bytes of `path` if it is a regular file of at most `max_bytes`, read with a bound.

    Opened with O_NONBLOCK (a FIFO or a device must not block the loader) and O_NOFOLLOW
    (the caller resolved the path; a symlink here is a loop or a race), then fstat'ed: only
    regular files are read, and only up to the size they declare plus one byte, so a file
    that grows while read is noticed rather than read without end.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise os_error(path, e) from None
    try:
        with os.fdopen(fd, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ModelFormatError(
                    "not_regular_file", f"{path}: a {_file_kind(st.st_mode)}, not a regular file"
                )
            if st.st_size > max_bytes:
                raise ModelFormatError(
                    too_large, f"{path}: {st.st_size} bytes, more than the {max_bytes} allowed"
                )
            data = f.read(st.st_size + 1) or b""
            if len(data) < st.st_size:  # a short read (network file systems): finish it
                parts, got = [data], len(data)
                while got <= st.st_size:
                    chunk = f.read(st.st_size + 1 - got)
                    if not chunk:
                        break
                    parts.append(chunk)
                    got += len(chunk)
                data = b"".join(parts)
    except OSError as e:
        raise os_error(path, e) from None
    if len(data) != st.st_size:
        raise TransientLoadError(
            f"{path}: changed while being read ({st.st_size} bytes at open, "
            f"{'more' if len(data) > st.st_size else len(data)} read)"
        )
    return data


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
        (stat.S_ISLNK, "symlink"),
    ):
        if test(mode):
            return kind
    return f"file of mode {mode:o}"


def _read_checksum(path: Path) -> str:
    raw = read_regular_file(path, MAX_CHECKSUM_BYTES, too_large="checksum")
    text = raw.decode("ascii", errors="replace")
    digest = text.split()[0].lower() if text.split() else ""
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ModelFormatError(
            "checksum", f"{path}: expected a sha256 hex digest, got {text[:80]!r}"
        )
    return digest


def _read_npz(data: bytes, path: Path, max_bytes: int) -> dict[str, np.ndarray[Any, Any]]:
    """Read every member, checking the directory and each header before allocating."""
    # zipfile builds one object per central-directory entry, and each needs this
    # signature: count them before parsing (a 256 MiB file could declare millions).
    if data.count(b"PK\x01\x02") > 8 * MAX_MEMBERS:
        raise ModelFormatError("too_many_members", f"{path}: far more zip entries than a model has")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        if data.startswith(b"PK\x03\x04"):  # starts like a zip but its directory is gone
            raise ModelFormatError(
                "truncated", f"{path}: zip archive cut short ({len(data)} bytes)"
            ) from None
        raise ModelFormatError("not_npz", f"{path}: not a zip archive (npz)") from None
    except (ValueError, OSError, EOFError, struct.error, zipfile.LargeZipFile) as e:
        raise ModelFormatError("corrupt", f"{path}: damaged zip directory: {e}") from None
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    try:
        with zf:
            infos = zf.infolist()
            _check_members(infos, path, max_bytes)
            for info in infos:
                name = info.filename.removesuffix(".npy")
                with zf.open(info) as f:
                    arrays[name] = _read_member(f, info.file_size, name, path, max_bytes)
    except ModelFormatError:
        raise
    except (
        zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, zlib.error,
        struct.error, NotImplementedError, RuntimeError,
    ) as e:
        # RuntimeError: a member flagged encrypted; NotImplementedError: a compression
        # method zipfile lacks; zlib.error: a damaged deflate stream. Checked up front,
        # but a damaged local header can still disagree with the directory.
        raise ModelFormatError("corrupt", f"{path}: damaged archive: {e}") from None
    return arrays


def _check_members(infos: list[zipfile.ZipInfo], path: Path, max_bytes: int) -> None:
    """The zip directory, before reading any member: names, count, flags, method, sizes."""
    if len(infos) > MAX_MEMBERS:
        raise ModelFormatError(
            "too_many_members", f"{path}: {len(infos)} members, at most {MAX_MEMBERS} allowed"
        )
    seen: set[str] = set()
    total = 0
    for info in infos:
        name = info.filename.removesuffix(".npy")
        if info.filename == name or "/" in name or "\\" in name or not name.isascii():
            raise ModelFormatError(
                "unexpected_key", f"{path}: unexpected member {info.filename[:80]!r}"
            )
        if name in seen:
            raise ModelFormatError("duplicate_member", f"{path}: member {name} appears twice")
        seen.add(name)
        if info.flag_bits & 0x1:
            raise ModelFormatError("encrypted", f"{path}: member {name} is encrypted")
        if info.compress_type not in _COMPRESSION:
            raise ModelFormatError(
                "compression",
                f"{path}: member {name} uses compression method {info.compress_type}; "
                f"only {sorted(_COMPRESSION.values())} are read",
            )
        total += info.file_size
        if info.file_size > max_bytes or total > max_bytes:
            raise ModelFormatError(
                "too_large",
                f"{path}: members declare {total} bytes uncompressed, more than the "
                f"{max_bytes} allowed",
            )


def _read_member(
    f: Any, size: int, name: str, path: Path, max_bytes: int
) -> np.ndarray[Any, Any]:
    version = np.lib.format.read_magic(f)
    read_header = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }.get(version)
    if read_header is None:
        raise ModelFormatError("corrupt", f"{path}: {name} has unknown .npy version {version}")
    shape, fortran, dtype = read_header(f)
    if dtype.hasobject:
        raise ModelFormatError(
            "pickle", f"{path}: {name} is an object array, which would need pickle to load"
        )
    declared = math.prod(shape) * dtype.itemsize
    if declared > max_bytes:
        raise ModelFormatError(
            "too_large",
            f"{path}: {name} declares shape {shape} ({declared} bytes), more than the "
            f"{max_bytes} allowed",
        )
    if declared != size - f.tell():
        raise ModelFormatError(
            "corrupt",
            f"{path}: {name} declares shape {shape} ({declared} bytes) "
            f"but holds {size - f.tell()} bytes",
        )
    raw = f.read(declared)
    array = np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return array


def _from_arrays(arrays: Mapping[str, np.ndarray[Any, Any]], path: Path) -> Model:
    for key in ("metadata", "probe_inputs", "probe_outputs"):
        if key not in arrays:
            raise ModelFormatError("missing_key", f"{path}: no {key!r} array")
    meta_raw = arrays["metadata"]
    if meta_raw.dtype != np.uint8 or meta_raw.ndim != 1:
        raise ModelFormatError(
            "metadata", f"{path}: metadata must be uint8 UTF-8 JSON, got {meta_raw.dtype}"
        )
    if meta_raw.size > MAX_METADATA_BYTES:
        raise ModelFormatError(
            "metadata",
            f"{path}: metadata is {meta_raw.size} bytes, at most {MAX_METADATA_BYTES} allowed",
        )
    try:
        metadata = json.loads(meta_raw.tobytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:
        # ValueError covers bad UTF-8, bad JSON and integers past Python's digit limit;
        # RecursionError, arrays nested thousands deep.
        raise ModelFormatError(
            "metadata", f"{path}: metadata is not UTF-8 JSON: {str(e)[:200]}"
        ) from None
    _check_json_bounds(metadata, path)
    _check_metadata(metadata, path)

    n_layers = len(metadata["layer_sizes"]) - 1
    expected = {f"W{i}" for i in range(n_layers)} | {f"b{i}" for i in range(n_layers)}
    expected |= {"metadata", "probe_inputs", "probe_outputs"}
    if set(arrays) != expected:
        missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
        raise ModelFormatError(
            "missing_key" if missing else "unexpected_key",
            f"{path}: arrays do not match layer_sizes {metadata['layer_sizes']}: "
            f"missing {missing}, unexpected {extra}",
        )
    for name, array in arrays.items():
        if name != "metadata" and array.dtype != np.float32:
            raise ModelFormatError(
                "dtype", f"{path}: {name} must be float32, got {array.dtype}"
            )
    model = Model(
        weights=tuple(_parameter(arrays[f"W{i}"]) for i in range(n_layers)),
        biases=tuple(_parameter(arrays[f"b{i}"]) for i in range(n_layers)),
        activations=tuple(metadata["activations"]),
        output=metadata["output"],
        probe_inputs=_frozen(arrays["probe_inputs"]),
        probe_outputs=_frozen(arrays["probe_outputs"]),
        metadata=MappingProxyType(metadata),
    )
    _validate(model, path, declared_sizes=metadata["layer_sizes"])
    return model


def _check_metadata(metadata: Any, path: Path) -> None:
    if not isinstance(metadata, dict):
        raise ModelFormatError("metadata", f"{path}: metadata must be a JSON object")
    for key, kind in _REQUIRED_METADATA.items():
        if key not in metadata:
            raise ModelFormatError("metadata", f"{path}: metadata has no {key!r}")
        if not isinstance(metadata[key], kind) or isinstance(metadata[key], bool):
            raise ModelFormatError(
                "metadata",
                f"{path}: metadata {key!r} must be {getattr(kind, '__name__', kind)}, "
                f"got {type(metadata[key]).__name__}",
            )
    if metadata["format_version"] != FORMAT_VERSION:
        raise ModelFormatError(
            "metadata",
            f"{path}: format_version {metadata['format_version']}, "
            f"this reader knows {FORMAT_VERSION}",
        )
    sizes = metadata["layer_sizes"]
    if not 2 <= len(sizes) <= MAX_LAYERS + 1 or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes
    ):
        raise ModelFormatError(
            "metadata",
            f"{path}: layer_sizes must be 2 to {MAX_LAYERS + 1} positive ints, "
            f"got {str(sizes)[:200]}",
        )
    labels = metadata["labels"]
    if len(labels) != NUM_CLASSES or not all(
        isinstance(label, str) and 0 < len(label) <= MAX_LABEL_CHARS for label in labels
    ):
        raise ModelFormatError(
            "metadata",
            f"{path}: labels must be {NUM_CLASSES} strings of 1 to {MAX_LABEL_CHARS} "
            f"characters, got {str(labels)[:200]}",
        )


def _check_json_bounds(value: Any, path: Path) -> None:
    """Bounds every servicer relies on when it renders metadata into an answer.

    Nesting (json.dumps and the metrics flattening recurse), string length and encoding
    (a lone surrogate such as "\\ud800" parses but cannot be sent as a protobuf string),
    and integer range (a 4000-digit integer cannot become a double). Iterative, so depth
    itself cannot overflow the stack here.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_METADATA_DEPTH:
            raise ModelFormatError(
                "metadata", f"{path}: metadata nests deeper than {MAX_METADATA_DEPTH} levels"
            )
        if isinstance(item, dict):
            for key, child in item.items():
                _check_json_string(key, path)
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str):
            _check_json_string(item, path)
        elif isinstance(item, int) and not -_METADATA_INT_LIMIT <= item < _METADATA_INT_LIMIT:
            raise ModelFormatError(
                "metadata", f"{path}: metadata holds an integer outside the int64 range"
            )


def _check_json_string(text: str, path: Path) -> None:
    if len(text) > MAX_METADATA_STRING_CHARS:
        raise ModelFormatError(
            "metadata",
            f"{path}: a metadata string of {len(text)} characters "
            f"(at most {MAX_METADATA_STRING_CHARS})",
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ModelFormatError(
            "metadata", f"{path}: metadata string {text[:40]!r} is not valid Unicode text"
        ) from None


def _validate(model: Model, path: Path | str = "<model>", declared_sizes: Any = None) -> None:
    """Everything a served model must satisfy; raises ModelFormatError naming the first fault."""
    sizes = list(declared_sizes) if declared_sizes is not None else None
    if len(model.weights) != len(model.biases) or not model.weights:
        raise ModelFormatError("shape", f"{path}: needs one bias per weight matrix")
    prev = INPUT_SIZE
    for i, (w, b) in enumerate(zip(model.weights, model.biases, strict=True)):
        if i == 0 and (w.ndim != 2 or w.shape[0] != INPUT_SIZE):
            raise ModelFormatError(
                "input_size",
                f"{path}: W0 must take {INPUT_SIZE} inputs (28x28 pixels), got shape {w.shape}",
            )
        if w.ndim != 2 or w.shape[0] != prev:
            raise ModelFormatError(
                "shape", f"{path}: W{i} must have shape ({prev}, n), got {w.shape}"
            )
        if b.shape != (w.shape[1],):
            raise ModelFormatError(
                "shape", f"{path}: b{i} must have shape ({w.shape[1]},), got {b.shape}"
            )
        prev = w.shape[1]
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise ModelFormatError("not_finite", f"{path}: W{i} or b{i} holds NaN or Inf")
    if prev != NUM_CLASSES:
        raise ModelFormatError(
            "shape", f"{path}: the last layer must have {NUM_CLASSES} outputs, got {prev}"
        )
    if sizes is not None and sizes != list(model.layer_sizes):
        raise ModelFormatError(
            "shape",
            f"{path}: metadata layer_sizes {sizes} but arrays give {list(model.layer_sizes)}",
        )
    if len(model.activations) != len(model.weights) - 1 or any(
        a not in HIDDEN_ACTIVATIONS for a in model.activations
    ):
        raise ModelFormatError(
            "metadata",
            f"{path}: activations must be one of {HIDDEN_ACTIVATIONS} per hidden layer "
            f"({len(model.weights) - 1}), got {list(model.activations)}",
        )
    if model.output not in OUTPUT_ACTIVATIONS:
        raise ModelFormatError(
            "metadata", f"{path}: output must be one of {OUTPUT_ACTIVATIONS}, got {model.output!r}"
        )
    labels = model.metadata.get("labels")
    if not isinstance(labels, list) or len(labels) != NUM_CLASSES:
        raise ModelFormatError("metadata", f"{path}: labels must list {NUM_CLASSES} class names")
    _check_probes(model, path)


def _check_probes(model: Model, path: Path | str) -> None:
    x, y = model.probe_inputs, model.probe_outputs
    if x.ndim != 2 or x.shape[1] != INPUT_SIZE or not 1 <= x.shape[0] <= MAX_PROBES:
        raise ModelFormatError(
            "shape",
            f"{path}: probe_inputs must have shape (1..{MAX_PROBES}, {INPUT_SIZE}), "
            f"got {x.shape}",
        )
    if y.shape != (x.shape[0], NUM_CLASSES):
        raise ModelFormatError(
            "shape",
            f"{path}: probe_outputs must have shape ({x.shape[0]}, {NUM_CLASSES}), got {y.shape}",
        )
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ModelFormatError("not_finite", f"{path}: probe arrays hold NaN or Inf")
    got = model.predict(x)
    if not np.allclose(got, y, rtol=PROBE_RTOL, atol=PROBE_ATOL):
        worst = float(np.abs(got - y).max())
        raise ModelFormatError(
            "probe_mismatch",
            f"{path}: the weights do not reproduce the recorded probe outputs "
            f"(largest difference {worst:.3g}); the file was altered or mis-built",
        )


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file, read in chunks (data fingerprints, checksums)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
