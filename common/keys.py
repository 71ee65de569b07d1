"""Cache keys: one compiled artifact per (archive, compile settings, target, runtime image).

Shared core (no torch). The key is a sha256 over canonical JSON, so it is the
same in every process and changes when any input changes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kiln.api import CompileSpec, json_ready

# 2: artifacts keep every dynamic dimension the archive declares (1 fixed all but batch).
KEY_SCHEMA = 2


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal inputs give equal bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def compile_identity(compile_spec: CompileSpec) -> dict[str, Any]:
    """The compile settings that decide the artifact: all but `jit`, which only replicas read."""
    return {k: v for k, v in json_ready(compile_spec).items() if k != "jit"}


def key_inputs(archive_digest: str, compile_spec: CompileSpec, target: str, runtime_image: str) -> dict[str, Any]:
    """Everything that decides the compiled code, in the form that is hashed."""
    return {
        "schema": KEY_SCHEMA,
        "archive": archive_digest,
        "compile": compile_identity(compile_spec),
        "target": target,
        "runtimeImage": runtime_image,
    }


def cache_key(archive_digest: str, compile_spec: CompileSpec, target: str, runtime_image: str) -> str:
    """Hex sha256 naming the artifact folder `<cache>/<key>/`."""
    blob = canonical_json(key_inputs(archive_digest, compile_spec, target, runtime_image))
    return hashlib.sha256(blob.encode()).hexdigest()


def short_key(key: str) -> str:
    """First 16 hex digits: enough to be unique in a cluster, short enough for object names."""
    return key[:16]
