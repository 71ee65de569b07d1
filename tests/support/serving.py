"""kiln-compile and kiln-serve as runtime tests run them: real processes, real sockets."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

BIN = Path(sys.executable).parent


@dataclass
class Artifact:
    name: str
    archive: Path
    cache: Path
    key: str

    @property
    def folder(self) -> Path:
        return self.cache / self.key


def compile_cmd(archive: Path, cache: Path, term: Path, *extra: str) -> list[str]:
    return [
        str(BIN / "kiln-compile"),
        f"--uri=file://{archive}",
        f"--cache={cache}",
        f"--termination-log={term}",
        *extra,
    ]


def run_compile(archive: Path, cache_dir: Path, tmp: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], str]:
    term = tmp / "termination-log"
    proc = subprocess.run(compile_cmd(archive, cache_dir, term, *extra), capture_output=True, text=True, timeout=600)
    return proc, term.read_text() if term.exists() else ""


class Server:
    def __init__(self, proc: subprocess.Popen[str], url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log
        self.client = httpx.Client(base_url=url, timeout=30)

    def metric(self, name: str) -> float:
        text = self.client.get("/metrics").text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total


def json_body(inputs: tuple[torch.Tensor, ...], input_names: list[str]) -> dict[str, object]:
    return {
        "inputs": [
            {"name": n, "shape": list(t.shape), "datatype": "FP32", "data": t.flatten().tolist()}
            for n, t in zip(input_names, inputs, strict=True)
        ]
    }


def infer_json(server: Server, name: str, inputs: tuple[torch.Tensor, ...], input_names: list[str]) -> httpx.Response:
    return server.client.post(f"/v2/models/{name}/infer", json=json_body(inputs, input_names))


def outputs_of(response: httpx.Response) -> list[torch.Tensor]:
    assert response.status_code == 200, response.text
    return [torch.tensor(o["data"]).reshape(o["shape"]) for o in response.json()["outputs"]]


def post_together(server: Server, path: str, bodies: list[dict[str, object]]) -> list[httpx.Response]:
    """POST each JSON body on a connection of its own so that all reach kiln-serve together: each is sent
    but its last byte, then every last byte at once. From a thread pool requests may arrive one at a time,
    and a quick CPU model is called for what reached it in one turn of the event loop: one at a time, no batch."""
    host, port = server.url.removeprefix("http://").split(":")
    raws = []
    for body in bodies:
        data = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(data)}\r\n\r\n"
        raws.append(head.encode() + data)
    sockets = [socket.create_connection((host, int(port)), timeout=60) for _ in raws]
    try:
        for sock, raw in zip(sockets, raws, strict=True):
            sock.sendall(raw[:-1])
        time.sleep(0.5)  # every request read but its last byte
        for sock, raw in zip(sockets, raws, strict=True):
            sock.sendall(raw[-1:])
        return [_read_answer(sock) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _read_answer(sock: socket.socket) -> httpx.Response:
    """One HTTP answer with a Content-Length."""
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += sock.recv(1 << 16)
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    length = int(next(v for k, v in headers.items() if k.lower() == "content-length"))
    while len(body) < length:
        body += sock.recv(1 << 16)
    return httpx.Response(int(lines[0].split()[1]), headers=headers, content=body)
