"""v2 tensors <-> the model's rows: decode and validate ModelInfer inputs, encode outputs.

The v2 counterpart of service/dataplane/codec.py, kept apart from the servicer
(service/api/oip.py) so the rules for a valid v2 request live in one small, testable place. Raw
bytes are viewed with one `np.frombuffer`, never a Python loop; float pixels pass the native
codec's range and NaN rule, so both APIs reject the same input with the same message. Every
rejection is an `InvalidInput` naming what was expected and what was received.

The model, as ModelMetadata describes it:
    input  "images"          FP32 [-1, 784] in 0..1  (also accepted: UINT8 0..255, [-1, 28, 28])
    output "probabilities"   FP32 [-1, 10]
    output "predicted_class" INT64 [-1]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt
from google.protobuf.message import Message

from service.dataplane import codec
from service.errors import InvalidInput
from service.model import IMAGE_SHAPE, INPUT_SIZE, NUM_CLASSES, pixels_to_input
from service.pb.inference import grpc_service_pb2 as pb
from service.registry import ServableVersion

INPUT_NAME = "images"
PROBABILITIES = "probabilities"
PREDICTED_CLASS = "predicted_class"
OUTPUT_NAMES = (PROBABILITIES, PREDICTED_CLASS)
PLATFORM = "numpy_mlp"
VERSION_PARAMETER = "version"  # RepositoryModelLoad/Unload: which version (else: the model)
# The v2 data types we take -> the dtype of their raw little-endian bytes.
_RAW_DTYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}

Array = npt.NDArray[np.float32]
M = TypeVar("M", bound=Message)


# --- requests in ----------------------------------------------------------------------------


def parse(cls: type[M], raw: bytes) -> M:
    try:
        message: M = cls.FromString(raw)
    except Exception as e:  # DecodeError, or upb's complaint about odd bytes
        raise InvalidInput(
            f"request is not a valid inference.{cls.__name__} ({len(raw)} bytes): {e}"
        ) from None
    return message


def parse_version(text: str) -> tuple[int, str]:
    """v2's string version -> (version, label): "" current, "3" a number, "stable" a label.

    The protocol's version is a free string. A number names a version directory; anything
    else is read as a version label, so v2 clients can ask for "canary" with no extension.
    """
    if text == "":
        return 0, ""
    if text.isascii() and text.isdigit():
        if int(text) < 1:
            raise InvalidInput(f"model_version: expected a version >= 1 or a label, got {text!r}")
        return int(text), ""
    if not text.isprintable() or text.strip() != text or len(text) > 64:
        raise InvalidInput(f"model_version: expected a version number or a label, got {text!r}")
    return 0, text


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _images_in(shape: Sequence[int], max_images: int) -> int:
    """N for an input of shape [N, 784] or [N, 28, 28], 1 <= N <= max_images."""
    dims = tuple(shape)
    if not ((len(dims) == 2 and dims[1] == INPUT_SIZE) or
            (len(dims) == 3 and dims[1:] == IMAGE_SHAPE)):
        raise InvalidInput(
            f"input {INPUT_NAME!r}: expected shape [N, {INPUT_SIZE}] or "
            f"[N, {IMAGE_SHAPE[0]}, {IMAGE_SHAPE[1]}], got {_shape_text(dims)}"
        )
    n = dims[0]
    if n < 1:
        raise InvalidInput(
            f"input {INPUT_NAME!r}: expected at least 1 image, got shape {_shape_text(dims)}"
        )
    if n > max_images:
        raise InvalidInput(f"{n} images in one request: at most {max_images} allowed")
    return n


def _typed_values(tensor: pb.ModelInferRequest.InferInputTensor) -> npt.NDArray[Any]:
    """The typed contents of the input, from the one field its datatype allows."""
    field = "fp32_contents" if tensor.datatype == "FP32" else "uint_contents"
    others = [f.name for f, _ in tensor.contents.ListFields() if f.name != field]
    if others:
        raise InvalidInput(
            f"input {INPUT_NAME!r} is {tensor.datatype}: expected its values in {field}, "
            f"got {', '.join(others)}"
        )
    if tensor.datatype == "FP32":
        return np.array(tensor.contents.fp32_contents, dtype=np.float32)
    values = np.array(tensor.contents.uint_contents, dtype=np.uint32)
    if values.size and int(values.max()) > 255:
        raise InvalidInput(
            f"input {INPUT_NAME!r} is UINT8: expected values 0..255, got {int(values.max())}"
        )
    return values.astype(np.uint8)


def decode_input(request: pb.ModelInferRequest, max_images: int) -> tuple[Array, bool]:
    """The request's input as float32 rows (n, 784) in 0..1, and whether it came raw.

    Raw bytes are viewed with np.frombuffer (no copy, no Python loop); typed contents are
    converted once. Float pixels then pass the native API's range and NaN check.
    """
    if len(request.inputs) != 1:
        raise InvalidInput(
            f"expected exactly 1 input ({INPUT_NAME!r}), got {len(request.inputs)}: "
            f"{[t.name for t in request.inputs]}"
        )
    tensor = request.inputs[0]
    n = check_input(tensor.name, tensor.datatype, tensor.shape, max_images)
    raw = len(request.raw_input_contents) > 0
    if raw:
        if len(request.raw_input_contents) != 1:
            raise InvalidInput(
                "raw_input_contents: expected 1 entry (one per input), got "
                f"{len(request.raw_input_contents)}"
            )
        if tensor.HasField("contents") and tensor.contents.ListFields():
            raise InvalidInput(
                f"input {INPUT_NAME!r}: values in both contents and raw_input_contents; "
                "expected them in one"
            )
        data = request.raw_input_contents[0]
        return rows_from_bytes(tensor.datatype, tensor.shape, n, data), raw
    return rows_from_values(tensor.datatype, tensor.shape, n, _typed_values(tensor)), raw


def check_input(name: str, datatype: str, shape: Sequence[int], max_images: int) -> int:
    """The number of images N in the one input, after its name, datatype and shape rules;
    shared by every transport (gRPC here, REST in service/frontends/http/codec.py)."""
    if name != INPUT_NAME:
        raise InvalidInput(f"expected an input named {INPUT_NAME!r}, got {name!r}")
    if datatype not in _RAW_DTYPES:
        raise InvalidInput(
            f"input {INPUT_NAME!r}: expected datatype FP32 or UINT8, got {datatype!r}"
        )
    return _images_in(shape, max_images)


def rows_from_bytes(
    datatype: str, shape: Sequence[int], n: int, data: bytes | memoryview
) -> Array:
    """Rows from the input's raw little-endian bytes (checked by `check_input`)."""
    dtype = _RAW_DTYPES[datatype]
    count = n * INPUT_SIZE
    if len(data) != count * dtype.itemsize:
        raise InvalidInput(
            f"input {INPUT_NAME!r}: expected {count * dtype.itemsize} bytes for shape "
            f"{_shape_text(shape)} {datatype}, got {len(data)}"
        )
    return _rows(datatype, n, np.frombuffer(data, dtype=dtype))


def rows_from_values(
    datatype: str, shape: Sequence[int], n: int, values: npt.NDArray[Any]
) -> Array:
    """Rows from the input's typed values (float32 for FP32, uint8 for UINT8), flat."""
    count = n * INPUT_SIZE
    if values.size != count:
        raise InvalidInput(
            f"input {INPUT_NAME!r}: expected {count} values for shape "
            f"{_shape_text(shape)}, got {values.size}"
        )
    return _rows(datatype, n, values)


def _rows(datatype: str, n: int, values: npt.NDArray[Any]) -> Array:
    if datatype == "UINT8":
        return pixels_to_input(values)
    x: Array = values.reshape(n, INPUT_SIZE)
    codec.check_unit_range(x)
    return x


# --- replies out ----------------------------------------------------------------------------


def requested_outputs(request: pb.ModelInferRequest) -> tuple[str, ...]:
    """The outputs to send, in the order asked, once each; none asked means all."""
    if not request.outputs:
        return OUTPUT_NAMES
    names: list[str] = []
    for out in request.outputs:
        if out.name not in OUTPUT_NAMES:
            raise InvalidInput(
                f"unknown output {out.name!r}: expected one of {list(OUTPUT_NAMES)}"
            )
        if out.name not in names:
            names.append(out.name)
    return tuple(names)


class OutputTensor(NamedTuple):
    """One output as any wire encodes it: v2 name, datatype, shape and values."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    values: npt.NDArray[Any]


def output_tensors(names: Sequence[str], probabilities: Array) -> list[OutputTensor]:
    """The outputs asked for (`requested_outputs`), in that order: the one definition of what
    each output is, shared by the gRPC encoder below and any other wire's (HTTP JSON)."""
    n = probabilities.shape[0]
    out: list[OutputTensor] = []
    for name in names:
        if name == PROBABILITIES:
            out.append(OutputTensor(name, "FP32", (n, NUM_CLASSES), probabilities))
        else:
            out.append(OutputTensor(name, "INT64", (n,), probabilities.argmax(axis=1)))
    return out


def encode_outputs(
    reply: pb.ModelInferResponse, names: Sequence[str], probabilities: Array, raw: bool
) -> None:
    for output in output_tensors(names, probabilities):
        tensor = reply.outputs.add(name=output.name, datatype=output.datatype)
        tensor.shape.extend(output.shape)
        if output.datatype == "FP32":
            if raw:
                reply.raw_output_contents.append(output.values.astype("<f4", copy=False).tobytes())
            else:
                tensor.contents.fp32_contents.extend(output.values.ravel().tolist())
        elif raw:
            reply.raw_output_contents.append(np.asarray(output.values, "<i8").tobytes())
        else:
            tensor.contents.int64_contents.extend(output.values.tolist())


def model_metadata(sv: ServableVersion, loaded: Sequence[int]) -> pb.ModelMetadataResponse:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=sv.name,
        versions=[str(v) for v in loaded] or [str(sv.version)],
        platform=PLATFORM,
        inputs=[tensor(name=INPUT_NAME, datatype="FP32", shape=[-1, INPUT_SIZE])],
        outputs=[
            tensor(name=PROBABILITIES, datatype="FP32", shape=[-1, NUM_CLASSES]),
            tensor(name=PREDICTED_CLASS, datatype="INT64", shape=[-1]),
        ],
    )


def version_parameter(parameters: Any) -> int:
    """The optional 'version' repository parameter (int64 or string); 0 when absent."""
    if VERSION_PARAMETER not in parameters:
        return 0
    p = parameters[VERSION_PARAMETER]
    kind = p.WhichOneof("parameter_choice")
    value: Any = p.int64_param if kind == "int64_param" else p.string_param
    if kind not in ("int64_param", "string_param") or not str(value).isdigit() or int(value) < 1:
        shown = getattr(p, kind) if kind else None
        raise InvalidInput(
            f"parameter {VERSION_PARAMETER!r}: expected a version >= 1 (int64 or string), "
            f"got {kind or 'nothing'} {shown!r}"
        )
    return int(value)
