"""Reliability fixtures: a control plane of its own (two CPU nodes, one may be stopped), the
operator on it, trial counts (quick in CI, long with KILN_LONG=1), and the report that
docs/reliability.md is written from.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from examples import models
from kiln.devcluster.cli import ensure_binaries
from kiln.devcluster.cluster import LocalCluster
from tests.support.kube import REPO, Kube, Operator, dump_logs

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
