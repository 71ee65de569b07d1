"""A corpus of malformed and hostile TorchModels against the real API server and operator.

Each is rejected by the API server with a message naming what is wrong, or accepted and
reported in status; the operator keeps running and keeps reconciling throughout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.kube import Kube, Operator
from tests.support.torchmodels import status, torchmodel, wait_phase

pytestmark = pytest.mark.cluster

CORPUS = yaml.safe_load((Path(__file__).parent / "hostile_torchmodels.yaml").read_text())
# Placeholders for values too long to write in the corpus.
FILLERS: dict[str, Any] = {
    "LONG_URI": "https://models.example.com/" + "a" * 2100,
    "LONG_VALUE": "1" * 65,
    "LONG_GPU": "G" * 64,
    "MANY_OPTIONS": {f"opt{i}": "1" for i in range(17)},
    "MANY_TARGETS": [{"gpu": f"gpu-{i}"} for i in range(17)],
}


def fill(value: Any, mlp: Path) -> Any:
    if isinstance(value, dict):
        return {k: fill(v, mlp) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, mlp) for v in value]
    if isinstance(value, str):
        return FILLERS.get(value, value.replace("MLP_ARCHIVE", str(mlp)))
    return value


def manifest(entry: dict[str, Any], name: str, mlp: Path) -> str:
    if "manifest" in entry:
        return json.dumps(fill(entry["manifest"], mlp))
    spec = {"archive": {"uri": "file:///m.pt2"}, "targets": [{"gpu": "cpu"}]} | fill(entry["spec"], mlp)
    spec = {k: v for k, v in spec.items() if v is not None}
    body = {"apiVersion": "kiln.dev/v1alpha1", "kind": "TorchModel", "metadata": {"name": name}, "spec": spec}
    return json.dumps(body)


def words(value: Any) -> str:
    """Every string in a status, space-joined (quotes unescaped, unlike its JSON)."""
    if isinstance(value, dict):
        return " ".join(words(v) for v in value.values())
    if isinstance(value, list):
        return " ".join(words(v) for v in value)
    return str(value)


def test_the_corpus_holds_at_least_forty_manifests() -> None:
    assert len(CORPUS["rejected"]) + len(CORPUS["status"]) >= 40


def test_every_hostile_manifest_is_rejected_or_reported_and_the_operator_survives(
    fkube: Kube, fault_operator: Operator, mlp_archive: Path, record: Any
) -> None:
    starts = fault_operator.starts
    wrong = []
    for i, entry in enumerate(CORPUS["rejected"]):
        result = fkube.apply(manifest(entry, f"bad-{i}", mlp_archive))
        if result.returncode == 0 or entry["says"] not in result.stderr:
            wrong.append(f"{entry['why']}: rc {result.returncode}, said {result.stderr.strip()[-300:]!r}")
    assert not wrong, "\n".join(wrong)
    for i, entry in enumerate(CORPUS["status"]):
        result = fkube.apply(manifest(entry, f"odd-{i}", mlp_archive))
        assert result.returncode == 0, f"{entry['why']}: {result.stderr}"
    for i, entry in enumerate(CORPUS["status"]):
        fkube.wait_for(
            lambda i=i, entry=entry: entry["says"] in words(status(fkube, f"odd-{i}")),
            300,
            every=1,
            message=f"{entry['why']}: status says {entry['says']!r} (now {status(fkube, f'odd-{i}')})",
        )
    # Still alive and still working: a good model next to them compiles and serves.
    assert fault_operator.proc is not None and fault_operator.proc.poll() is None
    assert fault_operator.starts == starts
    fkube.apply(torchmodel("good", f"file://{mlp_archive}"))
    wait_phase(fkube, "good", "Ready", timeout=600)
    total = len(CORPUS["rejected"]) + len(CORPUS["status"])
    record(
        "malformed and hostile TorchModels: wrong types, huge counts, unknown fields, traversal, "
        "credentials and forbidden schemes in URIs, unreachable or wrong archives",
        total,
        f"nothing: {len(CORPUS['rejected'])} rejected by the API server naming the field, "
        f"{len(CORPUS['status'])} reported in status; the operator never restarted and still serves a good model",
    )
