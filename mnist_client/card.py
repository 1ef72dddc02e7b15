"""How mnist-client describes a model: a compact summary (`--json models`) and a model card
(`show`), both from ModelInfo, whose metadata is what the trainer recorded.

A trained version's metadata is ~40 KB, most of it the per-epoch history; a listing carries
the few facts a caller acts on (versions, states, labels, accuracy) and leaves the rest to
`--full`. The metadata comes from a model file, so every field is read defensively: a
missing or odd-typed field is left out of the card, never a traceback.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from typing import Any

from service.pb.mnist.v1 import classifier_pb2 as pb

# Training metrics worth a line in a listing; the rest are in `--full` and in `show`.
HEADLINE_METRICS = ("test_accuracy", "validation_accuracy")
MAX_MATRIX_CLASSES = 100


def state_name(state: int) -> str:
    return str(pb.VersionState.Name(state)).removeprefix("VERSION_STATE_")


def metadata(info: pb.ModelInfo) -> dict[str, Any]:
    try:
        meta = json.loads(info.metadata_json) if info.metadata_json else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def summary(info: pb.ModelInfo, *, full: bool = False) -> dict[str, Any]:
    """One model for `--json models`: a few hundred bytes; `full` adds the metadata as JSON."""
    out: dict[str, Any] = {
        "name": info.name,
        "current_version": int(info.current_version),
        "versions": [
            {"version": int(v.version), "state": state_name(v.state),
             **({"reason": v.reason} if v.reason else {})}
            for v in info.versions
        ],
        "labels": {k: int(v) for k, v in sorted(info.labels.items())},
        "layer_sizes": list(info.layer_sizes),
        "created_at": info.created_at,
        "training_metrics": {
            k: info.training_metrics[k] for k in HEADLINE_METRICS if k in info.training_metrics
        },
    }
    if full:
        out["class_labels"] = list(info.class_labels)
        out["training_metrics"] = dict(sorted(info.training_metrics.items()))
        out["max_images_per_request"] = int(info.input.max_images_per_request)
        out["metadata"] = metadata(info)
    return out


def _get(meta: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(meta, Mapping):
            return None
        meta = meta.get(key)
    return meta


def _num(value: Any, fmt: str = "g") -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return format(value, fmt)


def _text(value: Any) -> str | None:
    return value[:200] if isinstance(value, str) and value else None


def _join(*parts: str | None) -> str:
    return ", ".join(p for p in parts if p)


def card(info: pb.ModelInfo) -> str:
    """A readable model card for the version GetModelInfo describes (the current one)."""
    meta = metadata(info)
    version = int(info.current_version)
    tags = [f"label {k}" for k, v in sorted(info.labels.items()) if v == version]
    lines = [f"{info.name} version {version} (current{'; ' + ', '.join(tags) if tags else ''})"]

    def row(title: str, text: str | None) -> None:
        if text:
            lines.append(f"  {title:<13}{text}")

    row("trained", " ".join(p for p in (
        info.created_at or None,
        f"by trainer {_text(_get(meta, 'trainer_version'))}"
        if _text(_get(meta, "trainer_version")) else None,
    ) if p))
    sizes = list(info.layer_sizes)
    activations = _get(meta, "activations")
    acts = (", ".join(str(_text(a)) for a in activations)
            if isinstance(activations, list) else None)
    output = _text(_get(meta, "output"))
    params = sum(a * b + b for a, b in itertools.pairwise(sizes))
    row("architecture", _join(
        "MLP " + "-".join(str(s) for s in sizes) if sizes else None,
        f"{acts} -> {output}" if acts and output else None,
        f"{params:,} parameters" if sizes else None,
        f"loss {_text(_get(meta, 'cost'))}" if _text(_get(meta, "cost")) else None,
    ))
    row("input", f"28x28 pixels, uint8 0..255 (0 = background) or float 0..1; up to "
                 f"{info.input.max_images_per_request} images a request"
        if info.input.max_images_per_request else None)
    row("classes", " ".join(info.class_labels))
    train, val = _get(meta, "training", "train_examples"), _get(
        meta, "training", "validation_examples")
    row("data", _join(
        _text(_get(meta, "data", "name")),
        f"{_get(meta, 'data', 'train_count'):,} training images"
        if _num(_get(meta, "data", "train_count")) else None,
        f"{train:,} train / {val:,} validation" if _num(train) and _num(val) else None,
        f"{_get(meta, 'data', 'test_count'):,} test images"
        if _num(_get(meta, "data", "test_count")) else None,
    ))
    t = _get(meta, "training") or {}
    augment = _join(*(
        f"{what} {_num(_get(t, key))}{unit}" for what, key, unit in
        (("shift", "shift", " px"), ("rotate", "rotate", " degrees"), ("scale", "scale", ""))
        if _num(_get(t, key)) and _get(t, key)
    ))
    row("training", _join(
        _text(_get(t, "optimizer")),
        f"learning rate {_num(_get(t, 'learning_rate'))}"
        + (f" ({_text(_get(t, 'schedule'))})" if _text(_get(t, "schedule")) else "")
        if _num(_get(t, "learning_rate")) else None,
        f"batch {_num(_get(t, 'batch_size'))}" if _num(_get(t, "batch_size")) else None,
        f"{_num(_get(t, 'epochs_run'))} epochs" if _num(_get(t, "epochs_run")) else None,
        f"best epoch {_num(_get(t, 'best_epoch'))}" if _num(_get(t, "best_epoch")) else None,
        f"seed {_num(_get(t, 'seed'))}" if _num(_get(t, "seed")) is not None else None,
        f"{_num(_get(t, 'seconds'), '.1f')} s" if _num(_get(t, "seconds")) else None,
    ))
    row("regularised", _join(
        f"dropout {_num(_get(t, 'dropout'))}" if _num(_get(t, "dropout")) else None,
        f"l2 {_num(_get(t, 'l2'))}" if _num(_get(t, "l2")) else None,
        f"label smoothing {_num(_get(t, 'label_smoothing'))}"
        if _num(_get(t, "label_smoothing")) else None,
    ))
    row("augmented", augment)
    row("accuracy", _join(*(
        f"{name.removesuffix('_accuracy')} {_num(_get(meta, 'metrics', name), '.4f')}"
        for name in HEADLINE_METRICS if _num(_get(meta, "metrics", name))
    )))
    per_class = _get(meta, "metrics", "per_class_accuracy")
    if isinstance(per_class, Mapping):
        row("per class", " ".join(
            f"{k}:{_num(v, '.3f')}" for k, v in per_class.items() if _num(v)
        ))
    lines += _matrix(_get(meta, "metrics", "confusion_matrix"), list(info.class_labels))
    return "\n".join(lines)


def _matrix(matrix: Any, labels: list[str]) -> list[str]:
    n = len(matrix) if isinstance(matrix, list) else 0
    if not (0 < n <= MAX_MATRIX_CLASSES) or not all(
        isinstance(r, list) and len(r) == n
        and all(isinstance(c, int) and not isinstance(c, bool) for c in r) for r in matrix
    ):
        return ["  confusion matrix: not recorded"]
    names = labels if len(labels) == n else [str(i) for i in range(n)]
    width = max(len(str(c)) for r in matrix for c in r)
    width = max(width, *(len(s) for s in names)) + 1
    head = max(len(s) for s in names) + 2
    total = sum(c for r in matrix for c in r)
    out = [f"  confusion matrix ({total:,} images; rows: true class, columns: predicted)",
           " " * (head + 2) + "".join(f"{s:>{width}}" for s in names)]
    for name, r in zip(names, matrix, strict=True):
        out.append(f"  {name:>{head}}" + "".join(f"{c:>{width}}" for c in r))
    return out
