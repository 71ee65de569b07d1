"""Names and labels of Kiln's children, derived from keys and model names.

Core layer (pure). Derived names make handlers idempotent: the same key always
maps to the same CompiledArtifact and compile Job, whoever creates them first.
"""

from __future__ import annotations

import hashlib
import re

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
