"""Property tests of the v2 tensor decoding: any request either decodes to valid model input
rows or is rejected with InvalidInput (INVALID_ARGUMENT) naming the problem; nothing else.

In process (no server): the decode functions are pure, so hypothesis can try thousands of
shapes, datatypes, byte lengths and contents quickly. The server-level checks of the same
rules are in tests/test_oip.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.dataplane import oip_codec
from service.errors import InvalidInput
from service.pb.inference import grpc_service_pb2 as pb

DATATYPES = st.sampled_from(["FP32", "UINT8", "FP64", "INT32", "BYTES", "", "fp32"])
SHAPES = st.one_of(
    st.lists(st.integers(-2, 5), min_size=0, max_size=4),
    st.tuples(st.integers(-1, 4), st.sampled_from([784, 783, 785])).map(list),
    st.tuples(st.integers(-1, 4), st.just(28), st.sampled_from([28, 27])).map(list),
)


@st.composite
def requests(draw: Any) -> pb.ModelInferRequest:
    datatype, shape = draw(DATATYPES), draw(SHAPES)
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=draw(st.sampled_from(["images", "images", "input__0"])), datatype=datatype,
        shape=shape,
    )
    request = pb.ModelInferRequest(model_name="mnist", inputs=[tensor])
    n = max(1, shape[0]) if shape else 1
    how = draw(st.sampled_from(["raw", "fp32", "uint", "int", "none"]))
    if how == "raw":
        itemsize = draw(st.sampled_from([1, 4, 8]))
        size = draw(st.sampled_from([n * 784 * itemsize, n * 784 * itemsize - 1, 0, 3]))
        request.raw_input_contents.append(draw(st.binary(min_size=size, max_size=size)))
    elif how == "fp32":
        count = draw(st.sampled_from([n * 784, n * 784 - 1, 1]))
        value = draw(st.floats(allow_nan=True, allow_infinity=True, width=32))
        tensor.contents.fp32_contents.extend([value] * count)
    elif how == "uint":
        count = draw(st.sampled_from([n * 784, 2]))
        tensor.contents.uint_contents.extend([draw(st.integers(0, 2**32 - 1))] * count)
    elif how == "int":
        tensor.contents.int_contents.extend([1] * n * 784)
    return request


@settings(max_examples=400, deadline=None)
@given(requests())
def test_decode_accepts_only_valid_input_and_rejects_the_rest_clearly(
    request: pb.ModelInferRequest,
) -> None:
    error: InvalidInput | None = None
    try:
        x, raw = oip_codec.decode_input(request, max_images=3)
    except InvalidInput as e:  # anything else fails the test
        error = e
    if error is not None:
        assert "expected" in str(error) or "at most 3 allowed" in str(error), str(error)
        return
    tensor = request.inputs[0]
    assert tensor.name == "images"
    assert tensor.datatype in ("FP32", "UINT8")
    assert x.dtype == np.float32
    assert x.shape == (tensor.shape[0], 784)
    assert 1 <= x.shape[0] <= 3
    assert np.isfinite(x).all()
    assert x.min() >= 0.0
    assert x.max() <= 1.0
    assert raw == bool(request.raw_input_contents)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_parse_or_are_invalid_input(raw: bytes) -> None:
    error: InvalidInput | None = None
    try:
        request = oip_codec.parse(pb.ModelInferRequest, raw)
    except InvalidInput as e:
        error = e
    if error is not None:
        assert "not a valid inference.ModelInferRequest" in str(error)
        return
    with pytest.raises(InvalidInput):
        oip_codec.decode_input(request, max_images=3)  # 64 bytes cannot hold a valid input


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", (0, "")), ("3", (3, "")), ("stable", (0, "stable")), ("٣", (0, "٣"))],
)
def test_parse_version(text: str, expected: tuple[int, str]) -> None:
    assert oip_codec.parse_version(text) == expected


@pytest.mark.parametrize("text", ["0", "00", " 1", "a\nb", "x" * 65])
def test_parse_version_rejects(text: str) -> None:
    with pytest.raises(InvalidInput, match="model_version"):
        oip_codec.parse_version(text)
