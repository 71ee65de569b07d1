"""Operator scale on the local control plane: N TorchModels over K distinct cache keys.

    bash bench/run.sh operator_scale --models 100 --keys 10 --out docs/results/operator-scale.json

Applies every TorchModel in one `kubectl apply`, then measures: compile Jobs created
(expected: exactly K) and compile pods run (no retries), the time from apply to each
Job's creation (seen by polling the API every 100 ms), the time to all Ready, and the
operator process's CPU seconds and peak resident memory. The K keys differ by
`dynamicBatch.max` over one small MLP archive, so every compile is a real AOTInductor
compile. Models run with replicas 0 (the operator does the same work per model; this
benchmark measures the operator, not 100 serving processes on one machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.hardware import describe
from examples import models
from examples.demo import start_operator

ROOT = Path(__file__).resolve().parents[1]


def manifests(count: int, keys: int, archive: Path) -> str:
    docs = []
    for i in range(count):
        spec = {
            "archive": {"uri": f"file://{archive}"},
            "compile": {"dynamicBatch": {"min": 1, "max": 8 + i % keys}},
            "targets": [{"gpu": "cpu", "replicas": 0}],
        }
        docs.append(
            {"apiVersion": "kiln.dev/v1alpha1", "kind": "TorchModel", "metadata": {"name": f"m{i:03d}"}, "spec": spec}
        )
    return "\n---\n".join(json.dumps(d) for d in docs)


def proc_usage(pid: int) -> tuple[float, int]:
    """(user+system CPU seconds, peak RSS bytes) of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    hwm = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM"))
    return cpu, int(hwm.split()[1]) * 1024


class JobWatcher(threading.Thread):
    """Notes when each compile Job first appears in the API."""

    def __init__(self, kubectl: Any, namespace: str) -> None:
        super().__init__(daemon=True)
        self.kubectl, self.namespace = kubectl, namespace
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            out = self.kubectl(
                "-n",
                self.namespace,
                "get",
                "jobs",
                "-l",
                "app.kubernetes.io/name=kiln-compile",
                "-o",
                "name",
                check=False,
            ).stdout
            now = time.perf_counter()
            for name in out.split():
                self.seen.setdefault(name, now)
            time.sleep(0.1)


def main() -> int:
    from kiln.devcluster.cli import default_nodes, ensure_binaries
    from kiln.devcluster.cluster import LocalCluster

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=100)
    p.add_argument("--keys", type=int, default=10)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-scale-", dir="/var/tmp"))
    work.chmod(0o755)  # compile pods run as uid 65532
    archive = models.export("mlp", work / "mlp.pt2")
    cluster = LocalCluster(bin_dir=ensure_binaries())
    cluster.__enter__()
    operator: subprocess.Popen[bytes] | None = None
    try:
        cluster.start_agent(default_nodes(None))
        kubectl = cluster.kubectl
        kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        kubectl("create", "namespace", "scale")
        operator = start_operator(cluster, "kiln-runtime:bench")
        time.sleep(3)  # the operator's watches are up
        cpu_before, _ = proc_usage(operator.pid)
        watcher = JobWatcher(kubectl, "scale")
        watcher.start()
        applied = time.perf_counter()
        kubectl("-n", "scale", "apply", "-f", "-", input=manifests(a.models, a.keys, archive))
        apply_seconds = time.perf_counter() - applied
        print(f"[scale] applied {a.models} TorchModels in {apply_seconds:.1f} s", flush=True)
        ready_at = None
        while time.perf_counter() - applied < a.timeout:
            items = json.loads(kubectl("-n", "scale", "get", "tm", "-o", "json").stdout)["items"]
            phases = [((i.get("status") or {}).get("phase")) for i in items]
            ready = phases.count("Ready")
            if ready == a.models:
                ready_at = time.perf_counter()
                break
            if "Failed" in phases:
                failed = next(i["status"] for i in items if (i.get("status") or {}).get("phase") == "Failed")
                raise RuntimeError(f"a TorchModel failed: {failed}")
            print(f"[scale] {ready}/{a.models} Ready, {len(watcher.seen)} compile Jobs", flush=True)
            time.sleep(5)
        watcher.stop.set()
        cpu_after, peak = proc_usage(operator.pid)
        jobs = json.loads(
            kubectl("-n", "scale", "get", "jobs", "-l", "app.kubernetes.io/name=kiln-compile", "-o", "json").stdout
        )["items"]
        pods = json.loads(
            kubectl("-n", "scale", "get", "pods", "-l", "app.kubernetes.io/name=kiln-compile", "-o", "json").stdout
        )["items"]
        artifacts = json.loads(kubectl("-n", "scale", "get", "compiledartifacts", "-o", "json").stdout)["items"]
        latencies = sorted(t - applied for t in watcher.seen.values())
        result = {
            "models": a.models,
            "keys": a.keys,
            "compile_jobs": len(jobs),
            "compile_pods": len(pods),
            "artifacts": len(artifacts),
            "apply_seconds": round(apply_seconds, 2),
            "all_ready_seconds": round(ready_at - applied, 1) if ready_at else None,
            "apply_to_job_seconds": {
                "first": round(latencies[0], 2) if latencies else None,
                "median": round(latencies[len(latencies) // 2], 2) if latencies else None,
                "last": round(latencies[-1], 2) if latencies else None,
            },
            "operator_cpu_seconds": round(cpu_after - cpu_before, 1),
            "operator_peak_rss_mb": round(peak / 2**20, 1),
            "hardware": describe("cpu"),
        }
    finally:
        if operator is not None:
            operator.terminate()
            operator.wait(30)
        cluster.__exit__(None, None, None)
    print(f"\nOperator scale: {a.models} TorchModels over {a.keys} keys; hardware: {result['hardware']}\n")
    print(
        "| TorchModels | keys | compile Jobs | compile pods | artifacts | apply → Job (first / median / last) "
        "| apply → all Ready | operator CPU | operator peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    lat = result["apply_to_job_seconds"]
    print(
        f"| {a.models} | {a.keys} | {result['compile_jobs']} | {result['compile_pods']} | {result['artifacts']} "
        f"| {lat['first']} / {lat['median']} / {lat['last']} s | {result['all_ready_seconds']} s "
        f"| {result['operator_cpu_seconds']} s | {result['operator_peak_rss_mb']} MB |"
    )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2))
    ok = result["compile_jobs"] == a.keys and result["compile_pods"] == a.keys and result["all_ready_seconds"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
