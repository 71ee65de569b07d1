"""Generate the CRDs in crds/ from the pydantic models in kiln.api.

Operator core (pure). Pydantic's JSON schema is turned into a structural OpenAPI v3
schema: references inlined, optional fields un-nulled, titles dropped, defaults
and descriptions kept, so `kubectl explain` shows the models' documentation.
Run `kiln-crds crds` to rewrite crds/; a test fails on drift.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kiln.api import (
    GROUP,
    VERSION,
    CompiledArtifact,
    CompiledArtifactSpec,
    CompiledArtifactStatus,
    TorchModel,
    TorchModelSpec,
    TorchModelStatus,
)

DROP = {"title", "additionalProperties", "propertyNames", "patternProperties", "$defs"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if len(options) == 1:
            return _structural({**options[0], **rest}, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in DROP or (key == "default" and value is None):
            continue
        if key == "properties":
            out[key] = {name: _property(child, defs, name in node.get("required", [])) for name, child in value.items()}
        else:
            out[key] = _structural(value, defs)
    if node.get("type") == "object" and isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _structural(node["additionalProperties"], defs)
    for pattern, value in node.get("patternProperties", {}).items():
        # Structural schemas have no patternProperties: check the keys with CEL instead.
        out["additionalProperties"] = _structural(value, defs)
        rule = {"rule": f"self.all(k, k.matches('{pattern}'))", "message": f"keys must match {pattern}"}
        out.setdefault("x-kubernetes-validations", []).append(rule)
    return out


def _property(child: dict[str, Any], defs: dict[str, Any], required: bool) -> dict[str, Any]:
    schema: dict[str, Any] = _structural(child, defs)
    # An omitted nested object defaults to its fields' defaults, so the API server fills them in.
    if schema.get("type") == "object" and "properties" in schema and not required and "default" not in schema:
        schema["default"] = {k: v["default"] for k, v in schema["properties"].items() if "default" in v}
    return schema


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="serialization")
    return _structural(raw, raw.get("$defs", {}))  # type: ignore[no-any-return]


def crd(
    kind: str,
    plural: str,
    short: list[str],
    resource: type[BaseModel],
    spec: type[BaseModel],
    status: type[BaseModel],
    columns: list[dict[str, Any]],
) -> dict[str, Any]:
    status_schema = schema_of(status)
    conditions = status_schema["properties"].get("conditions")
    if conditions:
        conditions.update({"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "kiln"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short,
                "categories": ["kiln"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": (resource.__doc__ or kind).strip(),
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": schema_of(spec),
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def generate() -> dict[str, dict[str, Any]]:
    """File name → CRD object."""
    age = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    return {
        "kiln.dev_torchmodels.yaml": crd(
            "TorchModel",
            "torchmodels",
            ["tm"],
            TorchModel,
            TorchModelSpec,
            TorchModelStatus,
            [
                {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
                {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
                {"name": "Targets", "type": "string", "jsonPath": ".spec.targets[*].gpu"},
                {"name": "Mode", "type": "string", "jsonPath": ".spec.compile.mode"},
                {
                    "name": "Message",
                    "type": "string",
                    "priority": 1,
                    "jsonPath": '.status.conditions[?(@.type=="Ready")].message',
                },
                {"name": "URL", "type": "string", "priority": 1, "jsonPath": ".status.url"},
                age,
            ],
        ),
        "kiln.dev_compiledartifacts.yaml": crd(
            "CompiledArtifact",
            "compiledartifacts",
            ["ca", "artifact"],
            CompiledArtifact,
            CompiledArtifactSpec,
            CompiledArtifactStatus,
            [
                {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                {"name": "Target", "type": "string", "jsonPath": ".spec.target"},
                {"name": "Bytes", "type": "integer", "jsonPath": ".status.sizeBytes"},
                {"name": "Compile-s", "type": "number", "jsonPath": ".status.compileSeconds"},
                {"name": "Used-By", "type": "string", "jsonPath": ".status.usedBy"},
                {"name": "Dims", "type": "string", "priority": 1, "jsonPath": ".status.dims"},
                {"name": "Message", "type": "string", "priority": 1, "jsonPath": ".status.message"},
                age,
            ],
        ),
    }


def render(obj: dict[str, Any]) -> str:
    header = "# Generated from common/api.py (kiln.api) by `kiln-crds crds`; do not edit.\n"
    return header + str(yaml.safe_dump(obj, sort_keys=False, width=120))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kiln-crds", description="Write the CRDs generated from kiln.api.")
    parser.add_argument("folder", nargs="?", default="crds", help="where to write them (default: crds)")
    out = Path(parser.parse_args(argv).folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, obj in generate().items():
        (out / name).write_text(render(obj))
        print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
