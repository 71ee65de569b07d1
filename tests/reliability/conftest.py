"""Reliability fixtures: a control plane of its own (two CPU nodes, one may be stopped), the
operator on it, trial counts (quick in CI, long with KILN_LONG=1), and the report that
docs/reliability.md is written from.
"""

from __future__ import annotations

import os
import random
import threading
import time
import urllib.error
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from examples import models
from kiln.devcluster.cli import ensure_binaries
from kiln.devcluster.cluster import LocalCluster
from kiln.operator import naming
from tests.conftest import REPO, Kube, dump_logs
from tests.operator.conftest import Operator
from tests.operator.helpers import infer, torchmodel, wait_phase

NODES: list[dict[str, object]] = [{"name": f"cpu-{n}", "cpu": 8, "memory": "32Gi"} for n in ("a", "b")]


@pytest.fixture(scope="session")
def rng() -> random.Random:
    seed = int(os.environ.get("KILN_FAULT_SEED", random.randrange(1 << 30)))
    print(f"fault injection seed: KILN_FAULT_SEED={seed}")
    return random.Random(seed)


@pytest.fixture(scope="session")
def fault_cluster() -> Iterator[LocalCluster]:
    """Its own control plane: stopping a node here cannot disturb the other tests' pods."""
    with LocalCluster(bin_dir=ensure_binaries()) as c:
        c.start_agent(NODES)
        c.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        c.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        yield c


@pytest.fixture(scope="session")
def fault_operator(fault_cluster: LocalCluster) -> Iterator[Operator]:
    op = Operator(fault_cluster, KILN_NODE_LOST_SECONDS="5")
    op.start()
    yield op
    op.stop()


@pytest.fixture
def fkube(fault_cluster: LocalCluster, fault_operator: Operator, request: pytest.FixtureRequest) -> Iterator[Kube]:
    """A fresh namespace on the fault cluster, its operator running."""
    ns = f"f-{uuid.uuid4().hex[:8]}"
    fault_cluster.kubectl("create", "namespace", ns)
    kube = Kube(fault_cluster, ns)
    kube.wait_for(lambda: kube.get("serviceaccount", "default"), 20, message="default service account")
    if fault_operator.proc is None or fault_operator.proc.poll() is not None:
        fault_operator.start()
    yield kube
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"logs of the fault cluster: {fault_cluster.log_dir}")
        dump_logs(fault_cluster)
    fault_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture(scope="session")
def seeded_archive(archive_dir: Path) -> Any:
    """seeded_archive(seed): an MLP archive whose weights (and so cache key) differ per seed."""

    def make(seed: int) -> Path:
        path = archive_dir / f"mlp-seed{seed}.pt2"
        return path if path.exists() else models.export("mlp", path, seed=seed)

    return make


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
        pods = self.kube.get("pods", "-l", self.selector) or {"items": []}
        return sorted(
            p["status"]["podIP"]
            for p in pods["items"]
            if not p["metadata"].get("deletionTimestamp")
            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
        )

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
