"""Dynamic batching: merge concurrent requests up to a row budget within a delay, split results back.

Only requests whose shapes are equal apart from the batch dimension are merged (a model with a
dynamic sequence length gets one batch per length present within the delay); the others wait
their turn, oldest first.

Serve path, batching (no HTTP). One model thread gathers batches and runs them, so
the compiled model is never called concurrently; the queue is bounded, and a full
queue is refused at once (Overloaded) instead of growing memory. Where a model call
only launches work (a GPU), a second thread waits for each batch's results and answers,
while the model thread already gathers and launches the next; past the delay, a batch the
GPU could not start yet (two still in flight) keeps gathering. While no request is queued
the model thread does idle work one step at a time (warm-up calls, which must run in the
thread that serves: cuDNN keeps its plans per thread). A CPU model whose calls take under a
millisecond runs in the event loop itself: the requests that reach the batcher in one turn of the
loop (bodies that came in one wake-up) are batched and called at the end of that turn, skipping
the two thread wake-ups; a lock keeps it from running beside the model thread's call, and once a
call is slow or requests are queued, the model thread takes over.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.runtime.errors import Overloaded

log = logging.getLogger(__name__)

RunFn = Callable[[Any], Any]  # merged inputs → the results, or something `finish` turns into them
FinishFn = Callable[[Any], list[np.ndarray]]
# Called once per model call with (batch rows, request count, seconds the first waited).
ObserveFn = Callable[[int, int, float], None]


MergeFn = Callable[[list[list[np.ndarray]], int], Any]


def concat(requests: list[list[np.ndarray]], dim: int = 0) -> list[np.ndarray]:
    """Each input of several requests, concatenated along the batch dimension."""
    if len(requests) == 1:
        return requests[0]
    return [np.concatenate(parts, dim) for parts in zip(*requests, strict=True)]


Group = tuple[tuple[int, ...], ...]  # every input's shape without the batch dimension


def group_of(inputs: Sequence[np.ndarray], dim: int) -> Group:
    """Requests of one group can be concatenated along `dim`."""
    return tuple(tuple(s for i, s in enumerate(t.shape) if i != dim) for t in inputs)


@dataclass
class _Pending:
    inputs: list[np.ndarray]
    rows: int
    future: asyncio.Future[list[np.ndarray]]
    group: Group = ()
    enqueued: float = field(default_factory=time.perf_counter)


_STOP = object()
# Batches a GPU holds at once (two model instances): a third cannot start before the first is done,
# so past the delay it keeps gathering, checking every POLL_S.
GPU_DEPTH, POLL_S = 2, 0.0005
# A model call that took under this (a small CPU model) runs in the event loop itself, with the requests that
# came in the same turn of the loop: the trip through the model thread and back costs two thread wake-ups
# (80-130 µs on a VM's idle cores, docs/benchmarks.md §13), more than such a call, and leaves the loop idle.
INLINE_S = 1e-3
Outcome = list[list[np.ndarray]] | BaseException  # each request's results, or what went wrong


class Batcher:
    """Requests go from the event loop into a bounded thread-safe queue; one model thread gathers
    batches from it, runs them and hands results back to the loop.

    Batches are gathered in the model thread, not in the event loop: under load the loop may take
    a long time per turn (thousands of connections), and the next batch must not wait for it.
    """

    def __init__(
        self,
        run: RunFn,
        max_batch: int,
        max_delay_s: float,
        max_queue: int,
        observe: ObserveFn | None = None,
        pending: Callable[[], int] | None = None,
        merge: MergeFn | None = None,
        dim: int = 0,
        batchable: bool = True,
        finish: FinishFn | None = None,
        idle: Callable[[], bool] | None = None,
        grow: bool = True,
        inline_s: float = 0.0,
    ) -> None:
        self._run = run
        # Calls quicker than this run in the event loop (0: never; nor with a `finish` stage: it would block there).
        self._inline_s = inline_s if finish is None else 0.0
        self._calling = threading.Lock()  # held around every model call: the model is never called twice at once
        self._turn: list[_Pending] = []  # quick requests of this turn of the event loop, called at its end
        self._last_call = float("inf")  # seconds the last model call took
        self._idle = idle  # one step of work for the model thread while no request waits; False: no more
        self._grow = grow and finish is not None  # keep gathering while the GPU holds GPU_DEPTH batches
        self._launches = self._finished = 0  # each written by one thread: the model thread, the answerer
        self._merge = merge or concat
        self._finish = finish
        self._dim = dim
        self._batchable = batchable  # False: every request is its own model call
        self._max_batch = max_batch
        self._max_delay = max_delay_s
        self._queue: queue.Queue[_Pending | object] = queue.Queue(maxsize=max_queue)
        self._held: collections.deque[_Pending] = collections.deque()  # taken, but of another group or too big
        self._observe = observe
        self._pending = pending  # requests in flight; none beyond this batch means no wait
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._work, name="kiln-model", daemon=True)
        # One batch waits for the answering thread at most: launched work stays bounded.
        self._launched: queue.Queue[tuple[list[_Pending], Any] | object] = queue.Queue(maxsize=1)
        self._answerer = threading.Thread(target=self._answer_launched, name="kiln-answer", daemon=True)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()
        if self._finish is not None:
            self._answerer.start()

    async def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)  # blocks while full: the thread is draining it
            await asyncio.to_thread(self._thread.join)
        if self._answerer.is_alive():
            await asyncio.to_thread(self._answerer.join)

    @property
    def depth(self) -> int:
        return self._queue.qsize() + len(self._held)

    async def submit(self, inputs: list[np.ndarray], rows: int) -> list[np.ndarray]:
        group = group_of(inputs, self._dim) if self._batchable else ()
        pending = _Pending(inputs, rows, asyncio.get_running_loop().create_future(), group)
        if self._quick():
            if len(self._turn) >= self._queue.maxsize:  # the turn is a queue too: as bounded
                raise self._full()
            self._turn.append(pending)
            if len(self._turn) == 1:  # the first request of this turn calls the model for all of it
                try:
                    await asyncio.sleep(0)  # one turn of the loop: requests whose bodies came in this wake-up join
                finally:
                    self._run_turn()
        else:
            self._enqueue(pending)
        return await pending.future

    def _enqueue(self, pending: _Pending) -> None:
        """Into the model thread's bounded queue; Overloaded when it is full."""
        try:
            if self.depth >= self._queue.maxsize:
                raise queue.Full
            self._queue.put_nowait(pending)
        except queue.Full:
            raise self._full() from None

    def _full(self) -> Overloaded:
        return Overloaded(f"request queue is full ({self._queue.maxsize} waiting); retry shortly")

    def _quick(self) -> bool:
        """Run in the event loop: a model whose last call was quick, and nothing queued for the model thread."""
        return self._last_call < self._inline_s and not self.depth

    def _run_turn(self) -> None:
        """In the event loop: the requests that came in one turn of it, batched and called right here; the
        model thread takes them instead while it is calling, or once a call was not quick."""
        turn, self._turn = self._turn, []
        held = self._calling.acquire(blocking=False)
        try:
            while turn and held and self._last_call < self._inline_s:
                batch, turn = self._take(turn)
                if self._observe:
                    self._observe(sum(p.rows for p in batch), len(batch), 0.0)
                outcome: Outcome
                try:
                    outcome = self._split(batch, self._call(self._merge([p.inputs for p in batch], self._dim)))
                except Exception as exc:
                    outcome = exc
                _resolve(batch, outcome)
        finally:
            if held:
                self._calling.release()
        for pending in turn:
            try:
                self._enqueue(pending)
            except Overloaded as exc:
                pending.future.set_exception(exc)

    def _take(self, requests: list[_Pending]) -> tuple[list[_Pending], list[_Pending]]:
        """The first request with those of its group that fit in one batch, and the others."""
        first, batch, others = requests[0], requests[:1], []
        rows = first.rows
        for p in requests[1:]:
            if self._batchable and p.group == first.group and rows + p.rows <= self._max_batch:
                batch.append(p)
                rows += p.rows
            else:
                others.append(p)
        return batch, others

    def _call(self, merged: Any) -> Any:
        """The model on merged inputs, with the call lock held by the caller; its duration noted."""
        start = time.perf_counter()
        try:
            return self._run(merged)
        finally:
            self._last_call = time.perf_counter() - start

    # -- the model thread ----------------------------------------------------------------------
    def _next(self, timeout: float | None) -> _Pending | object | None:
        """The next queued request (or _STOP); None when `timeout` passes first (0: only what is queued)."""
        try:
            if timeout is None:
                return self._queue.get()
            return self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _next_or_idle(self) -> _Pending | object | None:
        """The next queued request; while none is queued, steps of idle work, one at a time."""
        while self._idle is not None:
            if (item := self._next(0)) is not None:
                return item
            try:
                with self._calling:
                    more = self._idle()
            except Exception:  # a batch of that size will report its own error; keep serving
                log.exception("idle work in the model thread failed")
                more = False
            if not more:
                self._idle = None
        return self._next(None)

    def _gather(self) -> list[_Pending] | None:
        """The next batch: the oldest request, then others of its group that fit before the delay ends;
        None: stop."""
        first = self._held.popleft() if self._held else self._next_or_idle()
        if not isinstance(first, _Pending):
            return None
        batch, rows = [first], first.rows
        if self._batchable:  # same-group requests held back earlier come first
            others: collections.deque[_Pending] = collections.deque()
            for held in self._held:
                if held.group == first.group and rows + held.rows <= self._max_batch:
                    batch.append(held)
                    rows += held.rows
                else:
                    others.append(held)
            self._held = others
        deadline = time.perf_counter() + self._max_delay
        while self._batchable and rows < self._max_batch:
            item = self._next(0)
            if item is None:
                if self._pending is not None and self._pending() <= len(batch) + len(self._held):
                    break  # nobody else is on the way: waiting would only add latency
                remaining = deadline - time.perf_counter()
                busy = remaining <= 0 and self._grow and self._launches - self._finished >= GPU_DEPTH
                if busy:
                    remaining = POLL_S  # the GPU could not start this batch yet: let it grow meanwhile
                if remaining <= 0:
                    break
                if (item := self._next(remaining)) is None:
                    continue  # the delay is over: look again whether the GPU is still full
            if not isinstance(item, _Pending):
                self._queue.put(item)  # _STOP: serve this batch (and those held) first
                break
            if item.group != first.group or rows + item.rows > self._max_batch:
                self._held.append(item)
                if item.group == first.group:
                    break  # the batch is full
                continue
            batch.append(item)
            rows += item.rows
        return batch

    def _work(self) -> None:
        while (batch := self._gather()) is not None:
            batch = [p for p in batch if not p.future.done()]  # drop requests whose client left
            if not batch:
                continue
            if self._observe:
                self._observe(sum(p.rows for p in batch), len(batch), time.perf_counter() - batch[0].enqueued)
            try:
                merged = self._merge([p.inputs for p in batch], self._dim)
                with self._calling:
                    launched: Any = self._call(merged)
            except Exception as exc:
                launched = exc
            if self._finish is None:
                self._answer(batch, launched)
            else:
                if not isinstance(launched, BaseException):
                    self._launches += 1
                self._launched.put((batch, launched))  # waits while the previous batch is still being answered
        self._launched.put(_STOP)

    def _answer_launched(self) -> None:
        while isinstance(item := self._launched.get(), tuple):
            self._answer(*item)

    def _answer(self, batch: list[_Pending], launched: Any) -> None:
        """Hand each request its share of the batch's results (or the batch's error) in the event loop."""
        assert self._loop is not None
        outcome: Outcome = launched
        if not isinstance(launched, BaseException):
            try:
                results = self._finish(launched) if self._finish is not None else launched
                outcome = self._split(batch, results)
            except Exception as exc:
                outcome = exc
            self._finished += 1  # counted for launched batches only, as _launches is
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone
            self._loop.call_soon_threadsafe(_resolve, batch, outcome)

    def _split(self, batch: list[_Pending], results: list[np.ndarray]) -> list[list[np.ndarray]]:
        if len(batch) == 1:
            return [results]
        ends = list(itertools.accumulate(p.rows for p in batch))[:-1]
        split = [np.split(r, ends, self._dim) for r in results]
        return [[s[i] for s in split] for i in range(len(batch))]


def _resolve(batch: list[_Pending], outputs: Outcome) -> None:
    """In the event loop: answer each request that still waits."""
    for i, p in enumerate(batch):
        if p.future.done():
            continue
        if isinstance(outputs, BaseException):
            p.future.set_exception(outputs)
        else:
            p.future.set_result(outputs[i])
