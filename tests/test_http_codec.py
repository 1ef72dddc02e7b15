"""service/frontends/http/codec.py on its own: whatever a caller sends, the answer is a valid
request or an InvalidInput (a 400), never another exception (a 500)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.errors import InvalidInput
from service.frontends.http import codec as http_codec

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)
KEYS = st.sampled_from(["name", "datatype", "shape", "data", "parameters", "binary_data_size",
                        "inputs", "outputs", "id", "binary_data", "binary_data_output"])


def parse(body: bytes, header: str | None = None) -> None:
    """Parse; an InvalidInput with a message is a fine answer, anything else escapes."""
    message = "ok"
    try:
        http_codec.parse_infer(body, header, max_images=8)
    except InvalidInput as e:
        message = str(e)
    assert message


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200), st.none() | st.text(max_size=6))
def test_any_bytes(body: bytes, header: str | None) -> None:
    parse(body, header)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["FP32", "UINT8", "BYTES", "INT64", "", 3]),
    st.one_of(st.lists(st.integers(-2, 2000), max_size=4), JSON),
    st.one_of(JSON, st.lists(st.integers(0, 300), min_size=784, max_size=784),
              st.lists(st.floats(), min_size=784, max_size=784)),
    st.dictionaries(KEYS, JSON, max_size=3),
    st.binary(max_size=64),
)
def test_any_document_of_the_right_shape(datatype: Any, shape: Any, data: Any,
                                         params: dict[str, Any], tail: bytes) -> None:
    doc = {"inputs": [{"name": "images", "datatype": datatype, "shape": shape, "data": data,
                       "parameters": params}], "outputs": [params]}
    head = json.dumps(doc).encode()
    parse(head)
    parse(head + tail, str(len(head)))


def test_valid_json_and_binary_give_the_same_rows() -> None:
    pixels = np.arange(784 * 2, dtype=np.int64).reshape(2, 784) % 256
    as_json = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [2, 784],
                                      "data": pixels.tolist()}]}).encode()
    raw = pixels.astype(np.uint8).tobytes()
    head = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [2, 784],
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    a = http_codec.parse_infer(as_json, None, 8)
    b = http_codec.parse_infer(head + raw, str(len(head)), 8)
    np.testing.assert_array_equal(a.x, b.x)
    assert a.x.dtype == np.float32
    assert a.binary == b.binary == frozenset()


@pytest.mark.parametrize("binary_output", [True, False])
def test_reply_round_trips(binary_output: bool) -> None:
    request = http_codec.RestInfer(
        x=np.zeros((2, 784), np.float32), id="r1",
        binary=frozenset(["probabilities"]) if binary_output else frozenset())
    p = np.full((2, 10), 0.1, np.float32)
    reply = http_codec.encode_infer(request, "mnist", 3, p)
    n = reply.json_bytes if reply.json_bytes is not None else len(reply.body)
    doc = json.loads(reply.body[:n])
    assert (doc["model_name"], doc["model_version"], doc["id"]) == ("mnist", "3", "r1")
    assert reply.content_type == ("application/octet-stream" if binary_output
                                  else "application/json")
    probs = doc["outputs"][0]
    if binary_output:
        assert probs["parameters"]["binary_data_size"] == 80
        np.testing.assert_array_equal(np.frombuffer(reply.body[n:], "<f4").reshape(2, 10), p)
    else:
        np.testing.assert_array_equal(np.array(probs["data"], np.float32).reshape(2, 10), p)
