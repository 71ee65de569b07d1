"""Pure pieces of kiln-serve's request path: body buffers, zero-copy tensors, shapes, and the batcher: its model
and answering threads, batches that grow while the GPU is full (waiting on events, not on sleeps), and a quick
CPU model called in the event loop with the requests of one turn of it."""

from __future__ import annotations

import asyncio
import mmap
import threading
import time
from collections.abc import Coroutine
from typing import Any

import numpy as np
import pytest

from kiln.api import DynamicBatch
from kiln.enums import Loader
from kiln.manifest import DimRange, Signature, TensorSpec
from kiln.runtime.aoti_shim import TRIALS, TRY_ONE_S, Shapes, ThreadChoice
from kiln.runtime.batching import Batcher
from kiln.runtime.bodies import BodyBuffer, infer_model
from kiln.runtime.bundle import parse_config
from kiln.runtime.compile import validation_points
from kiln.runtime.errors import ArchiveError
from kiln.runtime.intake_pool import CLOSED, CLOSED_AT, Intake, handoff_order, memfd
from kiln.runtime.loader import LoadedModel, WarmPlan, warm_sizes
from kiln.runtime.protocol import RequestInput
from kiln.runtime.shm import HEADER, Arena
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
    array = from_rest(spec, body.view[10:])
    assert array.ctypes.data == np.frombuffer(body.view, np.uint8).ctypes.data + 10  # no copy
    assert np.array_equal(array, values.reshape(1, 16))
    read_only = from_rest(spec, memoryview(values.tobytes()))  # bytes: must not be written through
    assert np.array_equal(read_only, array) and read_only.ctypes.data != array.ctypes.data


def test_a_batcher_with_a_finishing_thread_answers_each_request_with_its_rows() -> None:
    threads: set[str] = set()
    idle: list[str] = []

    def warm_up_step() -> bool:  # idle work that never ends: requests are still served between steps
        idle.append(threading.current_thread().name)
        time.sleep(0.005)
        return True

    def launch(inputs: list[np.ndarray]) -> list[np.ndarray]:
        threads.add(threading.current_thread().name)
        return [inputs[0] * 2]

    def finish(launched: list[np.ndarray]) -> list[np.ndarray]:
        threads.add(threading.current_thread().name)
        return launched

    async def main() -> list[list[np.ndarray]]:
        batcher = Batcher(launch, 8, 0.05, 16, finish=finish, idle=warm_up_step, inline_s=1.0)
        batcher.start()
        requests = [[np.full((rows, 3), float(i))] for i, rows in enumerate([1, 2, 3, 1])]
        answers = await asyncio.gather(*(batcher.submit(r, r[0].shape[0]) for r in requests))
        deadline = time.perf_counter() + 5.0
        while not idle and time.perf_counter() < deadline:  # with nothing queued, idle work resumes
            await asyncio.sleep(0.001)
        await batcher.stop()
        return answers

    answers = asyncio.run(main())
    for i, (rows, answer) in enumerate(zip([1, 2, 3, 1], answers, strict=True)):
        assert np.array_equal(answer[0], np.full((rows, 3), 2.0 * i))
    assert threads == {"kiln-model", "kiln-answer"}  # a GPU's launch never runs in the event loop
    assert idle and set(idle) == {"kiln-model"}  # the thread that serves warms itself (cuDNN's plans are per thread)


def test_a_quick_cpu_model_is_called_in_the_event_loop_with_the_requests_of_one_turn() -> None:
    calls: list[tuple[str, int]] = []
    slow = threading.Event()  # set: the model's calls take longer than the batcher's inline_s
    inline_s = 0.5  # far above a trivial call's time even on a loaded CI machine: which thread calls is not timing

    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        calls.append((threading.current_thread().name, inputs[0].shape[0]))
        if slow.is_set():
            time.sleep(1.2 * inline_s)
        return [inputs[0] + 1]

    async def main() -> list[list[np.ndarray]]:
        batcher = Batcher(run, 8, 0.05, 16, inline_s=inline_s)
        batcher.start()

        def ask(i: int, rows: int = 1) -> Coroutine[Any, Any, list[np.ndarray]]:
            return batcher.submit([np.full((rows, 2), float(i))], rows)

        first = await ask(0)  # how long a call takes is not known yet: the model thread
        second = await ask(1)  # the last call was quick: the event loop
        # Five in one turn: one batch of the group that fits (1 + 2 + 1 + 3 rows), then the 2-row one.
        together = await asyncio.gather(ask(2), ask(3, 2), ask(4), ask(5, 3), ask(6, 2))
        other = await asyncio.gather(ask(7), batcher.submit([np.full((1, 3), 7.0)], 1))  # another shape: its own call
        slow.set()
        slowed = await ask(8)  # quick before: the loop (and slow now)
        after = await ask(9)  # the last call was slow: the model thread again
        await batcher.stop()
        return [first, second, *together, *other, slowed, after]

    answers = asyncio.run(main())
    rows = [1, 1, 1, 2, 1, 3, 2, 1, 1, 1, 1]
    values = [0, 1, 2, 3, 4, 5, 6, 7, 7, 8, 9]
    for answer, n, v in zip(answers, rows, values, strict=True):
        assert answer[0].shape[0] == n and np.all(answer[0] == v + 1)
    loop = threading.main_thread().name
    assert calls == [
        ("kiln-model", 1),
        (loop, 1),
        (loop, 7),
        (loop, 2),
        (loop, 1),
        (loop, 1),
        (loop, 1),
        ("kiln-model", 1),
    ]


@pytest.mark.parametrize("grow", [True, False])
def test_a_batch_keeps_growing_while_the_gpu_holds_two_earlier_ones(grow: bool) -> None:
    calls: list[int] = []
    gpu_done = threading.Event()  # the GPU holds the first batch until the test lets it go

    def launch(inputs: list[np.ndarray]) -> list[np.ndarray]:
        calls.append(inputs[0].shape[0])
        return inputs

    def finish(launched: list[np.ndarray]) -> list[np.ndarray]:
        gpu_done.wait()
        return launched

    async def launched(n: int, within_s: float) -> bool:
        deadline = time.perf_counter() + within_s
        while len(calls) < n and time.perf_counter() < deadline:
            await asyncio.sleep(0.001)
        return len(calls) >= n

    async def main() -> None:
        batcher = Batcher(launch, 16, 0.001, 64, pending=lambda: 100, finish=finish, grow=grow)
        batcher.start()

        async def request(i: int) -> None:
            answer = await batcher.submit([np.full((1, 2), float(i))], 1)
            assert np.array_equal(answer[0], np.full((1, 2), float(i)))

        asked = [asyncio.create_task(request(0))]
        assert await launched(1, 5.0)
        asked.append(asyncio.create_task(request(1)))
        assert await launched(2, 5.0)  # the GPU now holds two batches
        asked.append(asyncio.create_task(request(2)))
        # Past the 1 ms delay: without growing, the third batch launches (and waits for the GPU);
        # growing, it keeps gathering.
        assert await launched(3, 5.0 if not grow else 0.1) is not grow
        asked += [asyncio.create_task(request(i)) for i in range(3, 10)]
        await asyncio.sleep(0.05)
        gpu_done.set()
        await asyncio.gather(*asked)
        await batcher.stop()

    asyncio.run(main())
    # Growing, the third batch took every later request; not, it closed at the delay and the rest
    # waited for the next one.
    assert calls == ([1, 1, 8] if grow else [1, 1, 1, 7])


def test_a_batcher_merges_only_requests_whose_other_dimensions_match() -> None:
    calls: list[tuple[int, ...]] = []

    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        calls.append(inputs[0].shape)
        return [inputs[0] + 1]

    async def main() -> list[list[np.ndarray]]:
        batcher = Batcher(run, 8, 0.05, 16, pending=lambda: 6)
        batcher.start()
        lengths = [4, 7, 4, 7, 7, 4]
        requests = [[np.full((1, n), float(i))] for i, n in enumerate(lengths)]
        answers = await asyncio.gather(*(batcher.submit(r, 1) for r in requests))
        await batcher.stop()
        return answers

    answers = asyncio.run(main())
    for i, (n, answer) in enumerate(zip([4, 7, 4, 7, 7, 4], answers, strict=True)):
        assert np.array_equal(answer[0], np.full((1, n), i + 1.0))
    assert sorted(calls) == [(3, 4), (3, 7)]  # one call per length, each with all three requests


def test_kiln_yaml_names_dynamic_dimensions_and_refuses_a_second_range_for_one_name() -> None:
    config = parse_config(
        "inputs:\n"
        "- {name: ids, dtype: int64, shape: [-1, {name: seq, min: 2, max: 128}]}\n"
        "- {name: mask, dtype: bool, shape: [-1, {name: seq, min: 2, max: 128}, -1]}\n"
        "outputs: [logits]\n"
    )
    sig = config.signature(DynamicBatch(min=1, max=16))
    assert sig.describe_dims() == "batch=1..16 seq=2..128 mask.2=1..4096"
    assert [s.dims for s in sig.inputs] == [["batch", "seq"], ["batch", "seq", "mask.2"]]
    assert config.outputs == ["logits"]
    clash = parse_config(
        "inputs:\n- {name: a, dtype: float32, shape: [-1, {name: seq, max: 8}]}\n"
        "- {name: b, dtype: float32, shape: [-1, {name: seq, max: 9}]}\n"
    )
    with pytest.raises(ArchiveError, match="'seq' is declared twice with different ranges"):
        clash.signature(DynamicBatch())
    with pytest.raises(ArchiveError, match="mark dimension 1 -1"):
        config.signature(DynamicBatch(dim=1))


def test_validation_covers_min_middle_and_max_of_each_dimension_one_at_a_time() -> None:
    spec = TensorSpec(name="ids", datatype="INT64", shape=[-1, -1], dims=["batch", "seq"])
    sig = Signature(inputs=[spec], outputs=[], dims={"batch": DimRange(min=1, max=8), "seq": DimRange(min=2, max=512)})
    points = validation_points(sig)
    assert [p["batch"] for p in points if p["seq"] == 2] == [1, 3, 4, 8]
    assert [p["seq"] for p in points if p["batch"] == 1] == [2, 257, 512]
    assert {"batch": 8, "seq": 512} not in points  # never every maximum at once


def test_a_shared_arena_reuses_freed_blocks_and_merges_neighbours() -> None:
    arena = Arena(memfd("test-arena", 4096))
    a, b, c = arena.alloc(100), arena.alloc(1000), arena.alloc(64)
    assert (a, b, c) == (HEADER, HEADER + 128, HEADER + 1152) and arena.alloc(4096) is None
    arena.free(b)
    assert arena.alloc(900) == HEADER + 128  # first fit: the freed block comes back
    arena.free(HEADER + 128)
    arena.free(a)
    arena.free(c)
    arena.free(c)  # a repeated release is harmless
    assert arena.used == 0 and arena.alloc(4096 - HEADER) == HEADER  # every block merged back into one run


def test_bodies_on_the_wire_are_counted_in_the_arena_header_for_the_model_process() -> None:
    fd = memfd("test-arena", 1 << 16)
    intake, model = Arena(fd), Arena(fd)
    whole, partial = BodyBuffer(100, arena=intake), BodyBuffer(200, arena=intake)
    assert model.arriving == 2
    whole.write(b"x" * 60)
    assert model.arriving == 2  # still arriving
    whole.write(b"x" * 40)
    assert model.arriving == 1  # complete: the intake hands it on, the batcher no longer waits for it
    whole.release()
    partial.release()  # the client left mid-body
    assert model.arriving == 0 and intake.used == 0
    outside = BodyBuffer(100)  # a single-process server's body: no arena, nothing counted
    outside.write(b"x" * 100)
    assert model.arriving == 0


def test_arena_arrays_are_views_of_the_shared_memory_and_refs_are_checked() -> None:
    fd = memfd("test-arena", 1 << 16)
    owner, reader = Arena(fd), Arena(fd)  # two mappings of one memfd, as two processes hold it
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    ref = owner.put(values)
    assert ref is not None
    seen = reader.array(ref)
    np.testing.assert_array_equal(seen, values)
    owner.array(ref)[0, 0] = 42.0
    assert seen[0, 0] == 42.0 and reader.offset_of(seen) == ref[0]
    with pytest.raises(ValueError, match="runs past the shared arena"):
        reader.array((1 << 16, "<f4", [1]))
    assert reader.offset_of(values) is None


@pytest.mark.parametrize(
    ("loader", "device", "every", "plan"),
    [
        # a GPU: the model thread calls each size itself between requests (cuDNN plans per thread)
        (Loader.lean, "cuda", True, WarmPlan([1], [1, 2, 6, 3, 4, 5])),
        (Loader.lean, "cuda", False, WarmPlan([1], [1, 2, 6])),
        (Loader.lean, "cpu", False, WarmPlan([1], [])),  # a CPU's first call costs what any call costs
        (Loader.lean, "cpu", True, WarmPlan([1], [1, 2, 6, 3, 4, 5])),
        (Loader.jit, "cuda", True, WarmPlan([1, 2, 3, 4, 5, 6], [1, 2, 6, 3, 4, 5])),  # compiles: before ready
    ],
)
def test_warm_up_plans_say_which_batch_sizes_run_before_ready_and_which_in_the_model_thread(
    loader: Loader, device: str, every: bool, plan: WarmPlan
) -> None:
    signature = Signature(inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 4])], outputs=[])
    model = LoadedModel(lambda arrays: list(arrays), signature, 8, loader, device)
    assert warm_sizes(model, 6, every) == plan


def test_new_connections_go_to_intakes_that_are_up_then_to_the_least_loaded() -> None:
    def intake(index: int, handed: int, closed: int, up: bool) -> Intake:
        header = mmap.mmap(-1, mmap.PAGESIZE)
        CLOSED.pack_into(header, CLOSED_AT, closed)
        return Intake(index, None, None, -1, -1, None, header, handed, up)  # type: ignore[arg-type]

    starting = intake(0, 0, 0, up=False)  # a replacement still importing: no connections yet
    busy, idle = intake(1, 9, 1, up=True), intake(2, 5, 2, up=True)
    assert [i.index for i in handoff_order([starting, busy, idle])] == [2, 1, 0]
    starting.up = True
    assert [i.index for i in handoff_order([starting, busy, idle])] == [0, 2, 1]


def test_a_cpu_call_runs_on_one_thread_only_at_shapes_where_one_was_faster() -> None:
    choice = ThreadChoice(4)
    set_to: list[int] = []
    choice.set = set_to.append  # OpenMP's omp_set_num_threads: which count each call ran with

    def calls(key: Shapes, seconds: dict[int, float], n: int) -> list[int]:
        picked = []
        for _ in range(n):
            threads = choice.pick(key)
            choice.record(key, threads, seconds[threads])
            picked.append(threads)
        return picked

    quick, slow_alone, long = ((1, 4),), ((2, 4),), ((64, 4),)
    # timed alternately, TRIALS calls each way, then the faster kept
    assert calls(quick, {4: 60e-6, 1: 20e-6}, 2 * TRIALS + 3) == [4, 1] * TRIALS + [1, 1, 1]
    assert calls(slow_alone, {4: 60e-6, 1: 90e-6}, 2 * TRIALS + 2) == [4, 1] * TRIALS + [4, 4]
    assert calls(long, {4: 2 * TRY_ONE_S, 1: 0.0}, 3) == [4, 4, 4]  # never tried on one thread
    assert set_to[-3:] == [4, 4, 4] and set_to[:2] == [4, 1]
    assert ThreadChoice(1).pick(quick) == 1  # one thread in all: nothing to choose
