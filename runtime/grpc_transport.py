"""gRPC's unary calls over HTTP/2 (h2c, prior knowledge), served by an asyncio protocol on kiln-serve's own loop.

Serve path, transport (framework-free: no grpc, no protobuf; HPACK header blocks are decoded by `hpack`).
grpcio's server took ~0.4 ms of CPU for an empty call and ~1 ms more than HTTP to bring in a 602 KB
request (docs/benchmarks.md §15): its transport, not Kiln's handler, was most of a gRPC request. Here a
request's DATA frames are written once, as they arrive, into a body buffer (kiln.runtime.bodies: in an
intake process a block of the shared arena, so the model process reads the tensors where they lie), and
the handler runs when the stream ends. What a unary call needs of HTTP/2 is here: the connection preface,
SETTINGS, PING, WINDOW_UPDATE and flow control both ways, HEADERS with CONTINUATION, RST_STREAM and
GOAWAY (also to drain). The receive windows are opened wide once and topped up as bytes arrive: a message
is bounded by the size limit instead, as an HTTP body is. Compressed messages are refused (UNIMPLEMENTED).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import quote

from hpack import Decoder, HPACKError

from kiln.runtime.bodies import BodyBuffer
from kiln.runtime.shm import Arena

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, REFUSED_STREAM, COMPRESSION_ERROR = 0, 1, 3, 6, 7, 9
HEADER_TABLE_SIZE, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = 1, 3, 4, 5
MAX_WINDOW = (1 << 31) - 1
FRAME_LIMIT = (1 << 24) - 1  # the largest frame a peer may send us (we say so in SETTINGS)
STREAMS = 1024  # concurrent calls per connection
HEADER_LIMIT = 1 << 16  # bytes of a request's header block
FRAME = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id: a frame's 9-byte header
OK, INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 0, 3, 5, 8, 12, 13, 14
CODE_NAMES = {
    OK: "OK",
    INVALID_ARGUMENT: "INVALID_ARGUMENT",
    NOT_FOUND: "NOT_FOUND",
    RESOURCE_EXHAUSTED: "RESOURCE_EXHAUSTED",
    UNIMPLEMENTED: "UNIMPLEMENTED",
    INTERNAL: "INTERNAL",
    UNAVAILABLE: "UNAVAILABLE",
}


class GrpcError(Exception):
    """A call's non-OK status: the code (gRPC's numbering) and a message for the client."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# A method: the request message's bytes (a view of the body buffer, valid until the answer is sent) in,
# the answer message's bytes (in pieces, joined on the wire) out.
Handler = Callable[[memoryview], Awaitable[list[bytes]]]


def _no_hint(size: int) -> int:
    return 0


@dataclass
class Method:
    """A method's handler, and where in a request message of a given size its tensors likely start (that byte
    is placed on an alignment boundary, so they can be used where they lie)."""

    call: Handler
    aligned_at: Callable[[int], int] = _no_hint


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return FRAME.pack(len(payload) << 8 | kind, flags, stream) + payload


def _hpack_int(value: int, prefix: int, first: int = 0) -> bytes:
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A header field as a literal without indexing and with a literal name: it leaves the peer's table as it was,
    so a block made of these can be kept and sent again."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


STATUS_200 = b"\x88"  # :status 200, index 8 of HPACK's static table
RESPONSE_HEADERS = (
    STATUS_200 + _literal(b"content-type", b"application/grpc") + _literal(b"grpc-accept-encoding", b"identity")
)
OK_TRAILERS = _literal(b"grpc-status", b"0")


def status_block(code: int, message: str) -> bytes:
    # grpc-message is percent-encoded UTF-8 (gRPC over HTTP/2)
    text = quote(message.encode(), safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode()
    return _literal(b"grpc-status", str(code).encode()) + _literal(b"grpc-message", text)


@dataclass
class Stream:
    """One call: its method, its request body as it arrives, and what of its answer still waits for window."""

    id: int
    method: Method | None
    window: int  # how much we may still send on it
    error: GrpcError | None = None  # refused before its body was read: answered when it ends
    prefix: bytearray = field(default_factory=bytearray)  # the message's 5-byte length prefix, as it arrives
    body: BodyBuffer | None = None
    received: int = 0
    ended: bool = False  # the client sent END_STREAM
    outbox: memoryview | None = None  # answer DATA not yet sent
    trailers: bytes = b""
    done: bool = False  # answered (or reset): nothing more is sent


class Connection(asyncio.Protocol):
    """One client connection: frames in, calls to `methods`, answers out within the client's windows."""

    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.methods, self.limit, self.arena = server.methods, server.limit, server.arena
        self.transport: asyncio.Transport | None = None
        self.decoder = Decoder(max_header_list_size=HEADER_LIMIT)
        self.preface = bytearray()
        self.head = bytearray()  # the frame header being read
        self.payload = bytearray()  # the payload of a frame read whole (every kind but an unpadded DATA)
        self.kind = self.flags = self.sid = self.length = 0
        self.data_left = 0  # bytes of the unpadded DATA frame being streamed into its call's body
        self.data_stream: Stream | None = None
        self.headers_for: int | None = None  # a header block continues on this stream (CONTINUATION)
        self.block = bytearray()
        self.streams: dict[int, Stream] = {}
        self.last_stream = 0
        self.window = 65535  # connection-level: how much we may still send
        self.initial_window = 65535  # the client's SETTINGS_INITIAL_WINDOW_SIZE
        self.max_frame = 16384  # the client's SETTINGS_MAX_FRAME_SIZE
        self.unacked = 0  # bytes received since our last connection WINDOW_UPDATE
        self.blocked: dict[int, Stream] = {}  # streams with answer bytes waiting for window
        self.calls: set[asyncio.Task[None]] = set()
        self.closing = False
        self.closed = False  # a connection error was sent: nothing more is read
        self.ends_with_headers = False  # the header block being read ends its stream

    # -- the byte stream in

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is not asyncio's class
        self.server.connections.add(self)
        settings = struct.pack(
            ">HIHIHIHI",
            MAX_CONCURRENT_STREAMS,
            STREAMS,
            INITIAL_WINDOW_SIZE,
            MAX_WINDOW,
            MAX_FRAME_SIZE,
            FRAME_LIMIT,
            6,  # SETTINGS_MAX_HEADER_LIST_SIZE
            HEADER_LIMIT,
        )
        transport.write(
            frame(SETTINGS, 0, 0, settings) + frame(WINDOW_UPDATE, 0, 0, (MAX_WINDOW - 65535).to_bytes(4, "big"))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self.arena is not None:
            self.arena.connection_closed()  # the model process balances new connections by this count
        for stream in self.streams.values():
            stream.done = True
            if stream.body is not None and not stream.ended:  # no call holds it: give its block back
                stream.body.release()
        self.streams.clear()
        self.blocked.clear()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        view = memoryview(data)
        if len(self.preface) < len(PREFACE):
            take = len(PREFACE) - len(self.preface)
            self.preface += view[:take]
            view = view[take:]
            if not PREFACE.startswith(bytes(self.preface)):
                self.fail(PROTOCOL_ERROR, "not an HTTP/2 connection preface: gRPC clients speak HTTP/2 (h2c)")
                return
        while len(view) and not self.closed:
            if self.data_left:  # an unpadded DATA frame's payload goes straight to its call's body
                piece = view[: self.data_left]
                view = view[len(piece) :]
                self.data_left -= len(piece)
                self.on_data(self.data_stream, piece, end=False)
                if not self.data_left:
                    self.data_end()
                continue
            if len(self.head) < 9:
                take = 9 - len(self.head)
                self.head += view[:take]
                view = view[take:]
                if len(self.head) < 9:
                    return
                word, self.flags, sid = FRAME.unpack(self.head)
                self.length, self.kind, self.sid = word >> 8, word & 0xFF, sid & MAX_WINDOW
                if self.length > FRAME_LIMIT:
                    self.fail(FRAME_SIZE_ERROR, f"a frame of {self.length} bytes")
                    return
                if self.kind == DATA and not self.flags & PADDED:
                    self.data_begin()
                    continue
            take = self.length - len(self.payload)
            self.payload += view[:take]
            view = view[take:]
            if len(self.payload) < self.length:
                return
            payload = bytes(self.payload)
            self.payload.clear()
            self.head.clear()
            self.on_frame(self.kind, self.flags, self.sid, payload)

    def data_begin(self) -> None:
        self.head.clear()
        if self.headers_for is not None or not self.sid:
            self.fail(PROTOCOL_ERROR, "DATA inside a header block or on stream 0")
            return
        self.count_received(self.length)
        self.data_stream = self.streams.get(self.sid)
        self.data_left = self.length
        if not self.length:
            self.data_end()

    def data_end(self) -> None:
        stream, self.data_stream = self.data_stream, None
        if stream is not None and self.flags & END_STREAM:
            self.end(stream)

    def count_received(self, size: int) -> None:
        """Flow control in: the connection's window is topped up once half of it is used."""
        self.unacked += size
        if self.unacked >= MAX_WINDOW // 2:
            self.write(frame(WINDOW_UPDATE, 0, 0, self.unacked.to_bytes(4, "big")))
            self.unacked = 0

    def on_frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if self.headers_for is not None and kind != CONTINUATION:
            self.fail(PROTOCOL_ERROR, "a header block was interrupted")
        elif kind == DATA:  # padded
            self.count_received(len(payload))
            pad = payload[0] if payload else 0
            stream = self.streams.get(sid)
            if stream is not None and 1 + pad <= len(payload):
                self.on_data(stream, memoryview(payload)[1 : len(payload) - pad], end=bool(flags & END_STREAM))
        elif kind == HEADERS:
            self.on_headers(flags, sid, payload)
        elif kind == CONTINUATION:
            if sid != self.headers_for:
                self.fail(PROTOCOL_ERROR, "CONTINUATION on another stream")
                return
            self.add_block(flags, sid, payload)
        elif kind == SETTINGS:
            if not flags & ACK:
                self.on_settings(payload)
        elif kind == PING:
            if not flags & ACK:
                self.write(frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            self.on_window_update(sid, int.from_bytes(payload[:4], "big") & MAX_WINDOW)
        elif kind == RST_STREAM:
            self.reset(sid)
        elif kind == GOAWAY:
            self.closing = True
            self.close_when_idle()
        elif kind == PUSH_PROMISE:
            self.fail(PROTOCOL_ERROR, "a client may not push")
        # PRIORITY and unknown kinds are ignored, as HTTP/2 asks

    def on_headers(self, flags: int, sid: int, payload: bytes) -> None:
        start, end = 0, len(payload)
        if flags & PADDED:
            start, end = 1, len(payload) - (payload[0] if payload else 0)
        if flags & PRIORITY_FLAG:
            start += 5
        if start > end or not sid:
            self.fail(PROTOCOL_ERROR, "a malformed HEADERS frame")
            return
        self.block.clear()
        self.headers_for = sid
        self.ends_with_headers = bool(flags & END_STREAM)
        self.add_block(flags, sid, payload[start:end])

    def add_block(self, flags: int, sid: int, fragment: bytes) -> None:
        self.block += fragment
        if len(self.block) > HEADER_LIMIT:
            self.fail(PROTOCOL_ERROR, f"a header block over {HEADER_LIMIT} bytes")
            return
        if not flags & END_HEADERS:
            return
        self.headers_for = None
        try:  # every block is decoded, even a refused call's: the peer's table changes with each
            headers = dict(self.decoder.decode(bytes(self.block), raw=True))
        except HPACKError as exc:
            self.fail(COMPRESSION_ERROR, f"a header block that does not decode: {exc}")
            return
        if sid in self.streams:  # trailers from the client: the call's request ends here
            if self.ends_with_headers:
                self.end(self.streams[sid])
            return
        if sid % 2 == 0 or sid <= self.last_stream:
            self.fail(PROTOCOL_ERROR, f"stream {sid} was not a new client stream")
            return
        self.last_stream = sid
        if self.closing:
            self.write(frame(RST_STREAM, 0, sid, REFUSED_STREAM.to_bytes(4, "big")))
            return
        if len(self.streams) >= STREAMS:
            self.write(frame(RST_STREAM, 0, sid, REFUSED_STREAM.to_bytes(4, "big")))
            return
        stream = Stream(sid, None, self.initial_window)
        self.streams[sid] = stream
        path = headers.get(b":path", b"").decode("latin-1")
        if headers.get(b":method") != b"POST" or not headers.get(b"content-type", b"").startswith(b"application/grpc"):
            stream.error = GrpcError(INTERNAL, "not a gRPC call: POST with content-type application/grpc")
        elif (method := self.methods.get(path)) is None:
            stream.error = GrpcError(UNIMPLEMENTED, f"unknown method {path}")
        else:
            stream.method = method
        if self.ends_with_headers:
            self.end(stream)

    def on_data(self, stream: Stream | None, piece: memoryview, end: bool) -> None:
        if stream is not None and not stream.ended:
            if stream.error is None:
                self.take(stream, piece)
            if end:
                self.end(stream)

    def take(self, stream: Stream, piece: memoryview) -> None:
        """A piece of the request message: its length prefix first, then its bytes into the body buffer."""
        if stream.body is None:
            need = 5 - len(stream.prefix)
            stream.prefix += piece[:need]
            piece = piece[need:]
            if len(stream.prefix) < 5:
                return
            compressed, size = stream.prefix[0], int.from_bytes(stream.prefix[1:5], "big")
            if compressed:
                self.refuse(stream, GrpcError(UNIMPLEMENTED, "compressed messages are not supported"))
                return
            if size > self.limit:
                limit = f"the limit of {self.limit} bytes (--max-body-bytes)"
                self.refuse(stream, GrpcError(RESOURCE_EXHAUSTED, f"a {size}-byte message exceeds {limit}"))
                return
            assert stream.method is not None
            stream.body = BodyBuffer(size, stream.method.aligned_at(size), self.arena)
        if stream.received + len(piece) > stream.body.length:
            self.refuse(stream, GrpcError(INTERNAL, "more than one request message in a unary call"))
            return
        stream.body.write(piece)
        stream.received += len(piece)

    def refuse(self, stream: Stream, error: GrpcError) -> None:
        """Answer `error` now, before the request has ended, and ask the client to stop sending it."""
        stream.error = error
        self.end(stream)
        self.write(frame(RST_STREAM, 0, stream.id, NO_ERROR.to_bytes(4, "big")))

    def end(self, stream: Stream) -> None:
        """The client has sent the whole call: run its method, or answer its error."""
        if stream.ended:
            return
        stream.ended = True
        body = stream.body
        if stream.error is None and (body is None or not body.complete):
            got = len(stream.prefix) + stream.received
            stream.error = GrpcError(INTERNAL, f"the request ended after {got} bytes, inside its message")
        if stream.error is not None or stream.method is None:
            if body is not None:
                body.release()
            self.answer(stream, stream.error or GrpcError(INTERNAL, "no method"))
            return
        assert body is not None
        task = asyncio.get_running_loop().create_task(self.call(stream, stream.method.call, body))
        self.calls.add(task)
        task.add_done_callback(self.calls.discard)

    async def call(self, stream: Stream, method: Handler, body: BodyBuffer) -> None:
        try:
            parts = await method(body.view)
        except GrpcError as exc:
            self.answer(stream, exc)
        except Exception as exc:  # a method's own bug: INTERNAL naming it, and the connection keeps serving
            log.exception("gRPC call failed")
            self.answer(stream, GrpcError(INTERNAL, f"{type(exc).__name__}: {exc}"))
        else:
            self.answer(stream, parts)
        finally:
            body.release()  # after the answer is written: the model process read the tensors where they lie

    # -- answers out

    def answer(self, stream: Stream, result: list[bytes] | GrpcError) -> None:
        if stream.done or self.transport is None:
            self.forget(stream)
            return
        if isinstance(result, GrpcError):  # trailers only
            block = RESPONSE_HEADERS + status_block(result.code, str(result))
            self.write(self.header_frames(stream.id, END_STREAM, block))
            stream.done = True
            self.forget(stream)
            return
        size = sum(len(p) for p in result)
        message = b"".join([b"\x00", size.to_bytes(4, "big"), *result])
        self.write(self.header_frames(stream.id, 0, RESPONSE_HEADERS))
        stream.outbox, stream.trailers = memoryview(message), OK_TRAILERS
        self.flush(stream)

    def header_frames(self, sid: int, flags: int, block: bytes) -> bytes:
        if len(block) <= self.max_frame:
            return frame(HEADERS, flags | END_HEADERS, sid, block)
        pieces = [block[i : i + self.max_frame] for i in range(0, len(block), self.max_frame)]
        out = [frame(HEADERS, flags, sid, pieces[0])]
        out += [frame(CONTINUATION, 0, sid, p) for p in pieces[1:-1]]
        out.append(frame(CONTINUATION, END_HEADERS, sid, pieces[-1]))
        return b"".join(out)

    def flush(self, stream: Stream) -> None:
        """Send what the windows allow of the stream's answer; the trailers once all of it is out."""
        out: list[bytes | memoryview] = []
        pending = stream.outbox
        while pending is not None and len(pending) and min(self.window, stream.window) > 0:
            size = min(len(pending), self.window, stream.window, self.max_frame)
            out += (FRAME.pack(size << 8 | DATA, 0, stream.id), pending[:size])  # the answer's bytes, not copied
            pending = pending[size:]
            self.window -= size
            stream.window -= size
        if pending is not None and len(pending):
            stream.outbox = pending
            self.blocked[stream.id] = stream
        else:
            stream.outbox = None
            self.blocked.pop(stream.id, None)
            out.append(self.header_frames(stream.id, END_STREAM, stream.trailers))
            stream.done = True
        if self.transport is not None and out:
            self.transport.writelines(out)
        if stream.done:
            self.forget(stream)  # after the write: forgetting the last call may close a draining connection

    def on_window_update(self, sid: int, increment: int) -> None:
        if not sid:
            self.window += increment
            if self.window > MAX_WINDOW:
                self.fail(FLOW_CONTROL_ERROR, "the connection's window passed 2^31-1")
                return
            for stream in list(self.blocked.values()):
                if self.window <= 0:
                    break
                self.flush(stream)
        elif (one := self.streams.get(sid)) is not None:
            one.window += increment
            if one.id in self.blocked:
                self.flush(one)

    def on_settings(self, payload: bytes) -> None:
        for i in range(0, len(payload) - 5, 6):
            key, value = struct.unpack_from(">HI", payload, i)
            if key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    self.fail(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE over 2^31-1")
                    return
                for stream in self.streams.values():  # applies to the open streams' windows too
                    stream.window += value - self.initial_window
                self.initial_window = value
            elif key == MAX_FRAME_SIZE:
                self.max_frame = min(max(value, 16384), FRAME_LIMIT)
        self.write(frame(SETTINGS, ACK, 0))
        for stream in list(self.blocked.values()):
            self.flush(stream)

    def reset(self, sid: int) -> None:
        """The client cancelled a call: nothing more is sent on it (a call already running finishes first,
        since the model process may be reading its tensors)."""
        stream = self.streams.get(sid)
        if stream is None:
            return
        stream.done = True
        if not stream.ended and stream.body is not None:
            stream.body.release()
        stream.ended = True
        self.forget(stream)

    def forget(self, stream: Stream) -> None:
        self.streams.pop(stream.id, None)
        self.blocked.pop(stream.id, None)
        self.close_when_idle()

    def write(self, data: bytes) -> None:
        if self.transport is not None and data:
            self.transport.write(data)

    # -- the connection's end

    def goaway(self, code: int = NO_ERROR, reason: str = "") -> None:
        payload = self.last_stream.to_bytes(4, "big") + code.to_bytes(4, "big") + reason.encode()[:256]
        self.write(frame(GOAWAY, 0, 0, payload))

    def drain(self) -> None:
        """Stop taking calls (GOAWAY), and close once those in flight are answered."""
        if not self.closing:
            self.closing = True
            self.goaway()
        self.close_when_idle()

    def close_when_idle(self) -> None:
        if self.closing and not self.streams and self.transport is not None:
            self.transport.close()

    def fail(self, code: int, reason: str) -> None:
        """A connection error: GOAWAY naming it, then close (calls running finish and are not answered)."""
        log.warning("gRPC connection closed: %s", reason)
        self.goaway(code, reason)
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class GrpcServer:
    """The listening socket (or connections accepted elsewhere) and its connections; `methods` maps a
    call's path to its handler."""

    def __init__(self, methods: dict[str, Method], limit: int, arena: Arena | None) -> None:
        self.methods, self.limit, self.arena = methods, limit, arena
        self.connections: set[Connection] = set()
        self.server: asyncio.Server | None = None
        self.adopting: set[asyncio.Task[Any]] = set()  # connections handed over, being set up

    async def listen(self, host: str, port: int) -> None:
        """Listen on host:port: a kiln-serve without intake processes (with them, the model process listens)."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: Connection(self), host, port, reuse_port=True)

    def adopt(self, sock: socket.socket) -> None:
        """Serve a connection another process accepted (an intake's, from the model process)."""
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.connect_accepted_socket(lambda: Connection(self), sock))
        self.adopting.add(task)
        task.add_done_callback(self.adopting.discard)

    async def stop(self, grace: float) -> None:
        """Drain: no new connections or calls, and `grace` seconds for the calls in flight."""
        if self.server is not None:
            self.server.close()
        for connection in list(self.connections):
            connection.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
