"""The choices a TorchModel offers (archive format, compile mode, backends), engines and loaders.

Shared core, standard library only: kiln-serve reads these before it reports ready and must
not pay for pydantic's resource models (kiln.api) to do so; kiln.api builds its schema on them.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "ArchiveFormat",
    "CompileBackend",
    "CompileMode",
    "Engine",
    "InductorMode",
    "JitBackend",
    "Loader",
    "WarmSizes",
]


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


class WarmSizes(StrEnum):
    """Which batch sizes kiln-serve calls once before requests need them (--warm-batch-sizes)."""

    auto = "auto"  # every size on a GPU for compiled libraries, the ends elsewhere
    every = "every"  # 1, 2 and the largest by ready, then every size in the model thread between requests
    ends = "ends"  # 1, 2 and the largest only: any other size's first batch pays its first-call cost


class CompileMode(StrEnum):
    aot = "aot"
    jit = "jit"
    eager = "eager"


class InductorMode(StrEnum):
    default = "default"
    reduce_overhead = "reduce-overhead"
    max_autotune = "max-autotune"
    max_autotune_no_cudagraphs = "max-autotune-no-cudagraphs"


class Engine(StrEnum):
    """What an artifact holds (its manifest says), and so what runs it."""

    aotinductor = "aotinductor"
    openvino = "openvino"
    torchscript = "torchscript"
    exported_program = "exported-program"


class Loader(StrEnum):
    """How a replica runs its model: the `loader` metadata parameter and metrics label.

    `lean` calls an AOTInductor library through the C shim without importing torch; `runner`
    and `package` are torch's AOTInductor loaders (the fallback, with the reason logged).
    """

    lean = "lean"
    runner = "runner"
    package = "package"
    openvino = "openvino"
    torchscript = "torchscript"
    eager = "eager"
    jit = "jit"  # torch.compile with inductor; other backends read jit-<backend>
    jit_aot_eager = "jit-aot_eager"
    jit_eager = "jit-eager"
    jit_cudagraphs = "jit-cudagraphs"

    @classmethod
    def of_jit(cls, backend: str) -> Loader:
        return cls.jit if backend == JitBackend.inductor else cls(f"jit-{backend}")

    @property
    def runs_aotinductor(self) -> bool:
        """A compiled library: nothing compiles on a new batch size."""
        return self in (Loader.lean, Loader.runner, Loader.package)
