"""kopf glue: thin handlers that parse, call the pure reconcile, apply its result and patch status.

Operator glue. Level-triggered: create, update, resume and a timer all run the same
idempotent module-level functions. What they observe comes from kopf indexes (in-memory
views kept by watches), so a reconcile reads nothing from the API server and writes only
what differs. Settings, the Writer and the event sink reach them as kopf's `memo` (`Kiln`),
so unit tests call them directly (tests/unit/test_handlers.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import kopf
from pydantic import ValidationError

from kiln.api import (
    API_VERSION,
    GROUP,
    VERSION,
    CompiledArtifact,
    CompiledArtifactStatus,
    Condition,
    TorchModel,
    TorchModelStatus,
    json_ready,
)
from kiln.operator import children, naming
from kiln.operator.k8s import NamespaceTerminating, Writer, plain
from kiln.operator.reconcile import (
    ObservedTarget,
    corruption_report,
    expired,
    plan_targets,
    reconcile_artifact,
    reconcile_model,
    unschedulable,
)
from kiln.operator.settings import OperatorSettings

log = logging.getLogger("kiln.operator")
StatusT = TypeVar("StatusT", TorchModelStatus, CompiledArtifactStatus)
PostEvent = Callable[[kopf.Body, str, str, str], None]  # body, type, reason, message
TM, CA = "torchmodels", "compiledartifacts"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def first(index: kopf.Index[Any, Any], key: Any) -> Any:
    for value in index.get(key, []):
        return value
    return None


def parse_model(body: kopf.Body) -> TorchModel:
    raw = plain(body)
    return TorchModel(metadata=raw["metadata"], spec=raw["spec"], status=_status(TorchModelStatus, raw))


def parse_artifact(body: kopf.Body) -> CompiledArtifact:
    raw = plain(body)
    return CompiledArtifact(metadata=raw["metadata"], spec=raw["spec"], status=_status(CompiledArtifactStatus, raw))


def _status(model: type[StatusT], raw: dict[str, Any]) -> StatusT | None:
    """The last status written, or None when it cannot be read (it is then rebuilt)."""
    with contextlib.suppress(ValidationError):
        return model.model_validate(raw.get("status") or {})
    return None


def patch_status(patch: kopf.Patch, body: kopf.Body, status: TorchModelStatus | CompiledArtifactStatus) -> None:
    """Write the status only when it differs: a resync that changes nothing writes nothing."""
    wanted = json_ready(status)
    if wanted != plain(body.get("status") or {}):
        patch.status.update(wanted)


def invalid_spec(
    patch: kopf.Patch, body: kopf.Body, error: ValidationError, post_event: PostEvent
) -> kopf.PermanentError:
    """Report a spec the schema let through but the models refuse (e.g. a CEL-free rule)."""
    first_error = error.errors()[0]
    where = ".".join(str(p) for p in first_error["loc"])
    message = f"spec.{where}: {first_error['msg']}"
    condition = Condition(
        type="Ready", status="False", reason="InvalidSpec", message=message, last_transition_time=now()
    )
    patch.status["phase"] = "Failed"
    patch.status["conditions"] = [json_ready(condition)]
    patch.status["observedGeneration"] = body.metadata.get("generation")
    post_event(body, "Warning", "InvalidSpec", message)
    return kopf.PermanentError(message)


def kopf_event(body: kopf.Body, kind: str, reason: str, message: str) -> None:
    kopf.event(body, type=kind, reason=reason, message=message)


@dataclass
class Kiln:
    """What every handler gets as kopf's `memo`: settings, the client that writes, where events go.

    main() builds it once; unit tests build one with a recording cluster and event sink.
    """

    settings: OperatorSettings
    cluster: Writer
    post_event: PostEvent = kopf_event
    claims: set[str] = field(default_factory=set)  # namespaces whose cache claim exists (or was made)

    def ensure_cache_claim(self, namespace: str) -> None:
        if self.settings.cache_create and namespace not in self.claims:
            self.cluster.create_if_missing(children.cache_claim(namespace, self.settings))
            self.claims.add(namespace)


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return kopf.login_via_client(**kwargs)  # in-cluster service account, else KUBECONFIG


# -- indexes: what the reconcilers observe (kopf keeps them from watches) ------------------------------
def index_artifacts(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, name): plain(body.get("status") or {})}


def index_by_name(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    """Deployments, Services and Jobs Kiln manages, by namespace and name."""
    return {(namespace, name): plain(body)}


def index_pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, naming.pod_owner(labels)): plain(body)}


def index_corrupt(namespace: str, annotations: kopf.Annotations, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    """Serving pods that stopped because their artifact failed its sha256, by artifact."""
    key = annotations.get(naming.KEY_ANNOTATION)
    report = corruption_report(plain(body)) if key else None
    return {(namespace, naming.artifact_name(key)): report} if key and report else {}


def index_users(namespace: str, name: str, body: kopf.Body, memo: Kiln, **_: Any) -> dict[Any, Any]:
    """TorchModels by the artifacts they use."""
    try:
        model = TorchModel(metadata=plain(body.metadata), spec=plain(body.spec))
    except ValidationError:
        return {}
    return {(namespace, p.artifact): name for p in plan_targets(model, memo.settings) if p.artifact}


# -- TorchModel ------------------------------------------------------------------------------------------
def reconcile_torchmodel(
    body: kopf.Body,
    namespace: str,
    uid: str,
    patch: kopf.Patch,
    memo: Kiln,
    artifacts: kopf.Index[Any, Any],
    deployments: kopf.Index[Any, Any],
    services: kopf.Index[Any, Any],
    pods: kopf.Index[Any, Any],
    **_: Any,
) -> None:
    try:
        model = parse_model(body)
    except ValidationError as exc:
        raise invalid_spec(patch, body, exc, memo.post_event) from exc
    observed = {}
    for planned in plan_targets(model, memo.settings):
        name, gpu = model.metadata["name"], planned.target.gpu
        art = first(artifacts, (namespace, planned.artifact)) if planned.artifact else None
        job = (art or {}).get("job") or (naming.compile_job_name(planned.key) if planned.key else None)
        pod_bodies = list(pods.get((namespace, job), [])) if job else []
        pod_bodies += list(pods.get((namespace, naming.serving_owner(name, gpu)), []))
        observed[gpu] = ObservedTarget(
            artifact=CompiledArtifactStatus.model_validate(art) if art is not None else None,
            deployment=first(deployments, (namespace, naming.child_name(name, gpu))),
            unschedulable=unschedulable(pod_bodies),
        )
    result = reconcile_model(model, observed, uid, memo.settings, now())
    if result.artifacts or result.deployments:
        memo.ensure_cache_claim(namespace)
    for art_body in result.artifacts:
        if first(artifacts, (namespace, art_body["metadata"]["name"])) is None:
            memo.cluster.create_if_missing(art_body)
    for dep in result.deployments:
        memo.cluster.apply(dep, first(deployments, (namespace, dep["metadata"]["name"])))
    for svc in result.services:
        memo.cluster.apply(svc, first(services, (namespace, svc["metadata"]["name"])))
    patch_status(patch, body, result.status)
    for kind, reason, message in result.events:
        memo.post_event(body, kind, reason, message)


# -- CompiledArtifact --------------------------------------------------------------------------------------
def reconcile_compiledartifact(
    body: kopf.Body,
    namespace: str,
    name: str,
    uid: str,
    patch: kopf.Patch,
    memo: Kiln,
    jobs: kopf.Index[Any, Any],
    pods: kopf.Index[Any, Any],
    users: kopf.Index[Any, Any],
    corrupt: kopf.Index[Any, Any],
    **_: Any,
) -> None:
    if body.metadata.get("deletionTimestamp"):
        return
    settings = memo.settings
    art = parse_artifact(body)
    job_name = naming.compile_job_name(art.spec.key, art.status.rebuilds if art.status else 0)
    job = first(jobs, (namespace, job_name))
    result = reconcile_artifact(
        art,
        job,
        list(pods.get((namespace, job_name), [])),
        sorted(set(users.get((namespace, name), []))),
        uid,
        settings,
        now(),
        max(corrupt.get((namespace, name), []), default=None),
    )
    if result.job is not None and first(jobs, (namespace, result.job["metadata"]["name"])) is None:
        memo.ensure_cache_claim(namespace)
        memo.cluster.create_if_missing(result.job)
    patch_status(patch, body, result.status)
    if result.event:
        memo.post_event(body, *result.event)
    if expired(result.status, datetime.now(UTC), settings.artifact_gc_grace_seconds):
        log.info("artifact %s/%s unused for %d s: deleting it", namespace, name, settings.artifact_gc_grace_seconds)
        memo.cluster.delete(API_VERSION, "CompiledArtifact", namespace, name)


def remove_artifact(
    body: kopf.Body,
    namespace: str,
    name: str,
    memo: Kiln,
    users: kopf.Index[Any, Any],
    jobs: kopf.Index[Any, Any],
    **_: Any,
) -> None:
    """The finalizer: refuse while a TorchModel uses it, then remove its cache folder."""
    used = sorted(set(users.get((namespace, name), [])))
    if used:
        raise kopf.TemporaryError(f"still used by TorchModel(s) {used}; delete them first", delay=10)
    key = str(body.spec["key"])
    runtime_image = str(body.spec.get("runtimeImage", memo.settings.runtime_image))
    gc = children.cache_gc_job(key, namespace, runtime_image, memo.settings)
    job = first(jobs, (namespace, gc["metadata"]["name"]))
    if job is None:
        try:
            memo.cluster.create_if_missing(gc)
        except NamespaceTerminating:
            log.info("namespace %s is being deleted: the cache claim goes with it, %s with it", namespace, key)
            return
        raise kopf.TemporaryError("removing the cache folder", delay=2)
    if (job.get("status") or {}).get("succeeded"):
        log.info("removed cache folder of %s", key)
        return
    raise kopf.TemporaryError("waiting for the cache folder removal", delay=2)


def namespaced(handler: Callable[..., Any]) -> Any:
    """`handler` as kopf's protocols accept it: they allow namespace=None (for cluster-scoped kinds),
    and every kind Kiln watches is namespaced, so its handlers take `namespace: str`."""
    return handler


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    """Register every handler and index on `registry`; the timers tick at `settings.resync_seconds`."""
    kopf.on.login(registry=registry)(login)
    kopf.index(GROUP, VERSION, CA, id="artifacts", registry=registry)(namespaced(index_artifacts))
    kopf.index(GROUP, VERSION, TM, id="users", registry=registry)(namespaced(index_users))
    by_name, managed = namespaced(index_by_name), naming.MANAGED_BY
    kopf.index("apps", "v1", "deployments", labels=managed, id="deployments", registry=registry)(by_name)
    kopf.index("v1", "services", labels=managed, id="services", registry=registry)(by_name)
    kopf.index("batch", "v1", "jobs", labels=managed, id="jobs", registry=registry)(by_name)
    kopf.index("v1", "pods", labels=managed, id="pods", registry=registry)(namespaced(index_pods))
    kopf.index("v1", "pods", labels=managed, id="corrupt", registry=registry)(namespaced(index_corrupt))

    model, artifact = namespaced(reconcile_torchmodel), namespaced(reconcile_compiledartifact)
    every, backoff = settings.resync_seconds, 5.0
    kopf.on.create(GROUP, VERSION, TM, id="create", backoff=backoff, registry=registry)(model)
    kopf.on.update(GROUP, VERSION, TM, id="update", backoff=backoff, registry=registry)(model)
    kopf.on.resume(GROUP, VERSION, TM, id="resume", backoff=backoff, registry=registry)(model)
    kopf.timer(GROUP, VERSION, TM, id="resync", interval=every, sharp=False, backoff=backoff, registry=registry)(model)
    kopf.on.create(GROUP, VERSION, CA, id="create", backoff=backoff, registry=registry)(artifact)
    kopf.on.resume(GROUP, VERSION, CA, id="resume", backoff=backoff, registry=registry)(artifact)
    kopf.timer(GROUP, VERSION, CA, id="resync", interval=every, sharp=False, backoff=backoff, registry=registry)(
        artifact
    )
    kopf.on.delete(GROUP, VERSION, CA, id="finalize", backoff=backoff, registry=registry)(namespaced(remove_artifact))


def configure(settings: kopf.OperatorSettings, standalone: bool) -> None:
    """kopf's own settings: progress in annotations (our status schema has no room for kopf's)."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.level = logging.WARNING  # events for problems; our own events mark phases
    settings.peering.name = "kiln"
    settings.peering.mandatory = False
    settings.peering.standalone = standalone  # else one active replica, through kopf's peering objects
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 8
