"""The CRDs in crds/ are exactly what the models generate."""

from __future__ import annotations

from pathlib import Path

from kiln.operator.crd import generate, render

CRDS = Path(__file__).resolve().parents[2] / "crds"


def test_committed_crds_match_the_models() -> None:
    for name, obj in generate().items():
        committed = (CRDS / name).read_text()
        assert committed == render(obj), f"crds/{name} is stale: run kiln-crds crds"


def test_schemas_carry_descriptions_for_kubectl_explain() -> None:
    spec = generate()["kiln.dev_torchmodels.yaml"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    fields = spec["properties"]["spec"]["properties"]
    assert "torch.export.save" in fields["archive"]["properties"]["format"]["description"]
    assert fields["targets"]["x-kubernetes-list-map-keys"] == ["gpu"]
