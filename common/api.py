"""Resource models of group kiln.dev/v1alpha1: the TorchModel and CompiledArtifact.

Shared core (pydantic; no torch, no kubernetes). The CRD schemas in crds/ are generated from
these models, so a field documented here is what `kubectl explain` shows.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from kiln.enums import ArchiveFormat, CompileBackend, CompileMode, InductorMode, JitBackend

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

OPENVINO_NEEDS_AOT = "backend openvino compiles ahead of time: it needs mode aot"
OPENVINO_NEEDS_CPU = "backend openvino builds CPU artifacts: every target must be gpu: cpu"
# Archive URI rules the API server checks (CEL) and the models check again: (rule, regex that must
# not match, message). Credentials in a URI would reach status, events and logs.
URI_RULES: list[tuple[str, str]] = [
    (
        "^[a-z0-9]+://[^/]*@",
        "credentials must not be part of the archive URI (they would show in status and logs): "
        "give them to the compile Job through its service account or a Secret",
    ),
    ("(?i)(/|%2f)([.]|%2e)([.]|%2e)(/|%2f|$)", "'..' is not allowed in an archive URI"),
    ("^pvc://([^/]*|[^/]*/)$", "a pvc:// URI names a claim and a path in it: pvc://CLAIM/PATH"),
]


class StrictModel(BaseModel):
    """Base for resource parts: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class ArchiveSpec(StrictModel):
    """Where the model comes from."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": f"!self.uri.matches('{regex}')", "message": message} for regex, message in URI_RULES
            ]
        }
    )

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
        Field(
            description="exported-program: a file written by torch.export.save; "
            "module-and-weights: a .tar.gz or .zip holding model.py (one torch.nn.Module subclass), "
            "an optional model.pt state dict and kiln.yaml naming the inputs; "
            "torchscript: a torch.jit.save file (kiln.yaml as an extra file) or a .tar.gz/.zip holding "
            "model.pt and kiln.yaml, served as TorchScript; "
            "torchserve-mar: a TorchServe .mar of an eager model.py and state dict, with kiln.yaml."
        ),
    ] = ArchiveFormat.exported_program

    @model_validator(mode="after")
    def _safe_uri(self) -> ArchiveSpec:
        for regex, message in URI_RULES:
            if re.search(regex, self.uri):
                raise ValueError(message)
        return self


class DynamicBatch(StrictModel):
    """Range of the batch dimension the compiled model accepts."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [{"rule": "self.min <= self.max", "message": "min must not exceed max"}]
        }
    )

    min: Annotated[int, Field(ge=1, le=4096, description="Smallest batch size.")] = 1
    max: Annotated[int, Field(ge=1, le=4096, description="Largest batch size.")] = 32
    dim: Annotated[
        int,
        Field(
            ge=0,
            le=7,
            description="The batch dimension of every input and output (BentoML's batch_dim): compiled "
            "dynamic, and the one requests are merged and split along.",
        ),
    ] = 0

    @model_validator(mode="after")
    def _ordered(self) -> DynamicBatch:
        if self.min > self.max:
            raise ValueError(f"dynamicBatch.min ({self.min}) must not exceed dynamicBatch.max ({self.max})")
        return self


class JitOptions(StrictModel):
    """torch.compile arguments for mode jit (the ones Triton's PyTorch backend exposes)."""

    fullgraph: Annotated[bool, Field(description="Fail instead of splitting the graph at unsupported code.")] = False
    dynamic: Annotated[
        bool | None, Field(description="true: compile for dynamic shapes up front; false: specialise; unset: auto.")
    ] = None
    backend: Annotated[JitBackend, Field(description="torch.compile backend.")] = JitBackend.inductor
    disable: Annotated[bool, Field(description="Turn torch.compile off (serve eagerly) without changing mode.")] = False


class CompileSpec(StrictModel):
    """How the model is compiled. Every field but `jit` is part of the cache key."""

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
    backend: Annotated[
        CompileBackend,
        Field(
            description="aot only. inductor: AOTInductor (.pt2, CPU and GPU); "
            "openvino: OpenVINO IR compiled once, for cpu targets."
        ),
    ] = CompileBackend.inductor
    dynamic_batch: Annotated[DynamicBatch, Field(default_factory=DynamicBatch, description="Batch range compiled for.")]
    options: Annotated[
        dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=64)]],
        Field(
            default_factory=dict,
            max_length=16,
            description="Inductor configs as strings ('true', '8'), from an allowed list "
            "(max_autotune, freezing, ...).",
            json_schema_extra={
                "x-kubernetes-validations": [
                    {
                        "rule": "self.all(k, k in " + str(sorted(ALLOWED_INDUCTOR_OPTIONS)).replace("'", '"') + ")",
                        "message": "unknown compile option; allowed: " + ", ".join(sorted(ALLOWED_INDUCTOR_OPTIONS)),
                    }
                ]
            },
        ),
    ]

    jit: Annotated[
        JitOptions,
        Field(default_factory=JitOptions, description="mode jit: torch.compile arguments (mode is inductorMode)."),
    ]

    @model_validator(mode="after")
    def _known_options(self) -> CompileSpec:
        unknown = sorted(set(self.options) - ALLOWED_INDUCTOR_OPTIONS)
        if unknown:
            raise ValueError(f"unknown compile option(s) {unknown}; allowed: {sorted(ALLOWED_INDUCTOR_OPTIONS)}")
        if self.backend == CompileBackend.openvino and self.mode != CompileMode.aot:
            raise ValueError(OPENVINO_NEEDS_AOT)
        return self

    def typed_options(self) -> dict[str, bool | int | str]:
        """Options as inductor wants them: 'true'/'false' → bool, digits → int."""
        return {k: parse_option_value(v) for k, v in self.options.items()}


def needs_artifact(archive: ArchiveSpec, compile_spec: CompileSpec) -> bool:
    """True when a compile Job builds an artifact: aot always; jit and eager for archives
    that must first become an ExportedProgram or a TorchScript file (user code runs only there)."""
    return compile_spec.mode == CompileMode.aot or archive.format != ArchiveFormat.exported_program


def parse_option_value(raw: str) -> bool | int | str:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if raw.lstrip("-").isdigit():
        return int(raw)
    return raw


def json_ready(model: BaseModel) -> dict[str, Any]:
    """The camelCase JSON form of a model, as stored in the API server."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


# --- TorchModel ---------------------------------------------------------------------------------

GPU_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$"
CPU_TARGET = "cpu"


class Target(StrictModel):
    """One hardware target: an artifact is compiled for it and pods are pinned to it."""

    gpu: Annotated[
        str,
        Field(
            pattern=GPU_PATTERN,
            max_length=63,
            description="GPU product as the node label gives it (e.g. NVIDIA-H100-80GB-HBM3), or 'cpu'.",
        ),
    ]
    replicas: Annotated[int, Field(ge=0, le=512, description="Serving pods for this target.")] = 1

    @property
    def is_cpu(self) -> bool:
        return self.gpu == CPU_TARGET


class Batching(StrictModel):
    """Dynamic batching in each serving pod."""

    max_batch_size: Annotated[int, Field(ge=1, le=4096, description="Most rows merged into one model call.")] = 32
    max_delay_ms: Annotated[
        float, Field(ge=0, le=10_000, description="How long a request waits for others to batch with.")
    ] = 2.0
    max_queue: Annotated[
        int, Field(ge=1, le=100_000, description="Waiting requests beyond which new ones get 503 and Retry-After.")
    ] = 256
    batchable: Annotated[
        bool,
        Field(
            description="false: the model's inputs must not be merged across requests (each request runs "
            "alone, as BentoML's batchable=False); true: merge along compile.dynamicBatch.dim."
        ),
    ] = True


class Threads(StrictModel):
    """torch thread pools of each serving pod; 0 means from the pod's CPU limit."""

    intra_op: Annotated[int, Field(ge=0, le=256, description="torch.set_num_threads; 0: the CPU limit.")] = 0
    inter_op: Annotated[int, Field(ge=0, le=256, description="torch.set_num_interop_threads; 0: default.")] = 0


class RolloutStrategy(StrEnum):
    surge = "Surge"
    one_at_a_time = "OneAtATime"


QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"
ResourceMap = dict[
    Annotated[str, Field(pattern=r"^(cpu|memory|ephemeral-storage)$")], Annotated[str, Field(pattern=QUANTITY)]
]


class Resources(StrictModel):
    """Requests and limits of each serving container (GPUs are added per target)."""

    requests: Annotated[ResourceMap, Field(default_factory=dict, description="cpu, memory, ephemeral-storage.")]
    limits: Annotated[ResourceMap, Field(default_factory=dict, description="cpu, memory, ephemeral-storage.")]


class Serving(StrictModel):
    """How serving pods run."""

    batching: Annotated[Batching, Field(default_factory=Batching, description="Dynamic batching.")]
    threads: Annotated[Threads, Field(default_factory=Threads, description="torch thread pools.")]
    resources: Annotated[Resources, Field(default_factory=Resources, description="Container resources.")]
    rollout: Annotated[
        RolloutStrategy,
        Field(
            description="Surge: new pods start before old ones stop (needs spare GPUs); "
            "OneAtATime: no surge, one pod replaced at a time (for GPU-scarce clusters)."
        ),
    ] = RolloutStrategy.surge
    startup_seconds: Annotated[
        int, Field(ge=10, le=7200, description="Longest a pod may take to load and warm up before it is restarted.")
    ] = 300


class TorchModelSpec(StrictModel):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.compile.backend != 'openvino' || self.targets.all(t, t.gpu == 'cpu')",
                    "message": OPENVINO_NEEDS_CPU,
                },
                {
                    "rule": "self.compile.backend != 'openvino' || self.compile.mode == 'aot'",
                    "message": OPENVINO_NEEDS_AOT,
                },
            ]
        }
    )

    archive: Annotated[ArchiveSpec, Field(description="The model archive.")]
    compile: Annotated[CompileSpec, Field(default_factory=CompileSpec, description="How the model is compiled.")]
    targets: Annotated[
        list[Target],
        Field(
            min_length=1,
            max_length=16,
            description="Hardware targets; one artifact and one Deployment each.",
            json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["gpu"]},
        ),
    ]
    serving: Annotated[Serving, Field(default_factory=Serving, description="Serving pods.")]

    @model_validator(mode="after")
    def _backend_targets(self) -> TorchModelSpec:
        if self.compile.backend == CompileBackend.openvino and not all(t.is_cpu for t in self.targets):
            raise ValueError(OPENVINO_NEEDS_CPU)
        return self


class Condition(StrictModel):
    """A standard Kubernetes condition."""

    type: str
    status: Annotated[str, Field(description="True, False or Unknown.")]
    reason: str
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


class TargetPhase(StrEnum):
    """Where one target's artifact is; NotNeeded when its pods load the program themselves."""

    pending = "Pending"
    compiling = "Compiling"
    ready = "Ready"
    failed = "Failed"
    not_needed = "NotNeeded"


class ModelPhase(StrEnum):
    """The summary of a TorchModel's conditions."""

    compiling = "Compiling"
    progressing = "Progressing"
    ready = "Ready"
    degraded = "Degraded"
    failed = "Failed"


class TargetStatus(StrictModel):
    gpu: str
    key: Annotated[str | None, Field(description="Cache key of the artifact this target needs.")] = None
    artifact: Annotated[str | None, Field(description="CompiledArtifact name.")] = None
    phase: Annotated[TargetPhase, Field(description="Where this target's artifact is.")]
    serving_key: Annotated[str | None, Field(description="Cache key the serving pods run now.")] = None
    replicas: int = 0
    ready_replicas: int = 0
    url: str | None = None
    message: str = ""


class TorchModelStatus(StrictModel):
    observed_generation: int | None = None
    phase: Annotated[ModelPhase | None, Field(description="Summary of the conditions.")] = None
    replicas: int = 0
    ready_replicas: int = 0
    url: Annotated[str | None, Field(description="In-cluster URL of the first target's v2 model endpoint.")] = None
    targets: list[TargetStatus] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)


class TorchModel(StrictModel):
    """A PyTorch model compiled once per hardware target and served over the Open Inference Protocol."""

    api_version: str = API_VERSION
    kind: str = "TorchModel"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: TorchModelSpec
    status: TorchModelStatus | None = None


# --- CompiledArtifact ------------------------------------------------------------------------------


class ArtifactPhase(StrEnum):
    pending = "Pending"
    compiling = "Compiling"
    ready = "Ready"
    failed = "Failed"


class CompiledArtifactSpec(StrictModel):
    key: Annotated[str, Field(pattern=SHA256_PATTERN, description="Cache key: sha256 of all compile inputs.")]
    archive: ArchiveSpec
    compile: CompileSpec
    target: Annotated[str, Field(pattern=GPU_PATTERN, description="GPU product or 'cpu'.")]
    runtime_image: Annotated[str, Field(max_length=512, description="Image that compiles and serves it.")]


class CompiledArtifactStatus(StrictModel):
    phase: ArtifactPhase = ArtifactPhase.pending
    path: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    compile_seconds: float | None = None
    torch_version: str | None = None
    dims: Annotated[
        str | None,
        Field(description="Dynamic dimensions of the inputs and the sizes they accept, e.g. 'batch=1..32 seq=2..64'."),
    ] = None
    job: str | None = None
    message: str = ""
    ready_at: Annotated[str | None, Field(description="When the artifact last became Ready.")] = None
    rebuilds: Annotated[
        int, Field(ge=0, description="Times a serving pod found the cached artifact corrupt and it was compiled again.")
    ] = 0
    used_by: Annotated[list[str], Field(default_factory=list, description="TorchModels that use this artifact.")]
    unused_since: Annotated[str | None, Field(description="When the last TorchModel stopped using it.")] = None


class CompiledArtifact(StrictModel):
    """One compiled artifact per cache key, shared by every TorchModel that needs it."""

    api_version: str = API_VERSION
    kind: str = "CompiledArtifact"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: CompiledArtifactSpec
    status: CompiledArtifactStatus | None = None
