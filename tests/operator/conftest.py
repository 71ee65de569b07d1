"""Fixtures for operator tests: the operator running as a local process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from kiln.devcluster.cluster import LocalCluster, free_port


class Operator:
    """kiln-operator as a local process against the local control plane (standalone)."""

    def __init__(self, cluster: LocalCluster, log_name: str = "operator.log", **env: str) -> None:
        self.cluster = cluster
        self.log = cluster.log_dir / log_name
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
        log = self.log.open("ab")
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
def operator(cluster: LocalCluster, crds: None) -> Iterator[Operator]:
    op = Operator(cluster)
    op.start()
    yield op
    op.stop()
