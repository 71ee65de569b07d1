"""kiln-serve under hostile and excessive traffic: fuzzed requests from its own OpenAPI document,
and a burst of ten times what it can serve. Real server processes over real sockets."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from torch import nn

from tests.conftest import trials
from tests.runtime.conftest import Artifact, Server

FUZZED: list[Server] = []  # the server each fuzzed operation runs against


@pytest.fixture
def api_schema(compiled: dict[str, Artifact], serve: Any) -> Any:
    server = serve(f"--artifact={compiled['mlp'].folder}", "--model-name=mlp", "--max-body-bytes=65536")
    FUZZED.append(server)
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=trials(60, 1000), deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_from_the_openapi_document_never_get_a_5xx(case: Any) -> None:
    response = case.call(timeout=30)
    case.validate_response(response, checks=[not_a_server_error])
    assert FUZZED[-1].proc.poll() is None, "kiln-serve died"


def test_the_fuzz_reached_the_infer_body(compiled: dict[str, Artifact], serve: Any, record: Any) -> None:
    """The document describes the infer body, so the fuzzer sends tensors, not only empty posts."""
    server = serve(f"--artifact={compiled['mlp'].folder}", "--model-name=mlp")
    doc = server.client.get("/openapi.json").json()
    body = doc["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["inputs"] and "RequestInput" in doc["components"]["schemas"]
    operations = sum(len(methods) for methods in doc["paths"].values())
    record(
        "schemathesis: requests generated from kiln-serve's OpenAPI document (paths, names, JSON bodies)",
        operations * trials(60, 1000),
        "nothing: no 5xx, the server never died",
        operations=operations,
        examples_per_operation=trials(60, 1000),
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


async def offer(url: str, bodies: list[dict[str, Any]], connections: int) -> list[httpx.Response | Exception]:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def one(body: dict[str, Any]) -> httpx.Response | Exception:
            try:
                return await client.post("/v2/models/slow/infer", json=body)
            except httpx.HTTPError as exc:
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
    queue = 16
    server = serve(
        "--mode=eager",
        f"--archive=file://{archive}",
        "--model-name=slow",
        "--max-batch-size=4",
        "--max-delay-ms=2",
        f"--max-queue={queue}",
        "--intra-op-threads=1",
    )

    def body(seed: int) -> dict[str, Any]:
        x = torch.randn(1, 512, generator=torch.Generator().manual_seed(seed))
        return {"inputs": [{"name": "x", "shape": [1, 512], "datatype": "FP32", "data": x.flatten().tolist()}]}

    # Capacity: what it serves per second with the queue never full (4 clients).
    start = time.perf_counter()
    warm = asyncio.run(offer(server.url, [body(i) for i in range(80)], 4))
    capacity = 80 / (time.perf_counter() - start)
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in warm)
    before = rss_kib(server.proc.pid, "VmRSS")
    count = int(10 * capacity)
    bodies = [body(1000 + i) for i in range(count)]
    start = time.perf_counter()
    answers = asyncio.run(offer(server.url, bodies, 512))
    burst_s = time.perf_counter() - start
    peak = rss_kib(server.proc.pid, "VmHWM")
    errors = [a for a in answers if isinstance(a, Exception)]
    assert not errors, f"{len(errors)} requests got no HTTP answer: {errors[:3]}"
    responses = [a for a in answers if isinstance(a, httpx.Response)]
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, sorted(set(codes))
    shed = [r for r in responses if r.status_code == 503]
    accepted = [(b, r) for b, r in zip(bodies, responses, strict=True) if r.status_code == 200]
    assert shed and accepted, f"{len(shed)} shed, {len(accepted)} answered"
    assert all(r.headers.get("retry-after") == "1" and "queue is full" in r.json()["error"] for r in shed)
    with torch.inference_mode():
        for b, r in accepted:
            x = torch.tensor(b["inputs"][0]["data"]).reshape(1, 512)
            got = torch.tensor(r.json()["outputs"][0]["data"]).reshape(1, 512)
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
