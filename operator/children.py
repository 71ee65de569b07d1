"""Manifests of Kiln's children: CompiledArtifact, compile Job, Deployment, Service, cache PVC.

Operator core (pure): a resource model and settings in, a dict the API server accepts
out. Pods run non-root with a read-only root filesystem, no privilege escalation
and no capabilities; serving pods mount the cache read-only.
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlparse

from kiln.api import API_VERSION, CompiledArtifact, RolloutStrategy, Target, TorchModel, json_ready
from kiln.contracts import CompileFlags, ServeFlags
from kiln.enums import CompileMode
from kiln.keys import compile_identity
from kiln.operator import naming
from kiln.operator.settings import OperatorSettings

CACHE_MOUNT = "/cache"
PVC_ROOT = "/mnt/pvc"
# A terminating serving pod keeps answering this long while endpoints drop it.
DRAIN_SECONDS = 5


def _security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _torch_env(inductor_cache: str = "/tmp/torchinductor") -> list[dict[str, Any]]:
    """Where torch writes, for a runAsUser with no passwd entry, no home and a read-only root.

    torch._inductor calls getpass.getuser() when imported (it fails for a uid the image's
    /etc/passwd lacks unless USER is set); Inductor's and Triton's caches go to the /tmp emptyDir.
    """
    return [
        {"name": "USER", "value": "kiln"},
        {"name": "TORCHINDUCTOR_CACHE_DIR", "value": inductor_cache},
        {"name": "TRITON_CACHE_DIR", "value": "/tmp/triton"},
    ]


def _pod_security(settings: OperatorSettings) -> dict[str, Any]:
    uid = settings.run_as_user
    return {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid}


def _archive_volume(uri: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A pvc:// archive's claim, mounted read-only where kiln-compile and kiln-serve look for it."""
    parsed = urlparse(uri)
    if parsed.scheme != "pvc":
        return [], []
    claim = parsed.netloc
    volume = {"name": "archive", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
    mount = {"name": "archive", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True}
    return [volume], [mount]


def _gpu_placement(target: Target, settings: OperatorSettings) -> tuple[dict[str, str], dict[str, str]]:
    """Node selector and resource limits that pin a pod to the target's GPU product."""
    if target.is_cpu:
        return {}, {}
    return {settings.gpu_label: target.gpu}, {settings.gpu_resource: "1"}


def cache_claim(namespace: str, settings: OperatorSettings) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "accessModes": [settings.cache_access_mode],
        "resources": {"requests": {"storage": settings.cache_size}},
    }
    if settings.cache_storage_class:
        spec["storageClassName"] = settings.cache_storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": settings.cache_claim, "namespace": namespace, "labels": dict(naming.MANAGED_BY)},
        "spec": spec,
    }


def artifact(namespace: str, key: str, model: TorchModel, target: Target, settings: OperatorSettings) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "CompiledArtifact",
        "metadata": {
            "name": naming.artifact_name(key),
            "namespace": namespace,
            "labels": naming.artifact_labels(key, target.gpu),
        },
        "spec": {
            "key": key,
            "archive": json_ready(model.spec.archive),
            "compile": compile_identity(model.spec.compile),
            "target": target.gpu,
            "runtimeImage": settings.runtime_image,
        },
    }


def compile_args(art: CompiledArtifact, device: Literal["cpu", "cuda"]) -> list[str]:
    spec = art.spec
    return CompileFlags(
        uri=spec.archive.uri,
        format=spec.archive.format,
        mode=spec.compile.mode,
        backend=spec.compile.backend,
        inductor_mode=spec.compile.inductor_mode,
        batch_min=spec.compile.dynamic_batch.min,
        batch_max=spec.compile.dynamic_batch.max,
        batch_dim=spec.compile.dynamic_batch.dim,
        device=device,
        target=spec.target,
        cache=CACHE_MOUNT,
        key=spec.key,
        runtime_image=spec.runtime_image,
        pvc_root=PVC_ROOT,
        sha256=spec.archive.sha256,
        option=spec.compile.options,
    ).argv()


def compile_job(
    art: CompiledArtifact, namespace: str, owner_uid: str, settings: OperatorSettings, rebuild: int = 0
) -> dict[str, Any]:
    """The one Job that compiles a key (per rebuild); its name derives from both, so it is never duplicated."""
    target = Target(gpu=art.spec.target)
    selector, gpu_limits = _gpu_placement(target, settings)
    archive_volumes, archive_mounts = _archive_volume(art.spec.archive.uri)
    labels = naming.compile_labels(art.spec.key)
    container = {
        "name": "compile",
        "image": art.spec.runtime_image,
        "command": ["kiln-compile"],
        "args": compile_args(art, "cpu" if target.is_cpu else "cuda"),
        "env": _torch_env(),
        "resources": {
            "requests": {"cpu": settings.compile_cpu, "memory": settings.compile_memory},
            "limits": gpu_limits,
        },
        "volumeMounts": [
            {"name": "cache", "mountPath": CACHE_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},
            *archive_mounts,
        ],
        "securityContext": _security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": naming.compile_job_name(art.spec.key, rebuild),
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": [_owner(API_VERSION, "CompiledArtifact", art.metadata["name"], owner_uid)],
        },
        "spec": {
            "backoffLimit": settings.compile_backoff_limit,
            "activeDeadlineSeconds": settings.compile_deadline_seconds,
            "ttlSecondsAfterFinished": settings.compile_ttl_seconds,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "nodeSelector": selector,
                    "securityContext": _pod_security(settings),
                    "containers": [container],
                    "volumes": [
                        {"name": "cache", "persistentVolumeClaim": {"claimName": settings.cache_claim}},
                        {"name": "tmp", "emptyDir": {}},
                        *archive_volumes,
                    ],
                },
            },
        },
    }


def cache_gc_job(key: str, namespace: str, runtime_image: str, settings: OperatorSettings) -> dict[str, Any]:
    """A short Job that removes `<cache>/<key>` once its CompiledArtifact is deleted."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": naming.gc_job_name(key), "namespace": namespace, "labels": dict(naming.MANAGED_BY)},
        "spec": {
            "backoffLimit": 3,
            "ttlSecondsAfterFinished": 300,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "securityContext": _pod_security(settings),
                    "containers": [
                        {
                            "name": "gc",
                            "image": runtime_image,
                            "command": ["kiln-cache", "remove", f"--cache={CACHE_MOUNT}", f"--key={key}"],
                            "volumeMounts": [{"name": "cache", "mountPath": CACHE_MOUNT}],
                            "securityContext": _security_context(),
                        }
                    ],
                    "volumes": [{"name": "cache", "persistentVolumeClaim": {"claimName": settings.cache_claim}}],
                }
            },
        },
    }


def _owner(api_version: str, kind: str, name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _serve_args(model: TorchModel, name: str, target: Target, key: str | None, settings: OperatorSettings) -> list[str]:
    spec = model.spec
    batching, threads, jit = spec.serving.batching, spec.serving.threads, spec.compile.jit
    is_jit = spec.compile.mode == CompileMode.jit
    return ServeFlags(
        mode=spec.compile.mode,
        model_name=name,
        device="cpu" if target.is_cpu else "cuda",
        host="$(POD_IP)",
        port=settings.serve_port,
        grpc_port=settings.grpc_port,
        max_batch_size=min(batching.max_batch_size, spec.compile.dynamic_batch.max),
        max_delay_ms=batching.max_delay_ms,
        max_queue=batching.max_queue,
        batchable=batching.batchable,
        intra_op_threads=threads.intra_op,
        inter_op_threads=threads.inter_op,
        pvc_root=PVC_ROOT,
        drain_seconds=DRAIN_SECONDS,
        # a compile Job built it (aot, or an archive prepared for jit/eager), else the archive itself
        artifact=f"{CACHE_MOUNT}/{key}" if key is not None else None,
        archive=spec.archive.uri if key is None else None,
        batch_dim=spec.compile.dynamic_batch.dim if key is None else None,
        archive_sha256=spec.archive.sha256 if key is None else None,
        inductor_mode=spec.compile.inductor_mode if is_jit else None,
        jit_backend=jit.backend if is_jit else None,
        jit_fullgraph=jit.fullgraph if is_jit else None,
        jit_dynamic=("auto" if jit.dynamic is None else "true" if jit.dynamic else "false") if is_jit else None,
        jit_disable=jit.disable if is_jit else None,
    ).argv()


def deployment(
    model: TorchModel, target: Target, key: str | None, owner_uid: str, settings: OperatorSettings
) -> dict[str, Any]:
    """Serving pods of one target, pinned to its GPU product, running the artifact of `key`."""
    name = model.metadata["name"]
    namespace = model.metadata["namespace"]
    child = naming.child_name(name, target.gpu)
    selector_labels = naming.serving_selector(name, target.gpu)
    labels = naming.serving_labels(name, target.gpu)
    node_selector, gpu_limits = _gpu_placement(target, settings)
    archive_volumes, archive_mounts = _archive_volume(model.spec.archive.uri)
    jit = model.spec.compile.mode == CompileMode.jit
    env: list[dict[str, Any]] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        # Thread pools default to the container's CPU limit, not the node's cores (see kiln-serve's cpu_limit).
        {
            "name": "KILN_CPU_LIMIT",
            "valueFrom": {"resourceFieldRef": {"containerName": "serve", "resource": "limits.cpu", "divisor": "1"}},
        },
        # jit: torch.compile's cache, shared by the replicas of one target.
        *_torch_env(f"{CACHE_MOUNT}/inductor/{naming.slug(target.gpu)}" if jit else "/tmp/torchinductor"),
    ]
    resources = json_ready(model.spec.serving.resources)
    resources["limits"] = {**resources.get("limits", {}), **gpu_limits}
    probe = {"httpGet": {"path": "/v2/health/ready", "port": "http"}}
    startup_period = 2
    container = {
        "name": "serve",
        "image": settings.runtime_image,
        "command": ["kiln-serve"],
        "args": _serve_args(model, name, target, key, settings),
        "env": env,
        "ports": [
            {"name": "http", "containerPort": settings.serve_port, "protocol": "TCP"},
            {"name": "grpc", "containerPort": settings.grpc_port, "protocol": "TCP"},
        ],
        "startupProbe": {
            **probe,
            "periodSeconds": startup_period,
            "failureThreshold": max(1, model.spec.serving.startup_seconds // startup_period),
        },
        "readinessProbe": {**probe, "periodSeconds": 2, "failureThreshold": 2},
        "livenessProbe": {
            "httpGet": {"path": "/v2/health/live", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "resources": resources,
        "volumeMounts": [
            # jit writes torch.compile's cache; aot and eager only read.
            {"name": "cache", "mountPath": CACHE_MOUNT, "readOnly": not jit},
            {"name": "tmp", "mountPath": "/tmp"},
            *archive_mounts,
        ],
        "securityContext": _security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    one_at_a_time = model.spec.serving.rollout == RolloutStrategy.one_at_a_time
    strategy = {"maxSurge": 0, "maxUnavailable": 1} if one_at_a_time else {"maxSurge": "25%", "maxUnavailable": 0}
    annotations = {naming.KEY_ANNOTATION: key} if key else {}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": child,
            "namespace": namespace,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [_owner(API_VERSION, "TorchModel", name, owner_uid)],
        },
        "spec": {
            "replicas": target.replicas,
            "selector": {"matchLabels": selector_labels},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": strategy},
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": 30 + DRAIN_SECONDS,
                    "nodeSelector": node_selector,
                    # A replica on a lost node is replaced after this, not after Kubernetes' default 5 minutes.
                    "tolerations": [
                        {
                            "key": f"node.kubernetes.io/{taint}",
                            "operator": "Exists",
                            "effect": "NoExecute",
                            "tolerationSeconds": settings.node_lost_seconds,
                        }
                        for taint in ("not-ready", "unreachable")
                    ],
                    "securityContext": _pod_security(settings),
                    "containers": [container],
                    "volumes": [
                        {
                            "name": "cache",
                            "persistentVolumeClaim": {"claimName": settings.cache_claim, "readOnly": not jit},
                        },
                        {"name": "tmp", "emptyDir": {}},
                        *archive_volumes,
                    ],
                },
            },
        },
    }


def service(model: TorchModel, target: Target, owner_uid: str, settings: OperatorSettings) -> dict[str, Any]:
    name = model.metadata["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": naming.child_name(name, target.gpu),
            "namespace": model.metadata["namespace"],
            "labels": naming.instance_labels(name),
            "ownerReferences": [_owner(API_VERSION, "TorchModel", name, owner_uid)],
        },
        "spec": {
            "selector": naming.serving_selector(name, target.gpu),
            "ports": [
                {"name": "http", "port": settings.serve_port, "targetPort": "http", "protocol": "TCP"},
                {
                    "name": "grpc",
                    "port": settings.grpc_port,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    "appProtocol": "kubernetes.io/h2c",  # gRPC is HTTP/2 in clear text: meshes and gateways route it so
                },
            ],
        },
    }


def model_url(model: TorchModel, target: Target, settings: OperatorSettings) -> str:
    svc = naming.child_name(model.metadata["name"], target.gpu)
    host = f"{svc}.{model.metadata['namespace']}.svc.{settings.cluster_domain}"
    return f"http://{host}:{settings.serve_port}/v2/models/{model.metadata['name']}"
