"""What the operator and the runtime tell each other: command-line flags and the compile summary.

Shared core (pydantic only). The operator writes the compile Job's and serving pods' arguments
from `CompileFlags` and `ServeFlags` and reads `CompileSummary` from the compile pod's
termination log; kiln-compile writes that summary. A test parses what the operator writes with
the runtime's own argument parsers, so a renamed flag fails there, not in a cluster.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from kiln.enums import ArchiveFormat, CompileBackend, CompileMode, Engine, InductorMode, JitBackend

__all__ = ["CompileFlags", "CompileSummary", "Flags", "ServeFlags"]


def _flag_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()  # the runtime's parsers read true/false
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


class Flags(BaseModel):
    """Command-line flags as fields: `batch_max=8` is `--batch-max=8`; None is left out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def argv(self) -> list[str]:
        args: list[str] = []
        for name, value in self:
            flag = "--" + name.replace("_", "-")
            if value is None:
                continue
            if isinstance(value, dict):  # a repeatable NAME=VALUE flag, sorted for a stable pod spec
                args += [f"{flag}={k}={_flag_value(v)}" for k, v in sorted(value.items())]
            else:
                args.append(f"{flag}={_flag_value(value)}")
        return args


class CompileFlags(Flags):
    """The arguments of `kiln-compile` in a compile Job."""

    uri: str
    format: ArchiveFormat
    mode: CompileMode
    backend: CompileBackend
    inductor_mode: InductorMode
    batch_min: int
    batch_max: int
    batch_dim: int
    device: Literal["cpu", "cuda"]
    target: str
    cache: str
    key: str
    runtime_image: str
    pvc_root: str
    sha256: str | None = None
    option: Annotated[dict[str, str], Field(description="Inductor config, one --option=NAME=VALUE each.")] = {}


class ServeFlags(Flags):
    """The arguments of `kiln-serve` in serving pods (the rest keep kiln-serve's defaults)."""

    mode: CompileMode
    model_name: str
    device: Literal["cpu", "cuda"]
    host: str
    port: int
    grpc_port: int
    max_batch_size: int
    max_delay_ms: float
    max_queue: int
    batchable: bool
    intra_op_threads: int
    inter_op_threads: int
    pvc_root: str
    drain_seconds: float
    artifact: str | None = None  # a compile Job built it: aot, or an archive prepared for jit/eager
    archive: str | None = None  # else jit/eager load the archive itself
    batch_dim: int | None = None
    archive_sha256: str | None = None
    inductor_mode: InductorMode | None = None  # jit only, like the rest below
    jit_backend: JitBackend | None = None
    jit_fullgraph: bool | None = None
    jit_dynamic: Literal["auto", "true", "false"] | None = None
    jit_disable: bool | None = None


class CompileSummary(BaseModel):
    """What kiln-compile leaves in the termination log on success (< 4 KiB); camelCase on the wire."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)

    key: str
    path: str
    size_bytes: int
    sha256: str
    compile_seconds: float
    torch_version: str
    device_capability: str | None = None
    engine: Engine
    dims: str
    note: str | None = None

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)
