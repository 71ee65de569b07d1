"""Load a model for serving: the compiled artifact (aot), or the ExportedProgram (jit, eager).

Serve path (torch). The aot path checks the manifest, verifies the library's sha256,
and loads it with the AOTI runner: no compiler, no inductor import. The stock
`aoti_load_package` stays as the fallback (KILN_LOADER=package forces it). Nothing
here imports torch.export or inductor unless that path is taken: imports are most
of a replica's start-up time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._pytree import tree_leaves

from kiln.manifest import PACKAGE_NAME, Manifest, Signature, corrupt_files
from kiln.runtime.errors import ArtifactCorrupt, ArtifactMismatch

log = logging.getLogger(__name__)

ModelFn = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]


@dataclass
class LoadedModel:
    fn: ModelFn
    signature: Signature
    batch_max: int
    loader: str
    device: str
    batch_dim: int = 0
    threads: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class JitArgs:
    """torch.compile's arguments for mode jit (TorchModel spec.compile.jit and inductorMode)."""

    mode: str = "default"
    fullgraph: bool = False
    dynamic: bool | None = None
    backend: str = "inductor"
    disable: bool = False


def device_capability(device: str) -> str | None:
    if device != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def check_manifest(manifest: Manifest, device: str) -> None:
    """Refuse an artifact built for another torch, device or GPU, before loading it."""
    if manifest.torch_version != torch.__version__:
        raise ArtifactMismatch(
            f"artifact was compiled with torch {manifest.torch_version}, this runtime has "
            f"{torch.__version__}: recompile with this runtime image"
        )
    if manifest.device != device:
        raise ArtifactMismatch(f"artifact was compiled for {manifest.device}, this pod runs on {device}")
    have = device_capability(device)
    if manifest.device_capability and have != manifest.device_capability:
        raise ArtifactMismatch(
            f"artifact was compiled for GPU capability {manifest.device_capability} "
            f"({manifest.device_name}), this GPU has {have}"
        )


def _runner(so: Path, device: str) -> ModelFn:
    """The library called through its C interface (the GIL is free while it runs), else torch's runner class."""
    from kiln.runtime.aoti_library import AotiLibrary

    try:  # two model instances on a GPU: the next batch launches while the last one still runs
        return AotiLibrary(so, device, num_models=2 if device == "cuda" else 1)
    except (AttributeError, OSError, RuntimeError) as exc:
        log.warning("calling %s through its C interface failed (%s); using torch's runner class", so.name, exc)
    aoti = torch._C._aoti
    if device == "cuda":
        runner = aoti.AOTIModelContainerRunnerCuda(str(so), 1, "cuda", str(so.parent))
    else:
        runner = aoti.AOTIModelContainerRunnerCpu(str(so), 1)

    def run(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(runner.run([t.contiguous() for t in inputs]))

    return run


def _package(package: Path) -> ModelFn:
    compiled = torch._inductor.aoti_load_package(str(package))

    def run(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(tree_leaves(compiled(*inputs)))

    return run


def verify_files(folder: Path, files: dict[str, str]) -> None:
    bad = corrupt_files(folder, files)
    if bad:
        raise ArtifactCorrupt(
            f"{folder / bad[0]} does not match the sha256 in its manifest: the cached artifact is corrupt"
        )


def load_artifact(folder: Path, device: str, threads: int = 0, jit: JitArgs | None = None) -> LoadedModel:
    """Load whatever engine the manifest names; `jit` applies to prepared ExportedPrograms only."""
    manifest = Manifest.read(folder)
    check_manifest(manifest, device)
    if manifest.engine == "aotinductor":
        fn, loader = _load_aotinductor(folder, manifest, device)
    else:
        verify_files(folder, {manifest.package_file: manifest.package_sha256, **manifest.files})
        package = folder / manifest.package_file
        if manifest.engine == "exported-program":
            return load_program(package, device, jit, manifest.batch_max, manifest.batch_dim, manifest.signature)
        if manifest.engine == "openvino":
            from kiln.runtime import openvino_ir

            fn, loader = openvino_ir.load(folder, threads), "openvino"
        else:
            fn, loader = _torchscript(package, device), "torchscript"
    return LoadedModel(fn, manifest.signature, manifest.batch_max, loader, device, manifest.batch_dim)


def _torchscript(path: Path, device: str) -> ModelFn:
    script = torch.jit.load(str(path), map_location=device)

    def run(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(tree_leaves(script(*inputs)))

    return run


def _load_aotinductor(folder: Path, manifest: Manifest, device: str) -> tuple[ModelFn, str]:
    loader = os.environ.get("KILN_LOADER", "runner")
    if loader == "runner" and manifest.runner_so:
        so = folder / manifest.runner_so
        if manifest.runner_so_sha256:
            verify_files(folder, {manifest.runner_so: manifest.runner_so_sha256})
        try:
            return _runner(so, device), "runner"
        except (AttributeError, RuntimeError, TypeError) as exc:
            log.warning("AOTI runner could not load %s (%s); falling back to aoti_load_package", so, exc)
    verify_files(folder, {PACKAGE_NAME: manifest.package_sha256})
    return _package(folder / PACKAGE_NAME), "package"


def load_program(
    path: Path,
    device: str,
    jit: JitArgs | None,
    batch_max: int,
    batch_dim: int = 0,
    signature: Signature | None = None,
) -> LoadedModel:
    """eager (jit None): the ExportedProgram's module as is; jit: the same under torch.compile.

    `signature`: the one kiln-compile recorded (its dimension names come from kiln.yaml)."""
    # torch.export pulls in dynamo and sympy: imported here, so the aot path never pays for it.
    from kiln.manifest import DimRange
    from kiln.runtime.export import has_dynamic_batch, load_exported, signature_of, to_device, with_dynamic_dims

    program, device = to_device(load_exported(path), device)
    if not has_dynamic_batch(program, batch_dim):
        program = with_dynamic_dims(program, DimRange(min=1, max=batch_max), device, batch_dim)
    module = program.module()
    call: Callable[..., object] = module
    if jit is not None and not jit.disable:
        call = torch.compile(
            module,
            mode=None if jit.mode == "default" else jit.mode,
            fullgraph=jit.fullgraph,
            dynamic=jit.dynamic,
            backend=jit.backend,
        )

    def run(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(tree_leaves(call(*inputs)))

    loader = "eager" if jit is None or jit.disable else ("jit" if jit.backend == "inductor" else f"jit-{jit.backend}")
    signature = signature or signature_of(program, batch_dim, DimRange(min=1, max=batch_max))
    return LoadedModel(run, signature, batch_max, loader, device, batch_dim)
