"""Run one bound pod as local processes and report its status, as a kubelet would.

Each container's command runs on this host inside its own mount namespace
(`unshare --mount`), where every volume is bind-mounted at its mountPath
(read-only when asked) and a per-container file at terminationMessagePath. The
pod gets its own loopback address (127.B.x.y), given to processes as status.podIP.
Probes (httpGet, tcpSocket) gate readiness and restart on liveness failure;
restartPolicy is honoured with a short exponential backoff.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from kiln.devcluster import isolation, volumes

log = logging.getLogger("kiln.devcluster.pods")

TICK = 0.2
MAX_BACKOFF = 20.0
VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def now(micro: bool = False) -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, $$ escapes."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return VAR_REF.sub(sub, text)


@dataclass
class Probe:
    spec: Any
    successes: int = 0
    failures: int = 0
    next_at: float = 0.0
    ok: bool = False


@dataclass
class Container:
    spec: client.V1Container
    log: Path
    termination: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: str | None = None
    state: dict[str, Any] = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict[str, Any] = field(default_factory=dict)
    ready: bool = False
    started: bool = False
    next_start: float = 0.0
    done: bool = False
    probes: dict[str, Probe] = field(default_factory=dict)


class PodRunner(threading.Thread):
    def __init__(self, agent: Any, pod: client.V1Pod, pod_ip: str) -> None:
        super().__init__(name=f"pod-{pod.metadata.namespace}/{pod.metadata.name}", daemon=True)
        self.agent = agent
        self.pod = pod
        self.pod_ip = pod_ip
        self.dir = agent.root / "pods" / f"{pod.metadata.namespace}_{pod.metadata.name}_{pod.metadata.uid[:8]}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.containers = [
            Container(c, self.dir / f"{c.name}.log", self.dir / f"{c.name}.termination-log")
            for c in pod.spec.containers
        ]
        self.delete_grace: float | None = None
        self.killed = threading.Event()
        self.start_time = now()
        self.conditions: dict[str, dict[str, str]] = {}
        self.last_status: dict[str, Any] | None = None
        self.failure: str | None = None

    # -- requests from the agent --------------------------------------------------------
    def request_delete(self, grace: float) -> None:
        if self.delete_grace is None:
            log.info("stopping pod %s/%s (grace %.0f s)", self.ns, self.pod.metadata.name, grace)
            self.delete_grace = grace

    def detach(self) -> None:
        """Kill the processes at once and leave the pod object alone (deleted pod, lost node, agent exit)."""
        self.killed.set()
        self.request_delete(0)

    # -- main loop ------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self.volumes = volumes.prepare(self.agent.core, self.pod, self.dir, self.agent.root)
            if self.pod.spec.init_containers:
                raise ValueError("init containers are not supported by the dev node agent")
        except (ValueError, ApiException, OSError) as exc:
            self.failure = f"cannot set up pod: {exc}"
        while self.delete_grace is None:
            if self.failure is None:
                for c in self.containers:
                    self.step(c)
            self.report()
            time.sleep(TICK)
        self.terminate()

    def step(self, c: Container) -> None:
        t = time.monotonic()
        if c.proc is None:
            if not c.done and t >= c.next_start:
                self.launch(c)
            return
        code = c.proc.poll()
        if code is not None:
            self.exited(c, code)
            return
        self.run_probes(c, t)

    # -- processes --------------------------------------------------------------------------
    def env_for(self, spec: client.V1Container, home: str) -> dict[str, str]:
        """The pod's variables over what the image sets (PATH, HOME for its user), as a container runtime gives."""
        env = {
            "PATH": self.agent.path,
            "HOME": home,
            "HOSTNAME": self.pod.metadata.name,
            **isolation.IMAGE_ENV,
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(self.agent.api_port),
        }
        env.update(self.agent.pass_env)
        for src in spec.env_from or []:
            prefix = src.prefix or ""
            if src.config_map_ref:
                data = self.agent.core.read_namespaced_config_map(src.config_map_ref.name, self.ns).data or {}
                env.update({prefix + k: v for k, v in data.items()})
        for var in spec.env or []:
            env[var.name] = self.env_value(var, env)
        return env

    @property
    def ns(self) -> str:
        return str(self.pod.metadata.namespace)

    def env_value(self, var: client.V1EnvVar, env: dict[str, str]) -> str:
        if var.value_from is None:
            return expand(var.value or "", env)
        ref = var.value_from
        if ref.field_ref:
            if ref.field_ref.field_path == "status.podIP":
                return self.pod_ip
            return volumes.field_value(self.pod, ref.field_ref.field_path)
        if ref.config_map_key_ref:
            cm = self.agent.core.read_namespaced_config_map(ref.config_map_key_ref.name, self.ns)
            return str((cm.data or {}).get(ref.config_map_key_ref.key, ""))
        if ref.secret_key_ref:
            import base64

            secret = self.agent.core.read_namespaced_secret(ref.secret_key_ref.name, self.ns)
            return base64.b64decode((secret.data or {}).get(ref.secret_key_ref.key, "")).decode()
        if ref.resource_field_ref:
            return volumes.resource_value(self.pod, ref.resource_field_ref, self.agent.node_cpu(self.pod))
        return ""

    def command_for(self, spec: client.V1Container, env: dict[str, str]) -> list[str]:
        command = list(spec.command or [])
        if not command:
            command = self.agent.entrypoint(spec.image)
        return [expand(a, env) for a in [*command, *(spec.args or [])]]

    def launch(self, c: Container) -> None:
        try:
            who = isolation.identity(self.pod, c.spec)
            env = self.env_for(c.spec, who.home)
            argv = self.command_for(c.spec, env)
        except (ValueError, ApiException) as exc:
            c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
            c.next_start = time.monotonic() + 2
            return
        c.termination.write_text("")
        c.termination.chmod(0o666)  # as the kubelet makes it: any container user writes its last words
        mounts = volumes.mounts_for(c.spec, self.volumes)
        mounts.append(volumes.Mount(c.termination, c.spec.termination_message_path or "/dev/termination-log", False))
        script = isolation.setup_script(who, mounts, self.dir / "stage" / c.spec.name)
        cmd = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", *argv]
        with c.log.open("ab") as out:
            out.write(f"--- {now()} starting: {shlex.join(argv)}\n".encode())
            out.flush()
            c.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=c.spec.working_dir or "/",
                start_new_session=True,
            )
        c.started_at = now()
        c.state = {"running": {"startedAt": c.started_at}}
        c.probes = {
            k: Probe(p, next_at=time.monotonic() + (p.initial_delay_seconds or 0))
            for k, p in (
                ("startup", c.spec.startup_probe),
                ("readiness", c.spec.readiness_probe),
                ("liveness", c.spec.liveness_probe),
            )
            if p is not None
        }
        c.started = "startup" not in c.probes
        c.ready = False

    def exited(self, c: Container, code: int) -> None:
        message = c.termination.read_text(errors="replace").strip()
        policy = c.spec.termination_message_policy or "File"
        if not message and code != 0 and policy == "FallbackToLogsOnError":
            message = "\n".join(c.log.read_text(errors="replace").splitlines()[-20:])
        terminated: dict[str, Any] = {
            "exitCode": code if code >= 0 else 128 - code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": c.started_at,
            "finishedAt": now(),
        }
        if code < 0:
            terminated["signal"] = -code
        if message:
            terminated["message"] = message[:4096]
        c.proc, c.ready, c.started = None, False, False
        policy_restart = self.pod.spec.restart_policy or "Always"
        again = policy_restart == "Always" or (policy_restart == "OnFailure" and code != 0)
        if again:
            c.last_state = {"terminated": terminated}
            delay = min(MAX_BACKOFF, 2.0**c.restarts)
            c.restarts += 1
            c.next_start = time.monotonic() + delay
            c.state = {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": f"back-off {delay:.0f}s restarting failed container",
                }
            }
        else:
            c.state = {"terminated": terminated}
            c.done = True

    def kill_processes(self) -> None:
        for c in self.containers:
            if c.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGKILL)

    def stop_container(self, c: Container, reason: str) -> None:
        if c.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(c.proc.pid, signal.SIGKILL)
            code = c.proc.wait()
            with c.log.open("a") as out:
                out.write(f"--- {now()} killed: {reason}\n")
            self.exited(c, code)

    # -- probes -----------------------------------------------------------------------------
    def run_probes(self, c: Container, t: float) -> None:
        for kind in ("startup", "readiness", "liveness"):
            probe = c.probes.get(kind)
            if probe is None or t < probe.next_at or (kind != "startup" and not c.started):
                continue
            if kind == "startup" and c.started:
                continue
            spec = probe.spec
            probe.next_at = t + (spec.period_seconds or 10)
            ok = self.probe_once(c, spec)
            if ok:
                probe.successes, probe.failures = probe.successes + 1, 0
                if probe.successes >= (spec.success_threshold or 1):
                    probe.ok = True
            else:
                probe.failures, probe.successes = probe.failures + 1, 0
                if probe.failures >= (spec.failure_threshold or 3):
                    probe.ok = False
                    if kind in ("startup", "liveness"):
                        self.stop_container(c, f"{kind} probe failed {probe.failures} times")
                        return
            if kind == "startup" and probe.ok:
                c.started = True
        if c.started:
            readiness = c.probes.get("readiness")
            c.ready = readiness.ok if readiness else True

    def probe_once(self, c: Container, spec: Any) -> bool:
        timeout = spec.timeout_seconds or 1
        if spec.http_get:
            g = spec.http_get
            port = self.port_number(c, g.port)
            url = f"{(g.scheme or 'HTTP').lower()}://{g.host or self.pod_ip}:{port}{g.path or '/'}"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    return 200 <= resp.status < 400
            except OSError:
                return False
        if spec.tcp_socket:
            try:
                with socket.create_connection((self.pod_ip, self.port_number(c, spec.tcp_socket.port)), timeout):
                    return True
            except OSError:
                return False
        return False  # exec and grpc probes are not supported here: never reported healthy

    @staticmethod
    def port_number(c: Container, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in c.spec.ports or []:
            if p.name == port:
                return int(p.container_port)
        raise ValueError(f"no container port named {port!r}")

    # -- status ----------------------------------------------------------------------------
    def phase(self) -> str:
        if self.failure:
            return "Failed"
        if all(c.done for c in self.containers):
            codes = [c.state["terminated"]["exitCode"] for c in self.containers]
            return "Succeeded" if all(code == 0 for code in codes) else "Failed"
        if any(c.proc is not None or c.restarts for c in self.containers):
            return "Running"
        return "Pending"

    def condition(self, kind: str, value: bool) -> dict[str, str]:
        status = "True" if value else "False"
        old = self.conditions.get(kind)
        if old is None or old["status"] != status:
            self.conditions[kind] = {"type": kind, "status": status, "lastTransitionTime": now()}
        return self.conditions[kind]

    def status(self) -> dict[str, Any]:
        ready = all(c.ready for c in self.containers) and self.failure is None
        statuses = [
            {
                "name": c.spec.name,
                "image": c.spec.image,
                "imageID": "",
                "ready": c.ready,
                "started": c.started,
                "restartCount": c.restarts,
                "state": c.state,
                "lastState": c.last_state,
                **({"containerID": f"kiln-agent://{c.proc.pid}"} if c.proc else {}),
            }
            for c in self.containers
        ]
        status: dict[str, Any] = {
            "phase": self.phase(),
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.pod_ip,
            "podIPs": [{"ip": self.pod_ip}],
            "startTime": self.start_time,
            "containerStatuses": statuses,
            "conditions": [
                self.condition("PodReadyToStartContainers", True),
                self.condition("Initialized", True),
                self.condition("ContainersReady", ready),
                self.condition("Ready", ready),
            ],
        }
        if self.failure:
            status["message"], status["reason"] = self.failure, "UnsupportedPod"
        return status

    def report(self) -> None:
        status = self.status()
        if status == self.last_status:
            return
        try:
            self.agent.core.patch_namespaced_pod_status(self.pod.metadata.name, self.ns, {"status": status})
            self.last_status = status
        except ApiException as exc:
            if exc.status == 404:
                self.detach()

    def terminate(self) -> None:
        """Deletion: SIGTERM, wait the grace period, SIGKILL, then remove the pod object."""
        grace = 0.0 if self.killed.is_set() else (self.delete_grace or 0.0)
        running = [c for c in self.containers if c.proc is not None]
        for c in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(c.proc.pid, signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + grace
        while any(c.proc.poll() is None for c in running) and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(TICK)
        for c in running:
            self.stop_container(c, "pod deleted")
        if not self.killed.is_set():
            try:
                # The API server reads options from the body when there is one, not the query.
                self.agent.core.delete_namespaced_pod(
                    self.pod.metadata.name,
                    self.ns,
                    body=client.V1DeleteOptions(
                        grace_period_seconds=0, preconditions=client.V1Preconditions(uid=self.pod.metadata.uid)
                    ),
                )
            except ApiException as exc:
                if exc.status != 404:
                    log.warning("could not remove pod %s/%s: %s", self.ns, self.pod.metadata.name, exc.reason)
        self.agent.forget(self.pod.metadata.uid)
