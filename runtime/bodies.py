"""Inference request bodies read once into one buffer, by a subclass of uvicorn's httptools protocol.

Serve path, HTTP. uvicorn hands a request body to the application in pieces: each
piece is appended to a bytearray, copied again into a `bytes` message, and reading pauses
every 64 KiB until the application asks for more. For ResNet-50's 602 KB binary tensor that
is five copies and a dozen turns of the event loop per request, most of the server's CPU in
a py-spy profile (docs/benchmarks.md §2). For an inference POST whose Content-Length is
within the limit, `InferBodyProtocol` writes each piece once into a buffer of that length,
aligned so the binary tensors after the JSON header can be used where they lie, and wakes
the application once, when the body is complete. The application finds the buffer in
`scope["extensions"]["kiln.body"]`; every other request is uvicorn's as usual. In an intake
process the buffer is a block of the shared arena (kiln.runtime.shm), so binary tensors reach
the model process without another copy.

Such a request is also answered by the protocol itself (`Answering`), not through the ASGI cycle:
uvicorn's cycle wrote the head and the body of each answer in two sends, checked every header
against two regular expressions and passed messages through an event and two coroutines, over half
of the event loop's time on a 2-core CPU (docs/benchmarks.md §19). The answer goes out in one write.
Whatever the protocol does not answer itself (a pipelined request behind one in flight, a chunked or
oversized body, `Expect: 100-continue`, any other route) is uvicorn's as before, in order.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import httptools
import numpy as np
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from kiln.runtime.protocol import BINARY_HEADER
from kiln.runtime.shm import Arena
from kiln.runtime.tensors import ALIGNMENT

if TYPE_CHECKING:
    from kiln.runtime.inference import InferAnswer

log = logging.getLogger("kiln.serve")

BODY_EXTENSION = "kiln.body"
PREFIX, SUFFIX = "/v2/models/", "/infer"
_HEADER = BINARY_HEADER.lower().encode()


def infer_model(method: str, path: str) -> str | None:
    """The model named by POST /v2/models/{name}/infer, else None."""
    if method != "POST" or not path.startswith(PREFIX) or not path.endswith(SUFFIX):
        return None
    name = path[len(PREFIX) : -len(SUFFIX)]
    return name if name and "/" not in name else None


class BodyBuffer:
    """One request body of a known length, written piece by piece; byte `aligned_at` (where the
    binary tensors start) falls on an ALIGNMENT boundary, so tensors can view it without a copy.
    In a block of `arena` when one is given and has room; `release()` gives the block back."""

    def __init__(self, length: int, aligned_at: int = 0, arena: Arena | None = None) -> None:
        self.arena, self.block = arena, arena.alloc(length + ALIGNMENT) if arena is not None else None
        if arena is not None and self.block is not None:
            raw = arena.bytes[self.block : self.block + length + ALIGNMENT]
            arena.arrive(1)  # counted as arriving until complete or released (the batcher waits for it)
        else:
            raw = np.empty(length + ALIGNMENT, dtype=np.uint8)  # untouched pages cost no memory yet
        pad = -(raw.ctypes.data + aligned_at) % ALIGNMENT
        self.view: memoryview = raw[pad : pad + length].data
        self.length, self.filled = length, 0
        self.arriving = self.block is not None

    def arrived(self) -> None:
        if self.arriving and self.arena is not None:
            self.arena.arrive(-1)
            self.arriving = False

    def release(self) -> None:
        self.arrived()
        if self.arena is not None and self.block is not None:
            self.arena.free(self.block)
            self.block = None

    def write(self, piece: bytes | memoryview) -> None:
        end = min(self.filled + len(piece), self.length)  # the parser never passes more than Content-Length
        self.view[self.filled : end] = piece[: end - self.filled]
        self.filled = end
        if end == self.length:
            self.arrived()

    @property
    def complete(self) -> bool:
        return self.filled == self.length


class Answering:
    """An inference request the protocol answers itself. It stands where uvicorn keeps its request cycle
    (`protocol.cycle`), with the attributes uvicorn reads there, so a request behind it waits its turn."""

    __slots__ = ("body", "disconnected", "header_len", "keep_alive", "name", "response_complete")

    def __init__(self, name: str, body: BodyBuffer, header_len: str | None, keep_alive: bool) -> None:
        self.name, self.body, self.header_len, self.keep_alive = name, body, header_len, keep_alive
        self.response_complete = self.disconnected = False

    @property
    def message_event(self) -> Answering:
        return self  # uvicorn sets its cycle's event when the connection is lost: nothing waits on this one

    def set(self) -> None:
        pass


class InferBodyProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; inference bodies go straight into a BodyBuffer and are answered
    here (see module doc)."""

    limit = 0  # largest body read this way; larger ones take uvicorn's path (and get a 413)
    arena: Arena | None = None  # an intake process's shared arena
    answer: InferAnswer | None = None  # answers inference requests here; None: through the ASGI application
    body: BodyBuffer | None = None
    retiring = False  # every answer from now on closes the connection (`retire`)

    def retire(self) -> None:
        """Close this connection after the answer in flight, or after the next one: never an idle connection
        closed under a client that may be sending on it (an idle one closes at uvicorn's keep-alive timeout)."""
        self.retiring = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        super().connection_lost(exc)
        if isinstance(cycle, Answering) and not cycle.body.complete:
            cycle.body.release()  # the client left mid-body: nothing will answer it
        if self.arena is not None:
            self.arena.connection_closed()  # the model process balances new connections by this count

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.body = None

    def on_headers_complete(self) -> None:
        if self.answer is not None and (cycle := self.answering()) is not None:
            self.cycle = cycle  # type: ignore[assignment]
            self.body = cycle.body
            return
        super().on_headers_complete()
        if self.retiring and self.cycle is not None:
            self.cycle.keep_alive = False
        scope = self.scope
        if self.cycle is None or self.cycle.scope is not scope or infer_model(scope["method"], scope["path"]) is None:
            return
        self.body = self.body_buffer()
        if self.body is not None:
            scope.setdefault("extensions", {})[BODY_EXTENSION] = self.body  # type: ignore[assignment]

    def body_buffer(self) -> BodyBuffer | None:
        """A buffer for the body of the inference request whose headers were just read (None: uvicorn's path)."""
        headers = dict(self.headers)
        length, split = headers.get(b"content-length", b""), headers.get(_HEADER, b"0")
        if not length.isdigit() or not 0 < int(length) <= self.limit or b"transfer-encoding" in headers:
            return None
        aligned_at = int(split) if split.isdigit() and int(split) <= int(length) else 0
        return BodyBuffer(int(length), aligned_at, self.arena)

    def answering(self) -> Answering | None:
        """The request just read, when it is an inference request this protocol answers itself: a body of
        a known length within the limit, nothing in flight before it on this connection, no upgrade."""
        if self.cycle is not None and not self.cycle.response_complete:
            return None  # pipelined behind a request in flight: uvicorn queues it, in order
        parser = self.parser
        if parser.get_method() != b"POST" or self.expect_100_continue or parser.should_upgrade():
            return None
        path = httptools.parse_url(self.url).path
        name = infer_model("POST", path.decode("ascii")) if b"%" not in path and path.isascii() else None
        if name is None or (body := self.body_buffer()) is None:
            return None
        header_len = dict(self.headers).get(_HEADER)
        keep_alive = parser.get_http_version() != "1.0" and parser.should_keep_alive() and not self.retiring
        return Answering(name, body, None if header_len is None else header_len.decode("latin-1"), keep_alive)

    def on_body(self, body: bytes) -> None:
        if self.body is None:
            super().on_body(body)
        elif not self.cycle.response_complete:
            self.body.write(body)  # no wake-up per piece: on_message_complete wakes the application once

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if not isinstance(cycle, Answering):
            super().on_message_complete()
            return
        task = self.loop.create_task(self.respond(cycle))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)  # uvicorn's graceful shutdown waits for it

    async def respond(self, cycle: Answering) -> None:
        """Answer `cycle` in one write, then let the next request on this connection go (or close it)."""
        assert self.answer is not None
        try:
            status, payload, headers = await self.answer(cycle.name, cycle.body.view, cycle.header_len)
        except Exception:
            log.exception("answering an inference request failed")
            status, payload, headers, cycle.keep_alive = 500, b'{"error": "internal server error"}', [], False
        finally:
            cycle.body.release()  # after the answer: the model process reads tensors where they lie
        if self.flow.write_paused and not cycle.disconnected:
            await self.flow.drain()
        cycle.response_complete = True
        if cycle.disconnected:
            return
        head = [STATUS_LINE[status]]
        head += [b"%s: %s\r\n" % pair for pair in self.server_state.default_headers]
        head += [f"{name}: {value}\r\n".encode("latin-1") for name, value in headers]
        close = b"" if cycle.keep_alive else b"connection: close\r\n"
        head.append(b"content-length: %d\r\n%s\r\n" % (len(payload), close))
        self.transport.writelines([b"".join(head), payload])  # one send (writev) for head and body
        if not cycle.keep_alive:
            self.transport.close()
        self.on_response_complete()


def protocol_with_limit(
    limit: int, arena: Arena | None = None, answer: InferAnswer | None = None
) -> type[InferBodyProtocol]:
    """The protocol class for uvicorn's `http` setting, reading bodies up to `limit` bytes into buffers
    (blocks of `arena` where given), and answering inference requests with `answer` where given."""
    return type("InferBodyProtocol", (InferBodyProtocol,), {"limit": limit, "arena": arena, "answer": answer})
