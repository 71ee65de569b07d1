"""The artifact manifest, `<key>/manifest.json`: what was compiled, from what, for what.

Shared core (no torch). kiln-compile writes it; kiln-serve reads it and refuses an
artifact built for another torch version or GPU; the operator reads sizes from it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kiln.enums import Engine

MANIFEST_NAME = "manifest.json"
PACKAGE_NAME = "model.pt2"
# The compiled library extracted from the package, loaded without inductor (see loader).
RUNNER_DIR = "runner"
MANIFEST_SCHEMA = 2
# The dynamic dimension requests are merged and split along.
BATCH = "batch"
# kiln-serve's termination message starts with this when a file fails its sha256: the
# operator reads it from serving pods and compiles the key again.
CORRUPT_REASON = "ArtifactCorrupt"
# How kiln-serve runs the artifact: the AOTInductor library, an OpenVINO IR, a TorchScript
# file (no AOT compile is possible for TorchScript), or an ExportedProgram that jit and
# eager replicas load (prepared once from an archive whose user code must not run in pods).


class DimRange(BaseModel):
    """The sizes a dynamic dimension accepts, both ends included."""

    model_config = ConfigDict(extra="forbid")

    min: int
    max: int

    def __str__(self) -> str:
        return f"{self.min}..{self.max}"


class TensorSpec(BaseModel):
    """One named input or output; -1 marks each dynamic dimension, `dims` names them."""

    model_config = ConfigDict(extra="forbid")

    name: str
    datatype: Annotated[str, Field(description="Open Inference Protocol datatype, e.g. FP32.")]
    shape: list[int]
    dims: Annotated[
        list[str | None],
        Field(
            description="Per dimension, the name of its dynamic dimension (null: static). Tensors that share "
            "a name agree in size; empty in manifests of schema 1, where -1 was always the batch."
        ),
    ] = Field(default_factory=list)

    def dim_names(self) -> list[str | None]:
        return list(self.dims) if self.dims else [BATCH if d == -1 else None for d in self.shape]


class Signature(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dims: Annotated[
        dict[str, DimRange],
        Field(description="Every named dynamic dimension of the inputs and its range; `batch` among them."),
    ] = Field(default_factory=dict)

    def shape_at(self, spec: TensorSpec, sizes: Mapping[str, int]) -> list[int]:
        """The shape of `spec` with each dynamic dimension at its size in `sizes` (default: its minimum)."""
        return [
            size if name is None else sizes.get(name, self.dims[name].min if name in self.dims else 1)
            for size, name in zip(spec.shape, spec.dim_names(), strict=True)
        ]

    def describe_dims(self) -> str:
        """`batch=1..32 seq=2..64`: what status and logs show."""
        return " ".join(f"{name}={rng}" for name, rng in self.dims.items())


class Validation(BaseModel):
    """How the compiled artifact compared with the exported program."""

    model_config = ConfigDict(extra="forbid")

    batch_sizes: list[int]
    points: Annotated[
        list[dict[str, int]], Field(description="Sizes of the dynamic dimensions at each compared call.")
    ] = Field(default_factory=list)
    max_abs_error: float
    max_rel_error: float
    loader: str


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = MANIFEST_SCHEMA
    engine: Engine = Engine.aotinductor
    key: str
    inputs: dict[str, Any]
    torch_version: str
    device: Literal["cpu", "cuda"]
    device_name: str | None = None
    device_capability: str | None = None
    signature: Signature
    batch_min: int
    batch_max: int
    batch_dim: Annotated[int, Field(description="Dimension requests are merged and split along.")] = 0
    package_file: str = PACKAGE_NAME
    package_bytes: int
    package_sha256: str
    runner_so: str | None = None
    runner_so_sha256: str | None = None
    files: Annotated[
        dict[str, str],
        Field(description="Every other file the loader reads (relative path → sha256), verified at load."),
    ] = Field(default_factory=dict)
    compile_seconds: float
    validation: Validation | None = None
    note: Annotated[str | None, Field(description="What a user should know about how it is served.")] = None

    @model_validator(mode="after")
    def _batch_range(self) -> Manifest:
        """Schema 1 recorded only the batch range: name it, so every reader sees `signature.dims`."""
        if not self.signature.dims:
            self.signature.dims = {BATCH: DimRange(min=self.batch_min, max=self.batch_max)}
        return self

    def checked_files(self) -> dict[str, str]:
        """Every file of the artifact with the sha256 it must have (relative path → digest)."""
        files = {self.package_file: self.package_sha256, **self.files}
        if self.runner_so and self.runner_so_sha256:
            files[self.runner_so] = self.runner_so_sha256
        return files

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        return cls.model_validate_json((folder / MANIFEST_NAME).read_text())

    def write(self, folder: Path) -> None:
        (folder / MANIFEST_NAME).write_text(self.model_dump_json(indent=2) + "\n")


def sha256_file(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def corrupt_files(folder: Path, files: dict[str, str], hashed: Mapping[Path, str] | None = None) -> list[str]:
    """The files under `folder` that are missing or differ from their sha256 (`hashed`: digests taken already)."""
    hashed = hashed or {}
    bad = []
    for name, digest in sorted(files.items()):
        path = folder / name
        if not path.is_file() or (hashed.get(path) or sha256_file(path)) != digest:
            bad.append(name)
    return bad
