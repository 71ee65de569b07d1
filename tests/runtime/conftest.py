"""Fixtures for runtime tests: exported test models, real kiln-compile runs, kiln-serve processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from examples import models
from kiln.devcluster.cluster import free_port
from tests.support.serving import BIN, Artifact, Server, compile_cmd


@pytest.fixture(scope="session")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("archives")
    return {name: models.export(name, folder / f"{name}.pt2") for name in ("mlp", "conv")}


@pytest.fixture(scope="session")
def compiled(archives: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Artifact]:
    """Both test models compiled by the real kiln-compile CLI (in parallel: each takes ~30 s on 2 cores)."""
    cache = tmp_path_factory.mktemp("cache")
    batch_max = {"mlp": "16", "conv": "8"}
    procs = {}
    for name, archive in archives.items():
        term = cache.parent / f"{name}.term"
        procs[name] = (
            subprocess.Popen(
                compile_cmd(archive, cache, term, f"--batch-max={batch_max[name]}"),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            ),
            term,
        )
    out = {}
    for name, (proc, term) in procs.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, log
        out[name] = Artifact(name, archives[name], cache, json.loads(term.read_text())["key"])
    return out


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(*args: str, wait_ready: bool = True, timeout: float = 120) -> Server:
        port = free_port()
        log = tmp_path / f"serve-{port}.log"
        with log.open("w") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [str(BIN / "kiln-serve"), "--host=127.0.0.1", f"--port={port}", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )
        server = Server(proc, f"http://127.0.0.1:{port}", log)
        started.append(server)
        deadline = time.monotonic() + timeout
        while wait_ready:
            if proc.poll() is not None:
                raise AssertionError(f"kiln-serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if server.client.get("/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"kiln-serve not ready after {timeout} s:\n{log.read_text()}")
            time.sleep(0.1)
        return server

    yield start
    for server in started:
        server.client.close()
        if server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
