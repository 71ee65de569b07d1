"""The lean serve path: an AOT replica that never imports torch, and torch's runner as the named fallback.

Real kiln-compile artifacts (the session's compiled MLP), kiln-serve over a real socket.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from examples import models
from kiln.runtime.aoti_shim import LeanCpu, host_copy
from tests.support.serving import Artifact, Server, infer_json, outputs_of


def assert_answers_like_eager(server: Server) -> None:
    for batch in (1, 5, 16):
        inputs = models.examples("mlp", batch, seed=batch)
        for got, want in zip(
            outputs_of(infer_json(server, "model", inputs, ["x", "y"])), models.eager("mlp", *inputs), strict=True
        ):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


def test_an_aot_replica_is_ready_and_answers_without_importing_torch(compiled: dict[str, Artifact], serve) -> None:  # type: ignore[no-untyped-def]
    server = serve(f"--artifact={compiled['mlp'].folder}")
    assert_answers_like_eager(server)
    params = server.client.get("/v2/models/model").json()["parameters"]
    assert (params["loader"], params["torch_imported"], "loader_fallback" in params) == ("lean", False, False)
    assert 'kiln_model_loader{fallback="",loader="lean",model="model"} 1.0' in server.client.get("/metrics").text
    # the preload threads opened and warmed the model while the server was imported
    startup = next(line for line in server.log.read_text().splitlines() if "start-up:" in line)
    assert "compiled library hashed" in startup and "model opened and warmed up" in startup, startup


def test_the_model_thread_warms_every_batch_size_between_requests_when_asked(
    compiled: dict[str, Artifact], serve
) -> None:  # type: ignore[no-untyped-def]
    # on a GPU (the default there) each size's first call in a thread costs 20-50 ms that every request in flight
    # would wait for
    server = serve(f"--artifact={compiled['mlp'].folder}", "--warm-batch-sizes=every", "--max-batch-size=16")
    assert_answers_like_eager(server)  # answered between warm-up calls
    deadline = time.monotonic() + 60
    while "between requests" not in (log := server.log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "warmed up model in the model thread at batch sizes 1, 2, 16, 3..15 between requests" in log, log
    assert 'kiln_model_warm_sizes_left{model="model"} 0.0' in server.client.get("/metrics").text
    assert_answers_like_eager(server)


def test_torchs_runner_is_the_fallback_and_says_why(  # type: ignore[no-untyped-def]
    compiled: dict[str, Artifact], serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KILN_LOADER", "runner")
    server = serve(f"--artifact={compiled['mlp'].folder}")
    assert_answers_like_eager(server)
    params = server.client.get("/v2/models/model").json()["parameters"]
    assert (params["loader"], params["loader_fallback"], params["torch_imported"]) == (
        "runner",
        "KILN_LOADER=runner",
        True,
    )
    assert "not using the lean loader (KILN_LOADER=runner): importing torch" in server.log.read_text()
    assert (
        'kiln_model_loader{fallback="KILN_LOADER=runner",loader="runner",model="model"} 1.0'
        in server.client.get("/metrics").text
    )


def test_strided_results_are_copied_out_in_row_major_order() -> None:
    source = np.arange(12, dtype=np.float32)  # a [3, 4] tensor stored transposed: strides (1, 3)
    got = host_copy(source, [3, 4], [1, 3], copy=True)
    assert got.flags.c_contiguous and np.array_equal(got, source.reshape(4, 3).T)
    assert not np.shares_memory(got, source)


def test_cpu_results_are_copied_out_of_the_librarys_memory_whatever_their_strides() -> None:
    source = np.arange(12, dtype=np.float32)
    address = source.__array_interface__["data"][0]
    contiguous = LeanCpu._copy(address, [3, 4], [4, 1], "FP32")
    transposed = LeanCpu._copy(address, [3, 4], [1, 3], "FP32")
    assert np.array_equal(contiguous, source.reshape(3, 4)) and not np.shares_memory(contiguous, source)
    assert np.array_equal(transposed, source.reshape(4, 3).T) and not np.shares_memory(transposed, source)
