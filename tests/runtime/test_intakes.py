"""kiln-serve with intake processes: HTTP parsed in processes without torch, tensors through shared memory
to the one model process; an intake killed under load is replaced and no client gets another's rows."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import torch

from examples import models
from kiln.devcluster.cluster import free_port
from kiln.runtime import oip_v2_pb2 as pb
from tests.support.serving import Artifact, Server, infer_json, json_body, outputs_of


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def wait_for(check, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def serve_mlp(compiled: dict[str, Artifact], serve, *extra: str) -> Server:  # type: ignore[no-untyped-def]
    return serve(f"--artifact={compiled['mlp'].folder}", "--model-name=mlp", "--intake-processes=2", *extra)


def test_intakes_answer_as_eager_and_never_load_torch(compiled: dict[str, Artifact], serve) -> None:  # type: ignore[no-untyped-def]
    server = serve_mlp(compiled, serve, "--max-delay-ms=5")
    meta = server.client.get("/v2/models/mlp").json()["parameters"]
    assert meta["intake_processes"] == 2
    intakes = children(server.proc.pid)
    assert len(intakes) == 2 and not any(maps_torch(pid) for pid in intakes)
    assert maps_torch(server.proc.pid)  # the model process has libtorch: the compiled library needs it
    for batch in (1, 5, 16):
        inputs = models.examples("mlp", batch, seed=batch)
        got = outputs_of(infer_json(server, "mlp", inputs, ["x", "y"]))
        for g, want in zip(got, models.eager("mlp", *inputs), strict=True):
            torch.testing.assert_close(g, want, atol=1e-4, rtol=1e-3)
    text = server.client.get("/metrics").text
    assert 'kiln_requests_total{model="mlp",status="200"} 3.0' in text
    assert "kiln_intake_seconds_count" in text and "kiln_model_seconds_count" in text


def established(pid: int, port: int) -> int:
    """TCP connections to `port` that process `pid` holds open (its fds matched against /proc/net/tcp)."""
    inodes = {
        link.removeprefix("socket:[").rstrip("]")
        for fd in Path(f"/proc/{pid}/fd").iterdir()
        if (link := os.readlink(fd)).startswith("socket:[")
    }
    rows = [line.split() for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]]
    return sum(1 for r in rows if int(r[1].split(":")[1], 16) == port and r[3] == "01" and r[9] in inodes)


def test_keep_alive_connections_are_spread_evenly_over_the_intakes(  # type: ignore[no-untyped-def]
    compiled: dict[str, Artifact], serve
) -> None:
    """Each new connection goes to the intake with the fewest open ones; with a shared listening socket
    whichever intake woke first took it (64 connections landed 41/12/11/0 on four intakes)."""
    server = serve_mlp(compiled, serve)
    port = int(server.url.rsplit(":", 1)[1])
    body = json_body(models.examples("mlp", 1, seed=3), ["x", "y"])
    time.sleep(0.5)  # the fixture's closed probe connections are counted
    before = sum(established(pid, port) for pid in children(server.proc.pid))  # the fixture's client keeps one
    clients = [httpx.Client(base_url=server.url, timeout=30) for _ in range(16)]
    try:
        for c in clients:  # each opens one keep-alive connection and keeps it
            assert c.post("/v2/models/mlp/infer", json=body).status_code == 200
        counts = sorted(established(pid, port) for pid in children(server.proc.pid))
        assert sum(counts) == before + 16 and counts[-1] - counts[0] <= 1, counts
        assert established(server.proc.pid, port) == 0  # the model process accepts and hands over, keeps none
    finally:
        for c in clients:
            c.close()


def cases(count: int, seed: int) -> list[tuple[dict[str, object], list[torch.Tensor]]]:
    """Request bodies of 1..4 rows and eager answers, made before any thread starts (the models' seeds are global)."""
    out = []
    for i in range(count):
        inputs = models.examples("mlp", 1 + i % 4, seed=seed + i)
        out.append((json_body(inputs, ["x", "y"]), models.eager("mlp", *inputs)))
    return out


def right(response: httpx.Response, want: list[torch.Tensor]) -> bool:
    got = outputs_of(response)
    return all(torch.allclose(g, w, atol=1e-4, rtol=1e-3) for g, w in zip(got, want, strict=True))


def test_concurrent_requests_across_intakes_each_get_their_own_rows(  # type: ignore[no-untyped-def]
    compiled: dict[str, Artifact], serve
) -> None:
    server = serve_mlp(compiled, serve, "--max-delay-ms=5")

    def one(case: tuple[dict[str, object], list[torch.Tensor]]) -> bool:
        with httpx.Client(base_url=server.url, timeout=30) as client:  # a connection each: both intakes take some
            return right(client.post("/v2/models/mlp/infer", json=case[0]), case[1])

    with cf.ThreadPoolExecutor(16) as pool:
        assert all(pool.map(one, cases(96, seed=100)))
    assert server.metric("kiln_batch_requests_sum") == 96
    assert server.metric("kiln_batch_requests_count") < 96  # requests from both intakes were merged


def test_a_killed_intake_is_replaced_and_no_client_gets_another_requests_rows(  # type: ignore[no-untyped-def]
    compiled: dict[str, Artifact], serve
) -> None:
    server = serve_mlp(compiled, serve, "--max-delay-ms=2")
    stop = threading.Event()
    outcomes = {"right": 0, "wrong": 0, "failed": 0}
    lock = threading.Lock()

    known = cases(32, seed=1000)

    def client(first: int) -> None:
        k = first
        while not stop.is_set():
            body, want = known[k % len(known)]
            k += 1
            try:
                with httpx.Client(base_url=server.url, timeout=30) as c:  # new connections reach both intakes
                    response = c.post("/v2/models/mlp/infer", json=body)
                ok = response.status_code == 200
                kind = "right" if ok and right(response, want) else ("wrong" if ok else "failed")
            except httpx.TransportError:
                kind = "failed"  # the connection was on the killed intake: an error, never other rows
            with lock:
                outcomes[kind] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(2)
    victim = children(server.proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(children(server.proc.pid)) == 2 and victim not in children(server.proc.pid))
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join()
    assert outcomes["wrong"] == 0, outcomes
    assert outcomes["right"] > 50, outcomes
    assert server.proc.poll() is None
    wait_for(lambda: server.client.get("/v2/health/ready").status_code == 200)
    inputs = models.examples("mlp", 2, seed=5)
    got = outputs_of(infer_json(server, "mlp", inputs, ["x", "y"]))
    torch.testing.assert_close(got[0], models.eager("mlp", *inputs)[0], atol=1e-4, rtol=1e-3)
    assert "exited with -9; starting another" in server.log.read_text()


@contextlib.contextmanager
def intakes_stopped(server: Server) -> Iterator[list[int]]:
    """Both intake processes stopped mid-import (as on a host where they come up after the model)."""
    wait_for(lambda: len(children(server.proc.pid)) == 2, timeout=30)
    intakes = children(server.proc.pid)
    for pid in intakes:
        os.kill(pid, signal.SIGSTOP)
    try:
        assert "Started server process" not in server.log.read_text()  # stopped before either was up
        yield intakes
    finally:
        for pid in intakes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def test_while_no_intake_is_up_the_model_process_answers_and_grpc_waits(  # type: ignore[no-untyped-def]
    compiled: dict[str, Artifact], serve
) -> None:
    """Intakes import as much as the model process does; on slow hosts they came up after the model was
    ready and its first answer waited for them (docs/benchmarks.md §18). Here they are stopped mid-import:
    HTTP is answered by the model process, and a gRPC call waits for an intake, never refused."""
    grpc_port = free_port()
    server = serve(
        f"--artifact={compiled['mlp'].folder}",
        "--model-name=mlp",
        "--intake-processes=2",
        f"--grpc-port={grpc_port}",
        wait_ready=False,
    )
    port = int(server.url.rsplit(":", 1)[1])
    inputs = models.examples("mlp", 3, seed=11)
    with intakes_stopped(server) as intakes:
        wait_for(lambda: server.client.get("/v2/health/ready").status_code == 200)
        got = outputs_of(infer_json(server, "mlp", inputs, ["x", "y"]))
        for g, want in zip(got, models.eager("mlp", *inputs), strict=True):
            torch.testing.assert_close(g, want, atol=1e-4, rtol=1e-3)
        assert established(server.proc.pid, port) >= 1  # the model process holds the client's connection
        waiting = socket.create_connection(("127.0.0.1", grpc_port), timeout=5)  # the gRPC port listens
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch, cf.ThreadPoolExecutor(1) as pool:
            stub = ch.unary_unary(
                "/inference.GRPCInferenceService/ServerReady",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=pb.ServerReadyResponse.FromString,
            )
            call = pool.submit(stub, pb.ServerReadyRequest(), timeout=60)
            time.sleep(1)
            assert not call.done()  # held in the backlog while no intake is up
            for pid in intakes:
                os.kill(pid, signal.SIGCONT)
            assert call.result().ready  # answered by an intake once one is up
        waiting.close()
    wait_for(lambda: server.log.read_text().count("Started server process") == 2)
    time.sleep(0.5)  # their `up` frames reach the model process
    with httpx.Client(base_url=server.url, timeout=30) as fresh:  # a new connection goes to an intake now
        assert fresh.post("/v2/models/mlp/infer", json=json_body(inputs, ["x", "y"])).status_code == 200
        assert sum(established(pid, port) for pid in intakes) >= 1
    # the connection the model process served was closed after its next answer: the client reconnects
    assert server.client.post("/v2/models/mlp/infer", json=json_body(inputs, ["x", "y"])).status_code == 200
    wait_for(lambda: established(server.proc.pid, port) == 0, timeout=10)


def test_sigterm_while_no_intake_is_up_drains_the_model_processs_own_connections(  # type: ignore[no-untyped-def]
    compiled: dict[str, Artifact], serve
) -> None:
    server = serve(
        f"--artifact={compiled['mlp'].folder}",
        "--model-name=mlp",
        "--intake-processes=2",
        "--drain-seconds=2",
        wait_ready=False,
    )
    with intakes_stopped(server):
        wait_for(lambda: server.client.get("/v2/health/ready").status_code == 200)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert server.client.get("/v2/health/ready").status_code == 503  # draining: not ready, still answering
        inputs = models.examples("mlp", 1, seed=3)
        assert infer_json(server, "mlp", inputs, ["x", "y"]).status_code == 200
    assert server.proc.wait(timeout=60) == 0


def test_sigterm_drains_every_intake_then_exits(compiled: dict[str, Artifact], serve) -> None:  # type: ignore[no-untyped-def]
    server = serve_mlp(compiled, serve, "--drain-seconds=2")
    intakes = children(server.proc.pid)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert server.client.get("/v2/health/ready").status_code == 503  # draining: not ready, still answering
    inputs = models.examples("mlp", 1, seed=3)
    assert infer_json(server, "mlp", inputs, ["x", "y"]).status_code == 200
    assert server.proc.wait(timeout=60) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in intakes)


def length_of(reply: bytes) -> int:
    """The Content-Length of a raw HTTP response whose head has arrived."""
    head = reply.partition(b"\r\n\r\n")[0].decode("latin-1").lower()
    return int(head.split("content-length:", 1)[1].split("\r\n", 1)[0])


def test_a_body_still_on_the_wire_joins_the_batch_instead_of_a_batch_of_one(  # type: ignore[no-untyped-def]
    compiled: dict[str, Artifact], serve
) -> None:
    # One intake, so both requests share it; a long delay, so only the arriving count can make the batcher wait.
    server = serve(
        "--artifact=" + str(compiled["mlp"].folder), "--model-name=mlp", "--intake-processes=1", "--max-delay-ms=3000"
    )
    (slow_body, slow_want), (quick_body, quick_want) = cases(2, seed=7)
    raw = json.dumps(slow_body).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as slow:
        slow.sendall(
            f"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(raw)}\r\n\r\n".encode()
            + raw[:10]
        )
        time.sleep(0.5)  # headers in, body not: the intake counts it as arriving
        with cf.ThreadPoolExecutor(1) as pool:
            quick = pool.submit(server.client.post, "/v2/models/mlp/infer", json=quick_body)
            time.sleep(0.5)
            assert not quick.done()  # held for the body on the wire, not run alone
            slow.sendall(raw[10:])
            assert right(quick.result(timeout=30), quick_want)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < length_of(reply):
            reply += slow.recv(1 << 16)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    got = [torch.tensor(o["data"]).reshape(o["shape"]) for o in json.loads(body)["outputs"]]
    assert all(torch.allclose(g, w, atol=1e-4, rtol=1e-3) for g, w in zip(got, slow_want, strict=True))
    assert server.metric("kiln_batch_requests_sum") == 2
    assert server.metric("kiln_batch_requests_count") == 1  # one model call for both
