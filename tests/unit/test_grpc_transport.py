"""Kiln's HTTP/2 transport for gRPC (kiln.runtime.grpc_transport) against grpcio's client over real sockets:
messages larger than every default window both ways, concurrent calls each answered with their own bytes,
statuses and their messages, refusals before a body is read, and a drain that finishes calls in flight."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from kiln.devcluster.cluster import free_port
from kiln.runtime.grpc_transport import INVALID_ARGUMENT, PREFACE, GrpcError, GrpcServer, Method

LIMIT = 4 << 20


class Harness:
    """A GrpcServer on its own event loop in a thread, with an echo, a slow echo and a failing method."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.port = free_port()
        self.release = asyncio.Event()
        self.server = GrpcServer(
            {
                "/t.T/Echo": Method(self.echo),
                "/t.T/Slow": Method(self.slow),
                "/t.T/Fail": Method(self.fail),
                "/t.T/Crash": Method(self.crash),
            },
            LIMIT,
            None,
        )
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self.server.listen("127.0.0.1", self.port))

    def run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def echo(self, body: memoryview) -> list[bytes]:
        data = bytes(body)
        return [data[::-1], data[:1]]  # reversed, then its first byte: an answer in two pieces

    async def slow(self, body: memoryview) -> list[bytes]:
        await self.release.wait()
        return [bytes(body)]

    async def fail(self, body: memoryview) -> list[bytes]:
        raise GrpcError(INVALID_ARGUMENT, "input 'x' has shape [5, 15], expected [-1, 16] — 100% wrong")

    async def crash(self, body: memoryview) -> list[bytes]:
        raise ValueError("a bug")

    def close(self) -> None:
        self.run(self.server.stop(1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


def stub(channel: grpc.Channel, name: str) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(f"/t.T/{name}")


def test_messages_past_every_window_both_ways_and_concurrent_calls_get_their_own_answers(harness: Harness) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{harness.port}") as channel:
        echo = stub(channel, "Echo")
        for size in (0, 1, 70_000, 3_000_000):  # 70 KB and 3 MB pass HTTP/2's default 64 KiB windows
            data = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
            assert echo(data, timeout=10) == data[::-1] + data[:1]
        with ThreadPoolExecutor(16) as pool:
            bodies = [i.to_bytes(4, "big") * (1000 + 997 * i) for i in range(64)]
            for body, got in zip(bodies, pool.map(lambda b: echo(b, timeout=20), bodies), strict=True):
                assert got == body[::-1] + body[:1]


def test_statuses_name_what_is_wrong_and_the_connection_keeps_serving(harness: Harness) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{harness.port}") as channel:
        with pytest.raises(grpc.RpcError) as failed:
            stub(channel, "Fail")(b"x", timeout=10)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert failed.value.details() == "input 'x' has shape [5, 15], expected [-1, 16] — 100% wrong"
        with pytest.raises(grpc.RpcError) as crashed:
            stub(channel, "Crash")(b"x", timeout=10)
        assert crashed.value.code() == grpc.StatusCode.INTERNAL and "a bug" in crashed.value.details()
        with pytest.raises(grpc.RpcError) as unknown:
            stub(channel, "Nope")(b"x", timeout=10)
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED and "/t.T/Nope" in unknown.value.details()
        with pytest.raises(grpc.RpcError) as large:
            stub(channel, "Echo")(b"x" * (LIMIT + 1), timeout=10)
        assert large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and str(LIMIT) in large.value.details()
        with pytest.raises(grpc.RpcError) as compressed:
            stub(channel, "Echo")(b"y" * 1000, timeout=10, compression=grpc.Compression.Gzip)
        assert compressed.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert stub(channel, "Echo")(b"ab", timeout=10) == b"baa"


def test_a_drain_answers_calls_in_flight_and_takes_no_new_connections(harness: Harness) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{harness.port}") as channel:
        assert stub(channel, "Echo")(b"up", timeout=10) == b"puu"
        slow = stub(channel, "Slow").future(b"in flight", timeout=20)
        stopping = asyncio.run_coroutine_threadsafe(harness.server.stop(10), harness.loop)
        harness.loop.call_soon_threadsafe(harness.release.set)
        assert slow.result() == b"in flight"
        stopping.result(15)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", harness.port), timeout=2).close()


def test_a_client_that_does_not_speak_http2_is_told_so_and_closed(harness: Harness) -> None:
    with socket.create_connection(("127.0.0.1", harness.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    assert b"connection preface" in data and not data.startswith(PREFACE)
