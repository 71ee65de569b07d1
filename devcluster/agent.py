"""The node agent: registers Nodes and runs the pods bound to them as local processes.

It stands in for the kubelet (and a hostPath volume provisioner) on a machine
with no container runtime. Scheduling, Jobs, Deployments and garbage collection
stay with the real control plane. Images map to commands: a container's own
command and args run on this host; a container with no command gets the
entrypoint that `--image NAME=COMMAND` gives its image (tag ignored).

    python -m kiln.devcluster.agent --root DIR \
        --node '{"name": "cpu-0"}' \
        --node '{"name": "gpu-0", "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, "gpus": 1}'

Touch `<root>/control/<node>.stop` to make a node stop reporting (its pods die
with it, as on a lost machine); remove the file to bring it back.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from kiln.devcluster.podrunner import PodRunner, now
from kiln.devcluster.volumes import claim_dir

log = logging.getLogger("kiln.devcluster.agent")

HEARTBEAT = 4.0
LEASE_SECONDS = 40
# Only what this host needs to run the image's programs at all (a GPU host's libstdc++: see
# shared/notes/gpu-findings.md); everything else a container sees comes from its pod.
PASS_ENV = ("LD_PRELOAD",)


class Agent:
    def __init__(self, nodes: list[dict[str, Any]], root: Path, images: dict[str, list[str]]) -> None:
        self.nodes = {n["name"]: n for n in nodes}
        self.root = root
        self.images = images
        self.core = client.CoreV1Api()
        self.coord = client.CoordinationV1Api()
        host = client.Configuration.get_default_copy().host
        self.api_port = int(host.rsplit(":", 1)[1])
        self.path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin:/bin")])
        self.pass_env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
        self.runners: dict[str, PodRunner] = {}
        self.lock = threading.Lock()
        self.next_ip = 0
        self.ip_block = random.randint(2, 250)
        self.stopping = threading.Event()
        (root / "control").mkdir(parents=True, exist_ok=True)

    def node_cpu(self, pod: client.V1Pod) -> int:
        """The allocatable CPUs of the pod's node, as its Node reports them."""
        spec = self.nodes.get(pod.spec.node_name or "", {})
        return int(spec.get("cpu", os.cpu_count() or 2))

    # -- images and addresses -----------------------------------------------------------------
    def entrypoint(self, image: str) -> list[str]:
        name = image.rsplit("@", 1)[0]
        name = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
        for key in (name, name.rsplit("/", 1)[-1]):
            if key in self.images:
                return list(self.images[key])
        raise ValueError(
            f"image {image!r} has no entrypoint known to the node agent: give the container a "
            "command, or start the agent with --image NAME=COMMAND"
        )

    def allocate_ip(self) -> str:
        """A loopback address per pod; the block is random per agent, so a stray process
        left by an earlier agent cannot answer for a new pod."""
        with self.lock:
            n, self.next_ip = self.next_ip, self.next_ip + 1
        return f"127.{self.ip_block}.{n // 250 % 250}.{n % 250 + 1}"

    def forget(self, uid: str) -> None:
        with self.lock:
            self.runners.pop(uid, None)

    def stopped(self, node: str) -> bool:
        return (self.root / "control" / f"{node}.stop").exists()

    # -- nodes ----------------------------------------------------------------------------------
    def node_status(self, spec: dict[str, Any]) -> dict[str, Any]:
        capacity = {
            "cpu": str(spec.get("cpu", os.cpu_count() or 2)),
            "memory": spec.get("memory", "32Gi"),
            "pods": str(spec.get("pods", 110)),
            "ephemeral-storage": "100Gi",
        }
        if spec.get("gpus"):
            capacity["nvidia.com/gpu"] = str(spec["gpus"])
        t = now()
        conditions = [
            {
                "type": kind,
                "status": "False",
                "reason": f"KubeletHasNo{kind}",
                "lastHeartbeatTime": t,
                "lastTransitionTime": t,
            }
            for kind in ("MemoryPressure", "DiskPressure", "PIDPressure")
        ]
        conditions.append(
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "kiln node agent",
                "lastHeartbeatTime": t,
                "lastTransitionTime": t,
            }
        )
        return {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": conditions,
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": spec["name"]},
            ],
            "nodeInfo": {
                "kubeletVersion": "v1.33.13-kiln-agent",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "containerRuntimeVersion": "kiln-agent://1",
                "kernelVersion": os.uname().release,
                "osImage": "local processes",
                "kubeProxyVersion": "",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }

    def register(self, spec: dict[str, Any]) -> None:
        name = spec["name"]
        labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            **spec.get("labels", {}),
        }
        body = {"metadata": {"name": name, "labels": labels}, "spec": {"taints": spec.get("taints", [])}}
        try:
            self.core.create_node(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.core.patch_node(name, {"metadata": {"labels": labels}})
        self.core.patch_node_status(name, {"status": self.node_status(spec)})
        log.info("registered node %s labels=%s", name, spec.get("labels", {}))

    def heartbeat(self) -> None:
        while not self.stopping.is_set():
            for name, spec in self.nodes.items():
                if self.stopped(name):
                    self.kill_node_pods(name)
                    continue
                try:
                    self.renew_lease(name)
                    self.core.patch_node_status(name, {"status": {"conditions": self.node_status(spec)["conditions"]}})
                except ApiException as exc:
                    if exc.status == 404:
                        self.register(spec)
                    else:
                        log.warning("heartbeat for %s failed: %s", name, exc.reason)
            self.stopping.wait(HEARTBEAT)

    def renew_lease(self, name: str) -> None:
        ts = now(micro=True)
        body = {
            "metadata": {"name": name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": ts},
        }
        try:
            self.coord.patch_namespaced_lease(name, "kube-node-lease", {"spec": body["spec"]})
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.coord.create_namespaced_lease("kube-node-lease", body)

    def kill_node_pods(self, node: str) -> None:
        with self.lock:
            runners = [r for r in self.runners.values() if r.pod.spec.node_name == node]
        for r in runners:
            r.detach()

    # -- volumes ---------------------------------------------------------------------------------
    def provision(self) -> None:
        """Bind each pending claim to a hostPath PersistentVolume under the agent's root."""
        while not self.stopping.is_set():
            try:
                for pvc in self.core.list_persistent_volume_claim_for_all_namespaces().items:
                    if pvc.status.phase == "Pending" and not pvc.spec.volume_name:
                        self.make_volume(pvc)
            except ApiException as exc:
                log.warning("provisioner: %s", exc.reason)
            self.stopping.wait(1.0)

    def make_volume(self, pvc: client.V1PersistentVolumeClaim) -> None:
        ns, name = pvc.metadata.namespace, pvc.metadata.name
        folder = claim_dir(self.root, ns, name)
        folder.mkdir(parents=True, exist_ok=True)
        size = (pvc.spec.resources.requests or {}).get("storage", "1Gi")
        body = {
            "metadata": {"name": f"kiln-dev-{pvc.metadata.uid}", "labels": {"kiln.dev/dev-volume": "true"}},
            "spec": {
                "capacity": {"storage": size},
                "accessModes": pvc.spec.access_modes,
                "persistentVolumeReclaimPolicy": "Delete",
                "hostPath": {"path": str(folder)},
                "storageClassName": pvc.spec.storage_class_name or "",
                "volumeMode": pvc.spec.volume_mode or "Filesystem",
                "claimRef": {"namespace": ns, "name": name, "uid": pvc.metadata.uid},
            },
        }
        with contextlib.suppress(ApiException):
            self.core.create_persistent_volume(body)
            log.info("provisioned %s for claim %s/%s", folder, ns, name)

    # -- pods -------------------------------------------------------------------------------------
    def watch_pods(self) -> None:
        rv = ""
        while not self.stopping.is_set():
            try:
                if not rv:
                    listing = self.core.list_pod_for_all_namespaces(field_selector="spec.nodeName!=")
                    for pod in listing.items:
                        self.on_pod("ADDED", pod)
                    rv = listing.metadata.resource_version
                stream = watch.Watch().stream(
                    self.core.list_pod_for_all_namespaces,
                    field_selector="spec.nodeName!=",
                    resource_version=rv,
                    timeout_seconds=60,
                )
                for event in stream:
                    pod = event["object"]
                    rv = pod.metadata.resource_version
                    self.on_pod(event["type"], pod)
            except ApiException as exc:
                if exc.status == 410:
                    rv = ""
                else:
                    log.warning("pod watch: %s", exc.reason)
                    time.sleep(1)
            except Exception as exc:  # keep the agent alive through connection resets
                log.warning("pod watch interrupted: %s", exc)
                time.sleep(1)

    def on_pod(self, kind: str, pod: client.V1Pod) -> None:
        node = pod.spec.node_name
        if node not in self.nodes or self.stopped(node):
            return
        uid = pod.metadata.uid
        with self.lock:
            runner = self.runners.get(uid)
        if kind == "DELETED":
            if runner:
                runner.detach()
            return
        if pod.metadata.deletion_timestamp is not None:
            grace = pod.metadata.deletion_grace_period_seconds or 0
            if runner:
                runner.request_delete(float(grace))
            else:
                with contextlib.suppress(ApiException):
                    self.core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0)
            return
        if runner is None and (pod.status.phase or "Pending") in ("Pending", "Running"):
            runner = PodRunner(self, pod, self.allocate_ip())
            with self.lock:
                self.runners[uid] = runner
            log.info("starting pod %s/%s on %s at %s", pod.metadata.namespace, pod.metadata.name, node, runner.pod_ip)
            runner.start()

    # -- lifecycle --------------------------------------------------------------------------------
    def run(self) -> None:
        for spec in self.nodes.values():
            self.register(spec)
        for target in (self.heartbeat, self.provision):
            threading.Thread(target=target, daemon=True, name=target.__name__).start()
        self.watch_pods()

    def shutdown(self) -> None:
        """Stop every pod process now: they run in their own sessions and would outlive us."""
        self.stopping.set()
        with self.lock:
            runners = list(self.runners.values())
        for r in runners:
            r.detach()
            r.kill_processes()


def parse_image(text: str) -> tuple[str, list[str]]:
    name, _, command = text.partition("=")
    if not command:
        raise argparse.ArgumentTypeError(f"--image wants NAME=COMMAND, got {text!r}")
    return name, shlex.split(command)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kiln-node-agent", description=__doc__.splitlines()[0])
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    p.add_argument("--root", type=Path, required=True, help="folder for pod folders, volumes and logs")
    p.add_argument(
        "--node",
        action="append",
        type=json.loads,
        default=[],
        help='node as JSON: {"name", "labels", "gpus", "cpu", "memory", "taints"}',
    )
    p.add_argument("--image", action="append", type=parse_image, default=[], metavar="NAME=COMMAND")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config.load_kube_config(a.kubeconfig)
    agent = Agent(a.node or [{"name": "node-0"}], a.root, dict(a.image))

    def stop(*_: object) -> None:
        agent.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
