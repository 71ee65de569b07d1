"""Resource models of group kiln.dev/v1alpha1: the TorchModel and CompiledArtifact.

Shared layer (no torch, no kubernetes). The CRD schemas in crds/ are generated from
these models, so a field documented here is what `kubectl explain` shows.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "kiln.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Schemes kiln-compile can fetch; anything else is refused by the API server's schema.
URI_PATTERN = r"^(file|https|http|s3|gs|pvc)://[^\s]+$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
# Inductor config keys accepted in spec.compile.options: the ones that change the
# generated code and are safe to set per model. Checked again by kiln-compile.
ALLOWED_INDUCTOR_OPTIONS: frozenset[str] = frozenset(
    {
        "max_autotune",
        "max_autotune_gemm",
        "max_autotune_pointwise",
        "coordinate_descent_tuning",
        "freezing",
        "epilogue_fusion",
        "aggressive_fusion",
        "shape_padding",
        "layout_optimization",
        "cpp.simdlen",
        "cpp.threads",
        "triton.cudagraphs",
        "benchmark_kernel",
    }
)


class Strict(BaseModel):
    """Base for resource parts: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class ArchiveFormat(StrEnum):
    exported_program = "exported-program"


class CompileMode(StrEnum):
    aot = "aot"
    jit = "jit"
    eager = "eager"


class InductorMode(StrEnum):
    default = "default"
    reduce_overhead = "reduce-overhead"
    max_autotune = "max-autotune"
    max_autotune_no_cudagraphs = "max-autotune-no-cudagraphs"


class ArchiveSpec(Strict):
    """Where the model comes from."""

    uri: Annotated[
        str,
        Field(
            pattern=URI_PATTERN,
            max_length=2048,
            description="Model archive: file://, https://, s3://, gs:// or pvc://CLAIM/PATH.",
        ),
    ]
    sha256: Annotated[
        str | None,
        Field(default=None, pattern=SHA256_PATTERN, description="Hex sha256 of the archive; verified when given."),
    ] = None
    format: Annotated[
        ArchiveFormat,
        Field(description="Archive format. exported-program: a file written by torch.export.save."),
    ] = ArchiveFormat.exported_program


class DynamicBatch(Strict):
    """Range of the batch dimension the compiled model accepts."""

    min: Annotated[int, Field(ge=1, le=4096, description="Smallest batch size.")] = 1
    max: Annotated[int, Field(ge=1, le=4096, description="Largest batch size.")] = 32

    @model_validator(mode="after")
    def _ordered(self) -> DynamicBatch:
        if self.min > self.max:
            raise ValueError(f"dynamicBatch.min ({self.min}) must not exceed dynamicBatch.max ({self.max})")
        return self


class CompileSpec(Strict):
    """How the model is compiled. Every field here is part of the cache key."""

    mode: Annotated[
        CompileMode,
        Field(
            description="aot: AOTInductor once per target (default); "
            "jit: torch.compile in each replica; eager: no compile."
        ),
    ] = CompileMode.aot
    inductor_mode: Annotated[InductorMode, Field(description="Inductor mode (default, max-autotune, ...).")] = (
        InductorMode.default
    )
    dynamic_batch: Annotated[DynamicBatch, Field(default_factory=DynamicBatch, description="Batch range compiled for.")]
    options: Annotated[
        dict[str, bool | int | str],
        Field(
            default_factory=dict, description="Inductor configs, from an allowed list (max_autotune, freezing, ...)."
        ),
    ]

    @model_validator(mode="after")
    def _known_options(self) -> CompileSpec:
        unknown = sorted(set(self.options) - ALLOWED_INDUCTOR_OPTIONS)
        if unknown:
            raise ValueError(f"unknown compile option(s) {unknown}; allowed: {sorted(ALLOWED_INDUCTOR_OPTIONS)}")
        return self


def json_ready(model: BaseModel) -> dict[str, Any]:
    """The camelCase JSON form of a model, as stored in the API server."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)
