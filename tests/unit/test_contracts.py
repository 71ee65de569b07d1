"""The operator ↔ runtime contracts: what the operator writes, the runtime's own parsers accept."""

from __future__ import annotations

from typing import Any

import pytest

from kiln.api import ArtifactPhase, CompiledArtifact, TorchModel
from kiln.contracts import CompileFlags, CompileSummary, ServeFlags
from kiln.operator import children
from kiln.operator.reconcile import reconcile_artifact
from kiln.operator.settings import OperatorSettings
from kiln.runtime.compile import parse_args
from kiln.runtime.settings import ServeSettings, parse_settings

SETTINGS = OperatorSettings(runtime_image="kiln-runtime:1")
KEY = "c" * 64
SPECS = {
    "aot on a GPU, inductor options": {
        "archive": {"uri": "s3://b/m.pt2", "sha256": "a" * 64},
        "compile": {"options": {"freezing": "true", "max_autotune": "false"}, "dynamicBatch": {"min": 2, "max": 16}},
        "targets": [{"gpu": "NVIDIA-H100-80GB-HBM3"}],
    },
    "jit with every jit option": {
        "archive": {"uri": "file:///m.pt2"},
        "compile": {"mode": "jit", "jit": {"backend": "aot_eager", "fullgraph": True, "dynamic": False}},
        "targets": [{"gpu": "cpu"}],
    },
    "eager from the archive, no compile Job": {
        "archive": {"uri": "pvc://models/m.pt2", "sha256": "b" * 64},
        "compile": {"mode": "eager", "dynamicBatch": {"dim": 1}},
        "serving": {"batching": {"batchable": False}},
        "targets": [{"gpu": "cpu"}],
    },
}


def model(spec: dict[str, Any]) -> TorchModel:
    return TorchModel(metadata={"name": "m", "namespace": "ns"}, spec=spec)


def container(body: dict[str, Any]) -> dict[str, Any]:
    return dict(body["spec"]["template"]["spec"]["containers"][0])


def flags(args: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in args if not a.startswith("--option="))


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_kiln_serve_parses_the_arguments_of_every_serving_pod(spec: dict[str, Any]) -> None:
    m = model(spec)
    target = m.spec.targets[0]
    key = None if m.spec.compile.mode.value == "eager" else KEY
    args = container(children.deployment(m, target, key, "uid", SETTINGS))["args"]
    parsed = parse_settings(args)
    written = ServeFlags.model_validate({k.replace("-", "_"): v for k, v in flags(args).items()})
    for name, value in written:
        if value is not None:
            got = getattr(parsed, name)
            assert str(got).lower() == str(getattr(value, "value", value)).lower(), name
    assert set(ServeFlags.model_fields) <= {f for f in ServeSettings.__dataclass_fields__}
    assert parsed.artifact == (f"/cache/{KEY}" if key else "")
    assert parsed.archive == ("" if key else m.spec.archive.uri)


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_kiln_compile_parses_the_arguments_of_every_compile_job(spec: dict[str, Any]) -> None:
    m = model(spec)
    art = CompiledArtifact(
        metadata={"name": "a", "namespace": "ns"},
        spec={
            "key": KEY,
            "archive": m.spec.archive,
            "compile": m.spec.compile,
            "target": m.spec.targets[0].gpu,
            "runtimeImage": SETTINGS.runtime_image,
        },
    )
    args = container(children.compile_job(art, "ns", "uid", SETTINGS))["args"]
    parsed = parse_args(args)
    assert parsed.uri == m.spec.archive.uri and parsed.sha256 == m.spec.archive.sha256
    written = {"mode", "backend", "inductor_mode", "dynamic_batch", "options"}  # the jit options go to pods
    assert parsed.spec.model_dump(include=written) == m.spec.compile.model_dump(include=written)
    assert parsed.key == KEY and parsed.target == m.spec.targets[0].gpu
    assert str(parsed.cache_dir) == children.CACHE_MOUNT and parsed.runtime_image == SETTINGS.runtime_image
    assert parsed.device == ("cpu" if m.spec.targets[0].is_cpu else "cuda")
    assert set(CompileFlags.model_fields) >= {"uri", "key", "option"}


def compiled_pod(message: str) -> dict[str, Any]:
    terminated = {"exitCode": 0, "message": message}
    return {"status": {"containerStatuses": [{"state": {"terminated": terminated}}]}}


def test_the_summary_kiln_compile_writes_becomes_the_artifacts_status() -> None:
    m = model(SPECS["aot on a GPU, inductor options"])
    art = CompiledArtifact(
        metadata={"name": "a", "namespace": "ns"},
        spec={"key": KEY, "archive": m.spec.archive, "compile": m.spec.compile, "target": "cpu", "runtimeImage": "i"},
    )
    written = CompileSummary(
        key=KEY,
        path=f"/cache/{KEY}",
        size_bytes=123,
        sha256="d" * 64,
        compile_seconds=4.5,
        torch_version="2.11.0",
        engine="aotinductor",
        dims="batch=2..16",
    ).to_json()
    assert '"sizeBytes":123' in written  # camelCase on the wire, as the operator has always read it
    job = {"status": {"succeeded": 1}}
    status = reconcile_artifact(art, job, [compiled_pod(written)], ["m"], "uid", SETTINGS, "now").status
    assert status.phase == ArtifactPhase.ready and status.message == "compiled"
    assert (status.path, status.size_bytes, status.sha256) == (f"/cache/{KEY}", 123, "d" * 64)
    assert (status.compile_seconds, status.torch_version, status.dims) == (4.5, "2.11.0", "batch=2..16")

    unreadable = reconcile_artifact(art, job, [compiled_pod("not json")], ["m"], "uid", SETTINGS, "now").status
    assert unreadable.phase == ArtifactPhase.ready and unreadable.path is None
    assert "summary in the termination log is unreadable" in unreadable.message
