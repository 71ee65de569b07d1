"""Dynamic dimensions beyond batch: a variable-length encoder compiled once and served at every length.

Real kiln-compile runs (AOTInductor on this CPU), kiln-serve over real sockets, answers
compared with eager PyTorch.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from examples import models
from kiln.manifest import Manifest
from kiln.runtime.tensors import bf16_bits, bf16_values
from kiln.runtime.torch_arrays import BY_TORCH
from tests.support.serving import Server, post_together, run_compile

ENCODER_INPUTS = ["ids", "mask"]


def wire(name: str, tensor: torch.Tensor) -> dict[str, object]:
    """A JSON request input of any dtype (BF16 as its float values, as Triton clients send it)."""
    values = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
    return {
        "name": name,
        "shape": list(tensor.shape),
        "datatype": BY_TORCH[tensor.dtype],
        "data": values.flatten().tolist(),
    }


def infer(server: Server, names: list[str], tensors: tuple[torch.Tensor, ...]) -> httpx.Response:
    body = {"inputs": [wire(n, t) for n, t in zip(names, tensors, strict=True)]}
    return server.client.post("/v2/models/model/infer", json=body)


def answers(response: httpx.Response) -> dict[str, np.ndarray]:
    assert response.status_code == 200, response.text
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in response.json()["outputs"]}


def compile_ok(archive: Path, cache: Path, tmp: Path, *extra: str) -> Path:
    """The artifact folder a successful kiln-compile published."""
    proc, term = run_compile(archive, cache, tmp, "--batch-max=8", *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Path(json.loads(term)["path"])


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The encoder exported with batch and sequence dynamic (seq in 2..64), compiled by kiln-compile."""
    folder = tmp_path_factory.mktemp("encoder")
    return compile_ok(models.export("encoder", folder / "encoder.pt2"), folder / "cache", folder)


def artifact(folder: Path) -> str:
    return f"--artifact={folder}"


def test_every_dimension_the_program_declares_stays_dynamic_with_its_range(encoder: Path) -> None:
    manifest = Manifest.read(encoder)
    sig = manifest.signature
    assert [(s.name, s.shape, s.dims) for s in sig.inputs] == [
        ("ids", [-1, -1], ["batch", "ids.1"]),
        ("mask", [-1, -1], ["batch", "ids.1"]),
    ]
    assert {n: (r.min, r.max) for n, r in sig.dims.items()} == {"batch": (1, 8), "ids.1": (2, 64)}
    assert [o.name for o in sig.outputs] == ["pooled", "hidden"]  # the model's own dict keys
    assert sig.outputs[1].shape == [-1, -1, 32] and sig.outputs[1].dims == ["batch", "ids.1", None]
    assert manifest.validation is not None
    seq_sizes = sorted({p["ids.1"] for p in manifest.validation.points})
    assert seq_sizes == [2, 33, 64]  # min, middle and max of the sequence, not only the batch


def test_a_variable_length_encoder_answers_as_eager_at_every_length_and_batch(encoder: Path, serve) -> None:  # type: ignore[no-untyped-def]
    server = serve(artifact(encoder), "--max-batch-size=8")
    meta = server.client.get("/v2/models/model").json()
    assert [i["shape"] for i in meta["inputs"]] == [[-1, -1], [-1, -1]]
    assert meta["parameters"]["dynamic_dims"]["ids.1"] == {"min": 2, "max": 64}
    for batch, length in [(1, 2), (3, 10), (2, 20), (8, 37), (1, 64)]:
        inputs = models.examples("encoder", batch, seed=length, length=length)
        got = answers(infer(server, ENCODER_INPUTS, inputs))
        want = models.eager("encoder", *inputs)
        assert got["hidden"].shape == (batch, length, 32)
        np.testing.assert_allclose(got["pooled"], want[0].numpy(), atol=1e-4, rtol=1e-3)
        np.testing.assert_allclose(got["hidden"], want[1].numpy(), atol=1e-4, rtol=1e-3)


def test_a_length_outside_the_range_or_unequal_across_inputs_is_a_400_naming_the_dimension(  # type: ignore[no-untyped-def]
    encoder: Path, serve
) -> None:
    server = serve(artifact(encoder))
    long = infer(server, ENCODER_INPUTS, models.examples("encoder", 1, length=65))
    assert long.status_code == 400
    assert long.json()["error"] == (
        "input 'ids' dimension 1 (ids.1) is 65, outside its range 2..64: the model was compiled for ids.1 in 2..64"
    )
    ids, _ = models.examples("encoder", 1, length=6)
    _, mask = models.examples("encoder", 1, length=5)
    unequal = infer(server, ENCODER_INPUTS, (ids, mask))
    assert unequal.status_code == 400 and "inputs that share dimension ids.1 must agree" in unequal.json()["error"]


def test_batching_merges_only_equal_lengths_and_every_caller_gets_its_own_rows(encoder: Path, serve) -> None:  # type: ignore[no-untyped-def]
    server = serve(artifact(encoder), "--max-batch-size=8", "--max-delay-ms=30")
    requests = [models.examples("encoder", 1 + i % 2, seed=i, length=(7, 19)[i % 2]) for i in range(48)]
    bodies = [{"inputs": [wire(n, t) for n, t in zip(ENCODER_INPUTS, inputs, strict=True)]} for inputs in requests]
    responses = post_together(server, "/v2/models/model/infer", bodies)
    for inputs, response in zip(requests, responses, strict=True):
        got, want = answers(response), models.eager("encoder", *inputs)
        np.testing.assert_allclose(got["hidden"], want[1].numpy(), atol=1e-4, rtol=1e-3)
    calls, merged = server.metric("kiln_batch_requests_count"), server.metric("kiln_batch_requests_sum")
    assert merged == 48 and calls < merged, f"{merged} requests in {calls} model calls: nothing was merged"


def test_module_and_weights_declares_named_dimensions_and_output_names_in_kiln_yaml(  # type: ignore[no-untyped-def]
    tmp_path: Path, serve
) -> None:
    archive = models.pack(models.write_module_and_weights("encoder", tmp_path / "bundle", seed=3), tmp_path / "e.tgz")
    manifest = Manifest.read(compile_ok(archive, tmp_path / "cache", tmp_path, "--format=module-and-weights"))
    assert manifest.signature.describe_dims() == "batch=1..8 seq=2..64"
    assert [o.name for o in manifest.signature.outputs] == models.OUTPUTS["encoder"]
    server = serve(f"--artifact={tmp_path / 'cache' / manifest.key}")
    inputs = models.examples("encoder", 2, length=11)
    got = answers(infer(server, ENCODER_INPUTS, inputs))
    np.testing.assert_allclose(got["pooled"], models.eager("encoder", *inputs, seed=3)[0].numpy(), atol=1e-4, rtol=1e-3)
    refused = infer(server, ENCODER_INPUTS, models.examples("encoder", 1, length=70)).json()["error"]
    assert "(seq) is 70, outside its range 2..64" in refused


SPECIALISES = """import torch
from torch import nn


class FixedLength(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], 5 * 4).sum(1)  # only length 5 fits
"""


def test_a_dimension_export_would_fix_fails_the_compile_naming_it(tmp_path: Path) -> None:
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "model.py").write_text(SPECIALISES)
    (folder / "kiln.yaml").write_text(
        "inputs: [{name: x, dtype: float32, shape: [-1, {name: seq, min: 2, max: 9}, 4]}]\n"
    )
    proc, term = run_compile(
        models.pack(folder, tmp_path / "f.tgz"), tmp_path / "cache", tmp_path, "--format=module-and-weights"
    )
    assert proc.returncode == 1
    assert term.startswith("ExportFailed: cannot export with the dynamic dimensions batch=1..32 seq=2..9")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_int64_fp16_and_bf16_inputs_are_served_as_eager_computes_them(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    manifest = Manifest.read(compile_ok(models.export("mixed", tmp_path / "mixed.pt2"), tmp_path / "cache", tmp_path))
    assert [s.datatype for s in manifest.signature.inputs] == ["INT64", "FP16", "BF16"]
    assert [s.datatype for s in manifest.signature.outputs] == ["FP32", "BF16"]
    server = serve(f"--artifact={tmp_path / 'cache' / manifest.key}")
    inputs = models.examples("mixed", 3, seed=5)
    got = answers(infer(server, ["tokens", "scale", "bias"], inputs))
    want = models.eager("mixed", *inputs)
    np.testing.assert_allclose(got["output0"], want[0].numpy(), atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(got["output1"], want[1].float().numpy(), atol=1e-2, rtol=1e-2)
    wrong = infer(server, ["tokens", "scale", "bias"], (inputs[0], inputs[1].float(), inputs[2]))
    assert wrong.status_code == 400 and wrong.json()["error"] == "input 'scale' has datatype FP32, expected FP16"


def test_bf16_bits_round_to_nearest_even_as_torch_does() -> None:
    values = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 100
    values[:3] = torch.tensor([1.00390625, 1.01171875, float("inf")])  # ties to even, and infinity
    bits = bf16_bits(values.numpy())
    assert np.array_equal(bits, values.bfloat16().view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(bf16_values(bits), values.bfloat16().float().numpy())
