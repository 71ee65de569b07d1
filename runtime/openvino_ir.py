"""OpenVINO: convert an ExportedProgram to IR once (compile Job), run it with OpenVINO's CPU runtime (kiln-serve).

Compile and serve paths (torch for tensors, openvino imported only here). The compile
Job also compiles the IR once with a blob cache inside the artifact, so a replica on a
node of the same CPU loads the compiled blob instead of compiling again; the cache is
mounted read-only in pods, and a miss (another CPU) compiles in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from kiln.runtime.errors import CompileError

log = logging.getLogger(__name__)

MODEL_XML = "model.xml"
MODEL_BIN = "model.bin"
BLOB_CACHE = "ov-cache"
# f32 unless asked otherwise: OpenVINO picks bf16 on CPUs that have it, which moves
# outputs by ~1e-2 — more than the validation tolerance, and not what AOTInductor serves.
DEFAULT_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


def _openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise CompileError("backend openvino needs the openvino package in the runtime image") from exc
    return openvino


def _compiled(ov: Any, xml: Path, threads: int, cache: Path | None) -> Any:
    core = ov.Core()
    config: dict[str, Any] = dict(DEFAULT_CONFIG)
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if cache is not None:
        config["CACHE_DIR"] = str(cache)
    return core.compile_model(str(xml), "CPU", config)


def build(program: ExportedProgram, dest: Path) -> list[Path]:
    """Write model.xml/model.bin and the compiled blob cache into `dest`; return the IR files."""
    ov = _openvino()
    try:
        model = ov.convert_model(program)
        ov.save_model(model, str(dest / MODEL_XML))
        _compiled(ov, dest / MODEL_XML, 0, dest / BLOB_CACHE)
    except CompileError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise CompileError(f"OpenVINO conversion failed: {exc.__class__.__name__}: {first}") from exc
    return [dest / MODEL_XML, dest / MODEL_BIN]


def load(folder: Path, threads: int) -> Any:
    """A function running the IR on CPU; one infer request, as the batcher calls from one thread."""
    ov = _openvino()
    xml = folder / MODEL_XML
    try:
        compiled = _compiled(ov, xml, threads, folder / BLOB_CACHE)
    except RuntimeError as exc:  # an unwritable cache on a CPU the blob was not built for
        log.warning("OpenVINO blob cache unusable (%s); compiling the IR in memory", exc)
        compiled = _compiled(ov, xml, threads, None)
    request = compiled.create_infer_request()
    outputs = compiled.outputs

    def run(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        result = request.infer([t.contiguous().numpy() for t in inputs])
        return [torch.from_numpy(result[o].copy()) for o in outputs]

    return run
