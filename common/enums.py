"""The choices a TorchModel offers (archive format, compile mode and backends), shared by the operator and the runtime.

Shared core, standard library only: kiln-serve reads these before it reports ready and must
not pay for pydantic's resource models (kiln.api) to do so; kiln.api builds its schema on them.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ArchiveFormat", "CompileBackend", "CompileMode", "InductorMode", "JitBackend"]


class ArchiveFormat(StrEnum):
    exported_program = "exported-program"
    module_and_weights = "module-and-weights"
    torchscript = "torchscript"
    torchserve_mar = "torchserve-mar"


class CompileBackend(StrEnum):
    inductor = "inductor"
    openvino = "openvino"


class JitBackend(StrEnum):
    inductor = "inductor"
    aot_eager = "aot_eager"
    eager = "eager"
    cudagraphs = "cudagraphs"


class CompileMode(StrEnum):
    aot = "aot"
    jit = "jit"
    eager = "eager"


class InductorMode(StrEnum):
    default = "default"
    reduce_overhead = "reduce-overhead"
    max_autotune = "max-autotune"
    max_autotune_no_cudagraphs = "max-autotune-no-cudagraphs"
