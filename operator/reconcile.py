"""The reconcile loop's pure part: observed state in, desired children and status out.

Operator core (pure): no kopf, no kubernetes client. Handlers turn kopf's indexes into
`ObservedTarget`s (and a Job with its pods), call `reconcile_model` / `reconcile_artifact`,
and apply the result. Running either twice on the same input gives the same output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from kiln.api import (
    ArtifactPhase,
    CompiledArtifact,
    CompiledArtifactStatus,
    Condition,
    ModelPhase,
    Target,
    TargetPhase,
    TargetStatus,
    TorchModel,
    TorchModelStatus,
    needs_artifact,
)
from kiln.contracts import CompileSummary
from kiln.keys import cache_key
from kiln.manifest import CORRUPT_REASON
from kiln.operator import children, naming
from kiln.operator.observed import (
    ContainerState,
    Deployment,
    DeploymentSpec,
    DeploymentStatus,
    Job,
    JobStatus,
    Meta,
    Pod,
    PodStatus,
    Terminated,
)
from kiln.operator.settings import OperatorSettings

# Condition reasons (CamelCase constants).
ARTIFACTS_READY, AVAILABLE, PROGRESSING, DEGRADED, READY = (
    "ArtifactsReady",
    "Available",
    "Progressing",
    "Degraded",
    "Ready",
)
# What a CompiledArtifact's status copies from kiln-compile's summary.
SUMMARY_IN_STATUS = {"path", "size_bytes", "sha256", "compile_seconds", "torch_version", "dims"}


def archive_identity(model: TorchModel) -> str:
    """The archive's part of the key: its sha256 when given, else its URI (documented)."""
    archive = model.spec.archive
    return archive.sha256 or f"uri:{archive.uri}"


@dataclass(frozen=True)
class PlannedTarget:
    target: Target
    key: str | None  # None when nothing is compiled (jit, eager)

    @property
    def artifact(self) -> str | None:
        return naming.artifact_name(self.key) if self.key else None


def plan_targets(model: TorchModel, settings: OperatorSettings) -> list[PlannedTarget]:
    built = needs_artifact(model.spec.archive, model.spec.compile)
    digest = archive_identity(model)
    return [
        PlannedTarget(t, cache_key(digest, model.spec.compile, t.gpu, settings.runtime_image) if built else None)
        for t in model.spec.targets
    ]


@dataclass
class ObservedTarget:
    """What the cluster holds for one target."""

    artifact: CompiledArtifactStatus | None = None
    deployment: Deployment | None = None
    unschedulable: str | None = None  # the scheduler's message for a pod of this target


@dataclass
class ModelResult:
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    deployments: list[dict[str, Any]] = field(default_factory=list)
    services: list[dict[str, Any]] = field(default_factory=list)
    status: TorchModelStatus = field(default_factory=TorchModelStatus)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)


def serving_key(planned: PlannedTarget, observed: ObservedTarget) -> tuple[bool, str | None]:
    """(deploy?, key): the new key once its artifact is Ready, else whatever the pods run now."""
    if planned.key is None:
        return True, None
    if observed.artifact is not None and observed.artifact.phase == ArtifactPhase.ready:
        return True, planned.key
    deployment = observed.deployment or Deployment()
    current = deployment.get("metadata", Meta()).get("annotations", {}).get(naming.KEY_ANNOTATION)
    return (current is not None), current


def _replicas(deployment: Deployment | None) -> tuple[int, int, bool]:
    """(replicas, ready, rolled out) of a Deployment as its controller reports them."""
    if not deployment:
        return 0, 0, False
    status = deployment.get("status", DeploymentStatus())
    spec_replicas = deployment.get("spec", DeploymentSpec()).get("replicas", 0)
    done = (
        status.get("observedGeneration", 0) >= deployment.get("metadata", Meta()).get("generation", 0)
        and status.get("updatedReplicas", 0) == spec_replicas
        and status.get("replicas", 0) == spec_replicas
        and status.get("availableReplicas", 0) == spec_replicas
    )
    return status.get("replicas", 0), status.get("readyReplicas", 0), done


def _target_status(
    model: TorchModel, planned: PlannedTarget, observed: ObservedTarget, key: str | None, settings: OperatorSettings
) -> TargetStatus:
    if planned.key is None:
        phase, message = (
            TargetPhase.not_needed,
            f"mode {model.spec.compile.mode.value}: pods load the program themselves",
        )
    elif observed.artifact is None:
        phase, message = TargetPhase.pending, "artifact requested"
    else:
        phase = TargetPhase(observed.artifact.phase.value)
        message = observed.artifact.message or "artifact requested"
    if observed.unschedulable:
        message = f"no node can run this target: {observed.unschedulable}"
    replicas, ready, _ = _replicas(observed.deployment)
    return TargetStatus(
        gpu=planned.target.gpu,
        key=planned.key,
        artifact=planned.artifact,
        phase=phase,
        serving_key=key,
        replicas=replicas,
        ready_replicas=ready,
        url=children.model_url(model, planned.target, settings),
        message=message,
    )


def _condition(
    kind: str, ok: bool, reason: str, message: str, now: str, generation: int | None, previous: list[Condition]
) -> Condition:
    status = "True" if ok else "False"
    old = next((c for c in previous if c.type == kind), None)
    moved = old is None or old.status != status
    return Condition(
        type=kind,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=now if moved or old is None else old.last_transition_time,
        observed_generation=generation,
    )


def _conditions(model: TorchModel, targets: list[TargetStatus], rolled: list[bool], now: str) -> list[Condition]:
    previous = model.status.conditions if model.status else []
    gen = model.metadata.get("generation")
    needs = [t for t in targets if t.phase != TargetPhase.not_needed]
    failed = [t for t in needs if t.phase == TargetPhase.failed]
    stuck = [t for t in targets if t.message.startswith("no node can run")]
    compiling = [t for t in needs if t.phase not in (TargetPhase.ready, TargetPhase.failed)]
    wanted = sum(t.replicas for t in model.spec.targets)
    available = all(s.ready_replicas >= t.replicas for s, t in zip(targets, model.spec.targets, strict=True))
    progressing = bool(compiling) or not all(rolled)

    def describe(items: list[TargetStatus]) -> str:
        return "; ".join(f"{t.gpu}: {t.message}" for t in items)

    artifacts_ok = not failed and not compiling
    art = _condition(
        ARTIFACTS_READY,
        artifacts_ok,
        "Compiled" if artifacts_ok else ("CompileFailed" if failed else "Compiling"),
        describe(failed or compiling) or "every target's artifact is ready",
        now,
        gen,
        previous,
    )
    avail = _condition(
        AVAILABLE,
        available,
        "ReplicasReady" if available else "ReplicasNotReady",
        f"{sum(t.ready_replicas for t in targets)}/{wanted} replicas ready",
        now,
        gen,
        previous,
    )
    prog = _condition(
        PROGRESSING,
        progressing,
        "Compiling" if compiling else ("RollingOut" if progressing else "Complete"),
        describe(compiling) or ("rolling out" if progressing else "up to date"),
        now,
        gen,
        previous,
    )
    degraded_msg = describe(failed + stuck)
    deg = _condition(
        DEGRADED,
        bool(failed or stuck),
        "CompileFailed" if failed else ("Unschedulable" if stuck else "AsExpected"),
        degraded_msg,
        now,
        gen,
        previous,
    )
    ready_ok = artifacts_ok and available and not progressing and not (failed or stuck)
    ready_reason = (
        "Ready"
        if ready_ok
        else (deg.reason if deg.status == "True" else (prog.reason if progressing else avail.reason))
    )
    ready_msg = (
        "serving" if ready_ok else (degraded_msg or prog.message if (failed or stuck or progressing) else avail.message)
    )
    ready = _condition(READY, ready_ok, ready_reason, ready_msg, now, gen, previous)
    return [ready, art, avail, prog, deg]


def _phase(conditions: list[Condition]) -> ModelPhase:
    by = {c.type: c for c in conditions}
    if by[READY].status == "True":
        return ModelPhase.ready
    if by[DEGRADED].status == "True":
        return ModelPhase.failed if by[DEGRADED].reason == "CompileFailed" else ModelPhase.degraded
    if by[ARTIFACTS_READY].status != "True":
        return ModelPhase.compiling
    return ModelPhase.progressing


def reconcile_model(
    model: TorchModel, observed: dict[str, ObservedTarget], uid: str, settings: OperatorSettings, now: str
) -> ModelResult:
    """Desired children and status of a TorchModel, from what the cluster holds."""
    result = ModelResult()
    ns = model.metadata["namespace"]
    targets, rolled = [], []
    previous = {t.gpu: t for t in (model.status.targets if model.status else [])}
    for planned in plan_targets(model, settings):
        obs = observed.get(planned.target.gpu, ObservedTarget())
        if planned.key is not None:
            result.artifacts.append(children.artifact(ns, planned.key, model, planned.target, settings))
        deploy, key = serving_key(planned, obs)
        if deploy:
            result.deployments.append(children.deployment(model, planned.target, key, uid, settings))
            result.services.append(children.service(model, planned.target, uid, settings))
        status = _target_status(model, planned, obs, key, settings)
        # A Deployment that serves an older key, or none yet, is still rolling out.
        rolled.append(_replicas(obs.deployment)[2] and (planned.key is None or key == planned.key))
        targets.append(status)
        old = previous.get(status.gpu)
        if old is None or old.phase != status.phase:
            kind = "Warning" if status.phase == TargetPhase.failed else "Normal"
            result.events.append((kind, f"Artifact{status.phase}", f"{status.gpu}: {status.message or status.phase}"))
    conditions = _conditions(model, targets, rolled, now)
    result.status = TorchModelStatus(
        observed_generation=model.metadata.get("generation"),
        phase=_phase(conditions),
        replicas=sum(t.replicas for t in targets),
        ready_replicas=sum(t.ready_replicas for t in targets),
        url=targets[0].url if targets else None,
        targets=targets,
        conditions=conditions,
    )
    return result


# --- CompiledArtifact -------------------------------------------------------------------------------


def _terminated(pod: Pod) -> Terminated | None:
    for status in pod.get("status", PodStatus()).get("containerStatuses", []):
        state = status.get("state", ContainerState()).get("terminated") or status.get(
            "lastState", ContainerState()
        ).get("terminated")
        if state:
            return state
    return None


def job_failure(job: Job, pods: list[Pod]) -> str | None:
    """The reason a compile Job failed: the last pod's termination message, else the Job's condition."""
    conditions = {c.get("type"): c for c in job.get("status", JobStatus()).get("conditions", [])}
    failed = conditions.get("Failed")
    if not failed or failed.get("status") != "True":
        return None
    messages = [(_terminated(p) or Terminated()).get("message", "").strip() for p in pods]
    messages = [m for m in messages if m]
    if messages:
        return messages[-1].splitlines()[-1][:1000]
    return f"{failed.get('reason', 'Failed')}: {failed.get('message', 'compile job failed')}"


def job_success(pods: list[Pod]) -> CompileSummary | str | None:
    """The summary kiln-compile left in the termination log of a pod that succeeded, None before
    one has; a string saying why when that log cannot be read (e.g. a runtime image of another version).
    """
    for pod in pods:
        state = _terminated(pod)
        if state and state.get("exitCode") == 0:
            try:
                return CompileSummary.model_validate_json(state.get("message") or "")
            except ValidationError as exc:
                return f"compiled, but its summary in the termination log is unreadable: {exc.errors()[0]['msg']}"
    return None


def unschedulable(pods: list[Pod]) -> str | None:
    for pod in pods:
        for cond in pod.get("status", PodStatus()).get("conditions", []):
            if cond.get("type") == "PodScheduled" and cond.get("reason") == "Unschedulable":
                return cond.get("message", "unschedulable")
    return None


@dataclass
class ArtifactResult:
    job: dict[str, Any] | None
    status: CompiledArtifactStatus
    event: tuple[str, str, str] | None = None


def corruption_report(pod: Pod) -> tuple[str, str] | None:
    """(finishedAt, message) when a serving pod's container stopped because its artifact failed sha256."""
    state = _terminated(pod)
    message = (state or Terminated()).get("message", "")
    if state is None or not message.startswith(CORRUPT_REASON):
        return None
    return state.get("finishedAt", ""), message.splitlines()[0][:300]


def rebuild_for_corruption(
    status: CompiledArtifactStatus, report: tuple[str, str] | None, max_rebuilds: int
) -> CompiledArtifactStatus:
    """A Ready artifact that a serving pod found corrupt after it was published is compiled again.

    Only reports newer than the artifact's readyAt count: pods that crashed on the old copy
    keep that message in lastState after the rebuild, and must not trigger another one.
    """
    if status.phase != ArtifactPhase.ready or report is None or not report[0] > (status.ready_at or ""):
        return status
    seen, message = report
    if status.rebuilds >= max_rebuilds:
        return status.model_copy(
            update={
                "phase": ArtifactPhase.failed,
                "message": f"corrupt again after {status.rebuilds} rebuilds, check the cache volume: {message}",
            }
        )
    return status.model_copy(
        update={
            "phase": ArtifactPhase.compiling,
            "rebuilds": status.rebuilds + 1,
            "message": f"compiling again: a serving pod found the cached artifact corrupt at {seen} ({message})",
        }
    )


def reconcile_artifact(
    art: CompiledArtifact,
    job: Job | None,
    pods: list[Pod],
    used_by: list[str],
    uid: str,
    settings: OperatorSettings,
    now: str,
    corrupt: tuple[str, str] | None = None,
) -> ArtifactResult:
    """Ensure one compile Job per key (and rebuild) until the artifact is Ready or Failed; derive its status.

    `job` and `pods` are those of the Job named for the current rebuild (`compile_job_name`);
    `corrupt` is the newest corruption report of a serving pod of this key.
    """
    old = art.status or CompiledArtifactStatus(used_by=[])
    status = old.model_copy(
        update={"used_by": sorted(used_by), "unused_since": None if used_by else (old.unused_since or now)}
    )
    status = rebuild_for_corruption(status, corrupt, settings.max_rebuilds)
    if status.rebuilds != old.rebuilds:  # the Job and pods given were those of the previous build
        job, pods = None, []
    want_job: dict[str, Any] | None = None
    if status.phase not in (ArtifactPhase.ready, ArtifactPhase.failed):
        want_job = children.compile_job(art, art.metadata["namespace"], uid, settings, status.rebuilds)
        name = want_job["metadata"]["name"]
        summary = job_success(pods) if job else None
        failure = job_failure(job, pods) if job else None
        if summary is not None and (job or Job()).get("status", JobStatus()).get("succeeded"):
            read = {} if isinstance(summary, str) else summary.model_dump(include=SUMMARY_IN_STATUS)
            status = status.model_copy(
                update={
                    **read,
                    "phase": ArtifactPhase.ready,
                    "ready_at": now,
                    "job": name,
                    "message": summary if isinstance(summary, str) else summary.note or "compiled",
                }
            )
        elif failure is not None:
            status = status.model_copy(update={"phase": ArtifactPhase.failed, "job": name, "message": failure})
        else:
            waiting = unschedulable(pods)
            message = f"waiting for a node: {waiting}" if waiting else ("compiling" if pods else "compile job created")
            if status.rebuilds:
                message += f" (rebuild {status.rebuilds}: a serving pod found the cached artifact corrupt)"
            status = status.model_copy(update={"phase": ArtifactPhase.compiling, "job": name, "message": message})
    event = None
    if status.phase != old.phase:
        kind = "Warning" if status.phase == ArtifactPhase.failed else "Normal"
        event = (kind, status.phase.value, status.message)
    return ArtifactResult(want_job, status, event)


def expired(status: CompiledArtifactStatus, now: datetime, grace_seconds: int) -> bool:
    """True when no TorchModel has used the artifact for longer than the grace period."""
    if status.used_by or not status.unused_since:
        return False
    since = datetime.fromisoformat(status.unused_since.replace("Z", "+00:00"))
    return (now - since).total_seconds() >= grace_seconds
