"""Dynamic batching: merge concurrent requests up to a row budget within a delay, split results back.

Runtime dataplane layer (no HTTP). One worker thread runs the model, so the
compiled model is never called concurrently; the queue is bounded, and a full
queue is refused at once (Overloaded) instead of growing memory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kiln.runtime.errors import Overloaded

RunFn = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]
# Called once per model call with (batch rows, request count, seconds the first waited).
ObserveFn = Callable[[int, int, float], None]


MergeFn = Callable[[list[list[torch.Tensor]], int], list[torch.Tensor]]


def concat(requests: list[list[torch.Tensor]], dim: int = 0) -> list[torch.Tensor]:
    """Each input of several requests, concatenated along the batch dimension."""
    return [torch.cat(parts, dim) for parts in zip(*requests, strict=True)]


@dataclass
class _Pending:
    inputs: list[torch.Tensor]
    rows: int
    future: asyncio.Future[list[torch.Tensor]]
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
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
    ) -> None:
        self._run = run
        self._merge = merge or concat
        self._dim = dim
        self._batchable = batchable  # False: every request is its own model call
        self._max_batch = max_batch
        self._max_delay = max_delay_s
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=max_queue)
        self._carry: _Pending | None = None
        self._observe = observe
        self._pending = pending  # requests in flight; none beyond this batch means no wait
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="kiln-model")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        self._executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    async def submit(self, inputs: list[torch.Tensor], rows: int) -> list[torch.Tensor]:
        pending = _Pending(inputs, rows, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise Overloaded(f"request queue is full ({self._queue.maxsize} waiting); retry shortly") from None
        return await pending.future

    async def _next(self) -> _Pending:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        return await self._queue.get()

    async def _gather(self) -> list[_Pending]:
        """The next batch: the first request, then whatever fits before the delay ends."""
        batch = [await self._next()]
        rows = batch[0].rows
        deadline = time.perf_counter() + self._max_delay
        while self._batchable and rows < self._max_batch:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                if self._pending is not None and self._pending() <= len(batch):
                    break  # nobody else is on the way: waiting would only add latency
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if rows + item.rows > self._max_batch:
                self._carry = item
                break
            batch.append(item)
            rows += item.rows
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            batch = [p for p in batch if not p.future.done()]  # drop requests whose client left
            if not batch:
                continue
            if self._observe:
                self._observe(sum(p.rows for p in batch), len(batch), time.perf_counter() - batch[0].enqueued)
            try:
                outputs = await loop.run_in_executor(self._executor, self._call, batch)
            except Exception as exc:
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            for p, out in zip(batch, outputs, strict=True):
                if not p.future.done():
                    p.future.set_result(out)

    def _call(self, batch: list[_Pending]) -> list[list[torch.Tensor]]:
        with torch.inference_mode():
            if len(batch) == 1:
                return [self._run(batch[0].inputs)]
            merged = self._merge([p.inputs for p in batch], self._dim)
            results = self._run(merged)
            sizes = [p.rows for p in batch]
            split = [torch.split(r, sizes, self._dim) for r in results]
            return [[s[i] for s in split] for i in range(len(batch))]
