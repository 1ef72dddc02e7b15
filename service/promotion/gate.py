"""A model's quality gate: a labelled evaluation set and the bar a new version must clear.

The format (docs/versions.md, "Quality gate"), beside the versions of a model::

    models/<name>/gate/
      gate.json   {"min_accuracy": 0.95, "max_drop": 0.01}
      eval.npz    images: uint8 (N, 784), labels: integer (N,) in 0..9, 1 <= N <= 20,000

`gate` is not an integer, so the repository scan never takes it for a version. A gate file
is an input like a model file: both are read with the loader's bounded reads
(`service.model.read_regular_file`, the npz reader that checks every header before
allocating, no pickles), and anything wrong with them is a `GateError`. What the registry
does with a broken gate is its policy (`service.registry.manager`): hold new versions,
keep serving.

A version is evaluated with `Model.predict`, the forward that serves it, on pixels scaled as
the uint8 wire encoding scales them (`service.model.pixels_to_input`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from service.model import (
    INPUT_SIZE,
    NUM_CLASSES,
    Model,
    ModelFormatError,
    pixels_to_input,
    read_regular_file,
)
from service.model import _read_npz as read_npz

GATE_DIR = "gate"
GATE_JSON = "gate.json"
GATE_EVAL = "eval.npz"
MAX_GATE_JSON_BYTES = 16 * 1024
MAX_GATE_IMAGES = 20_000
# images (N x 784 uint8) + labels (N x 8 at most) + zip overhead
MAX_GATE_EVAL_BYTES = MAX_GATE_IMAGES * (INPUT_SIZE + 8) + 64 * 1024
# Rows per forward while evaluating: bounds the float32 copy (~3 MiB), not the set.
_CHUNK_ROWS = 1024

GateSignature = tuple[object, ...]


class GateError(ValueError):
    """The gate's files are missing a part, too big, or not in the documented format."""


@dataclass(frozen=True, slots=True)
class Gate:
    """A validated gate: read-only evaluation arrays and the two thresholds."""

    images: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.int64]
    min_accuracy: float
    max_drop: float | None


@dataclass(frozen=True, slots=True)
class Verdict:
    """One version measured against a gate. `detail` holds figures only, never a path, so it
    may be shown to unauthenticated callers (ListModels) as the rejection's reason."""

    passed: bool
    accuracy: float
    baseline: float | None
    detail: str


def signature(model_dir: Path) -> GateSignature | None:
    """The identity of a model's gate files (None: the model has no gate directory).

    Like a version's signature: real path, inode, size and times, so an edited gate is
    read again at the next scan (hot reload) and one left alone is not.
    """
    gate_dir = model_dir / GATE_DIR
    if not os.path.lexists(gate_dir):
        return None
    out: list[object] = [os.path.realpath(gate_dir)]
    for name in (GATE_JSON, GATE_EVAL):
        try:
            st = os.lstat(gate_dir / name)
            out.append((name, st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        except OSError:
            out.append((name, None))
    return tuple(out)


def load_gate(model_dir: Path) -> Gate:
    """Read and validate `<model_dir>/gate/` (blocking, bounded); GateError says what is wrong."""
    gate_dir = model_dir / GATE_DIR
    real_root = Path(os.path.realpath(model_dir))
    for name in (GATE_JSON, GATE_EVAL):
        real = Path(os.path.realpath(gate_dir / name))
        if not real.is_relative_to(real_root):
            raise GateError(f"{gate_dir / name} resolves outside the model directory")
    try:
        settings = _settings(read_regular_file(gate_dir / GATE_JSON, MAX_GATE_JSON_BYTES))
        data = read_regular_file(gate_dir / GATE_EVAL, MAX_GATE_EVAL_BYTES)
        arrays = read_npz(data, gate_dir / GATE_EVAL, MAX_GATE_EVAL_BYTES)
    except ModelFormatError as e:
        raise GateError(f"{e.reason}: {e}") from None
    except OSError as e:  # read_regular_file maps errnos, but be sure nothing escapes
        raise GateError(f"{gate_dir}: {e.strerror or e}") from None
    except Exception as e:  # TransientLoadError and the unforeseen: the gate is unusable now
        raise GateError(f"{gate_dir}: {type(e).__name__}: {str(e)[:200]}") from None
    images, labels = _arrays(arrays)
    return Gate(images, labels, *settings)


def _settings(raw: bytes) -> tuple[float, float | None]:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise GateError(f"{GATE_JSON}: not valid JSON ({str(e)[:100]})") from None
    if not isinstance(doc, dict):
        raise GateError(f"{GATE_JSON}: expected an object, got {type(doc).__name__}")
    unknown = sorted(set(doc) - {"min_accuracy", "max_drop", "format", "note"})
    if unknown:
        raise GateError(f"{GATE_JSON}: unknown keys {[str(k)[:40] for k in unknown][:5]}")
    if doc.get("format", 1) != 1:
        raise GateError(f"{GATE_JSON}: format {str(doc['format'])[:20]!r}, expected 1")
    min_accuracy = _fraction(doc.get("min_accuracy", 0.0), "min_accuracy")
    max_drop = doc.get("max_drop")
    return min_accuracy, None if max_drop is None else _fraction(max_drop, "max_drop")


def _fraction(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
        math.isfinite(value) and 0.0 <= value <= 1.0
    ):
        raise GateError(f"{GATE_JSON}: {key} must be a number in 0..1, got {str(value)[:40]}")
    return float(value)


def _arrays(arrays: dict[str, np.ndarray[Any, Any]]) -> tuple[
    npt.NDArray[np.uint8], npt.NDArray[np.int64]
]:
    if set(arrays) != {"images", "labels"}:
        raise GateError(f"{GATE_EVAL}: expected arrays images and labels, got {sorted(arrays)[:5]}")
    images, labels = arrays["images"], arrays["labels"]
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != INPUT_SIZE:
        raise GateError(
            f"{GATE_EVAL}: images must be uint8 (N, {INPUT_SIZE}), got {images.dtype} "
            f"{images.shape}"
        )
    n = images.shape[0]
    if not 1 <= n <= MAX_GATE_IMAGES:
        raise GateError(f"{GATE_EVAL}: {n} images, expected 1 to {MAX_GATE_IMAGES}")
    if labels.dtype.kind not in "iu" or labels.shape != (n,):
        raise GateError(
            f"{GATE_EVAL}: labels must be integers of shape ({n},), got {labels.dtype} "
            f"{labels.shape}"
        )
    out = labels.astype(np.int64)
    if out.min() < 0 or out.max() >= NUM_CLASSES:
        raise GateError(f"{GATE_EVAL}: labels must be 0..{NUM_CLASSES - 1}")
    images = np.ascontiguousarray(images)
    images.flags.writeable = False
    out.flags.writeable = False
    return images, out


def accuracy(model: Model, gate: Gate) -> float:
    """The share of the gate's images `model` classifies right, through its serving forward."""
    right = 0
    for start in range(0, gate.images.shape[0], _CHUNK_ROWS):
        x = pixels_to_input(gate.images[start:start + _CHUNK_ROWS])
        predicted = np.argmax(model.predict(x), axis=1)
        right += int(np.count_nonzero(predicted == gate.labels[start:start + _CHUNK_ROWS]))
    return right / int(gate.images.shape[0])


def judge(candidate: Model, gate: Gate, baseline: Model | None, baseline_version: int) -> Verdict:
    """Measure `candidate` (and the version serving now, for `max_drop`) on the gate."""
    acc = accuracy(candidate, gate)
    n = gate.images.shape[0]
    base = accuracy(baseline, gate) if baseline is not None and gate.max_drop is not None else None
    if acc < gate.min_accuracy:
        return Verdict(False, acc, base, (
            f"accuracy {acc:.4f} on {n} gate images is below min_accuracy {gate.min_accuracy:.4f}"
        ))
    if base is not None and gate.max_drop is not None and base - acc > gate.max_drop:
        return Verdict(False, acc, base, (
            f"accuracy {acc:.4f} on {n} gate images is {base - acc:.4f} below current version "
            f"{baseline_version}'s {base:.4f} (max_drop {gate.max_drop:.4f})"
        ))
    against = f", current version {baseline_version} {base:.4f}" if base is not None else ""
    return Verdict(True, acc, base, f"accuracy {acc:.4f} on {n} gate images{against}")


def write_gate(
    model_dir: Path,
    images: npt.NDArray[np.uint8],
    labels: npt.NDArray[Any],
    *,
    min_accuracy: float,
    max_drop: float | None,
) -> Path:
    """Write `<model_dir>/gate/` atomically (temp directory, fsync, rename over the old one).

    For the trainer; validated by reading it back with `load_gate`, so a gate it writes is
    one the server accepts.
    """
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".tmp-gate-{os.getpid()}"
    tmp.mkdir()
    try:
        doc: dict[str, Any] = {"format": 1, "min_accuracy": float(min_accuracy)}
        if max_drop is not None:
            doc["max_drop"] = float(max_drop)
        _write_synced(tmp / GATE_JSON, json.dumps(doc, indent=1).encode())
        with open(tmp / GATE_EVAL, "wb") as f:
            np.savez_compressed(  # deflate: the loader's reader checks sizes before inflating
                f, images=np.ascontiguousarray(images, dtype=np.uint8).reshape(-1, INPUT_SIZE),
                labels=np.asarray(labels, dtype=np.uint8),
            )
            f.flush()
            os.fsync(f.fileno())
        load_gate_from(tmp)
        final = model_dir / GATE_DIR
        old = model_dir / f".old-gate-{os.getpid()}"
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        if old.exists():
            for p in old.iterdir():
                p.unlink()
            old.rmdir()
        return final
    finally:
        if tmp.exists():
            for p in tmp.iterdir():
                p.unlink()
            tmp.rmdir()


def load_gate_from(gate_dir: Path) -> Gate:
    """`load_gate` for a gate directory under any name (the trainer's check of its temp dir)."""
    data = read_regular_file(gate_dir / GATE_EVAL, MAX_GATE_EVAL_BYTES)
    settings = _settings(read_regular_file(gate_dir / GATE_JSON, MAX_GATE_JSON_BYTES))
    images, labels = _arrays(read_npz(data, gate_dir / GATE_EVAL, MAX_GATE_EVAL_BYTES))
    return Gate(images, labels, *settings)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
