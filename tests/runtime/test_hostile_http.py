"""kiln-serve under hostile and excessive traffic: fuzzed requests from its own OpenAPI document,
and a burst of ten times what it can serve. Real server processes over real sockets."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from torch import nn

from tests.support.kube import trials
from tests.support.serving import Artifact

EXAMPLES = trials(60, 1000)  # per operation and generation mode


def fuzz(operation: Any, mode: GenerationMode, name: str | None, url: str, calls: list[int]) -> None:
    """EXAMPLES generated requests to one operation; `name` pins the model name in the path."""

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: Any) -> None:
        if name is not None:
            case.path_parameters = {**(case.path_parameters or {}), "name": name}
        response = case.call(base_url=url, timeout=30)
        calls.append(response.status_code)
        case.validate_response(response, checks=[not_a_server_error])

    check()


def test_fuzzed_requests_from_the_openapi_document_never_get_a_5xx(
    compiled: dict[str, Artifact], serve: Any, record: Any
) -> None:
    """schemathesis generates valid and invalid requests (paths, names, JSON bodies) from the document
    kiln-serve publishes; the document describes the infer body, so the fuzzer sends tensors too."""
    server = serve(f"--artifact={compiled['mlp'].folder}", "--model-name=mlp", "--max-body-bytes=65536")
    doc = server.client.get("/openapi.json").json()
    body = doc["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["inputs"] and "RequestInput" in doc["components"]["schemas"]
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    calls: list[int] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        # Names as generated (mostly unknown models: 404), then the served model's, so bodies get parsed.
        pins = (False, True) if "{name}" in operation.path else (False,)
        for mode, pin in itertools.product((GenerationMode.POSITIVE, GenerationMode.NEGATIVE), pins):
            try:
                fuzz(operation, mode, "mlp" if pin else None, server.url, calls)
            except Unsatisfiable:
                assert mode == GenerationMode.NEGATIVE  # an operation with no input cannot be made invalid
    assert server.proc.poll() is None, "kiln-serve died"
    codes = {c: calls.count(c) for c in sorted(set(calls))}
    assert max(codes) < 500 and 200 in codes and 400 in codes, codes
    record(
        "schemathesis: valid and invalid requests generated from kiln-serve's OpenAPI document",
        len(calls),
        "nothing: no 5xx, the server never died",
        status_codes=codes,
    )


class Slow(nn.Module):
    """A model slow enough (a few ms a row on CPU) that a Python client can offer ten times its capacity."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.randn(512, 512) / 512**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(48):
            x = torch.tanh(x @ self.weight)
        return x


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def post(port: int, path: str, body: bytes) -> Answer:
    """One request on its own connection, as a distinct client sends it (raw asyncio: no client-side pool,
    whose bookkeeping would make the client, not the server, the bottleneck of a burst)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        lines = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        data = await reader.readexactly(int(headers.get("content-length", "0")))
        return Answer(int(lines[0].split()[1]), headers, data)
    finally:
        writer.close()


async def offer(port: int, bodies: list[bytes], connections: int) -> list[Answer | Exception]:
    """Every body at once, at most `connections` open together."""
    gate = asyncio.Semaphore(connections)

    async def one(body: bytes) -> Answer | Exception:
        async with gate:
            try:
                return await asyncio.wait_for(post(port, "/v2/models/slow/infer", body), 300)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                return exc

    return list(await asyncio.gather(*(one(b) for b in bodies)))


def test_a_burst_of_ten_times_capacity_is_shed_with_retry_after_in_bounded_memory(
    serve: Any, tmp_path: Path, record: Any
) -> None:
    model = Slow().eval()
    example = torch.randn(2, 512)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    archive = tmp_path / "slow.pt2"
    torch.export.save(program, str(archive))
    queue = 8
    server = serve(
        "--mode=eager",
        f"--archive=file://{archive}",
        "--model-name=slow",
        "--max-batch-size=4",
        "--max-delay-ms=2",
        f"--max-queue={queue}",
        "--intra-op-threads=1",
    )

    def body(seed: int) -> bytes:
        x = torch.randn(1, 512, generator=torch.Generator().manual_seed(seed))
        inputs = [{"name": "x", "shape": [1, 512], "datatype": "FP32", "data": x.flatten().tolist()}]
        return json.dumps({"inputs": inputs}).encode()

    # Capacity: what it serves per second with the queue never full (4 clients).
    start = time.perf_counter()
    port = int(server.url.rsplit(":", 1)[1])
    warm = asyncio.run(offer(port, [body(i) for i in range(80)], 4))
    capacity = 80 / (time.perf_counter() - start)
    assert all(isinstance(r, Answer) and r.status == 200 for r in warm)
    before = rss_kib(server.proc.pid, "VmRSS")
    count = int(10 * capacity)
    bodies = [body(1000 + i) for i in range(count)]
    start = time.perf_counter()
    answers = asyncio.run(offer(port, bodies, 512))
    burst_s = time.perf_counter() - start
    peak = rss_kib(server.proc.pid, "VmHWM")
    errors = [a for a in answers if isinstance(a, Exception)]
    assert not errors, f"{len(errors)} requests got no HTTP answer: {errors[:3]}"
    responses = [a for a in answers if isinstance(a, Answer)]
    codes = [r.status for r in responses]
    assert set(codes) <= {200, 503}, sorted(set(codes))
    shed = [r for r in responses if r.status == 503]
    accepted = [(b, r) for b, r in zip(bodies, responses, strict=True) if r.status == 200]
    assert shed and accepted, f"{len(shed)} shed, {len(accepted)} answered"
    assert all(r.headers.get("retry-after") == "1" and b"queue is full" in r.body for r in shed)
    with torch.inference_mode():
        for b, r in accepted:
            x = torch.tensor(json.loads(b)["inputs"][0]["data"]).reshape(1, 512)
            got = torch.tensor(json.loads(r.body)["outputs"][0]["data"]).reshape(1, 512)
            torch.testing.assert_close(got, model(x), atol=1e-4, rtol=1e-3)
    growth_mib = (peak - before) / 1024
    assert growth_mib < 256, f"peak RSS grew {growth_mib:.0f} MiB under the burst"
    assert server.client.get("/v2/health/ready").status_code == 200
    record(
        f"burst of {count} requests (10x the {capacity:.0f} req/s it serves) over 512 connections, queue {queue}",
        count,
        f"nothing: {len(accepted)} answered correctly, {len(shed)} shed with 503 + Retry-After, 0 dropped",
        capacity_rps=round(capacity, 1),
        burst_seconds=round(burst_s, 2),
        rss_before_mib=round(before / 1024),
        peak_rss_growth_mib=round(growth_mib, 1),
    )
