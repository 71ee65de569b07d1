"""Load a model for serving: the compiled artifact (aot), or the ExportedProgram (jit, eager).

Serve path (torch). The aot path checks the manifest, verifies the library's sha256,
and loads it with the AOTI runner: no compiler, no inductor import. The stock
`aoti_load_package` stays as the fallback (KILN_LOADER=package forces it). Nothing
here imports torch.export or inductor unless that path is taken: imports are most
of a replica's start-up time.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._pytree import tree_leaves

from kiln.manifest import PACKAGE_NAME, Manifest, Signature
from kiln.runtime.errors import ArtifactMismatch

log = logging.getLogger(__name__)

ModelFn = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]


@dataclass
class LoadedModel:
    fn: ModelFn
    signature: Signature
    batch_max: int
    loader: str
    device: str


def device_capability(device: str) -> str | None:
    if device != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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


def load_aot(folder: Path, device: str) -> LoadedModel:
    manifest = Manifest.read(folder)
    check_manifest(manifest, device)
    loader = os.environ.get("KILN_LOADER", "runner")
    fn: ModelFn | None = None
    if loader == "runner" and manifest.runner_so:
        so = folder / manifest.runner_so
        if manifest.runner_so_sha256 and sha256_file(so) != manifest.runner_so_sha256:
            raise ArtifactMismatch(f"{so} does not match the sha256 in its manifest: the cached artifact is corrupt")
        try:
            fn = _runner(so, device)
        except (AttributeError, RuntimeError, TypeError) as exc:
            log.warning("AOTI runner could not load %s (%s); falling back to aoti_load_package", so, exc)
            loader = "package"
    if fn is None:
        package = folder / PACKAGE_NAME
        if sha256_file(package) != manifest.package_sha256:
            raise ArtifactMismatch(
                f"{package} does not match the sha256 in its manifest: the cached artifact is corrupt"
            )
        fn, loader = _package(package), "package"
    return LoadedModel(fn, manifest.signature, manifest.batch_max, loader, device)


def load_program(path: Path, device: str, compiled: bool, inductor_mode: str, batch_max: int) -> LoadedModel:
    """eager: the ExportedProgram's module as is; jit: the same under torch.compile."""
    # torch.export pulls in dynamo and sympy: imported here, so the aot path never pays for it.
    from kiln.runtime.export import has_dynamic_batch, load_exported, signature_of, to_device, with_dynamic_batch

    program, device = to_device(load_exported(path), device)
    if not has_dynamic_batch(program):
        program = with_dynamic_batch(program, 1, batch_max, device)
    module = program.module()
    call: Callable[..., object] = module
    if compiled:
        mode = None if inductor_mode == "default" else inductor_mode
        call = torch.compile(module, mode=mode, dynamic=True)

    def run(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(tree_leaves(call(*inputs)))

    return LoadedModel(run, signature_of(program), batch_max, "jit" if compiled else "eager", device)
