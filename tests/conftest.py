"""Shared fixtures: the local control plane (session) and a fresh namespace per test."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from examples import models
from kiln.devcluster.cli import ensure_binaries
from kiln.devcluster.cluster import LocalCluster
from tests.support.kube import GPU_PRODUCT, LONG, REPO, Kube, dump_logs

NODES: list[dict[str, object]] = [
    {"name": "cpu-0", "cpu": 8, "memory": "32Gi"},
    {"name": "gpu-0", "cpu": 8, "memory": "64Gi", "gpus": 1, "labels": {"nvidia.com/gpu.product": GPU_PRODUCT}},
]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    bin_dir = ensure_binaries()
    with LocalCluster(bin_dir=bin_dir) as c:
        c.start_agent(NODES, images={"kiln-operator": "kiln-operator"})
        yield c


@pytest.fixture
def kube(cluster: LocalCluster, request: pytest.FixtureRequest) -> Iterator[Kube]:
    ns = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", ns)
    Kube(cluster, ns).wait_for(
        lambda: Kube(cluster, ns).get("serviceaccount", "default"), 20, message="default service account"
    )
    yield Kube(cluster, ns)
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"logs of the local control plane: {cluster.log_dir}")
        dump_logs(cluster)
    if not os.environ.get("KILN_KEEP_NAMESPACES"):
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture(scope="session")
def crds(cluster: LocalCluster) -> None:
    cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")


@pytest.fixture(scope="session")
def archive_dir() -> Iterator[Path]:
    # Outside /tmp: serving and compile pods mount an emptyDir over /tmp.
    folder = Path(tempfile.mkdtemp(prefix="kiln-test-archives-", dir="/var/tmp"))
    folder.chmod(0o755)  # pods run as uid 65532: the archives must be readable, as a user would publish them
    yield folder
    subprocess.run(["rm", "-rf", str(folder)], check=False)


@pytest.fixture(scope="session")
def mlp_archive(archive_dir: Path) -> Path:
    return models.export("mlp", archive_dir / "mlp.pt2")


# --- the reliability report: one row per fault test, printed at the end and written for the docs ---


@dataclass
class Row:
    test: str
    injected: str
    trials: int
    lost: str
    figures: dict[str, Any] = field(default_factory=dict)


ROWS: list[Row] = []


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Any:
    """record(injected, trials, lost, **figures): one row of docs/reliability.md."""

    def add(injected: str, trials: int, lost: str, **figures: Any) -> None:
        ROWS.append(Row(request.node.name, injected, trials, lost, figures))

    return add


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not ROWS:
        return
    terminalreporter.section(f"reliability ({'long' if LONG else 'quick'} run)")
    for row in ROWS:
        terminalreporter.write_line(f"{row.test}: {row.injected} x{row.trials}; lost: {row.lost}; {row.figures}")
    out = os.environ.get("KILN_RELIABILITY_JSON")
    if out:
        Path(out).write_text(json.dumps({"long": LONG, "rows": [asdict(r) for r in ROWS]}, indent=2) + "\n")
        terminalreporter.write_line(f"written to {out}")
