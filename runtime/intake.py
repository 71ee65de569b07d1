"""An intake process of kiln-serve: HTTP in, requests checked, tensors handed to the model process in shared memory.

Serve path, entry (beside kiln.runtime.serve), started by the model process
(kiln.runtime.intake_pool) with its ends of two socket pairs (frames; connections the model process
accepted) and two arenas.
It imports no torch: it parses and checks requests against the model's signature (from the model
process's `ready` frame), writes their bodies straight into its arena (the body buffer is a block of
it), and encodes answers from the model process's arena. Health, metadata, metrics and errors are
the same HTTP server as a single-process kiln-serve's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np

from kiln.runtime import errors, frames
from kiln.runtime.dataplane import BatchSettings, DataPlane, ModelInfo, T
from kiln.runtime.errors import KilnError, ModelFailed, NotReady, Overloaded, PayloadTooLarge
from kiln.runtime.intake_pool import GRPC, INTAKE_ENV
from kiln.runtime.metrics import Metrics
from kiln.runtime.server import HttpServer, batch_settings
from kiln.runtime.settings import parse_settings
from kiln.runtime.shm import Arena, Ref

log = logging.getLogger("kiln.intake")


def error_of(frame: dict[str, Any]) -> KilnError:
    """The domain error a `failed` frame names (an unknown name reads as the model failing)."""
    kind = getattr(errors, frame["error"], None)
    cls = kind if isinstance(kind, type) and issubclass(kind, KilnError) else ModelFailed
    return cls(frame["message"])


class ModelLink:
    """The model process as an intake sees it: frames over the socket pair, tensors in the two arenas."""

    def __init__(self, channel: socket.socket, handoff: socket.socket, requests: Arena, answers: Arena) -> None:
        self.channel, self.handoff, self.requests, self.answers = channel, handoff, requests, answers
        self.ids = itertools.count()
        self.waiting: dict[int, tuple[asyncio.Future[dict[str, Any]], list[int]]] = {}
        self.writer: frames.FrameWriter | None = None
        self.reading: asyncio.Task[None] | None = None
        self.building: asyncio.Task[None] | None = None

    async def start(self, plane: IntakePlane, http: HttpServer) -> None:
        reader, stream = await asyncio.open_unix_connection(sock=self.channel)
        self.handoff.setblocking(False)
        asyncio.get_running_loop().add_reader(self.handoff.fileno(), self.adopt, http)
        self.writer = frames.FrameWriter(stream)
        self.writer.send({"kind": "up"})  # the model process may hand this intake connections now
        self.reading = asyncio.create_task(self.read(reader, plane, http))

    async def read(self, reader: asyncio.StreamReader, plane: IntakePlane, http: HttpServer) -> None:
        while (frame := await frames.read(reader)) is not None:
            if frame["kind"] == "ready":
                plane.info, plane.ready = ModelInfo.model_validate(frame["info"]), True
                log.info("intake %d ready (pid %d)", plane.index, os.getpid())
                self.building = asyncio.create_task(http.build_api_later())
            elif (waiting := self.waiting.pop(frame["id"], None)) is not None:
                future, blocks = waiting
                for block in blocks:  # the model process is done with the request's tensors
                    self.requests.free(block)
                if not future.done():
                    future.set_result(frame)
        plane.ready = False
        for future, _ in self.waiting.values():
            if not future.done():
                future.set_exception(NotReady("the model process is gone"))
        log.error("the model process closed its end; stopping")
        http.stop()

    def adopt(self, http: HttpServer) -> None:
        """Serve the connections the model process handed over (one descriptor per message)."""
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.handoff, 1, 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds = b"", []
            if not data and not fds:  # the model process closed its end: no more connections
                asyncio.get_running_loop().remove_reader(self.handoff.fileno())
                return
            for fd in fds:
                if data[:1] == GRPC and http.grpc is not None:
                    http.grpc.adopt(socket.socket(fileno=fd))
                else:
                    http.adopt(socket.socket(fileno=fd))

    def place(self, tensor: np.ndarray, blocks: list[int]) -> Ref:
        """A request tensor in this intake's arena: where it lies (a binary body), or copied into a new block."""
        offset = self.requests.offset_of(tensor)
        if offset is not None:
            return offset, tensor.dtype.str, list(tensor.shape)
        if tensor.nbytes > self.requests.size:
            raise PayloadTooLarge(
                f"a {tensor.nbytes}-byte tensor exceeds the shared memory for requests ({self.requests.size} bytes);"
                " raise --shm-bytes"
            )
        ref = self.requests.put(tensor)
        if ref is None:
            raise Overloaded("shared memory for requests is full; retry shortly")
        blocks.append(ref[0])
        return ref

    @contextlib.asynccontextmanager
    async def call(self, tensors: list[np.ndarray], rows: int) -> AsyncIterator[list[np.ndarray]]:
        """The model's outputs for one request, as views of the answer arena, released on exit."""
        if self.writer is None or self.writer.closed:
            raise NotReady("the model process is gone")
        blocks: list[int] = []
        try:
            refs = [self.place(t, blocks) for t in tensors]
        except KilnError:
            for block in blocks:
                self.requests.free(block)
            raise
        key = next(self.ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[key] = (future, blocks)
        self.writer.send({"kind": "infer", "id": key, "rows": rows, "inputs": refs})
        frame = await future
        if frame["kind"] == "failed":
            raise error_of(frame)
        try:
            yield [self.answers.array(ref) for ref in frame["outputs"]]
        finally:
            self.writer.send({"kind": "release", "blocks": [r[0] for r in frame["outputs"]]})


class IntakePlane(DataPlane):
    """The dataplane of an intake process: checks and encodes here, batches and runs in the model process."""

    def __init__(self, name: str, batching: BatchSettings, metrics: Metrics, link: ModelLink, index: int) -> None:
        super().__init__(name, batching, metrics)
        self.link, self.index = link, index

    async def call(self, tensors: list[np.ndarray], rows: int, answer: Callable[[list[np.ndarray]], T]) -> T:
        """`answer` made of the model process's outputs, read where they lie in its arena."""
        if not self.ready:
            raise self.not_ready()
        inflight = self.metrics.intake_inflight.labels(self.name)
        inflight.inc()
        try:
            async with self.link.call(tensors, rows) as outputs:
                back = time.perf_counter()
                result = answer(outputs)
        finally:
            inflight.dec()
        self.metrics.intake_seconds.labels(self.name).observe(time.perf_counter() - back)
        return result


def main() -> int:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    settings = parse_settings(sys.argv[1:])
    handoff, channel, requests, answers, index, total = (int(n) for n in os.environ.pop(INTAKE_ENV).split(","))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics = Metrics()
    link = ModelLink(socket.socket(fileno=channel), socket.socket(fileno=handoff), Arena(requests), Arena(answers))
    plane = IntakePlane(settings.model_name, batch_settings(settings), metrics, link, index)
    plane.intakes = total

    async def startup(http: HttpServer) -> None:
        await link.start(plane, http)

    http = HttpServer(settings, plane, metrics, startup, arena=link.requests, listens=False)
    return http.run()


if __name__ == "__main__":
    sys.exit(main())
