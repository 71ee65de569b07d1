"""Model bundles: the files of a module-and-weights, TorchScript or TorchServe .mar archive, and their kiln.yaml.

Compile path (no torch). Finds model.py, the weights and kiln.yaml in an unpacked
archive (Triton's layout, or a TorchServe MANIFEST.json) and parses kiln.yaml, which
names the input tensors: torch.export and TorchScript need example inputs that
neither a state dict nor a .mar records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic import ValidationError as SchemaError

from kiln.api import DynamicBatch
from kiln.manifest import BATCH, DimRange, Signature, TensorSpec
from kiln.runtime.errors import ArchiveError

CONFIG_NAME = "kiln.yaml"
MODULE_NAME = "model.py"
WEIGHT_NAMES = ("model.pt", "model.pth")
MAR_MANIFEST = "MAR-INF/MANIFEST.json"
# kiln.yaml may use torch's dtype names as well as the protocol's datatypes.
DTYPE_ALIASES = {
    "float32": "FP32",
    "float": "FP32",
    "float16": "FP16",
    "half": "FP16",
    "bfloat16": "BF16",
    "float64": "FP64",
    "double": "FP64",
    "int64": "INT64",
    "long": "INT64",
    "int32": "INT32",
    "int": "INT32",
    "int16": "INT16",
    "int8": "INT8",
    "uint8": "UINT8",
    "bool": "BOOL",
}
DATATYPES = {"FP32", "FP16", "BF16", "FP64", "INT64", "INT32", "INT16", "INT8", "UINT8", "BOOL"}


NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
# A dimension marked -1 anywhere but the batch, with no range of its own, accepts these sizes.
DEFAULT_DIM_RANGE = DimRange(min=1, max=4096)


class DimDecl(BaseModel):
    """A named dynamic dimension: inputs that use one name agree in size."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
    min: Annotated[int, Field(ge=1)] = DEFAULT_DIM_RANGE.min
    max: Annotated[int, Field(ge=1, le=1 << 20)] = DEFAULT_DIM_RANGE.max

    @model_validator(mode="after")
    def _ordered(self) -> DimDecl:
        if self.min > self.max:
            raise ValueError(f"dimension {self.name!r}: min {self.min} exceeds max {self.max}")
        return self


class InputDecl(BaseModel):
    """One input tensor: a positive size per static dimension, -1 for the batch (and any dimension
    free in DEFAULT_DIM_RANGE), or `{name, min, max}` for a named dynamic dimension."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
    datatype: Annotated[str, Field(alias="dtype")]
    shape: Annotated[list[int | DimDecl], Field(min_length=1, max_length=8)]

    @field_validator("datatype")
    @classmethod
    def _datatype(cls, value: str) -> str:
        name = DTYPE_ALIASES.get(value.lower(), value.upper())
        if name not in DATATYPES:
            raise ValueError(f"unknown dtype {value!r}; use one of {sorted(DATATYPES)} or torch names like float32")
        return name

    @field_validator("shape")
    @classmethod
    def _shape(cls, value: list[int | DimDecl]) -> list[int | DimDecl]:
        if any(isinstance(d, int) and d < 1 and d != -1 for d in value):
            raise ValueError(f"shape {value} must hold positive sizes, -1 or {{name, min, max}}")
        return value


class BundleConfig(BaseModel):
    """kiln.yaml: what Kiln needs to know that the model's files do not say."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    inputs: Annotated[list[InputDecl], Field(min_length=1, max_length=64)]
    class_name: Annotated[
        str | None, Field(alias="class", description="The nn.Module subclass when model.py defines several.")
    ] = None
    kwargs: Annotated[
        dict[str, bool | int | float | str], Field(description="Constructor arguments of the module class.")
    ] = Field(default_factory=dict)
    outputs: Annotated[
        list[Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]],
        Field(description="Output names, in the order the model returns them (default: the model's, or outputN)."),
    ] = Field(default_factory=list)

    def signature(self, batch: DynamicBatch) -> Signature:
        """The inputs as declared, dimension `batch.dim` the batch in [batch.min, batch.max]; no outputs yet."""
        dims: dict[str, DimRange] = {BATCH: DimRange(min=batch.min, max=batch.max)}
        inputs = []
        for decl in self.inputs:
            if len(decl.shape) <= batch.dim or decl.shape[batch.dim] != -1:
                raise ArchiveError(
                    f"{CONFIG_NAME}: input {decl.name!r} has shape {_plain(decl.shape)}, but compile.dynamicBatch.dim "
                    f"is {batch.dim}: mark dimension {batch.dim} -1 (the batch), or change dynamicBatch.dim"
                )
            names: list[str | None] = []
            for index, entry in enumerate(decl.shape):
                if isinstance(entry, DimDecl):
                    rng = DimRange(min=entry.min, max=entry.max)
                    if dims.setdefault(entry.name, rng) != rng or entry.name == BATCH:
                        raise ArchiveError(
                            f"{CONFIG_NAME}: dimension {entry.name!r} is declared twice with different ranges "
                            f"(or is named {BATCH!r}, which dynamicBatch sets): give it one range"
                        )
                    names.append(entry.name)
                elif entry == -1:
                    names.append(BATCH if index == batch.dim else f"{decl.name}.{index}")
                    dims.setdefault(names[-1], DEFAULT_DIM_RANGE)
                else:
                    names.append(None)
            shape = [-1 if n else int(e) for e, n in zip(decl.shape, names, strict=True)]  # type: ignore[arg-type]
            inputs.append(TensorSpec(name=decl.name, datatype=decl.datatype, shape=shape, dims=names))
        return Signature(inputs=inputs, outputs=[], dims=dims)


def _plain(shape: list[int | DimDecl]) -> list[int | str]:
    return [e if isinstance(e, int) else e.name for e in shape]


def parse_config(text: str | None) -> BundleConfig:
    """kiln.yaml's content (None or empty: the archive has none)."""
    if not text:
        raise ArchiveError(
            f"the archive has no {CONFIG_NAME}: add one naming the inputs, e.g. "
            "'inputs: [{name: x, dtype: float32, shape: [-1, 16]}]' (-1 marks the batch dimension)"
        )
    try:
        return BundleConfig.model_validate(yaml.safe_load(text) or {})
    except yaml.YAMLError as exc:
        raise ArchiveError(f"{CONFIG_NAME} is not valid YAML: {exc}") from exc
    except SchemaError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ArchiveError(f"{CONFIG_NAME} at {where}: {first['msg']}") from exc


def read_config(path: Path) -> BundleConfig:
    return parse_config(path.read_text() if path.is_file() else None)


@dataclass(frozen=True)
class ModuleBundle:
    """model.py, its optional state dict, and kiln.yaml."""

    module: Path
    weights: Path | None
    config: BundleConfig


def _root(folder: Path) -> Path:
    """The folder holding the files: archives often wrap everything in one top folder."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return folder


def _inside(root: Path, name: str, what: str) -> Path:
    path = (root / name).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ArchiveError(f"{what} {name!r} points outside the archive")
    if not path.is_file():
        raise ArchiveError(f"{what} {name!r} is not in the archive")
    return path


def module_bundle(folder: Path) -> ModuleBundle:
    """Triton's layout: model.py (one nn.Module subclass), model.pt (state dict, optional), kiln.yaml."""
    root = _root(folder)
    module = root / MODULE_NAME
    if not module.is_file():
        found = sorted(p.name for p in root.iterdir())
        raise ArchiveError(f"module-and-weights archive has no {MODULE_NAME} at its top (found {found})")
    weights = next((root / n for n in WEIGHT_NAMES if (root / n).is_file()), None)
    return ModuleBundle(module, weights, read_config(root / CONFIG_NAME))


class MarModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    model_name: Annotated[str, Field(alias="modelName")] = ""
    serialized_file: Annotated[str | None, Field(alias="serializedFile")] = None
    model_file: Annotated[str | None, Field(alias="modelFile")] = None
    handler: str | None = None


class MarManifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: MarModel


def mar_bundle(folder: Path) -> ModuleBundle:
    """A TorchServe .mar of an eager model: its MANIFEST names model.py and the state dict."""
    manifest_path = folder / MAR_MANIFEST
    if not manifest_path.is_file():
        raise ArchiveError(f"not a TorchServe .mar: {MAR_MANIFEST} is missing")
    try:
        manifest = MarManifest.model_validate(json.loads(manifest_path.read_text()))
    except (json.JSONDecodeError, SchemaError) as exc:
        raise ArchiveError(f"{MAR_MANIFEST} is malformed: {exc}") from exc
    model = manifest.model
    if not model.model_file:
        raise ArchiveError(
            "this .mar has no model file (modelFile): Kiln reads eager .mar archives (model.py + state dict); "
            "a TorchScript .mar's serializedFile can be given as format torchscript"
        )
    weights = _inside(folder, model.serialized_file, "serializedFile") if model.serialized_file else None
    config = read_config(folder / CONFIG_NAME)
    return ModuleBundle(_inside(folder, model.model_file, "modelFile"), weights, config)


@dataclass(frozen=True)
class ScriptBundle:
    script: Path
    config: BundleConfig | None  # None: kiln.yaml is inside the TorchScript file as an extra file


def script_bundle(folder: Path) -> ScriptBundle:
    root = _root(folder)
    script = next((root / n for n in WEIGHT_NAMES if (root / n).is_file()), None)
    if script is None:
        raise ArchiveError(f"torchscript archive has no {' or '.join(WEIGHT_NAMES)} at its top")
    return ScriptBundle(script, read_config(root / CONFIG_NAME))
