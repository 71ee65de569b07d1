"""Frames between an intake process and the model process: length-prefixed JSON over a Unix socket pair.

Serve path, frames (standard library only). Tensors never travel in frames: they lie in the shared
arenas of kiln.runtime.shm and frames name them by `Ref`. Per-request frames are TypedDicts, not
validated models: both ends are kiln-serve's own processes and a frame must cost microseconds; the
one `ready` frame carries the model's description as a pydantic model (dataplane.ModelInfo).

intake → model: `up` (the intake's event loop runs: it can take connections), `infer` (a request's
tensors in the intake's arena), `release` (answer blocks read).
model → intake: `ready` (the model is loaded and warm), `answer` (output tensors in the model's
arena for that intake), `failed` (the domain error a request met, by class name).
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any, Literal, TypedDict

from kiln.runtime.shm import Ref

LENGTH = struct.Struct("<I")


class Up(TypedDict):
    kind: Literal["up"]


class Infer(TypedDict):
    kind: Literal["infer"]
    id: int
    rows: int
    inputs: list[Ref]


class Release(TypedDict):
    kind: Literal["release"]
    blocks: list[int]


class Ready(TypedDict):
    kind: Literal["ready"]
    info: dict[str, Any]


class Answer(TypedDict):
    kind: Literal["answer"]
    id: int
    outputs: list[Ref]


class Failed(TypedDict):
    kind: Literal["failed"]
    id: int
    error: str  # a kiln.runtime.errors class name
    message: str


Frame = Up | Infer | Release | Ready | Answer | Failed


def encode(frame: Frame) -> bytes:
    data = json.dumps(frame, separators=(",", ":")).encode()
    return LENGTH.pack(len(data)) + data


class FrameWriter:
    """Frames sent in one write per turn of the event loop: under load, one system call carries the
    answers (or releases) of many requests instead of one each."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.queued: list[bytes] = []

    @property
    def closed(self) -> bool:
        return self.writer.is_closing()

    def send(self, frame: Frame) -> None:
        if not self.queued:
            asyncio.get_running_loop().call_soon(self.flush)
        self.queued.append(encode(frame))

    def flush(self) -> None:
        data, self.queued = b"".join(self.queued), []
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def close(self) -> None:
        self.flush()
        self.writer.close()


async def read(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next frame, or None when the other process closed its end (or died)."""
    try:
        (length,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
        frame: dict[str, Any] = json.loads(await reader.readexactly(length))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return frame
