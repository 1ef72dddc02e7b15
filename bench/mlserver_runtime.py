"""MLServer custom runtime serving this project's model.npz, for bench/http_bench.py only.

Runs inside MLServer's own venv (.tools/mlserver-venv, scripts/install-bench-tools.sh), so it
imports nothing from `service`: it reads the same arrays and runs the same forward pass
(ReLU hidden layers, softmax output) with NumPy, and checks it against the file's own probe
outputs at load, so both servers answer with the same model.
"""

import json

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


def forward(x, weights, biases):
    for w, b in zip(weights[:-1], biases[:-1], strict=True):
        x = np.maximum(x @ w + b, 0)
    z = x @ weights[-1] + biases[-1]
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class NpzMLP(MLModel):
    async def load(self) -> bool:
        z = np.load(self.settings.parameters.uri)
        meta = json.loads(z["metadata"].tobytes())
        if set(meta["activations"]) != {"relu"} or meta["output"] != "softmax":
            raise ValueError(f"expected ReLU layers and a softmax output, got {meta}")
        n = len(meta["activations"]) + 1
        self._w = [z[f"W{i}"] for i in range(n)]
        self._b = [z[f"b{i}"] for i in range(n)]
        got = forward(z["probe_inputs"], self._w, self._b)
        if not np.allclose(got, z["probe_outputs"], atol=1e-5):
            raise ValueError("this forward does not reproduce the model's probe outputs")
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).reshape(-1, 784)
        x = x.astype(np.float32) / 255 if x.dtype == np.uint8 else x.astype(np.float32)
        p = forward(x, self._w, self._b).astype(np.float32)
        return InferenceResponse(model_name=self.name, model_version=self.version, outputs=[
            NumpyCodec.encode_output("probabilities", p),
            NumpyCodec.encode_output("predicted_class", p.argmax(axis=1).astype(np.int64)),
        ])
