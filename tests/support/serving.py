"""kiln-compile and kiln-serve as runtime tests run them: real processes, real sockets."""

from __future__ import annotations

import subprocess
import sys
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
