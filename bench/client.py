"""A minimal Open Inference Protocol client for benchmarks: binary tensors over keep-alive HTTP, and
pre-serialized ModelInferRequests (raw_input_contents) over gRPC, one connection per client."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from kiln.runtime.dtypes import DATATYPES

NP_BY_NAME = dict(DATATYPES)


def encode(names: list[str], arrays: list[np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """A binary-data request body and its headers."""
    header = {
        "inputs": [
            {"name": n, "shape": list(a.shape), "datatype": _datatype(a), "parameters": {"binary_data_size": a.nbytes}}
            for n, a in zip(names, arrays, strict=True)
        ],
        "parameters": {"binary_data_output": True},
    }
    head = json.dumps(header).encode()
    body = head + b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
    return body, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def _datatype(a: np.ndarray) -> str:
    return next(name for name, dtype in DATATYPES.items() if dtype == a.dtype and name != "BF16")


def decode(body: bytes, header_length: str | None) -> list[np.ndarray]:
    split = int(header_length) if header_length else len(body)
    header = json.loads(body[:split])
    out, offset = [], split
    for o in header["outputs"]:
        dtype = NP_BY_NAME[o["datatype"]]
        if "data" in o and o.get("data") is not None:
            out.append(np.asarray(o["data"], dtype=dtype).reshape(o["shape"]))
            continue
        size = o["parameters"]["binary_data_size"]
        out.append(np.frombuffer(body[offset : offset + size], dtype=dtype).reshape(o["shape"]))
        offset += size
    return out


# http.client leaves Nagle's algorithm on; requests/urllib3, curl, Go's net/http and grpc turn it off.
# With it on, the last partial segment of a 602 KB body can wait for a delayed ACK (40-200 ms).
# KILN_BENCH_NAGLE=1 keeps it on, to measure what such a client gets.
NAGLE = os.environ.get("KILN_BENCH_NAGLE") == "1"


class Client:
    """One keep-alive connection (TCP_NODELAY, as common HTTP clients set it)."""

    def __init__(self, host: str, port: int, timeout: float = 60) -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)
        if not NAGLE:
            self.conn.connect()
            self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def infer(
        self, model: str, body: bytes, headers: dict[str, str], path: str | None = None
    ) -> tuple[int, bytes, str | None]:
        """POST to the model's v2 infer route, or to `path` (another server's API)."""
        self.conn.request("POST", path or f"/v2/models/{model}/infer", body, headers)
        resp = self.conn.getresponse()
        data = resp.read()
        return resp.status, data, resp.getheader("Inference-Header-Content-Length")

    def close(self) -> None:
        self.conn.close()


GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"


def encode_grpc(model: str, names: list[str], arrays: list[np.ndarray]) -> bytes:
    """A serialized ModelInferRequest with raw_input_contents (what tritonclient.grpc sends)."""
    from kiln.runtime import oip_v2_pb2 as pb

    tensor = pb.ModelInferRequest.InferInputTensor
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[tensor(name=n, datatype=_datatype(a), shape=list(a.shape)) for n, a in zip(names, arrays, strict=True)],
        raw_input_contents=[np.ascontiguousarray(a).tobytes() for a in arrays],
    ).SerializeToString()


def decode_grpc(reply: bytes) -> list[np.ndarray]:
    from kiln.runtime import oip_v2_pb2 as pb

    message = pb.ModelInferResponse.FromString(reply)
    return [
        np.frombuffer(raw, dtype=NP_BY_NAME[o.datatype]).reshape(list(o.shape))
        for o, raw in zip(message.outputs, message.raw_output_contents, strict=True)
    ]


class GrpcClient:
    """One gRPC connection of its own (a local subchannel pool: channels in a process do not share one)."""

    def __init__(self, host: str, port: int, timeout: float = 60) -> None:
        import grpc

        self.channel = grpc.insecure_channel(
            f"{host}:{port}",
            options=[
                ("grpc.use_local_subchannel_pool", 1),
                ("grpc.max_receive_message_length", 256 << 20),
                ("grpc.max_send_message_length", 256 << 20),
            ],
        )
        self.call = self.channel.unary_unary(GRPC_INFER)  # bytes in, bytes out: the request is serialized once
        self.timeout = timeout

    def infer(self, request: bytes) -> bytes | None:
        """The serialized reply, or None when the call failed."""
        import grpc

        try:
            return bytes(self.call(request, timeout=self.timeout))
        except grpc.RpcError:
            return None


LOADGEN = Path(__file__).parent / "loadgen"


def loadgen() -> Path:
    """kiln-loadgen (bench/loadgen: Go's standard library, and grpc-go for gRPC), built once per source
    version into kiln's cache outside the clone; KILN_LOADGEN names a binary built elsewhere (a GPU host
    without Go or the module proxy)."""
    if given := os.environ.get("KILN_LOADGEN"):
        return Path(given)
    source = b"".join((LOADGEN / name).read_bytes() for name in ("main.go", "grpc.go", "go.mod", "go.sum"))
    cache = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln"))
    binary = cache / "bin" / f"kiln-loadgen-{hashlib.sha256(source).hexdigest()[:12]}"
    if not binary.exists():
        env = {**os.environ, "CGO_ENABLED": "0"}  # static: it runs on hosts without Go or this libc
        subprocess.run(["go", "build", "-o", str(binary), "."], cwd=LOADGEN, env=env, check=True)
    return binary


def go_load(
    port: int,
    path: str,
    variants: list[tuple[bytes, dict[str, str], Any]],
    concurrency: int,
    seconds: float,
    method: str = "POST",
    protocol: str = "http",
) -> dict[str, Any]:
    """bench.serving.load's numbers from kiln-loadgen: `concurrency` keep-alive connections for `seconds`,
    each answer's first output checked against the variant's expected array (None: not checked).
    `protocol` "grpc": `path` is the method (GRPC_INFER) and bodies are serialized ModelInferRequests."""
    spec = {
        "address": f"127.0.0.1:{port}",
        "protocol": protocol,
        "method": method,
        "path": path,
        "concurrency": concurrency,
        "seconds": seconds,
        "variants": [
            {
                "body": base64.b64encode(body).decode(),
                "headers": headers,
                "expected": None if expected is None else [float(x) for x in expected.ravel()],
            }
            for body, headers, expected in variants
        ],
    }
    done = subprocess.run([str(loadgen())], input=json.dumps(spec).encode(), capture_output=True, check=True)
    result = json.loads(done.stdout)
    if result.get("first_error"):
        print(f"[client] first error: {result['first_error']}", flush=True)
    return {
        "concurrency": concurrency,
        "requests": result["requests"],
        "errors": result["errors"],
        "wrong": result["wrong"],
        "rps": result["requests"] / result["elapsed_s"],
        "p50_ms": result["p50_ms"],
        "p99_ms": result["p99_ms"],
    }
