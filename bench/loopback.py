"""The ceiling of any HTTP server on this host: the serving benchmark's client against a null server.

    python -m bench.loopback --model resnet50 --processes 1,4 --concurrency 1,64

The null server reads each request body whole (straight into a buffer: no parsing, no copies in
Python) and answers a fixed body the size of the model's answer, from `--processes` processes sharing
one listening socket, as kiln-serve's intakes do. What it reaches is what the loopback network, the
kernel (or a sandbox's network stack) and the benchmark's own client allow, before any serving work:
bench.serving's rows are read against it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import socket
import sys
from pathlib import Path

from bench import models
from bench.client import encode
from bench.hardware import describe
from bench.serving import load


class NullHttp(asyncio.BufferedProtocol):
    """HTTP/1.1 keep-alive POSTs with a Content-Length: each body read into one buffer, a fixed answer sent."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.buffer = bytearray(4 << 20)
        self.filled = 0
        self.need = 0  # bytes of the current request (headers + body) once its headers are in

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buffer)[self.filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self.filled += nbytes
        while True:
            if not self.need:
                end = self.buffer.find(b"\r\n\r\n", 0, self.filled)
                if end < 0:
                    return
                head = bytes(self.buffer[:end]).lower()
                length = (
                    int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]) if b"content-length:" in head else 0
                )
                self.need = end + 4 + length
            if self.filled < self.need:
                return
            self.transport.write(self.answer)  # type: ignore[attr-defined]
            rest = self.filled - self.need
            self.buffer[:rest] = self.buffer[self.need : self.filled]
            self.filled, self.need = rest, 0


def _serve(listener: socket.socket, answer: bytes) -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(lambda: NullHttp(answer), sock=listener)
        await server.serve_forever()

    asyncio.run(main())


def null_server(processes: int, answer_bytes: int) -> tuple[list[mp.Process], int]:
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    body = json.dumps({"outputs": [{"name": "output", "datatype": "FP32", "shape": [1, answer_bytes // 4]}]}).encode()
    payload = body + b"\0" * answer_bytes
    answer = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
        + f"inference-header-content-length: {len(body)}\r\ncontent-length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    procs = [
        mp.get_context("fork").Process(target=_serve, args=(listener, answer), daemon=True) for _ in range(processes)
    ]
    for p in procs:
        p.start()
    return procs, listener.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--processes", default="1,4")
    p.add_argument("--concurrency", default="1,64")
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--answer-bytes", type=int, default=4000, help="answer body size (ResNet-50: 1000 FP32)")
    p.add_argument("--client", default="python", choices=("python", "go"), help="as bench.serving's --client")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    body, headers = encode(models.names(a.model), [t.numpy() for t in models.inputs(a.model, 1)])
    hardware = describe("cpu")
    rows = []
    for n in (int(x) for x in a.processes.split(",")):
        procs, port = null_server(n, a.answer_bytes)
        try:
            load(port, a.model, body, headers, 4, 1.0)
            for c in (int(x) for x in a.concurrency.split(",")):
                r = load(port, a.model, body, headers, c, a.seconds, client=a.client)
                r |= {"processes": n, "body_bytes": len(body), "client": a.client}
                rows.append(r)
                print(
                    f"[loopback] {n} null-server processes, c={c}: {r['rps']:.0f} req/s p50 {r['p50_ms']:.3f} ms "
                    f"({len(body)}-byte bodies)",
                    flush=True,
                )
        finally:
            for proc in procs:
                os.kill(proc.pid, signal.SIGKILL)
    print(f"\nThe benchmark's {a.client} client against a null HTTP server ({a.model} bodies); hardware: {hardware}\n")
    print("| null-server processes | concurrency | req/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['processes']} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} "
            f"| {r['errors']} |"
        )
    if a.out:
        a.out.write_text(json.dumps({"hardware": hardware, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
