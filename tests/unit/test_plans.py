"""Request plans (kiln.runtime.plans): a repeated binary header is parsed and checked once, and every answer
is still made of its own request's bytes. A real DataPlane and Batcher around a numpy model; no HTTP."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np

from kiln.enums import Loader
from kiln.manifest import DimRange, Signature, TensorSpec
from kiln.runtime.batching import Batcher
from kiln.runtime.dataplane import BatchSettings, DataPlane, ModelInfo
from kiln.runtime.inference import InferAnswer
from kiln.runtime.metrics import Metrics
from kiln.runtime.plans import MAX_PLANS
from kiln.runtime.protocol import BINARY_HEADER

SIGNATURE = Signature(
    inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 3])],
    outputs=[
        TensorSpec(name="twice", datatype="FP32", shape=[-1, 3]),
        TensorSpec(name="sum", datatype="FP32", shape=[-1]),
    ],
    dims={"batch": DimRange(min=1, max=8)},
)


def numpy_plane(calls: list[int]) -> DataPlane:
    """A ready DataPlane of SIGNATURE around a numpy model (each call's rows appended to `calls`), its batcher
    started: call it in the event loop that will stop it."""

    def model(inputs: list[np.ndarray]) -> list[np.ndarray]:
        calls.append(inputs[0].shape[0])
        return [inputs[0] * 2, inputs[0].sum(axis=1)]

    plane = DataPlane("m", BatchSettings(8, 1.0, 16), Metrics())
    plane.info = ModelInfo(signature=SIGNATURE, rows=8, batch_dim=0, loader=Loader.lean, torch_imported=False)
    plane.batcher = Batcher(model, 8, 0.001, 16)
    plane.batcher.start()
    plane.ready = True
    return plane


def binary_request(x: np.ndarray, **extra: object) -> tuple[bytes, str]:
    header = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
            ],
            "parameters": {"binary_data_output": True},
            **extra,
        }
    ).encode()
    return header + x.astype("<f4").tobytes(), str(len(header))


def outputs_of(payload: bytes, header_len: str) -> tuple[Any, list[np.ndarray]]:
    split = int(header_len)
    header = json.loads(payload[:split])
    arrays, offset = [], split
    for out in header["outputs"]:
        size = out["parameters"]["binary_data_size"]
        arrays.append(np.frombuffer(payload[offset : offset + size], "<f4").reshape(out["shape"]))
        offset += size
    return header, arrays


def test_a_repeated_binary_header_is_planned_once_and_each_answer_is_its_own_requests() -> None:
    calls: list[int] = []

    async def main() -> None:
        plane = numpy_plane(calls)
        answer = InferAnswer(plane, 1 << 20, plane.metrics)
        rng = np.random.default_rng(0)
        for rows in (2, 2, 2, 5):
            x = rng.standard_normal((rows, 3)).astype(np.float32)
            body, header_len = binary_request(x)
            status, payload, headers = await answer("m", body, header_len)
            assert status == 200, payload
            header, (twice, total) = outputs_of(payload, dict(headers)[BINARY_HEADER.lower()])
            assert np.array_equal(twice, x * 2) and np.allclose(total, x.sum(axis=1))
            assert [o["shape"] for o in header["outputs"]] == [[rows, 3], [rows]]
        assert len(answer.plans.by_header) == 2  # one header per shape seen: 2 rows, then 5
        plan = next(iter(answer.plans.by_header.values()))
        assert list(plan.answers) == [((2, 3), (2,))]  # its answer header, kept for these output shapes

        # Same header, but a body of another length: not this plan's request; the full check names the fault.
        body, header_len = binary_request(np.zeros((2, 3), np.float32))
        status, payload, _ = await answer("m", body + b"\0\0\0\0", header_len)
        assert status == 400 and b"not claimed by any input" in payload

        # Asking for one output by name: a header of its own, and only that output in the answer.
        x = np.ones((2, 3), np.float32)
        body, header_len = binary_request(x, outputs=[{"name": "sum", "parameters": {"binary_data": True}}])
        for _ in range(2):
            status, payload, headers = await answer("m", body, header_len)
            header, arrays = outputs_of(payload, dict(headers)[BINARY_HEADER.lower()])
            assert [o["name"] for o in header["outputs"]] == ["sum"] and np.array_equal(arrays[0], [3.0, 3.0])

        # Tensors as JSON values: parsed every time, never kept.
        kept = len(answer.plans.by_header)
        json_body = json.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]})
        status, payload, _ = await answer("m", json_body.encode(), None)
        assert status == 200 and json.loads(payload)["outputs"][1]["data"] == [6.0]
        assert len(answer.plans.by_header) == kept

        # A wrong header is refused every time and never kept.
        body, header_len = binary_request(np.zeros((2, 4), np.float32))
        for _ in range(2):
            status, payload, _ = await answer("m", body, header_len)
            assert status == 400 and b"expected [-1, 3]" in payload
        assert len(answer.plans.by_header) == kept

        # Bounded: many distinct headers keep at most MAX_PLANS.
        for i in range(MAX_PLANS + 10):
            body, header_len = binary_request(np.zeros((1, 3), np.float32), id=f"r{i}")
            assert (await answer("m", body, header_len))[0] == 200
        assert len(answer.plans.by_header) == MAX_PLANS
        await plane.batcher.stop()

    asyncio.run(main())
    assert calls  # the model ran
