"""Start and stop the local control plane: etcd, kube-apiserver, controller-manager, scheduler.

Each component is a child process with its log in `log_dir`; `stop()` ends them
all and removes the temporary folders, also after a failure (context manager).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kiln.devcluster.pki import make_pki

DEFAULT_BIN = Path.home() / ".cache" / "kiln" / "k8s" / os.environ.get("KILN_K8S_VERSION", "v1.33.13") / "bin"
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"
# The controllers Kiln relies on; endpoints controllers are left out because
# Endpoints may not hold the loopback pod addresses the node agent hands out.
CONTROLLERS = ",".join(
    [
        "serviceaccount-token-controller",
        "serviceaccount-controller",
        "root-ca-certificate-publisher-controller",
        "garbage-collector-controller",
        "namespace-controller",
        "job-controller",
        "cronjob-controller",
        "deployment-controller",
        "replicaset-controller",
        "statefulset-controller",
        "daemonset-controller",
        "ttl-after-finished-controller",
        "node-lifecycle-controller",
        "pod-garbage-collector-controller",
        "persistentvolume-binder-controller",
        "disruption-controller",
        "taint-eviction-controller",
    ]
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log(message: str) -> None:
    print(f"[devcluster {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class LocalCluster:
    """A control plane in a temporary folder. Use as a context manager."""

    bin_dir: Path = DEFAULT_BIN
    root: Path | None = None
    node_monitor_grace_seconds: int = 20
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    keep_root: bool = False

    def __post_init__(self) -> None:
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="kiln-devcluster-"))
        else:
            self.keep_root = True
            self.root.mkdir(parents=True, exist_ok=True)
        self.log_dir = self.root / "logs"
        self.log_dir.mkdir(exist_ok=True)
        self.token = secrets.token_hex(16)
        self.api_port = free_port()
        self.server = f"https://127.0.0.1:{self.api_port}"
        self.kubeconfig = self.root / "kubeconfig"
        # Pod folders live outside /tmp: pods mount an emptyDir at /tmp, which would hide them.
        self.agent_root = Path(tempfile.mkdtemp(prefix="kiln-agent-", dir="/var/tmp"))

    # -- lifecycle --------------------------------------------------------------------
    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        missing = [
            b
            for b in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
            if not (self.bin_dir / b).is_file()
        ]
        if missing:
            raise FileNotFoundError(f"{missing} not in {self.bin_dir}: run devcluster/build.sh first")
        start = time.monotonic()
        assert self.root is not None
        self.pki = make_pki(self.root / "pki", SERVICE_IP)
        (self.root / "tokens.csv").write_text(f"{self.token},kiln-admin,kiln-admin,system:masters\n")
        self.write_kubeconfig(self.kubeconfig)
        etcd_port, peer_port = free_port(), free_port()
        etcd = f"http://127.0.0.1:{etcd_port}"
        self.spawn(
            "etcd",
            [
                "--name=default",
                f"--data-dir={self.root / 'etcd'}",
                f"--listen-client-urls={etcd}",
                f"--advertise-client-urls={etcd}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        self.spawn(
            "kube-apiserver",
            [
                f"--etcd-servers={etcd}",
                f"--secure-port={self.api_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",
                f"--tls-cert-file={self.pki.server_crt}",
                f"--tls-private-key-file={self.pki.server_key}",
                f"--client-ca-file={self.pki.ca_crt}",
                f"--token-auth-file={self.root / 'tokens.csv'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={self.pki.sa_pub}",
                f"--service-account-signing-key-file={self.pki.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                f"--cert-dir={self.root / 'certs'}",
                "--profiling=false",
                "--v=1",
            ],
        )
        self.wait_http("/readyz", timeout)
        common = [f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--secure-port=0", "--v=1"]
        self.spawn(
            "kube-controller-manager",
            [
                *common,
                f"--controllers={CONTROLLERS}",
                f"--service-account-private-key-file={self.pki.sa_key}",
                f"--root-ca-file={self.pki.ca_crt}",
                f"--node-monitor-grace-period={self.node_monitor_grace_seconds}s",
                "--node-monitor-period=2s",
                "--concurrent-gc-syncs=10",
            ],
        )
        self.spawn("kube-scheduler", common)
        self.wait_default_service_account(timeout - (time.monotonic() - start))
        log(
            f"control plane ready in {time.monotonic() - start:.1f} s at {self.server} "
            f"(kubeconfig {self.kubeconfig}, logs {self.log_dir})"
        )

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        shutil.rmtree(self.agent_root, ignore_errors=True)
        if self.root and not self.keep_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def start_agent(
        self, nodes: list[dict[str, object]], images: dict[str, str] | None = None, timeout: float = 30
    ) -> None:
        """Start the node agent for these nodes and wait until they are Ready."""
        assert self.root is not None
        args = [f"--root={self.agent_root}", f"--kubeconfig={self.kubeconfig}"]
        args += [f"--node={json.dumps(n)}" for n in nodes]
        args += [f"--image={k}={v}" for k, v in (images or {}).items()]
        self.spawn_python("node-agent", "kiln.devcluster.agent", args)
        deadline = time.monotonic() + timeout
        names = [str(n["name"]) for n in nodes]
        while True:
            self.check_alive()
            out = self.kubectl("get", "nodes", "-o", "json", check=False).stdout
            ready = {
                item["metadata"]["name"]
                for item in (json.loads(out)["items"] if out else [])
                if not item["spec"].get("taints")
                and any(c["type"] == "Ready" and c["status"] == "True" for c in item["status"].get("conditions", []))
            }
            if set(names) <= ready:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes {names} not Ready after {timeout:.0f} s; logs in {self.log_dir}")
            time.sleep(0.3)

    def stop_node(self, name: str, stopped: bool = True) -> None:
        """Make a node stop reporting (its pods die), or bring it back."""
        assert self.root is not None
        marker = self.agent_root / "control" / f"{name}.stop"
        if stopped:
            marker.touch()
        else:
            marker.unlink(missing_ok=True)

    # -- helpers ---------------------------------------------------------------------
    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        return self._popen(name, [str(self.bin_dir / name), *args])

    def _popen(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        with (self.log_dir / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "KUBECONFIG": str(self.kubeconfig)},
            )
        self.procs[name] = proc
        return proc

    def spawn_python(self, name: str, module: str, args: list[str]) -> subprocess.Popen[bytes]:
        return self._popen(name, [sys.executable, "-P", "-u", "-m", module, *args])

    def write_kubeconfig(self, path: Path) -> None:
        path.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: kiln-dev
  cluster:
    server: {self.server}
    certificate-authority: {self.pki.ca_crt}
users:
- name: kiln-admin
  user:
    token: {self.token}
contexts:
- name: kiln-dev
  context: {{cluster: kiln-dev, user: kiln-admin, namespace: default}}
current-context: kiln-dev
""")

    def wait_http(self, path: str, timeout: float) -> None:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_crt))
        deadline = time.monotonic() + timeout
        req = urllib.request.Request(self.server + path, headers={"Authorization": f"Bearer {self.token}"})
        while True:
            self.check_alive()
            try:
                with urllib.request.urlopen(req, context=ctx, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.server}{path} not ready after {timeout:.0f} s; logs in {self.log_dir}")
            time.sleep(0.2)

    def wait_default_service_account(self, timeout: float) -> None:
        self.wait_http("/api/v1/namespaces/default/serviceaccounts/default", max(timeout, 5))

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n" + "\n".join(tail))

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["kubectl", f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            check=check,
            input=input,
        )
