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
"""

from __future__ import annotations

import numpy as np
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kiln.runtime.protocol import BINARY_HEADER
from kiln.runtime.shm import Arena
from kiln.runtime.tensors import ALIGNMENT

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


class InferBodyProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; inference bodies go straight into a BodyBuffer (see module doc)."""

    limit = 0  # largest body read this way; larger ones take uvicorn's path (and get a 413)
    arena: Arena | None = None  # an intake process's shared arena
    body: BodyBuffer | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.arena is not None:
            self.arena.connection_closed()  # the model process balances new connections by this count

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.body = None

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        scope = self.scope
        if self.cycle is None or self.cycle.scope is not scope or infer_model(scope["method"], scope["path"]) is None:
            return
        headers = dict(scope["headers"])
        length, split = headers.get(b"content-length", b""), headers.get(_HEADER, b"0")
        if not length.isdigit() or not 0 < int(length) <= self.limit:
            return
        aligned_at = int(split) if split.isdigit() and int(split) <= int(length) else 0
        self.body = BodyBuffer(int(length), aligned_at, self.arena)
        scope.setdefault("extensions", {})[BODY_EXTENSION] = self.body  # type: ignore[assignment]

    def on_body(self, body: bytes) -> None:
        if self.body is None:
            super().on_body(body)
        elif not self.cycle.response_complete:
            self.body.write(body)  # no wake-up per piece: on_message_complete wakes the application once


def protocol_with_limit(limit: int, arena: Arena | None = None) -> type[InferBodyProtocol]:
    """The protocol class for uvicorn's `http` setting, reading bodies up to `limit` bytes into buffers
    (blocks of `arena` where given)."""
    return type("InferBodyProtocol", (InferBodyProtocol,), {"limit": limit, "arena": arena})
