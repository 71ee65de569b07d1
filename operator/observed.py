"""The Kubernetes fields the operator reads, as TypedDicts: watched objects typed where Kiln looks.

Operator core (pure, standard library only). kopf's indexes hold plain JSON dicts; these name the
fields the reconcile reads from Pods, Jobs and Deployments, so a typo in a field name is a type
error, not a status that never changes. `total=False`: the API server leaves out what is unset.
"""

from __future__ import annotations

from typing import TypedDict


class Meta(TypedDict, total=False):
    name: str
    namespace: str
    generation: int
    labels: dict[str, str]
    annotations: dict[str, str]


class Condition(TypedDict, total=False):
    type: str
    status: str
    reason: str
    message: str


class Terminated(TypedDict, total=False):
    exitCode: int
    reason: str
    message: str
    finishedAt: str


class ContainerState(TypedDict, total=False):
    terminated: Terminated


class ContainerStatus(TypedDict, total=False):
    state: ContainerState
    lastState: ContainerState


class PodStatus(TypedDict, total=False):
    conditions: list[Condition]
    containerStatuses: list[ContainerStatus]


class Pod(TypedDict, total=False):
    metadata: Meta
    status: PodStatus


class JobStatus(TypedDict, total=False):
    conditions: list[Condition]
    succeeded: int
    failed: int


class Job(TypedDict, total=False):
    metadata: Meta
    status: JobStatus


class DeploymentSpec(TypedDict, total=False):
    replicas: int


class DeploymentStatus(TypedDict, total=False):
    observedGeneration: int
    replicas: int
    readyReplicas: int
    updatedReplicas: int
    availableReplicas: int


class Deployment(TypedDict, total=False):
    metadata: Meta
    spec: DeploymentSpec
    status: DeploymentStatus
