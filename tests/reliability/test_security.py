"""Security review as tests: effective RBAC, locked-down pods, what the runtime binds, no secret in logs."""

from __future__ import annotations

import json
import pwd
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln.devcluster.cluster import LocalCluster
from kiln.operator.settings import OperatorSettings
from tests.support.kube import CHART, Kube, helm
from tests.support.torchmodels import compile_jobs, job_pods, torchmodel, wait_phase

pytestmark = pytest.mark.cluster

# What the operator does, resource by resource (see operator/handlers.py and k8s.py): nothing more.
EXPECTED_RBAC = {
    "torchmodels.kiln.dev": {"get", "list", "watch", "patch"},
    "torchmodels.kiln.dev/status": {"get", "patch"},
    "compiledartifacts.kiln.dev": {"get", "list", "watch", "create", "patch", "delete"},
    "compiledartifacts.kiln.dev/status": {"get", "patch"},
    "deployments.apps": {"get", "list", "watch", "create", "patch"},
    "services": {"get", "list", "watch", "create", "patch"},
    "jobs.batch": {"get", "list", "watch", "create"},
    "pods": {"get", "list", "watch"},
    "persistentvolumeclaims": {"create"},
    "events": {"create"},
    "events.events.k8s.io": {"create"},
    "kopfpeerings.kopf.dev": {"get", "list", "watch", "patch"},
    "clusterkopfpeerings.kopf.dev": {"get", "list", "watch", "patch"},
    "customresourcedefinitions.apiextensions.k8s.io": {"get", "list", "watch"},
}
# Kubernetes grants these to every authenticated user (system:basic-user): not the chart's doing.
EVERYONE = {
    "selfsubjectreviews.authentication.k8s.io",
    "selfsubjectaccessreviews.authorization.k8s.io",
    "selfsubjectrulesreviews.authorization.k8s.io",
}
FORBIDDEN = [
    ("get", "secrets"),
    ("list", "secrets"),
    ("create", "pods"),
    ("create", "pods/exec"),
    ("delete", "pods"),
    ("delete", "deployments.apps"),
    ("update", "clusterroles.rbac.authorization.k8s.io"),
    ("create", "rolebindings.rbac.authorization.k8s.io"),
    ("patch", "nodes"),
    ("create", "serviceaccounts/token"),
]


def effective_rules(cluster: LocalCluster, user: str, namespace: str) -> dict[str, set[str]]:
    """`kubectl auth can-i --list` as that user: resource → verbs, merged over rows."""
    out = cluster.kubectl("auth", "can-i", "--list", f"--as={user}", "-n", namespace).stdout
    rules: dict[str, set[str]] = {}
    for line in out.splitlines()[1:]:
        match = re.match(r"^(\S+)\s+\[(.*?)\]\s+\[(.*?)\]\s+\[(.*?)\]\s*$", line)
        if not match or not match.group(1) or match.group(2):
            continue  # non-resource URLs (/healthz, /version, …) are public-info-viewer's
        rules.setdefault(match.group(1), set()).update(match.group(4).split())
    return rules


@pytest.mark.parametrize("mode", ["cluster", "namespaced"])
def test_the_operators_effective_permissions_are_exactly_what_it_uses(kube: Kube, mode: str, record: Any) -> None:
    ns = kube.namespace
    values = ["--set", f"watchNamespaces={{{ns}}}"] if mode == "namespaced" else []
    rendered = helm("template", f"sec-{mode}", str(CHART), "--namespace", ns, *values).stdout
    rbac = re.compile(r"^kind: (ServiceAccount|ClusterRole|ClusterRoleBinding|Role|RoleBinding)$", re.M)
    docs = [d for d in rendered.split("\n---\n") if rbac.search(d)]
    kube.cluster.kubectl("apply", "-f", "-", input="\n---\n".join(docs))
    try:
        user = f"system:serviceaccount:{ns}:sec-{mode}-kiln"
        rules = {k: v for k, v in effective_rules(kube.cluster, user, ns).items() if k not in EVERYONE}
        assert rules == EXPECTED_RBAC, f"extra: { {k: v for k, v in rules.items() if EXPECTED_RBAC.get(k) != v} }"
        allowed = [
            f"{verb} {what}"
            for verb, what in FORBIDDEN
            if kube.cluster.kubectl("auth", "can-i", verb, what, f"--as={user}", "-n", ns, check=False).returncode == 0
        ]
        assert not allowed, f"the operator's account may {allowed}"
        if mode == "namespaced":  # a Role per watched namespace: nothing in any other namespace
            elsewhere = effective_rules(kube.cluster, user, "default")
            assert not {k for k in elsewhere if k not in EVERYONE} - {
                "customresourcedefinitions.apiextensions.k8s.io",
                "clusterkopfpeerings.kopf.dev",
            }
    finally:
        kube.cluster.kubectl("delete", "-f", "-", input="\n---\n".join(docs), check=False)
    record(
        f"RBAC of the chart ({mode} mode): effective permissions listed with kubectl auth can-i --list",
        len(EXPECTED_RBAC) + len(FORBIDDEN),
        "nothing beyond the expected list; secrets, pods/exec, pod creation and RBAC edits all denied",
    )


def locked_down(pod: dict[str, Any]) -> list[str]:
    """What in a pod spec breaks the baseline: non-root, read-only root, no escalation, no capabilities."""
    spec, problems = pod["spec"], []
    pod_ctx = spec.get("securityContext") or {}
    if not pod_ctx.get("runAsNonRoot") or pod_ctx.get("runAsUser", 0) == 0:
        problems.append("pod may run as root")
    if spec.get("automountServiceAccountToken") is not False:
        problems.append("service account token mounted")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            problems.append(key)
    if any("hostPath" in v for v in spec.get("volumes", [])):
        problems.append("hostPath volume")
    for c in spec["containers"]:
        ctx = c.get("securityContext") or {}
        if ctx.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{c['name']}: writable root filesystem")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{c['name']}: privilege escalation allowed")
        if ctx.get("privileged"):
            problems.append(f"{c['name']}: privileged")
        caps = ctx.get("capabilities") or {}
        if caps.get("drop") != ["ALL"] or caps.get("add"):
            problems.append(f"{c['name']}: capabilities {caps}")
        seccomp = ctx.get("seccompProfile") or pod_ctx.get("seccompProfile") or {}  # the pod's applies to all
        if seccomp.get("type") != "RuntimeDefault":
            problems.append(f"{c['name']}: no RuntimeDefault seccomp profile")
    return problems


def listeners(pid: int) -> list[str]:
    """Listening addresses of a process; an IPv4-mapped IPv6 socket (gRPC makes those) reads as its IPv4 address."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]
    return [re.sub(r"^\[::ffff:([0-9.]+)\]", r"\1", address) for address in found]


SETTINGS_UID = OperatorSettings(runtime_image="x").run_as_user


def process_uids(pid: int) -> set[int]:
    """Real, effective, saved and filesystem uids of a process."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Uid:"))
    return {int(u) for u in line.split()[1:]}


def mount_options(pid: int, target: str) -> set[str]:
    """The per-mount options of `target` as the process sees it (its own mount namespace; the top mount wins)."""
    options: set[str] = set()
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == target:
            options = set(fields[5].split(","))
    return options


def test_pods_are_locked_down_bind_their_ports_only_and_no_secret_reaches_logs(
    fkube: Kube, fault_cluster: LocalCluster, mlp_archive: Path, record: Any
) -> None:
    fkube.apply(torchmodel("safe", f"file://{mlp_archive}"))
    wait_phase(fkube, "safe", "Ready")
    # Offered credentials: refused by the API server, so they can reach nothing.
    leaked = "s3cr3t-d0-not-log"
    refused = fkube.apply(torchmodel("leak", f"https://kiln:{leaked}@models.example.com/m.pt2"))
    assert refused.returncode != 0 and "credentials must not be part of the archive URI" in refused.stderr
    serving = fkube.get("pods", "-l", "kiln.dev/model=safe")["items"]
    compiling = job_pods(fkube, compile_jobs(fkube)[0]["metadata"]["name"])
    problems = {p["metadata"]["name"]: locked_down(p) for p in serving + compiling}
    assert not any(problems.values()), problems
    for pod in serving:
        cache = next(m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == "cache")
        claim = next(v for v in pod["spec"]["volumes"] if v["name"] == "cache")["persistentVolumeClaim"]
        assert cache["readOnly"] is True and claim["readOnly"] is True
    # The operator pod of the chart follows the same baseline (it needs its token: it talks to the API).
    rendered = helm("template", "kiln", str(CHART), "--namespace", fkube.namespace).stdout
    operator = next(d for d in rendered.split("\n---\n") if re.search(r"^kind: Deployment$", d, re.M))
    template = yaml.safe_load(operator)["spec"]["template"]
    template["spec"]["automountServiceAccountToken"] = False  # exempt from that one check only
    assert not locked_down(template), locked_down(template)
    # kiln-serve listens on its pod IP and ports only (HTTP, gRPC): not on every address, and nothing else.
    ip = serving[0]["status"]["podIP"]
    pid = int(subprocess.run(["pgrep", "-f", f"kiln-serve.*--host={ip} "], capture_output=True, text=True).stdout)
    assert sorted(listeners(pid)) == [f"{ip}:8080", f"{ip}:8081"]
    # ...and runs as the pods' uid, which has no passwd entry on this host, on a read-only root
    # (the node agent enforces the spec); the compile Job wrote the artifact as that uid too.
    with pytest.raises(KeyError):
        pwd.getpwuid(SETTINGS_UID)
    assert process_uids(pid) == {SETTINGS_UID}
    assert mount_options(pid, "/") >= {"ro"} and "rw" in mount_options(pid, "/tmp")
    artifact = next((fault_cluster.agent_root / "pvc" / fkube.namespace).glob("*/*/manifest.json"))
    assert artifact.stat().st_uid == SETTINGS_UID
    # No secret in any log, event or status: the API token the operator uses, and the refused password.
    texts = [p.read_text(errors="replace") for p in fault_cluster.log_dir.glob("operator*.log")]
    texts += [p.read_text(errors="replace") for p in (fault_cluster.agent_root / "pods").glob("*/*.log")]
    texts.append(fkube.run("get", "events", "-o", "json").stdout)
    texts.append(json.dumps(fkube.get("torchmodels")))
    for secret in (fault_cluster.token, leaked):
        assert not any(secret in t for t in texts), "a secret reached a log, event or status"
    record(
        "pod specs of compile and serving pods, the chart's operator pod, kiln-serve's sockets, every log",
        len(serving) + len(compiling) + 1,
        "nothing: non-root, read-only root, no escalation, ALL capabilities dropped, RuntimeDefault seccomp, "
        "no token, cache read-only in serving pods; listeners podIP:8080 (HTTP) and :8081 (gRPC) only; no token or "
        "password in logs; kiln-serve runs as uid 65532 (no passwd entry here) on a read-only root, and the "
        "compile Job wrote the artifact as 65532",
        log_files=len(texts) - 2,
    )
