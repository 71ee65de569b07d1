"""Names and labels of Kiln's children, derived from keys and model names.

Operator core (pure). Derived names make handlers idempotent: the same key always
maps to the same CompiledArtifact and compile Job, whoever creates them first. The label
scheme (what selects a target's pods, how the pod index files them) is spelled out only here.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

from kiln.keys import short_key

MANAGED_BY = {"app.kubernetes.io/managed-by": "kiln"}
MODEL_LABEL = "kiln.dev/model"
TARGET_LABEL = "kiln.dev/target"
KEY_LABEL = "kiln.dev/key"
KEY_ANNOTATION = "kiln.dev/key"


def artifact_name(key: str) -> str:
    return f"art-{short_key(key)}"


def compile_job_name(key: str, rebuild: int = 0) -> str:
    """The compile Job of a key; a rebuild after corruption gets its own, equally derived name."""
    return f"compile-{short_key(key)}" + (f"-r{rebuild}" if rebuild else "")


def gc_job_name(key: str) -> str:
    return f"cache-gc-{short_key(key)}"


def slug(value: str) -> str:
    """A DNS-label-safe form of a GPU product name (NVIDIA-H100-80GB-HBM3 → nvidia-h100-80gb-hbm3)."""
    return re.sub(r"[^a-z0-9-]+", "-", value.lower()).strip("-") or "x"


def child_name(model: str, gpu: str) -> str:
    """Deployment and Service name of one target: a DNS-1035 label of at most 63 characters."""
    base = f"{model}-{slug(gpu)}"
    if not base[0].isalpha():
        base = "m-" + base
    if len(base) > 63:
        digest = hashlib.sha256(base.encode()).hexdigest()[:8]
        base = f"{base[:54].rstrip('-')}-{digest}"
    return base


def label_value(value: str) -> str:
    """Label values are at most 63 characters."""
    if len(value) <= 63:
        return value
    return value[:54].rstrip("-._") + "-" + hashlib.sha256(value.encode()).hexdigest()[:8]


# -- labels: the one place the scheme is spelled out ---------------------------------------------
def serving_selector(model: str, gpu: str) -> dict[str, str]:
    """The labels that select one target's serving pods (Deployment selector and Service)."""
    return {MODEL_LABEL: label_value(model), TARGET_LABEL: slug(gpu)[:63]}


def serving_labels(model: str, gpu: str) -> dict[str, str]:
    return {
        **MANAGED_BY,
        "app.kubernetes.io/name": "kiln-serve",
        "app.kubernetes.io/instance": label_value(model),
        **serving_selector(model, gpu),
    }


def instance_labels(model: str) -> dict[str, str]:
    """Labels of a model's Services."""
    return {**MANAGED_BY, "app.kubernetes.io/instance": label_value(model)}


def artifact_labels(key: str, gpu: str) -> dict[str, str]:
    return {**MANAGED_BY, KEY_LABEL: key[:63], TARGET_LABEL: slug(gpu)[:63]}


def compile_labels(key: str) -> dict[str, str]:
    return {**MANAGED_BY, "app.kubernetes.io/name": "kiln-compile", KEY_LABEL: key[:63]}


def serving_owner(model: str, gpu: str) -> str:
    """How the pod index files one target's serving pods."""
    selector = serving_selector(model, gpu)
    return f"{selector[MODEL_LABEL]}/{selector[TARGET_LABEL]}"


def pod_owner(labels: Mapping[str, str]) -> str:
    """How the pod index files a managed pod: its compile Job's name, else `serving_owner`."""
    job = labels.get("job-name") or labels.get("batch.kubernetes.io/job-name")
    return job or f"{labels.get(MODEL_LABEL)}/{labels.get(TARGET_LABEL)}"
