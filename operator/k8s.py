"""Client I/O of the operator: create, server-side apply and delete, through one dynamic client.

Operator I/O: the only operator module that talks to the API server directly (kopf posts
status patches and events for the handlers). Handlers see it as a `Writer`, which unit
tests replace with a recording one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from functools import cache
from typing import Any, Protocol

from kubernetes import client, config
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ConflictError, ForbiddenError, NotFoundError
from kubernetes.dynamic.resource import Resource

log = logging.getLogger("kiln.operator.k8s")
FIELD_MANAGER = "kiln-operator"


def plain(value: Any) -> Any:
    """A JSON-ready copy of kopf's body views."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def contains(actual: Any, desired: Any) -> bool:
    """True when every field of `desired` is already so in `actual` (server defaults may add more)."""
    if desired in ({}, []):
        return actual in (None, {}, [])  # the API server drops empty maps and lists
    if isinstance(desired, dict):
        return isinstance(actual, dict) and all(contains(actual.get(k), v) for k, v in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(desired)
            and all(contains(a, d) for a, d in zip(actual, desired, strict=True))
        )
    return bool(actual == desired)


class NamespaceTerminating(Exception):
    """The namespace is being deleted: nothing new may be created in it, and it needs nothing new."""


class Writer(Protocol):
    """What handlers change in the cluster (kopf patches status and posts events itself)."""

    def create_if_missing(self, obj: dict[str, Any]) -> bool: ...
    def apply(self, obj: dict[str, Any], current: Mapping[str, Any] | None) -> bool: ...
    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None: ...


class Cluster:
    """The Writer of a running operator: one dynamic client, in-cluster config else KUBECONFIG."""

    def __init__(self) -> None:
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config()  # type: ignore[no-untyped-call]
        self.dyn = DynamicClient(client.ApiClient())  # type: ignore[no-untyped-call]

    @cache  # noqa: B019 - one client per process; discovery is worth keeping
    def resource(self, api_version: str, kind: str) -> Resource:
        found: Resource = self.dyn.resources.get(api_version=api_version, kind=kind)
        return found

    def _of(self, obj: Mapping[str, Any]) -> tuple[Resource, str, str]:
        meta = obj["metadata"]
        return self.resource(obj["apiVersion"], obj["kind"]), meta["name"], meta.get("namespace", "")

    def create_if_missing(self, obj: dict[str, Any]) -> bool:
        """Create `obj`; False when it exists already (someone, maybe our earlier self, made it)."""
        resource, name, ns = self._of(obj)
        try:
            resource.create(body=obj, namespace=ns or None)
            log.info("created %s %s/%s", obj["kind"], ns, name)
            return True
        except ConflictError:
            return False
        except ForbiddenError as exc:
            if "because it is being terminated" in str(getattr(exc, "body", "") or exc):
                raise NamespaceTerminating(ns) from exc
            raise

    def apply(self, obj: dict[str, Any], current: Mapping[str, Any] | None) -> bool:
        """Server-side apply unless `current` already holds every desired field."""
        if current is not None and contains(plain(current), obj):
            return False
        resource, name, ns = self._of(obj)
        resource.server_side_apply(
            body=obj, name=name, namespace=ns or None, field_manager=FIELD_MANAGER, force_conflicts=True
        )
        log.info("applied %s %s/%s", obj["kind"], ns, name)
        return True

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        with contextlib.suppress(NotFoundError):
            self.resource(api_version, kind).delete(
                name=name, namespace=namespace, body={"propagationPolicy": "Background"}
            )
