"""KServe v2 REST bodies <-> the model's rows: JSON tensors and Triton's binary extension.

The REST counterpart of service/dataplane/oip_codec.py, and a thin one: the rules for a valid input
(name, datatype, shape, byte length, value count, range, NaN) are oip_codec's, called here,
so the REST and gRPC endpoints reject the same input with the same message. What is REST's
own lives here: the JSON document's shape, the binary tensor data extension
(`Inference-Header-Content-Length`: a JSON header followed by each binary tensor's bytes in
order, sized by its `binary_data_size` parameter), and the reply in JSON or binary.

A BYTES input carries encoded images (docs/images.md), checked here by service/dataplane/images.py's
rules, the gRPC ones: as binary data in Triton's BYTES layout (what tritonclient sends), or in
JSON as base64 strings marked by the input parameter `"content_type": "base64"` (MLServer's
codec name; a JSON string cannot hold an image's bytes as they are).

Every rejection is an `InvalidInput` (HTTP 400) naming what was expected and what was
received; nothing a caller sends may raise anything else (tests/test_http_codec.py throws
malformed bodies of every kind at it).
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from service.dataplane import images
from service.dataplane import oip_codec as tensors
from service.errors import InvalidInput
from service.model import NUM_CLASSES

Array = tensors.Array
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
HEADER_LENGTH = "inference-header-content-length"  # Triton's binary tensor data extension
BASE64 = "base64"  # a BYTES input's `content_type` parameter for base64 strings in JSON
_MAX_SHOWN = 64  # characters of a caller's string quoted back in an error


@dataclass(slots=True)
class RestInfer:
    """A valid REST infer request: the rows (or encoded images, `blobs`, when `x` is None),
    and how the reply must be encoded."""

    x: Array | None
    id: str = ""
    outputs: tuple[str, ...] = tensors.OUTPUT_NAMES
    binary: frozenset[str] = field(default_factory=frozenset)  # outputs sent as binary
    routing_key: str = ""  # the request parameter "routing_key": canary or current
    blobs: tuple[bytes, ...] = ()  # a BYTES input's encoded images, checked, not decoded


@dataclass(frozen=True, slots=True)
class Reply:
    """An encoded reply body; `json_bytes` is set when binary tensors follow the JSON."""

    body: bytes
    json_bytes: int | None = None

    @property
    def content_type(self) -> str:
        return BINARY_TYPE if self.json_bytes is not None else JSON_TYPE


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."


def load_json(data: bytes, what: str = "request body") -> Any:
    """The JSON document in `data`; every way it can be malformed is an InvalidInput."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise InvalidInput(
            f"{what} is not valid JSON ({len(data)} bytes): {reason}"
        ) from None


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def _bool(params: Mapping[str, Any], key: str, what: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"{what} parameter {key!r}: expected true or false, got {_shown(value)}")
    return value


def _shape(value: Any) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in value
    ):
        raise InvalidInput(f"input 'shape': expected a list of integers, got {_shown(value)}")
    return value


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON part, binary part) by the `Inference-Header-Content-Length` header's value."""
    if header_length is None:
        return body, memoryview(b"")
    text = header_length.strip()
    if not (text.isascii() and text.isdigit()) or int(text) > len(body):
        raise InvalidInput(
            f"header Inference-Header-Content-Length: expected a byte count from 0 to the "
            f"body's {len(body)} bytes, got {_shown(header_length)}"
        )
    n = int(text)
    return body[:n], memoryview(body)[n:]


def _json_values(datatype: str, data: Any) -> npt.NDArray[Any]:
    """A tensor's JSON `data` (flat or nested, row-major) as a flat typed array."""
    try:
        values = np.array(data)
    except (ValueError, OverflowError, TypeError) as e:  # ragged nesting, huge integers
        raise InvalidInput(f"input {tensors.INPUT_NAME!r} data: not a regular array: {e}") from None
    kinds = "iu" if datatype == "UINT8" else "iuf"
    if values.dtype.kind not in kinds or (values.size == 0 and values.ndim != 1):
        expected = "integers 0..255" if datatype == "UINT8" else "numbers"
        raise InvalidInput(
            f"input {tensors.INPUT_NAME!r} is {datatype}: expected its data as {expected}, got "
            f"{values.dtype.name if values.size else 'an empty list'}"
        )
    values = values.reshape(-1)
    if datatype == "UINT8":
        if values.size and (int(values.min()) < 0 or int(values.max()) > 255):
            bad = int(values.max()) if int(values.max()) > 255 else int(values.min())
            raise InvalidInput(
                f"input {tensors.INPUT_NAME!r} is UINT8: expected values 0..255, got {bad}"
            )
        return values.astype(np.uint8)
    with np.errstate(over="ignore"):  # out of float32's range: inf, refused as out of range
        return values.astype(np.float32)


def parse_infer(body: bytes, header_length: str | None, max_images: int) -> RestInfer:
    """A REST infer body (JSON, or JSON + binary tensors) -> the validated request."""
    head, binary = split_body(body, header_length)
    doc = _object(load_json(head), "request body")
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput(f"'id': expected a string, got {_shown(request_id)}")
    params = _object(doc.get("parameters", {}), "request 'parameters'")
    binary_default = _bool(params, "binary_data_output", "request")
    routing_key = params.get("routing_key", "")
    if not isinstance(routing_key, str):
        raise InvalidInput(f"parameter 'routing_key': expected a string, got {_shown(routing_key)}")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        got = len(inputs) if isinstance(inputs, list) else _shown(inputs)
        raise InvalidInput(
            f"'inputs': expected a list of exactly 1 input ({tensors.INPUT_NAME!r}), got {got}"
        )
    tensor = _object(inputs[0], "input")
    name, datatype = tensor.get("name"), tensor.get("datatype")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise InvalidInput(
            f"input: expected string 'name' and 'datatype', got {_shown(name)} and "
            f"{_shown(datatype)}"
        )
    shape = _shape(tensor.get("shape"))
    tensor_params = _object(tensor.get("parameters", {}), "input 'parameters'")
    size = tensor_params.get("binary_data_size")
    if datatype == "BYTES":  # encoded images: the image decoder checks them further
        n = images.check_bytes_input(name, shape)
        if n > max_images:  # before any element is looked at (the decoder's words)
            raise InvalidInput(f"{n} images in one request: at most {max_images} allowed")
    else:
        n = tensors.check_input(name, datatype, shape, max_images)
    x: Array | None = None
    blobs: list[bytes] = []
    if size is not None:
        if "data" in tensor:
            raise InvalidInput(
                f"input {name!r}: values in both 'data' and binary data; expected them in one"
            )
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary):
            raise InvalidInput(
                f"input {name!r} parameter 'binary_data_size': expected a byte count up to the "
                f"{len(binary)} binary bytes sent, got {_shown(size)}"
            )
        if size != len(binary):
            raise InvalidInput(
                f"binary data: {len(binary)} bytes after the JSON header, input {name!r} "
                f"claims {size}; expected them to match"
            )
        if datatype == "BYTES":
            if "content_type" in tensor_params:
                raise InvalidInput(
                    f"input {name!r}: parameter 'content_type' describes JSON 'data'; binary "
                    "data carries each image's bytes as they are: expected no 'content_type'"
                )
            blobs = images.split_bytes_tensor(binary, n)  # Triton's layout, as on gRPC
        else:
            x = tensors.rows_from_bytes(datatype, shape, n, binary)  # one np.frombuffer
    else:
        if len(binary):
            raise InvalidInput(
                f"binary data: {len(binary)} bytes after the JSON header, but input {name!r} "
                "has no 'binary_data_size' parameter"
            )
        if "data" not in tensor:
            raise InvalidInput(f"input {name!r}: expected 'data' or binary data, got neither")
        if datatype == "BYTES":
            blobs = _base64_values(tensor_params, shape, tensor["data"])
        else:
            x = tensors.rows_from_values(datatype, shape, n,
                                         _json_values(datatype, tensor["data"]))
    outputs, binary_outputs = _outputs(doc.get("outputs"), binary_default)
    return RestInfer(x=x, id=request_id, outputs=outputs, binary=binary_outputs,
                     routing_key=routing_key,
                     blobs=tuple(images.matching_count(shape, blobs)) if x is None else ())


def _base64_values(params: Mapping[str, Any], shape: list[int], data: Any) -> list[bytes]:
    """A BYTES input's JSON `data`: base64 strings, flat or nested as the shape [N, 1] is."""
    name = tensors.INPUT_NAME
    content_type = params.get("content_type")
    if content_type != BASE64:
        raise InvalidInput(
            f"input {name!r} is BYTES (encoded images) in JSON: expected its 'data' as base64 "
            f"strings with the input parameter \"content_type\": \"base64\" (a JSON string "
            f"cannot hold an image's bytes), or the bytes as binary data; got content_type "
            f"{_shown(content_type)}"
        )
    if not isinstance(data, list):
        raise InvalidInput(f"input {name!r} data: expected a list of base64 strings, got "
                           f"{_shown(data)}")
    images.matching_count(shape, data)
    if len(shape) == 2 and all(isinstance(row, list) and len(row) == 1 for row in data):
        data = [row[0] for row in data]  # nested as [N, 1]
    blobs: list[bytes] = []
    for i, value in enumerate(data):
        if not isinstance(value, str):
            raise InvalidInput(f"input {name!r} data[{i}]: expected a base64 string, got "
                               f"{_shown(value)}")
        try:
            blobs.append(binascii.a2b_base64(value, strict_mode=True))
        except (binascii.Error, ValueError) as e:  # ValueError: a non-ASCII character
            raise InvalidInput(
                f"image {i}: not base64 ({e}; {len(value)} characters starting "
                f"{_shown(value[:16])}): expected standard base64 on one line "
                "(e.g. `base64 -w0 file.png`)"
            ) from None
    return blobs


def _outputs(value: Any, binary_default: bool) -> tuple[tuple[str, ...], frozenset[str]]:
    """The outputs asked for (all when none are) and those to send as binary."""
    if value is None:
        names = tensors.OUTPUT_NAMES
        return names, frozenset(names) if binary_default else frozenset()
    if not isinstance(value, list):
        raise InvalidInput(f"'outputs': expected a list, got {_shown(value)}")
    names_asked: list[str] = []
    binary: set[str] = set()
    for item in value:
        out = _object(item, "output")
        name = out.get("name")
        if name not in tensors.OUTPUT_NAMES:
            raise InvalidInput(
                f"unknown output {_shown(name)}: expected one of {list(tensors.OUTPUT_NAMES)}"
            )
        params = _object(out.get("parameters", {}), f"output {name!r} 'parameters'")
        if params.get("classification") or params.get("class_count"):
            raise InvalidInput(
                f"output {name!r}: the classification extension is not supported; expected "
                f"no 'classification' parameter (read {tensors.PREDICTED_CLASS!r} instead)"
            )
        if "binary_data" in params:
            if _bool(params, "binary_data", f"output {name!r}"):
                binary.add(name)
        elif binary_default:
            binary.add(name)
        if name not in names_asked:
            names_asked.append(name)
    if not names_asked:
        return tensors.OUTPUT_NAMES, frozenset(tensors.OUTPUT_NAMES) if binary_default else (
            frozenset())
    return tuple(names_asked), frozenset(binary)


def encode_infer(
    request: RestInfer, model: str, version: int, probabilities: Array
) -> Reply:
    """The reply: each output as JSON `data` or as binary bytes after the JSON header."""
    n = probabilities.shape[0]
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name in request.outputs:
        values: npt.NDArray[Any]
        if name == tensors.PROBABILITIES:
            datatype, shape = "FP32", [n, NUM_CLASSES]
            values = probabilities.astype("<f4", copy=False)
        else:
            datatype, shape = "INT64", [n]
            values = np.asarray(probabilities.argmax(axis=1), "<i8")
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if name in request.binary:
            data = values.tobytes()
            tensor["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            tensor["data"] = values.ravel().tolist()
        outputs.append(tensor)
    doc: dict[str, Any] = {"model_name": model, "model_version": str(version), "outputs": outputs}
    if request.id:
        doc["id"] = request.id
    head = dumps(doc)
    if not chunks:
        return Reply(head)
    return Reply(b"".join([head, *chunks]), json_bytes=len(head))


def dumps(doc: Any) -> bytes:
    """Compact JSON; probabilities are finite, so the strict (allow_nan=False) form holds."""
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def error_body(message: str) -> bytes:
    """The protocol's error reply: `{"error": "<message>"}`."""
    return dumps({"error": message})


def optional_bool(doc: Any, key: str) -> bool:
    """`key` of an optional JSON object body (e.g. repository index's `ready`)."""
    if doc is None:
        return False
    return _bool(_object(doc, "request body"), key, "request")
