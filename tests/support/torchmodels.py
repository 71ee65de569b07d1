"""What operator and reliability tests do with TorchModels: write, wait, find pods, infer, load."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from examples import models
from kiln.operator import naming
from tests.support.kube import Kube


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


def ready_ips(kube: Kube, selector: str) -> list[str]:
    """What endpoints would route to: the selected pods that are Ready and not terminating."""
    pods = kube.get("pods", "-l", selector) or {"items": []}
    return sorted(
        p["status"]["podIP"]
        for p in pods["items"]
        if not p["metadata"].get("deletionTimestamp")
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
    )


def ready_pod_ips(kube: Kube, model: str) -> list[str]:
    return ready_ips(kube, f"{naming.MODEL_LABEL}={model}")


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


def cache_folder(kube: Kube) -> Path:
    """Where the namespace's cache claim lives on this machine (the dev PersistentVolume's hostPath)."""
    claim = kube.get("pvc", "kiln-cache")
    pv = kube.get("pv", claim["spec"]["volumeName"])
    return Path(pv["spec"]["hostPath"]["path"])


class Endpoints:
    """Ready addresses of a Service, refreshed in a thread: its selector's pods that are Ready and not
    terminating, the rule of the EndpointSlice controller (whose slices refuse the node agent's
    loopback pod addresses, so clients here compute them the same way)."""

    def __init__(self, kube: Kube, service: str, every: float = 0.25) -> None:
        self.kube, self.service, self.every = kube, service, every
        self.addresses: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        selector = kube.get("service", service)["spec"]["selector"]
        self.selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))

    def read(self) -> list[str]:
        return ready_ips(self.kube, self.selector)

    def run(self) -> None:
        while not self.stop.is_set():
            self.addresses = self.read()
            self.stop.wait(self.every)

    def __enter__(self) -> Endpoints:
        self.addresses = self.read()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


@dataclass
class Outcome:
    at: float  # monotonic time the request was sent
    ok: bool
    retried: bool
    detail: str = ""


class SteadyLoad:
    """Requests at a fixed rate to a ready endpoint, round robin; each answer checked against eager.

    A refused or reset connection (the replica died before or while answering) is retried once
    on another ready endpoint, as ingress proxies do for idempotent requests (Envoy retry_on
    connect-failure,reset; nginx proxy_next_upstream error); an HTTP error, a wrong answer or a
    second connection failure is a failed request. Retries are counted and reported.
    """

    def __init__(self, endpoints: Endpoints, model: str, seed: int, rate: float = 20.0) -> None:
        self.endpoints, self.model, self.seed, self.period = endpoints, model, seed, 1.0 / rate
        self.inputs = models.examples("mlp", 2, seed=3)
        self.accepted = [models.eager("mlp", *self.inputs, seed=seed)[0]]  # answers that count as correct
        self.outcomes: list[Outcome] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.n = 0

    def accept(self, seed: int) -> None:
        """Also count the weights of `seed` as correct (during a rollout both versions serve)."""
        self.accepted.append(models.eager("mlp", *self.inputs, seed=seed)[0])

    def one(self) -> Outcome:
        sent = time.monotonic()
        retried, failed = False, ""
        for attempt in range(2):
            addresses = [a for a in self.endpoints.addresses if a != failed]
            if not addresses:
                return Outcome(sent, False, retried, "no ready endpoint" + (f" but {failed}" if failed else ""))
            ip = addresses[self.n % len(addresses)]
            try:
                got = infer(ip, self.model, self.inputs)
            except urllib.error.HTTPError as exc:
                return Outcome(sent, False, retried, f"HTTP {exc.code} from {ip}")
            except (urllib.error.URLError, ConnectionError) as exc:
                reason = getattr(exc, "reason", exc)
                if isinstance(reason, ConnectionRefusedError | ConnectionResetError) and attempt == 0:
                    retried, failed = True, ip
                    continue
                return Outcome(sent, False, retried, f"{reason} from {ip}")
            except OSError as exc:
                return Outcome(sent, False, retried, f"{exc} from {ip}")
            if any(torch.allclose(got, want, atol=1e-4, rtol=1e-3) for want in self.accepted):
                return Outcome(sent, True, retried)
            return Outcome(sent, False, retried, f"wrong answer from {ip}")
        return Outcome(sent, False, retried, "connection failed twice")

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stop.is_set():
            self.outcomes.append(self.one())
            self.n += 1
            next_at += self.period
            self.stop.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> SteadyLoad:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]


@contextmanager
def steady_model(kube: Kube, name: str, archive: Path, seed: int) -> Iterator[SteadyLoad]:
    """A two-replica TorchModel, Ready, under 20 req/s through its ready endpoints."""
    kube.apply(torchmodel(name, f"file://{archive}", replicas=2))
    wait_phase(kube, name, "Ready")
    with Endpoints(kube, naming.child_name(name, "cpu")) as endpoints, SteadyLoad(endpoints, name, seed) as load:
        yield load
