"""The v2 (Open Inference Protocol) path's overhead: ModelInfer vs native Classify, same run.

    flock /tmp/mnist-bench.lock .venv/bin/python bench/oip_bench.py [--duration-s 2] [--repeats 3]

One server (`python -m service` as shipped, pinned to CPU 0) serves both APIs; the load
generator (closed loop, asyncio, pre-serialized requests, as in serve_bench) is pinned to CPU 1.
Per cell the two APIs run back to back with the same pixels: native Classify (pixels bytes) vs
ModelInfer (raw_input_contents, what Triton clients send), UINT8 and FP32, 1 image per request
at concurrency 1 and 64, 256 images at 1 and 8. Each round restarts the server, warms both APIs
up, and alternates which API goes first in each cell. Reported: medians over rounds, the
median of each round's back-to-back v2/native ratio (1.00 = no overhead), and the in-process
CPU each API spends translating one request.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
from common import (
    CLASSIFY,
    free_port,
    measure_cell,
    median_per_metric,
    model_repo,
    pin_self,
    random_pixels,
    service_command,
    start_server,
    stop,
)

from service.pb.inference import grpc_service_pb2 as v2
from service.pb.mnist.v1 import classifier_pb2 as native

METHODS = {"native": CLASSIFY,
           "v2": "/inference.GRPCInferenceService/ModelInfer"}
DTYPES = ("uint8", "fp32")
# 256-image requests at c8, not c64: 64 x 256 rows passes the default queue bound (8192) and
# measures rejections instead of serving.
CELLS = [(i, d, c) for i, cs in ((1, (1, 64)), (256, (1, 8))) for d in DTYPES for c in cs]


# --- the server, started as serve_bench starts "ours" ---------------------------------------


def start(model_dir: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`python -m service` pinned to CPU 0; returns once both APIs answer."""
    def both_apis_answer(ch: grpc.Channel) -> bool:
        for api, method in METHODS.items():
            ch.unary_unary(method)(payload(api, 1, "uint8"), timeout=5)
        return True

    port = free_port()
    return start_server(service_command(model_dir, port, metrics_port=free_port()), port,
                        log_path, both_apis_answer)


# --- the load generator ---------------------------------------------------------------------


def payload(api: str, images: int, dtype: str) -> bytes:
    """The same pixels for both APIs, serialized once."""
    pixels = random_pixels(images)
    data = pixels.tobytes() if dtype == "uint8" else (pixels / 255).astype("<f4").tobytes()
    if api == "native":
        encoding = native.ENCODING_UINT8 if dtype == "uint8" else native.ENCODING_FLOAT32_LE
        return native.ClassifyRequest(pixels=data, encoding=encoding).SerializeToString()
    tensor = v2.ModelInferRequest.InferInputTensor(
        name="images", datatype=dtype.upper(), shape=[images, 784]
    )
    return v2.ModelInferRequest(
        model_name="mnist", inputs=[tensor], raw_input_contents=[data]
    ).SerializeToString()


async def load(target: str, api: str, images: int, dtype: str, concurrency: int,
               duration_s: float, max_requests: int) -> dict[str, float]:
    """One cell of one API: common.measure_cell of this API's pre-serialized request."""
    return await measure_cell(target, METHODS[api], payload(api, images, dtype), images,
                              concurrency, duration_s, max_requests)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=2.0, help="per cell and API")
    parser.add_argument("--max-requests", type=int, default=200_000, help="per cell")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; medians reported")
    args = parser.parse_args()
    pin_self(1)  # the load generator on the other core
    results: dict[tuple[str, int, str, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = model_repo(Path(tmp))
        print(f"model repository: {repo}; {args.repeats} rounds of {args.duration_s} s cells",
              file=sys.stderr)
        for r in range(args.repeats):
            proc, target = start(repo, Path(tmp) / "server.log")
            try:
                for api in METHODS:  # warm-up: first calls pay for imports, caches, page faults
                    asyncio.run(load(target, api, 1, "uint8", 8, args.duration_s, 100_000))
                for images, dtype, conc in CELLS:
                    order = ("native", "v2") if r % 2 == 0 else ("v2", "native")
                    for api in order:
                        out = asyncio.run(load(target, api, images, dtype, conc,
                                               args.duration_s, args.max_requests))
                        results.setdefault((api, images, dtype, conc), []).append(out)
                        print(f"round {r + 1} {api:6} {images:3} img {dtype:5} c{conc:<3} "
                              f"{out['rps']:8.0f} req/s {out['p50_ms']:7.3f} ms p50",
                              file=sys.stderr)
            finally:
                stop(proc)
    med = median_per_metric(results)

    def paired(images: int, dtype: str, conc: int, metric: str) -> float:
        """Median over rounds of v2/native measured back to back: drift cancels out."""
        pairs = zip(results[("v2", images, dtype, conc)], results[("native", images, dtype, conc)],
                    strict=True)
        return statistics.median(o[metric] / n[metric] for o, n in pairs)

    print(f"\nmedians of {args.repeats} rounds, {args.duration_s} s per cell and API; server "
          "on CPU 0, client on CPU 1\n")
    print("| images/req | dtype | concurrency | native req/s | v2 req/s | v2/native req/s "
          "| native p50 ms | v2 p50 ms | v2/native p50 | errors |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for images, dtype, conc in CELLS:
        n, o = med[("native", images, dtype, conc)], med[("v2", images, dtype, conc)]
        print(f"| {images} | {dtype} | {conc} | {n['rps']:.0f} | {o['rps']:.0f} | "
              f"{paired(images, dtype, conc, 'rps'):.2f} | {n['p50_ms']:.3f} | "
              f"{o['p50_ms']:.3f} | {paired(images, dtype, conc, 'p50_ms'):.2f} | "
              f"{n['errors'] + o['errors']:.0f} |")
    print("\n(ratios: median over rounds of the back-to-back pair's ratio)")
    codec_table(args.repeats)
    return 0


def native_translate(body: bytes, probabilities: np.ndarray, sv: Any) -> bytes:
    from service.dataplane import codec

    request = codec.parse_request(body)
    codec.decode_pixels(request, 4096)
    return bytes(codec.encode_response(probabilities, sv, request.request_id).SerializeToString())


def v2_translate(body: bytes, probabilities: np.ndarray, sv: Any) -> bytes:
    from service.dataplane import oip_codec

    request = oip_codec.parse(v2.ModelInferRequest, body)
    oip_codec.parse_version(request.model_version)
    names = oip_codec.requested_outputs(request)
    _, raw = oip_codec.decode_input(request, 4096)
    reply = v2.ModelInferResponse(model_name=sv.name, model_version=str(sv.version))
    oip_codec.encode_outputs(reply, names, probabilities, raw)
    return bytes(reply.SerializeToString())


def codec_table(repeats: int) -> None:
    """Server CPU per request spent translating (parse, decode, encode, serialize), in process:
    the part of the cost that differs between the two APIs, without the network's noise."""
    print("\n| images/req | dtype | native translate us | v2 translate us | v2/native |")
    print("|---:|---|---:|---:|---:|")
    sv = SimpleNamespace(name="mnist", version=1)
    for images in (1, 256):
        probabilities = np.random.default_rng(0).random((images, 10), dtype=np.float32)
        number = 2000 if images == 1 else 50
        for dtype in DTYPES:
            t = {}
            for api, fn in (("native", native_translate), ("v2", v2_translate)):
                call = functools.partial(fn, payload(api, images, dtype), probabilities, sv)
                runs = timeit.repeat(call, number=number, repeat=max(repeats, 5))
                t[api] = statistics.median(runs) / number * 1e6
            print(f"| {images} | {dtype} | {t['native']:.1f} | {t['v2']:.1f} | "
                  f"{t['v2'] / t['native']:.2f} |")

if __name__ == "__main__":
    sys.exit(main())
