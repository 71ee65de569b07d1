"""Load a model for serving: the lean path for AOTInductor artifacts, torch's loaders for everything else.

Serve path, torch-free at import. An AOTInductor artifact is checked against its manifest
(torch version, device, GPU capability, sha256 of the library) and called through the C
shim without importing torch (kiln.runtime.aoti_shim). Where that cannot run, or
`KILN_LOADER` names another loader (`runner`, `package`), kiln.runtime.torch_loaders
takes over and the reason is kept in `LoadedModel.fallback`: the log, the model's
metadata and /metrics show which path a replica took and why.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, cast

import numpy as np

from kiln.enums import Engine, Loader
from kiln.manifest import BATCH, Manifest, Signature, corrupt_files
from kiln.runtime.errors import ArtifactCorrupt, ArtifactMismatch
from kiln.runtime.tensors import zero_arrays

log = logging.getLogger(__name__)

ArrayFn = Callable[[Sequence[np.ndarray]], list[np.ndarray]]  # host arrays in, host arrays out, synchronous


class Pipeline(Protocol):
    """A GPU model call in steps the batcher overlaps: upload, launch (model thread), finish (answering thread)."""

    def upload(self, requests: list[list[np.ndarray]], dim: int) -> Any: ...

    def launch(self, uploaded: Any) -> Any: ...

    def finish(self, launched: Any) -> list[np.ndarray]: ...

    def pin(self, address: int, size: int) -> bool:
        """Page-lock host memory that inputs are copied from (an intake's arena); False if the driver refused."""
        ...

    def unpin(self, address: int) -> None: ...


@dataclass
class LoadedModel:
    fn: ArrayFn
    signature: Signature
    batch_max: int
    loader: Loader
    device: str
    batch_dim: int = 0
    threads: dict[str, int] = field(default_factory=dict)
    pipeline: Pipeline | None = None  # GPU: the batcher overlaps copies, the model and answering
    fallback: str | None = None  # why the lean loader was not used
    warmed: set[int] = field(default_factory=set)  # batch sizes already called once


@dataclass(frozen=True)
class JitArgs:
    """torch.compile's arguments for mode jit (TorchModel spec.compile.jit and inductorMode)."""

    mode: str = "default"
    fullgraph: bool = False
    dynamic: bool | None = None
    backend: str = "inductor"
    disable: bool = False


def check_manifest(manifest: Manifest, device: str, torch_version: str, capability: str | None) -> None:
    """Refuse an artifact built for another torch, device or GPU, before loading it."""
    if manifest.torch_version != torch_version:
        raise ArtifactMismatch(
            f"artifact was compiled with torch {manifest.torch_version}, this runtime has "
            f"{torch_version}: recompile with this runtime image"
        )
    if manifest.device != device:
        raise ArtifactMismatch(f"artifact was compiled for {manifest.device}, this pod runs on {device}")
    if manifest.device_capability and capability != manifest.device_capability:
        raise ArtifactMismatch(
            f"artifact was compiled for GPU capability {manifest.device_capability} "
            f"({manifest.device_name}), this GPU has {capability}"
        )


def verify_files(folder: Path, files: dict[str, str]) -> None:
    from kiln.runtime import preload

    bad = corrupt_files(folder, files, preload.digests())  # the preload's hasher may have hashed them
    if bad:
        raise ArtifactCorrupt(
            f"{folder / bad[0]} does not match the sha256 in its manifest: the cached artifact is corrupt"
        )


def load_artifact(
    folder: Path, device: str, threads: int = 0, jit: JitArgs | None = None, inter_op: int = 0
) -> LoadedModel:
    """Load whatever engine the manifest names: the lean path where it can run, torch's loaders otherwise."""
    manifest = Manifest.read(folder)
    reason = lean_refusal(manifest)
    if reason is None:
        from kiln.runtime import preload

        try:
            early = cast(LoadedModel | None, preload.model_for(folder, device, threads))
            return early or load_lean(folder, manifest, device, threads)
        except preload.LeanUnavailable as exc:
            reason = str(exc)
    if manifest.engine == Engine.aotinductor:
        log.warning("not using the lean loader (%s): importing torch", reason)
    from kiln.runtime import torch_loaders  # torch's Python package: seconds of imports

    model = torch_loaders.load_artifact(folder, manifest, device, threads, jit, inter_op)
    model.fallback = reason if manifest.engine == Engine.aotinductor else None
    return model


def lean_refusal(manifest: Manifest) -> str | None:
    """Why the lean loader is not tried for this artifact (None: it is)."""
    if manifest.engine != Engine.aotinductor:
        return f"engine {manifest.engine} runs through torch"
    forced = os.environ.get("KILN_LOADER", Loader.lean)
    if forced != Loader.lean:
        return f"KILN_LOADER={forced}"
    if not manifest.runner_so:
        return "the artifact has no extracted library"
    return None


class WarmPlan(NamedTuple):
    """Batch sizes to call once: before reporting ready, and in the model thread itself whenever no
    request waits (`served`, in this order: cuDNN's plans are per thread)."""

    before: list[int]
    served: list[int]


def warm_sizes(model: LoadedModel, max_batch_size: int, every: bool = False) -> WarmPlan:
    """Which batch sizes to warm up when and where; `every`: all sizes up to the largest.

    A compiled artifact compiles nothing on a new batch size, so one correct call (batch 1) is enough
    to report ready. jit compiles per size: all sizes before ready.

    On a GPU each size's first call in a thread still costs 20-70 ms more than its next (ResNet-50 on
    the H200, bench/first_calls.py): cuDNN plans each convolution shape once per thread (torch keeps
    the plans thread-local), so warm-ups in the preload thread do not spare the model thread, and
    every request in flight waits for such a call. The model thread therefore calls each size itself
    while it has no request to serve, the ends (1, 2, largest) first; warming them in the preload
    thread as well only delayed ready (docs/benchmarks.md §12). On a CPU a first call costs what any
    call costs: nothing is warmed after ready unless `every` asks."""
    rows = min(max_batch_size, model.batch_max)
    ends = sorted({1, min(2, rows), rows})
    others = [s for s in range(1, rows + 1) if s not in ends] if every else []
    served = ends + others if model.device != "cpu" or every else []
    if not model.loader.runs_aotinductor:  # compiles per size
        return WarmPlan(sorted(ends + others), served)
    return WarmPlan(ends[:1], served)


def warm_up(model: LoadedModel, sizes: list[int], again: bool = False) -> None:
    """Call the model once at each batch size it has not run yet (`again`: also those another thread ran)."""
    for rows in sizes:
        if again or rows not in model.warmed:
            model.fn(zero_arrays(model.signature, {BATCH: rows}))
            model.warmed.add(rows)


def open_lean(folder: Path, device: str, threads: int, max_batch_size: int) -> LoadedModel | None:
    """The lean model, opened and called at the batch sizes warm_sizes names for before ready (None: the
    lean loader is not tried for it).

    Run by kiln-serve's preload thread while the main thread imports the server: the first call loads
    kernels and library workspaces (cuDNN, cuBLAS), C work that then overlaps those imports."""
    manifest = Manifest.read(folder)
    if lean_refusal(manifest) is not None:
        return None
    model = load_lean(folder, manifest, device, threads)
    warm_up(model, warm_sizes(model, max_batch_size).before)
    return model


def load_lean(folder: Path, manifest: Manifest, device: str, threads: int) -> LoadedModel:
    from kiln.runtime import aoti_shim, preload

    # torch version and device now; the GPU's capability once CUDA's runtime is loaded
    check_manifest(manifest, device, preload.torch_version(), manifest.device_capability)
    assert manifest.runner_so is not None
    if manifest.runner_so_sha256:
        verify_files(folder, {manifest.runner_so: manifest.runner_so_sha256})
    preload.wait(device, threads)  # started by kiln-serve's entry point, or now
    aoti_shim.set_openmp_threads(threads)
    if device == "cuda":
        check_manifest(manifest, device, manifest.torch_version, aoti_shim.capability())
    datatypes = [s.datatype for s in manifest.signature.inputs]
    so = folder / manifest.runner_so
    container = cast(aoti_shim.Container | None, preload.container_for(so, device))  # opened early, or None
    library: Any = (
        aoti_shim.LeanCuda(so, datatypes, container)
        if device == "cuda"
        else aoti_shim.LeanCpu(so, datatypes, container, threads)
    )
    return LoadedModel(
        library,
        manifest.signature,
        manifest.batch_max,
        Loader.lean,
        device,
        manifest.batch_dim,
        {"intra_op_threads": aoti_shim.openmp_threads() or threads},
        pipeline=library if device == "cuda" else None,
    )
