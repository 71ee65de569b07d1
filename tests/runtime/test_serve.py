"""kiln-serve over a real socket: correctness, the v2 protocol, batching, bad input, overload, shutdown."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton

from examples import models
from kiln.manifest import Manifest
from tests.support.serving import Artifact, Server, infer_json, json_body, outputs_of, post_together


@pytest.fixture
def mlp_server(compiled: dict[str, Artifact], serve) -> Server:  # type: ignore[no-untyped-def]
    return serve(f"--artifact={compiled['mlp'].folder}", "--model-name=mlp", "--max-delay-ms=5")


def test_results_equal_eager_for_every_batch_size(mlp_server: Server) -> None:
    for batch in range(1, 17):
        inputs = models.examples("mlp", batch, seed=batch)
        got = outputs_of(infer_json(mlp_server, "mlp", inputs, ["x", "y"]))
        for g, want in zip(got, models.eager("mlp", *inputs), strict=True):
            torch.testing.assert_close(g, want, atol=1e-4, rtol=1e-3)


def test_conv_net_results_equal_eager(compiled: dict[str, Artifact], serve) -> None:  # type: ignore[no-untyped-def]
    server = serve(f"--artifact={compiled['conv'].folder}", "--model-name=conv")
    for batch in (1, 3, 8):
        inputs = models.examples("conv", batch, seed=batch)
        (got,) = outputs_of(infer_json(server, "conv", inputs, ["image"]))
        torch.testing.assert_close(got, models.eager("conv", *inputs)[0], atol=1e-4, rtol=1e-3)


def test_health_and_metadata_follow_the_v2_protocol(mlp_server: Server) -> None:
    c = mlp_server.client
    assert c.get("/v2/health/live").status_code == 200
    assert c.get("/v2/health/ready").status_code == 200
    assert c.get("/v2/models/mlp/ready").status_code == 200
    assert c.get("/v2").json()["extensions"] == ["binary_tensor_data"]
    meta = c.get("/v2/models/mlp").json()
    assert meta["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, 16]},
        {"name": "y", "datatype": "FP32", "shape": [-1, 4]},
    ]
    assert [o["name"] for o in meta["outputs"]] == ["output0", "output1"]
    missing = c.get("/v2/models/other")
    assert missing.status_code == 404 and "serves 'mlp'" in missing.json()["error"]


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_infers_with_json_and_binary_data(mlp_server: Server, binary: bool) -> None:
    with contextlib.closing(triton.InferenceServerClient(mlp_server.url.removeprefix("http://"))) as client:
        assert client.is_server_ready() and client.is_model_ready("mlp")
        x, y = models.examples("mlp", 5, seed=7)
        inputs = [triton.InferInput("x", [5, 16], "FP32"), triton.InferInput("y", [5, 4], "FP32")]
        inputs[0].set_data_from_numpy(x.numpy(), binary_data=binary)
        inputs[1].set_data_from_numpy(y.numpy(), binary_data=binary)
        outputs = [
            triton.InferRequestedOutput("output0", binary_data=binary),
            triton.InferRequestedOutput("output1", binary_data=binary),
        ]
        result = client.infer("mlp", inputs, outputs=outputs)
        want = models.eager("mlp", x, y)
        np.testing.assert_allclose(result.as_numpy("output0"), want[0].numpy(), atol=1e-4, rtol=1e-3)
        np.testing.assert_allclose(result.as_numpy("output1"), want[1].numpy(), atol=1e-4, rtol=1e-3)


def test_concurrent_requests_are_merged_into_batches(compiled: dict[str, Artifact], serve) -> None:  # type: ignore[no-untyped-def]
    server = serve(
        f"--artifact={compiled['mlp'].folder}", "--model-name=mlp", "--max-delay-ms=50", "--max-batch-size=16"
    )
    inputs = [models.examples("mlp", 1, seed=i) for i in range(32)]
    responses = post_together(server, "/v2/models/mlp/infer", [json_body(inp, ["x", "y"]) for inp in inputs])
    for inp, response in zip(inputs, responses, strict=True):  # every caller got its own rows back
        torch.testing.assert_close(outputs_of(response)[0], models.eager("mlp", *inp)[0], atol=1e-4, rtol=1e-3)
    calls = server.metric("kiln_batch_requests_count")
    merged = server.metric("kiln_batch_requests_sum")
    assert merged >= 32 and calls < merged, f"{merged} requests in {calls} model calls: nothing was batched"
    assert server.metric("kiln_requests_total") >= 32


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}]},
            "inputs must be exactly x (FP32 [-1, 16]), y (FP32 [-1, 4])",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "shape": [1, 15], "datatype": "FP32", "data": [0.0] * 15},
                    {"name": "y", "shape": [1, 4], "datatype": "FP32", "data": [0.0] * 4},
                ]
            },
            "input 'x' has shape [1, 15], expected [-1, 16]",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "shape": [1, 16], "datatype": "INT64", "data": [0] * 16},
                    {"name": "y", "shape": [1, 4], "datatype": "FP32", "data": [0.0] * 4},
                ]
            },
            "input 'x' has datatype INT64, expected FP32",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 3},
                    {"name": "y", "shape": [1, 4], "datatype": "FP32", "data": [0.0] * 4},
                ]
            },
            "input 'x': 3 values for shape [1, 16], expected 16",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "shape": [17, 16], "datatype": "FP32", "data": [0.0] * 272},
                    {"name": "y", "shape": [17, 4], "datatype": "FP32", "data": [0.0] * 68},
                ]
            },
            "batch size 17, expected 1..16",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "shape": [2, 16], "datatype": "FP32", "data": [0.0] * 32},
                    {"name": "y", "shape": [1, 4], "datatype": "FP32", "data": [0.0] * 4},
                ]
            },
            "all inputs must share one batch size",
        ),
        ({"inputs": "nope"}, "malformed inference request at inputs"),
        ({"inputs": [], "surprise": 1}, "malformed inference request at surprise"),
    ],
)
def test_bad_requests_get_400_naming_what_was_expected(mlp_server: Server, body: object, expected: str) -> None:
    response = mlp_server.client.post("/v2/models/mlp/infer", json=body)
    assert response.status_code == 400
    assert expected in response.json()["error"]


def test_malformed_json_and_oversized_bodies_are_refused(compiled: dict[str, Artifact], serve) -> None:  # type: ignore[no-untyped-def]
    server = serve(f"--artifact={compiled['mlp'].folder}", "--model-name=mlp", "--max-body-bytes=2000")
    bad = server.client.post("/v2/models/mlp/infer", content=b"{not json")
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]
    huge = server.client.post("/v2/models/mlp/infer", content=b"x" * 5000)
    assert huge.status_code == 413 and "exceeds the limit of 2000" in huge.json()["error"]


def test_a_full_queue_answers_503_with_retry_after_and_serves_the_rest(  # type: ignore[no-untyped-def]
    compiled: dict[str, Artifact], serve
) -> None:
    server = serve(
        f"--artifact={compiled['mlp'].folder}",
        "--model-name=mlp",
        "--max-queue=2",
        "--max-delay-ms=200",
        "--max-batch-size=1",
    )
    inputs = [models.examples("mlp", 1, seed=i) for i in range(24)]
    # All 24 at once: whether the model thread queues them or the event loop calls them (a quick CPU
    # model), at most 2 wait and the others are refused at once.
    responses = post_together(server, "/v2/models/mlp/infer", [json_body(inp, ["x", "y"]) for inp in inputs])
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0
    for inp, r in zip(inputs, responses, strict=True):
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1" and "queue is full" in r.json()["error"]
        else:
            torch.testing.assert_close(outputs_of(r)[0], models.eager("mlp", *inp)[0], atol=1e-4, rtol=1e-3)


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length, read from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b"<closed>"
        assert not data.endswith(b"<closed>"), data
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    length = next((int(v) for k, _, v in (h.partition(": ") for h in lines[1:]) if k.lower() == "content-length"), 0)
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(lines[0].split()[1]), rest


def test_sigterm_finishes_in_flight_requests_then_exits(compiled: dict[str, Artifact], serve) -> None:  # type: ignore[no-untyped-def]
    server = serve(f"--artifact={compiled['mlp'].folder}", "--model-name=mlp")
    inputs = models.examples("mlp", 2, seed=3)
    tensors = [
        {"name": n, "shape": list(t.shape), "datatype": "FP32", "data": t.flatten().tolist()}
        for n, t in zip(["x", "y"], inputs, strict=True)
    ]
    body = json.dumps({"inputs": tensors}).encode()
    url = httpx.URL(server.url)
    with socket.create_connection((url.host, url.port), timeout=30) as sock:
        # The server answers "100 Continue" once it has taken the request up: from then on it is in flight.
        sock.sendall(
            b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        assert read_response(sock)[0] == 100
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while "Shutting down" not in server.log.read_text():
            assert time.monotonic() < deadline, server.log.read_text()
            time.sleep(0.05)
        sock.sendall(body)  # the body arrives after the server began to shut down
        status, payload = read_response(sock)
    assert status == 200, payload
    got = torch.tensor(json.loads(payload)["outputs"][0]["data"]).reshape(2, -1)
    torch.testing.assert_close(got, models.eager("mlp", *inputs)[0], atol=1e-4, rtol=1e-3)
    # uvicorn re-raises the signal once shut down, the way a process killed by it would end
    assert server.proc.wait(timeout=30) in (0, -signal.SIGTERM)
    assert "Finished server process" in server.log.read_text()


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_eager_and_jit_modes_serve_the_exported_program(  # type: ignore[no-untyped-def]
    archives: dict[str, Path], serve, mode: str
) -> None:
    server = serve(
        f"--mode={mode}", f"--archive=file://{archives['mlp']}", "--model-name=mlp", "--max-batch-size=8", timeout=300
    )
    inputs = models.examples("mlp", 3, seed=11)
    got = outputs_of(infer_json(server, "mlp", inputs, ["x", "y"]))
    torch.testing.assert_close(got[0], models.eager("mlp", *inputs)[0], atol=1e-4, rtol=1e-3)
    assert server.client.get("/v2/models/mlp").json()["platform"] == f"kiln_{mode}"


def test_an_artifact_from_another_torch_version_is_refused(  # type: ignore[no-untyped-def]
    compiled: dict[str, Artifact], serve, tmp_path: Path
) -> None:
    folder = tmp_path / "artifact"
    shutil.copytree(compiled["mlp"].folder, folder)
    Manifest.read(folder).model_copy(update={"torch_version": "1.0.0"}).write(folder)
    server = serve(f"--artifact={folder}", wait_ready=False)
    assert server.proc.wait(timeout=120) == 1
    assert "ArtifactMismatch: artifact was compiled with torch 1.0.0" in server.log.read_text()


def test_a_corrupted_artifact_is_detected_by_sha256_and_refused(  # type: ignore[no-untyped-def]
    compiled: dict[str, Artifact], serve, tmp_path: Path
) -> None:
    folder = tmp_path / "artifact"
    shutil.copytree(compiled["mlp"].folder, folder)
    so = folder / str(Manifest.read(folder).runner_so)
    data = bytearray(so.read_bytes())
    data[len(data) // 2] ^= 0xFF
    so.write_bytes(bytes(data))
    server = serve(f"--artifact={folder}", wait_ready=False)
    assert server.proc.wait(timeout=120) == 1
    assert "ArtifactCorrupt: " in server.log.read_text()  # the reason the operator recompiles on
    assert "cached artifact is corrupt" in server.log.read_text()


def test_a_model_that_raises_answers_a_json_500_naming_it_and_keeps_serving(  # type: ignore[no-untyped-def]
    serve, tmp_path: Path
) -> None:
    archive = models.export("encoder", tmp_path / "encoder.pt2")
    server = serve("--mode=eager", f"--archive=file://{archive}", "--model-name=enc", timeout=300)

    def infer(ids: torch.Tensor) -> httpx.Response:
        body = {
            "inputs": [
                {"name": n, "shape": [1, 4], "datatype": "INT64", "data": t.flatten().tolist()}
                for n, t in (("ids", ids), ("mask", torch.ones(1, 4, dtype=torch.int64)))
            ]
        }
        return server.client.post("/v2/models/enc/infer", json=body)

    failed = infer(torch.full((1, 4), models.TinyEncoder.VOCAB + 7))  # no such token: the embedding raises
    assert failed.status_code == 500
    assert failed.json()["error"].startswith("model 'enc' failed: IndexError: index out of range")
    assert infer(torch.arange(4).reshape(1, 4)).status_code == 200
    assert server.metric('kiln_requests_total{model="enc",status="500"}') == 1
