"""What operator tests and reliability tests do with TorchModels: write, wait, find pods, infer."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import torch

from tests.conftest import Kube


def torchmodel(name: str, uri: str, gpu: str = "cpu", replicas: int = 1, mode: str = "aot") -> str:
    return f"""
apiVersion: kiln.dev/v1alpha1
kind: TorchModel
metadata: {{name: {name}}}
spec:
  archive: {{uri: "{uri}"}}
  compile: {{mode: {mode}, dynamicBatch: {{min: 1, max: 8}}}}
  targets: [{{gpu: {gpu}, replicas: {replicas}}}]
  serving: {{batching: {{maxBatchSize: 8, maxDelayMs: 1}}, startupSeconds: 120}}
"""


def status(kube: Kube, name: str) -> dict[str, Any]:
    return (kube.get("tm", name) or {}).get("status") or {}


def wait_phase(kube: Kube, name: str, phase: str, timeout: float = 420) -> dict[str, Any]:
    return kube.wait_for(
        lambda: status(kube, name) if status(kube, name).get("phase") == phase else None,
        timeout,
        every=1,
        message=f"TorchModel {name} phase {phase} (now {status(kube, name)})",
    )


def ready_pod_ips(kube: Kube, model: str) -> list[str]:
    """What endpoints would route to: Ready pods that are not terminating."""
    pods = kube.get("pods", "-l", f"kiln.dev/model={model}") or {"items": []}
    return [
        p["status"]["podIP"]
        for p in pods["items"]
        if not p["metadata"].get("deletionTimestamp")
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
    ]


def infer(ip: str, model: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    body = {
        "inputs": [
            {"name": n, "shape": list(t.shape), "datatype": "FP32", "data": t.flatten().tolist()}
            for n, t in zip(["x", "y"], inputs, strict=True)
        ]
    }
    req = urllib.request.Request(
        f"http://{ip}:8080/v2/models/{model}/infer", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        out = json.load(resp)["outputs"][0]
    return torch.tensor(out["data"]).reshape(out["shape"])


def compile_jobs(kube: Kube) -> list[dict[str, Any]]:
    return (kube.get("jobs", "-l", "app.kubernetes.io/name=kiln-compile") or {"items": []})["items"]


def job_pods(kube: Kube, job: str) -> list[dict[str, Any]]:
    return (kube.get("pods", "-l", f"job-name={job}") or {"items": []})["items"]
