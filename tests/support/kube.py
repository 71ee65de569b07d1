"""The local control plane as tests use it: kubectl in a namespace, the operator process, helm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiln.devcluster.cli import ensure_binaries
from kiln.devcluster.cluster import LocalCluster, free_port

GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"

REPO = Path(__file__).resolve().parents[2]

CHART = REPO / "helm" / "kiln"
LONG = os.environ.get("KILN_LONG") == "1"


def trials(quick: int, long: int) -> int:
    """How many times a fault is injected: `quick` in CI, `long` with KILN_LONG=1."""
    return long if LONG else quick


class Kube:
    """kubectl in one namespace, with JSON helpers and polling."""

    def __init__(self, cluster: LocalCluster, namespace: str) -> None:
        self.cluster = cluster
        self.namespace = namespace

    def run(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl("-n", self.namespace, *args, check=check, input=input)

    def apply(self, manifest: str) -> subprocess.CompletedProcess[str]:
        return self.run("apply", "-f", "-", input=manifest, check=False)

    def get(self, *args: str) -> Any:
        out = self.run("get", *args, "-o", "json", check=False)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def wait_for(self, what: Callable[[], Any], timeout: float = 60, every: float = 0.3, message: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = what()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {message or what}")
            time.sleep(every)


def dump_logs(cluster: LocalCluster, tail: int = 30) -> None:
    agent = cluster.agent_root / "pods"
    for log_file in sorted(cluster.log_dir.glob("*.log")) + sorted(agent.glob("*/*.log") if agent else []):
        lines = log_file.read_text(errors="replace").splitlines()[-tail:]
        print(f"==== {log_file} (last {tail} lines)\n" + "\n".join(lines))


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
        with self.log.open("ab") as log:  # the child keeps its own descriptor
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


def helm(*args: str, cluster: LocalCluster | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [str(ensure_binaries() / "helm"), *args]
    if cluster is not None:
        cmd.append(f"--kubeconfig={cluster.kubeconfig}")
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=300)
