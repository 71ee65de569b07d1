"""Archive formats, the OpenVINO backend and CPU-limit threads through the operator, on the real control plane."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from examples import models
from tests.support.kube import Kube, Operator
from tests.support.torchmodels import infer, ready_pod_ips, wait_phase

pytestmark = pytest.mark.cluster
SEED = 3


def torchmodel(name: str, archive: dict[str, str], compile_spec: dict[str, object], cpu_limit: str = "2") -> str:
    return json.dumps(
        {
            "apiVersion": "kiln.dev/v1alpha1",
            "kind": "TorchModel",
            "metadata": {"name": name},
            "spec": {
                "archive": archive,
                "compile": {"dynamicBatch": {"min": 1, "max": 8}, **compile_spec},
                "targets": [{"gpu": "cpu", "replicas": 1}],
                "serving": {"startupSeconds": 120, "resources": {"limits": {"cpu": cpu_limit}}},
            },
        }
    )


def mar(bundle: Path, dest: Path) -> Path:
    subprocess.run(
        [
            str(Path(sys.executable).parent / "torch-model-archiver"),
            "--model-name=mlp",
            "--version=1.0",
            f"--model-file={bundle / 'model.py'}",
            f"--serialized-file={bundle / 'model.pt'}",
            "--handler=base_handler",
            f"--extra-files={bundle / 'kiln.yaml'}",
            f"--export-path={dest}",
            "--force",
        ],
        check=True,
    )
    return dest / "mlp.mar"


def test_every_archive_format_and_the_openvino_backend_serve_through_the_operator(
    kube: Kube, operator: Operator, archive_dir: Path
) -> None:
    bundle = models.write_module_and_weights("mlp", archive_dir / "bundle", seed=SEED)
    uris = {
        "bundle": {"uri": f"file://{models.pack(bundle, archive_dir / 'mlp.tar.gz')}", "format": "module-and-weights"},
        "mar": {"uri": f"file://{mar(bundle, archive_dir)}", "format": "torchserve-mar"},
        "script": {
            "uri": f"file://{models.save_torchscript('mlp', archive_dir / 'mlp.pt', seed=SEED)}",
            "format": "torchscript",
        },
        "ov": {"uri": f"file://{models.export('mlp', archive_dir / 'mlp-ov.pt2', seed=SEED)}"},
    }
    specs: dict[str, dict[str, object]] = {
        "bundle": {},
        "mar": {"mode": "eager"},
        "script": {},
        "ov": {"backend": "openvino"},
    }
    for name, archive in uris.items():
        result = kube.apply(torchmodel(name, archive, specs[name], cpu_limit="1" if name == "ov" else "2"))
        assert result.returncode == 0, result.stderr
    inputs = models.examples("mlp", 3, seed=9)
    want = models.eager("mlp", *inputs, seed=SEED)[0]
    for name in uris:
        st = wait_phase(kube, name, "Ready", timeout=420)
        target = st["targets"][0]
        assert target["phase"] == "Ready" and target["servingKey"] == target["key"], target
        got = infer(ready_pod_ips(kube, name)[0], name, inputs)
        torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3, msg=f"{name} answers differently from eager")
        if name == "script":
            assert target["message"] == "served as TorchScript: a TorchScript archive cannot be compiled ahead of time"
        if name == "mar":  # model.py ran in the compile Job; the pod loads the program it prepared
            assert "prepared as an ExportedProgram for eager replicas" in target["message"]
            pod = kube.get("pods", "-l", "kiln.dev/model=mar")["items"][0]
            args = pod["spec"]["containers"][0]["args"]
            assert any(a.startswith("--artifact=/cache/") for a in args)
            assert not any(a.startswith("--archive=") for a in args)
    # Thread pools follow the container's CPU limit (downward API), not the node's 8 cores.
    ip = ready_pod_ips(kube, "ov")[0]
    meta = json.loads(subprocess.run(["curl", "-s", f"http://{ip}:8080/v2/models/ov"], capture_output=True).stdout)
    assert meta["platform"] == "kiln_openvino"
    assert meta["parameters"]["intra_op_threads"] == 1
