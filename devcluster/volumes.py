"""Pod volumes as host folders, for the node agent.

emptyDir → a folder of the pod; hostPath → that path; persistentVolumeClaim → one
folder per claim under the agent's root (the same folder the agent's provisioner
puts in the PersistentVolume); configMap, secret and projected (service-account
token through the TokenRequest API, kube-root-ca.crt, namespace) → files written
once at start. Each mount becomes a bind mount at its mountPath (read-only when asked).
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client


@dataclass(frozen=True)
class Mount:
    host: Path
    path: str
    read_only: bool


def claim_dir(root: Path, namespace: str, claim: str) -> Path:
    return root / "pvc" / namespace / claim


def _write_items(folder: Path, data: dict[str, str], items: list[Any] | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pairs = [(i.key, i.path) for i in items] if items else [(k, k) for k in data]
    for key, rel in pairs:
        if key in data:
            target = folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(data[key])


def _secret_data(core: client.CoreV1Api, ns: str, name: str) -> dict[str, str]:
    secret = core.read_namespaced_secret(name, ns)
    return {k: base64.b64decode(v).decode(errors="replace") for k, v in (secret.data or {}).items()}


def _projected(core: client.CoreV1Api, pod: client.V1Pod, folder: Path, sources: list[Any]) -> None:
    ns = pod.metadata.namespace
    folder.mkdir(parents=True, exist_ok=True)
    for src in sources:
        if src.service_account_token:
            sat = src.service_account_token
            req = client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(
                    audiences=[sat.audience] if sat.audience else [],
                    expiration_seconds=sat.expiration_seconds or 3600,
                    bound_object_ref=client.V1BoundObjectReference(
                        kind="Pod", api_version="v1", name=pod.metadata.name, uid=pod.metadata.uid
                    ),
                )
            )
            sa = pod.spec.service_account_name or "default"
            token = core.create_namespaced_service_account_token(sa, ns, req)
            (folder / sat.path).write_text(token.status.token)
        if src.config_map:
            cm = core.read_namespaced_config_map(src.config_map.name, ns)
            _write_items(folder, cm.data or {}, src.config_map.items)
        if src.secret:
            _write_items(folder, _secret_data(core, ns, src.secret.name), src.secret.items)
        if src.downward_api:
            for item in src.downward_api.items or []:
                if item.field_ref:
                    value = field_value(pod, item.field_ref.field_path)
                    (folder / item.path).write_text(value)


def field_value(pod: client.V1Pod, path: str) -> str:
    """The downward API's fieldRef values the agent knows."""
    meta = pod.metadata
    values = {
        "metadata.name": meta.name,
        "metadata.namespace": meta.namespace,
        "metadata.uid": meta.uid,
        "spec.nodeName": pod.spec.node_name,
        "spec.serviceAccountName": pod.spec.service_account_name or "default",
        "status.podIP": (pod.status.pod_ip if pod.status else "") or "",
        "status.hostIP": "127.0.0.1",
    }
    if path.startswith("metadata.labels['"):
        return (meta.labels or {}).get(path[len("metadata.labels['") : -2], "")
    if path.startswith("metadata.annotations['"):
        return (meta.annotations or {}).get(path[len("metadata.annotations['") : -2], "")
    return str(values.get(path, ""))


def _quantity(text: str) -> float:
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


def resource_value(pod: client.V1Pod, ref: client.V1ResourceFieldSelector, node_cpu: int) -> str:
    """The downward API's resourceFieldRef: the container's limit (or request) over the divisor, rounded up.

    As the kubelet does, a limit that is not set reads as the node's allocatable amount.
    """
    kind, _, resource = ref.resource.partition(".")
    container = next((c for c in pod.spec.containers if c.name == ref.container_name), pod.spec.containers[0])
    values = getattr(container.resources, kind, None) or {}
    raw = values.get(resource)
    if raw is None:
        raw = str(node_cpu) if resource == "cpu" else "0"
    divisor = _quantity(str(ref.divisor or "1"))
    return str(max(1, math.ceil(_quantity(str(raw)) / divisor)))


def prepare(core: client.CoreV1Api, pod: client.V1Pod, pod_dir: Path, root: Path) -> dict[str, tuple[Path, bool]]:
    """Make each volume's host folder; returns name → (folder, read-only by the volume)."""
    out: dict[str, tuple[Path, bool]] = {}
    ns = pod.metadata.namespace
    for vol in pod.spec.volumes or []:
        folder = pod_dir / "volumes" / vol.name
        read_only = False
        if vol.empty_dir is not None:
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o777)  # the kubelet's emptyDir mode: whatever user the pod runs as writes it
        elif vol.host_path is not None:
            folder = Path(vol.host_path.path)
            if vol.host_path.type in (None, "", "DirectoryOrCreate"):
                folder.mkdir(parents=True, exist_ok=True)
        elif vol.persistent_volume_claim is not None:
            folder = claim_dir(root, ns, vol.persistent_volume_claim.claim_name)
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o777)  # as kind's local-path provisioner makes a volume's folder
            read_only = bool(vol.persistent_volume_claim.read_only)
        elif vol.config_map is not None:
            cm = core.read_namespaced_config_map(vol.config_map.name, ns)
            _write_items(folder, cm.data or {}, vol.config_map.items)
            read_only = True
        elif vol.secret is not None:
            _write_items(folder, _secret_data(core, ns, vol.secret.secret_name), vol.secret.items)
            read_only = True
        elif vol.projected is not None:
            _projected(core, pod, folder, vol.projected.sources or [])
            read_only = True
        else:
            raise ValueError(
                f"volume {vol.name!r}: this node agent supports emptyDir, hostPath, "
                "persistentVolumeClaim, configMap, secret and projected volumes"
            )
        out[vol.name] = (folder, read_only)
    return out


def mounts_for(container: client.V1Container, volumes: dict[str, tuple[Path, bool]]) -> list[Mount]:
    mounts = []
    for vm in container.volume_mounts or []:
        folder, vol_ro = volumes[vm.name]
        host = folder / vm.sub_path if vm.sub_path else folder
        mounts.append(Mount(host, vm.mount_path, bool(vm.read_only) or vol_ro))
    return mounts
