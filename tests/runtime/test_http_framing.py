"""HTTP/1.1 framing on the infer route, which kiln-serve's protocol answers itself (kiln.runtime.bodies):
pipelined requests answered in order beside uvicorn's routes, HTTP/1.0 closed after its answer,
`Expect: 100-continue` and chunked bodies, and clients that leave mid-body, whose buffers (shared-memory
blocks with intake processes) must come back. Raw sockets: HTTP clients neither pipeline nor leave mid-body."""

from __future__ import annotations

import json
import socket
import time
from typing import BinaryIO

import pytest
import torch

from examples import models
from tests.support.serving import Artifact, Server, json_body

INFER = "/v2/models/mlp/infer"


def connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=60)


def post(body: bytes, *extra: str, version: str = "1.1", length: int | None = None) -> bytes:
    """An inference POST's bytes; `length`: the Content-Length it claims, when not the body's."""
    head = [f"POST {INFER} HTTP/{version}", "Host: kiln", "Content-Type: application/json", *extra]
    if not any(h.lower().startswith("transfer-encoding") for h in extra):
        head.append(f"Content-Length: {len(body) if length is None else length}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def read_answer(stream: BinaryIO) -> tuple[int, dict[str, str], bytes]:
    """One answer from a connection's byte stream, leaving the next answer's bytes unread."""
    status = int(stream.readline().split()[1])
    headers = {}
    while (line := stream.readline().decode("latin-1").strip()) != "":
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    return status, headers, stream.read(int(headers.get("content-length", "0")))


def request(batch: int) -> tuple[bytes, list[torch.Tensor]]:
    inputs = models.examples("mlp", batch, seed=batch)
    return json.dumps(json_body(inputs, ["x", "y"])).encode(), list(models.eager("mlp", *inputs))


def assert_answers(body: bytes, want: list[torch.Tensor]) -> None:
    got = [torch.tensor(o["data"]).reshape(o["shape"]) for o in json.loads(body)["outputs"]]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-3)


@pytest.fixture(params=[0, 2], ids=["one-process", "intakes"])
def server(request: pytest.FixtureRequest, compiled: dict[str, Artifact], serve) -> Server:  # type: ignore[no-untyped-def]
    intakes = f"--intake-processes={request.param}"
    return serve(f"--artifact={compiled['mlp'].folder}", "--model-name=mlp", intakes, "--shm-bytes=1048576")


def test_pipelined_requests_are_answered_in_order_with_their_own_rows(server: Server) -> None:
    (one, want_one), (three, want_three), (five, want_five) = request(1), request(3), request(5)
    chunked = f"{len(five):x}\r\n".encode() + five + b"\r\n0\r\n\r\n"
    health = b"GET /v2/health/ready HTTP/1.1\r\nHost: kiln\r\n\r\n"
    with connect(server) as sock, sock.makefile("rb") as stream:
        # all in one write: the first is answered by the protocol, the rest wait their turn behind it
        sock.sendall(post(one) + health + post(three) + post(chunked, "Transfer-Encoding: chunked") + post(one))
        answers = [read_answer(stream) for _ in range(5)]
    assert [status for status, _, _ in answers] == [200] * 5
    for (_, _, body), want in zip(answers[0:1] + answers[2:], [want_one, want_three, want_five, want_one], strict=True):
        assert_answers(body, want)


def test_http_1_0_is_closed_after_its_answer_and_100_continue_is_honoured(server: Server) -> None:
    body, want = request(2)
    with connect(server) as sock, sock.makefile("rb") as stream:
        sock.sendall(post(body, version="1.0"))
        status, headers, answer = read_answer(stream)
        assert status == 200 and headers["connection"] == "close"
        assert_answers(answer, want)
        assert stream.read() == b""  # the server closed the connection
    with connect(server) as sock, sock.makefile("rb") as stream:
        sock.sendall(post(b"", "Expect: 100-continue", length=len(body)))
        assert stream.readline().split()[1] == b"100"
        stream.readline()
        sock.sendall(body)
        status, _, answer = read_answer(stream)
        assert status == 200
        assert_answers(answer, want)


def test_clients_that_leave_mid_body_give_their_buffers_back(server: Server) -> None:
    # Three bodies of this length fill an intake's 1 MiB request arena exactly (each block is the body and
    # 64 bytes of alignment, after the arena's 64-byte header): a block kept after its client left would
    # leave no room for a later request's tensors (a 503, shared memory full). Held open together, the
    # eight spread over both intakes.
    length = ((1 << 20) - 64) // 3 - 64
    abandoned = [connect(server) for _ in range(8)]
    for sock in abandoned:
        sock.sendall(post(b"{" * 1000, length=length))
    time.sleep(1)  # every intake has read the headers and started the bodies
    for sock in abandoned:
        sock.close()
    body, want = request(4)
    for _ in range(6):
        with connect(server) as sock, sock.makefile("rb") as stream:
            sock.sendall(post(body))
            status, _, answer = read_answer(stream)
            assert status == 200, answer
            assert_answers(answer, want)
