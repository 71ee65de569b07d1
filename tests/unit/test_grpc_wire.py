"""ModelInfer at the byte level (kiln.runtime.grpc_wire) and its request plans (kiln.runtime.grpc_service):
raw tensors found where they lie in any field order, malformed messages refused by name, and every answer made
of its own request's bytes through plan hits and misses. A real DataPlane and Batcher around a numpy model; the
gRPC server is tests/runtime/test_grpc.py's."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from kiln.runtime import oip_v2_pb2 as pb
from kiln.runtime.errors import InvalidInput
from kiln.runtime.grpc_service import InferenceService
from kiln.runtime.grpc_transport import INVALID_ARGUMENT, NOT_FOUND, GrpcError
from kiln.runtime.grpc_wire import plan_key, raw_output, split_request
from tests.unit.test_plans import numpy_plane

TENSOR = pb.ModelInferRequest.InferInputTensor


def request(x: np.ndarray, model_name: str = "m", **fields: object) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model_name,
        inputs=[TENSOR(name="x", datatype="FP32", shape=list(x.shape))],
        raw_input_contents=[x.astype("<f4").tobytes()],
        **fields,
    )


def test_split_request_finds_raw_inputs_where_they_lie_in_any_field_order() -> None:
    message = request(np.arange(6, dtype=np.float32).reshape(2, 3), id="r-1")
    message.raw_input_contents.append(b"second")
    data = message.SerializeToString()
    rest, raws = split_request(data)
    assert [data[a:b] for a, b in raws] == list(message.raw_input_contents)
    parsed = pb.ModelInferRequest.FromString(rest)
    assert parsed.id == "r-1" and parsed.inputs == message.inputs and not parsed.raw_input_contents

    # Raw contents first: a parser must take fields in any order.
    first = pb.ModelInferRequest(raw_input_contents=message.raw_input_contents).SerializeToString()
    reordered = first + pb.ModelInferRequest(model_name="m", inputs=message.inputs).SerializeToString()
    rest2, raws2 = split_request(reordered)
    assert [reordered[a:b] for a, b in raws2] == list(message.raw_input_contents)
    assert pb.ModelInferRequest.FromString(rest2).inputs == message.inputs
    assert plan_key(rest2, raws2) != plan_key(rest2, [(a, b - 1) for a, b in raws2])  # spans are in the key

    for broken in (data[:-1], data[:4], b"\x0b\x00"):  # cut short, cut before a length, a group (wire type 3)
        with pytest.raises(InvalidInput, match="not a valid ModelInferRequest"):
            split_request(broken)


def test_an_answer_is_its_header_then_one_raw_output_field_per_output() -> None:
    header = pb.ModelInferResponse(model_name="m", id="r-1").SerializeToString()
    chunks = [b"\x01\x02", b"x" * 300]  # a length of one byte and of two
    reply = pb.ModelInferResponse.FromString(header + b"".join(raw_output(c) for c in chunks))
    assert reply.id == "r-1" and list(reply.raw_output_contents) == chunks


async def call(service: InferenceService, message: bytes) -> pb.ModelInferResponse:
    """ModelInfer as the transport calls it: a view of the message in, the answer's pieces out."""
    return pb.ModelInferResponse.FromString(b"".join(await service.model_infer(memoryview(message))))


def test_model_infer_plans_a_repeated_request_once_and_each_answer_is_its_own_requests() -> None:
    calls: list[int] = []

    async def main() -> None:
        plane = numpy_plane(calls)
        service = InferenceService(plane, plane.metrics)
        rng = np.random.default_rng(0)
        for rows in (2, 2, 2, 5):
            x = rng.standard_normal((rows, 3)).astype(np.float32)
            reply = await call(service, request(x).SerializeToString())
            assert [list(o.shape) for o in reply.outputs] == [[rows, 3], [rows]]
            twice, total = (np.frombuffer(raw, "<f4") for raw in reply.raw_output_contents)
            assert np.array_equal(twice.reshape(rows, 3), x * 2) and np.allclose(total, x.sum(axis=1))
        assert len(service.plans.by_header) == 2  # one per shape seen: 2 rows, then 5

        # Typed contents: answered, parsed every time, never kept.
        typed = pb.ModelInferRequest(
            model_name="m",
            inputs=[
                TENSOR(
                    name="x", datatype="FP32", shape=[1, 3], contents=pb.InferTensorContents(fp32_contents=[1, 2, 3])
                )
            ],
        )
        reply = await call(service, typed.SerializeToString())
        assert np.frombuffer(reply.raw_output_contents[1], "<f4").tolist() == [6.0]
        assert len(service.plans.by_header) == 2

        # A wrong shape or another model is refused every time, by name, and never kept.
        for bad, says in (
            (request(np.zeros((2, 4), np.float32)), "expected [-1, 3]"),
            (request(np.zeros((1, 3), np.float32), model_name="other"), "other"),
        ):
            for _ in range(2):
                with pytest.raises(GrpcError, match=says.replace("[", "\\[")) as refused:
                    await call(service, bad.SerializeToString())
                assert refused.value.code in (INVALID_ARGUMENT, NOT_FOUND)
        assert len(service.plans.by_header) == 2
        with pytest.raises(GrpcError, match="the request is not a valid ModelInferRequest") as malformed:
            await call(service, request(np.zeros((1, 3), np.float32)).SerializeToString()[:-1])
        assert malformed.value.code == INVALID_ARGUMENT
        await plane.batcher.stop()

    asyncio.run(main())
    assert calls  # the model ran
