"""Fixtures for operator tests: CRDs installed, the operator running as a process, archives on disk."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from examples import models
from kiln.devcluster.cluster import LocalCluster, free_port

REPO = Path(__file__).resolve().parents[2]


class Operator:
    """kiln-operator as a local process against the local control plane (standalone)."""

    def __init__(self, cluster: LocalCluster, **env: str) -> None:
        self.cluster = cluster
        self.env = {
            **os.environ,
            "KUBECONFIG": str(cluster.kubeconfig),
            "KILN_STANDALONE": "true",
            "KILN_RUNTIME_IMAGE": "kiln-runtime:test",
            "KILN_RESYNC_SECONDS": "1",
            "KILN_ARTIFACT_GC_GRACE_SECONDS": "5",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.env["KILN_LIVENESS_ENDPOINT"] = f"http://127.0.0.1:{free_port()}/healthz"
        log = (self.cluster.log_dir / "operator.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "kiln.operator.main"], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as when a node dies."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="session")
def crds(cluster: LocalCluster) -> None:
    cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")


@pytest.fixture(scope="session")
def operator(cluster: LocalCluster, crds: None) -> Iterator[Operator]:
    op = Operator(cluster)
    op.start()
    yield op
    op.stop()


@pytest.fixture(scope="session")
def archive_dir() -> Iterator[Path]:
    # Outside /tmp: serving and compile pods mount an emptyDir over /tmp.
    folder = Path(tempfile.mkdtemp(prefix="kiln-test-archives-", dir="/var/tmp"))
    yield folder
    subprocess.run(["rm", "-rf", str(folder)], check=False)


@pytest.fixture(scope="session")
def mlp_archive(archive_dir: Path) -> Path:
    return models.export("mlp", archive_dir / "mlp.pt2")
