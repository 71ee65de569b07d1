"""A minimal Open Inference Protocol client for benchmarks: binary tensors over keep-alive HTTP."""

from __future__ import annotations

import http.client
import json

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


class Client:
    """One keep-alive connection."""

    def __init__(self, host: str, port: int, timeout: float = 60) -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)

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
