"""AOTInductor: compile an ExportedProgram into a `.pt2` package, and extract its library.

Compile path (torch). The extracted library lets kiln-serve load the model through
the AOTI runner, with no compiler and no inductor import at start (see loader.py).
"""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch.export import ExportedProgram

from kiln.api import CompileSpec, InductorMode
from kiln.runtime.errors import CompileError

MODE_CONFIGS: dict[InductorMode, dict[str, Any]] = {
    InductorMode.default: {},
    InductorMode.reduce_overhead: {"triton.cudagraphs": True},
    InductorMode.max_autotune: {"max_autotune": True, "triton.cudagraphs": True},
    InductorMode.max_autotune_no_cudagraphs: {"max_autotune": True},
}
# Files of the package the runner needs: the library and, on CUDA, its kernel binaries.
RUNNER_SUFFIXES = (".so", ".cubin", ".hsaco", ".fatbin")


def inductor_configs(spec: CompileSpec) -> dict[str, Any]:
    """Inductor configs for a compile spec: the mode's presets, then the user's options."""
    return {**MODE_CONFIGS[spec.inductor_mode], **spec.typed_options()}


def compile_package(program: ExportedProgram, dest: Path, configs: dict[str, Any]) -> None:
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(dest), inductor_configs=configs)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise CompileError(f"AOTInductor compile failed: {exc.__class__.__name__}: {first}") from exc


def extract_runner(package: Path, dest: Path) -> Path:
    """Unpack the compiled library (and kernel binaries) into `dest`; return the library."""
    dest.mkdir(parents=True, exist_ok=True)
    libraries: list[Path] = []
    with zipfile.ZipFile(package) as archive:
        for info in archive.infolist():
            member = PurePosixPath(info.filename)
            if "aotinductor" not in member.parts or not member.name.endswith(RUNNER_SUFFIXES):
                continue
            target = dest / member.name  # flat: no path from the archive reaches the disk
            target.write_bytes(archive.read(info))
            if member.suffix == ".so":
                libraries.append(target)
    if len(libraries) != 1:
        raise CompileError(f"expected one compiled library in {package.name}, found {len(libraries)}")
    return libraries[0]
