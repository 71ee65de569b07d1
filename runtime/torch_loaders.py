"""torch's loaders: the AOTI runner (the lean path's fallback), aoti_load_package, TorchScript, OpenVINO, jit and eager.

Serve path, torch side. Each returns a LoadedModel whose function takes and returns numpy
arrays (kiln.runtime.torch_arrays), and on a GPU a pipeline that overlaps copies with the
model (kiln.runtime.device). Nothing here imports torch.export or inductor unless that
path is taken: imports are most of a replica's start-up time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils._pytree import tree_leaves

from kiln.enums import Engine, Loader
from kiln.manifest import PACKAGE_NAME, DimRange, Manifest, Signature
from kiln.runtime.loader import ArrayFn, JitArgs, LoadedModel, Pipeline, check_manifest, verify_files
from kiln.runtime.torch_arrays import TensorFn, on_arrays

log = logging.getLogger(__name__)


def device_capability(device: str) -> str | None:
    if device != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def _runner(so: Path, device: str) -> TensorFn:
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


def _package(package: Path) -> TensorFn:
    compiled = torch._inductor.aoti_load_package(str(package))

    def run(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(tree_leaves(compiled(*inputs)))

    return run


def set_threads(threads: int, inter_op: int = 0) -> dict[str, int]:
    """torch's thread pools: intra-op from the pod's CPU limit; what they are, for the metadata."""
    if threads:
        torch.set_num_threads(threads)
    if inter_op:
        torch.set_num_interop_threads(inter_op)
    return {"intra_op_threads": torch.get_num_threads(), "inter_op_threads": torch.get_num_interop_threads()}


def serving(fn: TensorFn, signature: Signature, device: str) -> tuple[ArrayFn, Pipeline | None]:
    """The model as LoadedModel holds it: a numpy function, and on a GPU the overlapping pipeline."""
    if device == "cpu":
        return on_arrays(fn, signature, device), None
    from kiln.runtime.device import CudaTransfers

    return on_arrays(fn, signature, device), CudaTransfers(device, fn, signature)


def load_artifact(
    folder: Path, manifest: Manifest, device: str, threads: int = 0, jit: JitArgs | None = None, inter_op: int = 0
) -> LoadedModel:
    """Load whatever engine the manifest names; `jit` applies to prepared ExportedPrograms only."""
    check_manifest(manifest, device, torch.__version__, device_capability(device))
    pools = set_threads(threads, inter_op)
    if manifest.engine == Engine.aotinductor:
        fn, loader = _load_aotinductor(folder, manifest, device)
    else:
        verify_files(folder, {manifest.package_file: manifest.package_sha256, **manifest.files})
        package = folder / manifest.package_file
        if manifest.engine == Engine.exported_program:
            model = load_program(package, device, jit, manifest.batch_max, manifest.batch_dim, manifest.signature)
            model.threads = pools
            return model
        if manifest.engine == Engine.openvino:
            from kiln.runtime import openvino_ir

            fn, loader = openvino_ir.load(folder, threads), Loader.openvino
        else:
            fn, loader = _torchscript(package, device), Loader.torchscript
    on_host, pipeline = serving(fn, manifest.signature, device)
    return LoadedModel(
        on_host,
        manifest.signature,
        manifest.batch_max,
        loader,
        device,
        manifest.batch_dim,
        pools,
        pipeline,
    )


def _torchscript(path: Path, device: str) -> TensorFn:
    script = torch.jit.load(str(path), map_location=device)

    def run(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(tree_leaves(script(*inputs)))

    return run


def _load_aotinductor(folder: Path, manifest: Manifest, device: str) -> tuple[TensorFn, Loader]:
    if os.environ.get("KILN_LOADER") != Loader.package and manifest.runner_so:
        so = folder / manifest.runner_so
        if manifest.runner_so_sha256:
            verify_files(folder, {manifest.runner_so: manifest.runner_so_sha256})
        try:
            return _runner(so, device), Loader.runner
        except (AttributeError, RuntimeError, TypeError) as exc:
            log.warning("AOTI runner could not load %s (%s); falling back to aoti_load_package", so, exc)
    verify_files(folder, {PACKAGE_NAME: manifest.package_sha256})
    return _package(folder / PACKAGE_NAME), Loader.package


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

    loader = Loader.eager if jit is None or jit.disable else Loader.of_jit(jit.backend)
    signature = signature or signature_of(program, batch_dim, DimRange(min=1, max=batch_max))
    on_host, pipeline = serving(run, signature, device)
    return LoadedModel(on_host, signature, batch_max, loader, device, batch_dim, pipeline=pipeline)
