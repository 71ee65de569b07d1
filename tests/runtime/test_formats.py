"""Archive formats users bring from Triton, TorchServe and OpenVINO, compile options, threads and batching declarations.

Real kiln-compile runs (AOTInductor, OpenVINO, TorchScript), real torch-model-archiver,
kiln-serve over real sockets.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import pickle
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from examples import models
from tests.support.serving import Artifact, Server, infer_json, json_body, outputs_of, post_together, run_compile

WEIGHTS_SEED = 7  # not the seed a fresh module would get: equal outputs prove the weights were loaded


def compile_ok(archive: Path, cache: Path, tmp: Path, *extra: str) -> dict[str, object]:
    proc, term = run_compile(archive, cache, tmp, "--batch-max=8", *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dict(json.loads(term))


def assert_serves_mlp(server: Server, seed: int = WEIGHTS_SEED) -> None:
    for batch in (1, 3, 8):
        inputs = models.examples("mlp", batch, seed=batch)
        got = outputs_of(infer_json(server, "model", inputs, ["x", "y"]))
        for g, want in zip(got, models.eager("mlp", *inputs, seed=seed), strict=True):
            torch.testing.assert_close(g, want, atol=2e-3, rtol=1e-3)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.write_module_and_weights("mlp", tmp_path_factory.mktemp("bundle") / "mlp", seed=WEIGHTS_SEED)


def test_module_and_weights_tarball_is_compiled_ahead_of_time_with_its_weights(  # type: ignore[no-untyped-def]
    bundle_dir: Path, tmp_path: Path, serve
) -> None:
    archive = models.pack(bundle_dir, tmp_path / "mlp.tar.gz")
    summary = compile_ok(archive, tmp_path / "cache", tmp_path, "--format=module-and-weights")
    assert summary["engine"] == "aotinductor" and summary["note"] is None
    server = serve(f"--artifact={summary['path']}")
    assert server.client.get("/v2/models/model").json()["platform"] == "kiln_lean"
    assert_serves_mlp(server)


def test_torchserve_mar_from_torch_model_archiver_is_read_as_module_and_weights(  # type: ignore[no-untyped-def]
    bundle_dir: Path, tmp_path: Path, serve
) -> None:
    archiver = Path(sys.executable).parent / "torch-model-archiver"
    subprocess.run(
        [
            str(archiver),
            "--model-name=mlp",
            "--version=1.0",
            f"--model-file={bundle_dir / 'model.py'}",
            f"--serialized-file={bundle_dir / 'model.pt'}",
            "--handler=base_handler",
            f"--extra-files={bundle_dir / 'kiln.yaml'}",
            f"--export-path={tmp_path}",
        ],
        check=True,
    )
    summary = compile_ok(tmp_path / "mlp.mar", tmp_path / "cache", tmp_path, "--format=torchserve-mar", "--mode=eager")
    assert summary["engine"] == "exported-program"
    assert "prepared as an ExportedProgram for eager replicas" in str(summary["note"])
    server = serve("--mode=eager", f"--artifact={summary['path']}")
    assert_serves_mlp(server)


def test_torchscript_is_served_as_torchscript_and_says_so(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    script = models.save_torchscript("mlp", tmp_path / "mlp.pt", seed=WEIGHTS_SEED)
    summary = compile_ok(script, tmp_path / "cache", tmp_path, "--format=torchscript")
    assert summary["engine"] == "torchscript"
    assert summary["note"] == "served as TorchScript: a TorchScript archive cannot be compiled ahead of time"
    server = serve(f"--artifact={summary['path']}")
    assert server.client.get("/v2/models/model").json()["platform"] == "kiln_torchscript"
    assert_serves_mlp(server)


def test_openvino_ir_is_built_once_and_served_by_openvino(  # type: ignore[no-untyped-def]
    tmp_path: Path, serve
) -> None:
    archive = models.export("mlp", tmp_path / "mlp.pt2", seed=WEIGHTS_SEED)
    summary = compile_ok(archive, tmp_path / "cache", tmp_path, "--backend=openvino")
    assert summary["engine"] == "openvino"
    folder = Path(str(summary["path"]))
    assert (folder / "model.xml").is_file() and (folder / "model.bin").is_file()
    assert list((folder / "ov-cache").iterdir()), "the compiled blob was not cached in the artifact"
    server = serve(f"--artifact={folder}")
    assert server.client.get("/v2/models/model").json()["platform"] == "kiln_openvino"
    assert_serves_mlp(server)


def test_zip_archive_prepared_for_jit_replicas_honours_torch_compile_arguments(  # type: ignore[no-untyped-def]
    bundle_dir: Path, tmp_path: Path, serve
) -> None:
    archive = models.pack(bundle_dir, tmp_path / "mlp.zip")
    summary = compile_ok(archive, tmp_path / "cache", tmp_path, "--format=module-and-weights", "--mode=jit")
    server = serve(
        "--mode=jit",
        f"--artifact={summary['path']}",
        "--jit-backend=aot_eager",
        "--jit-fullgraph=true",
        "--jit-dynamic=true",
        timeout=300,
    )
    assert server.client.get("/v2/models/model").json()["platform"] == "kiln_jit-aot_eager"
    assert_serves_mlp(server)


def test_a_bogus_jit_backend_is_refused_with_the_allowed_list(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("--mode=jit", "--archive=file:///x.pt2", "--jit-backend=tvm", wait_ready=False)
    assert server.proc.wait(timeout=60) == 2
    assert "--jit-backend: expected one of inductor, aot_eager, eager, cudagraphs, not 'tvm'" in server.log.read_text()


def test_thread_pools_follow_the_declared_cpu_limit_not_the_cores(  # type: ignore[no-untyped-def]
    compiled: dict[str, Artifact], serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KILN_CPU_LIMIT", "1")
    params = serve(f"--artifact={compiled['mlp'].folder}").client.get("/v2/models/model").json()["parameters"]
    assert (params["loader"], params["intra_op_threads"]) == ("lean", 1)  # OpenMP's threads, as the library sees them
    monkeypatch.setenv("KILN_INTRA_OP_THREADS", "2")
    monkeypatch.setenv("KILN_INTER_OP_THREADS", "3")
    monkeypatch.setenv("KILN_LOADER", "runner")  # torch's pools, through torch
    params = serve(f"--artifact={compiled['mlp'].folder}").client.get("/v2/models/model").json()["parameters"]
    assert (params["intra_op_threads"], params["inter_op_threads"]) == (2, 3)


def concurrent_mlp(server: Server, count: int) -> None:
    inputs = [models.examples("mlp", 1, seed=i) for i in range(count)]
    with cf.ThreadPoolExecutor(count) as pool:
        responses = list(pool.map(lambda inp: infer_json(server, "model", inp, ["x", "y"]), inputs))
    for inp, response in zip(inputs, responses, strict=True):
        torch.testing.assert_close(outputs_of(response)[0], models.eager("mlp", *inp)[0], atol=1e-4, rtol=1e-3)


def test_a_model_declared_not_batchable_never_merges_requests(  # type: ignore[no-untyped-def]
    compiled: dict[str, Artifact], serve
) -> None:
    server = serve(f"--artifact={compiled['mlp'].folder}", "--max-delay-ms=50", "--batchable=false")
    concurrent_mlp(server, 24)
    assert server.metric("kiln_batch_requests_count") == server.metric("kiln_batch_requests_sum") == 24
    assert server.client.get("/v2/models/model").json()["parameters"]["batchable"] is False


SEQUENCE_FIRST = """
import torch
from torch import nn


class SequenceFirst(nn.Module):
    def __init__(self, features: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(features, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).cumsum(dim=0)
"""


def test_batch_dimension_one_is_compiled_merged_and_split_along_dimension_one(  # type: ignore[no-untyped-def]
    tmp_path: Path, serve
) -> None:
    """Sequence-first models (time, batch, features) batch along dimension 1, as BentoML's batch_dim=1."""
    folder = tmp_path / "seq"
    folder.mkdir()
    (folder / "model.py").write_text(SEQUENCE_FIRST)
    (folder / "kiln.yaml").write_text("inputs: [{name: x, dtype: float32, shape: [5, -1, 8]}]\nkwargs: {features: 8}\n")
    archive = models.pack(folder, tmp_path / "seq.tar.gz")
    summary = compile_ok(archive, tmp_path / "cache", tmp_path, "--format=module-and-weights", "--batch-dim=1")
    server = serve(f"--artifact={summary['path']}", "--max-delay-ms=50")
    meta = server.client.get("/v2/models/model").json()
    assert meta["inputs"][0]["shape"] == [5, -1, 8] and meta["outputs"][0]["shape"] == [5, -1, 3]
    rows = [torch.randn(5, 1 + i % 3, 8, generator=torch.Generator().manual_seed(i)) for i in range(12)]
    responses = post_together(server, "/v2/models/model/infer", [json_body((x,), ["x"]) for x in rows])
    # Weights are random (no model.pt): compare each answer with the same library run alone.
    alone = [outputs_of(infer_json(server, "model", (x,), ["x"]))[0] for x in rows]
    for x, response, single in zip(rows, responses, alone, strict=True):
        (got,) = outputs_of(response)
        assert got.shape == (5, x.shape[1], 3)
        torch.testing.assert_close(got, single, atol=1e-5, rtol=1e-4)
    assert server.metric("kiln_batch_requests_count") < server.metric("kiln_batch_requests_sum")
    bad = infer_json(server, "model", (torch.zeros(6, 1, 8),), ["x"])
    assert bad.status_code == 400 and "expected [5, -1, 8]" in bad.json()["error"]


# --- hostile and broken archives: refused with one clear line, nothing published ---------------------


class Payload:
    """A pickle that would run a command when unpickled without weights_only."""

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (print, ("PWNED: arbitrary code ran while loading weights",))


def _broken(kind: str, folder: Path) -> None:
    models.write_module_and_weights("mlp", folder)
    if kind == "pickled payload":
        with (folder / "model.pt").open("wb") as fh:
            pickle.dump({"body.0.weight": Payload()}, fh)
    elif kind == "no kiln.yaml":
        (folder / "kiln.yaml").unlink()
    elif kind == "two classes":
        (folder / "model.py").write_text(models.module_source("mlp") + "\n\nclass Other(nn.Module):\n    pass\n")
    elif kind == "wrong weights":
        torch.save(models.build("conv").state_dict(), folder / "model.pt")
    elif kind == "bad input dtype":
        (folder / "kiln.yaml").write_text("inputs: [{name: x, dtype: complex7, shape: [-1, 16]}]\n")


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("pickled payload", "model.pt is not a plain state dict: torch.load(weights_only=True) refused"),
        ("no kiln.yaml", "InvalidArchive: the archive has no kiln.yaml: add one naming the inputs"),
        ("two classes", "model.py must define exactly one torch.nn.Module subclass, it defines ['Other', 'TwoInput"),
        ("wrong weights", "InvalidArchive: model.pt does not fit TwoInputMLP: missing ['body.0.weight'"),
        ("bad input dtype", "InvalidArchive: kiln.yaml at inputs.0.dtype: Value error, unknown dtype 'complex7'"),
    ],
)
def test_broken_module_and_weights_archives_fail_with_one_clear_line(kind: str, expected: str, tmp_path: Path) -> None:
    folder = tmp_path / "bundle"
    _broken(kind, folder)
    archive = models.pack(folder, tmp_path / "model.tar.gz")
    proc, term = run_compile(archive, tmp_path / "cache", tmp_path, "--format=module-and-weights")
    assert proc.returncode == 1, proc.stdout
    assert expected in term, term
    assert "PWNED" not in proc.stdout + proc.stderr
    assert not list((tmp_path / "cache").glob("*/manifest.json"))


def test_a_tarball_with_path_traversal_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar.gz"
    payload = tmp_path / "model.py"
    payload.write_text("raise SystemExit('must never run')\n")
    with tarfile.open(evil, "w:gz") as t:
        t.add(payload, "../../model.py")
    proc, term = run_compile(evil, tmp_path / "cache", tmp_path, "--format=module-and-weights")
    assert proc.returncode == 1
    assert "InvalidArchive: archive member '../../model.py' would be written outside" in term
    assert not (tmp_path.parent / "model.py").exists()
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
