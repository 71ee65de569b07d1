"""Pure pieces of kiln-serve's request path: body buffers, zero-copy tensors, the two-thread batcher."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from kiln.runtime.batching import Batcher
from kiln.runtime.bodies import BodyBuffer, infer_model
from kiln.runtime.protocol import RequestInput
from kiln.runtime.tensors import ALIGNMENT, from_rest


@pytest.mark.parametrize("aligned_at", [0, 1, 37, 100])
def test_body_buffer_puts_the_binary_part_on_an_aligned_address(aligned_at: int) -> None:
    data = bytes(range(256)) * 4
    body = BodyBuffer(len(data), aligned_at)
    for start in range(0, len(data), 300):  # pieces as the parser hands them over
        body.write(data[start : start + 300])
    assert body.complete and bytes(body.view) == data
    address = np.frombuffer(body.view, np.uint8).ctypes.data
    assert (address + aligned_at) % ALIGNMENT == 0


def test_body_buffer_never_takes_more_than_its_length() -> None:
    body = BodyBuffer(4)
    body.write(b"abc")
    assert not body.complete
    body.write(b"defg")
    assert body.complete and bytes(body.view) == b"abcd"


@pytest.mark.parametrize(
    ("method", "path", "name"),
    [
        ("POST", "/v2/models/mlp/infer", "mlp"),
        ("GET", "/v2/models/mlp/infer", None),
        ("POST", "/v2/models//infer", None),
        ("POST", "/v2/models/a/b/infer", None),
        ("POST", "/v2/models/mlp", None),
    ],
)
def test_only_inference_posts_take_the_fast_path(method: str, path: str, name: str | None) -> None:
    assert infer_model(method, path) == name


def test_aligned_binary_tensors_are_used_where_they_lie_and_others_are_copied() -> None:
    values = np.arange(16, dtype=np.float32)
    spec = RequestInput(name="x", shape=[1, 16], datatype="FP32", parameters={"binary_data_size": 64})
    body = BodyBuffer(64 + 10, aligned_at=10)
    body.write(b"h" * 10 + values.tobytes())
    tensor = from_rest(spec, body.view[10:])
    assert tensor.data_ptr() == np.frombuffer(body.view, np.uint8).ctypes.data + 10  # no copy
    assert torch.equal(tensor, torch.from_numpy(values).reshape(1, 16))
    read_only = from_rest(spec, memoryview(values.tobytes()))  # bytes: must not be written through
    assert torch.equal(read_only, tensor) and read_only.data_ptr() != tensor.data_ptr()


def test_a_batcher_with_a_finishing_thread_answers_each_request_with_its_rows() -> None:
    threads: set[str] = set()
    prepared = threading.Event()

    def launch(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        assert prepared.is_set()  # late warm-up ran before any request
        threads.add(threading.current_thread().name)
        return [inputs[0] * 2]

    def finish(launched: list[torch.Tensor]) -> list[torch.Tensor]:
        threads.add(threading.current_thread().name)
        return launched

    async def main() -> list[list[torch.Tensor]]:
        batcher = Batcher(launch, 8, 0.05, 16, finish=finish, prepare=prepared.set)
        batcher.start()
        requests = [[torch.full((rows, 3), float(i))] for i, rows in enumerate([1, 2, 3, 1])]
        answers = await asyncio.gather(*(batcher.submit(r, r[0].shape[0]) for r in requests))
        await batcher.stop()
        return answers

    answers = asyncio.run(main())
    for i, (rows, answer) in enumerate(zip([1, 2, 3, 1], answers, strict=True)):
        assert torch.equal(answer[0], torch.full((rows, 3), 2.0 * i))
    assert threads == {"kiln-model", "kiln-answer"}
