"""ExportedProgram handling: load an archive, make the batch dimension dynamic, read its signature.

Compile path (torch). Archives are loaded with torch.export.load, which reads
weights without unpickling arbitrary objects.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.export import Dim, ExportedProgram

from kiln.manifest import Signature, TensorSpec
from kiln.runtime.errors import ArchiveError, ExportError
from kiln.runtime.tensors import datatype_of, example_inputs

log = logging.getLogger(__name__)


def load_exported(path: Path) -> ExportedProgram:
    """Load a file written by torch.export.save, or say why it is not one."""
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # torch raises many types for a foreign file
        raise ArchiveError(
            f"archive is not an ExportedProgram written by torch.export.save: {exc.__class__.__name__}: {exc}"
        ) from exc
    if not isinstance(program, ExportedProgram):
        raise ArchiveError(f"archive holds a {type(program).__name__}, not an ExportedProgram")
    return program


def _user_placeholders(program: ExportedProgram) -> list[torch.fx.Node]:
    names = set(program.graph_signature.user_inputs)
    return [n for n in program.graph.nodes if n.op == "placeholder" and n.name in names]


def tensor_spec(name: str, value: object, batch_dim: int) -> TensorSpec:
    """A tensor's name, datatype and shape, its batch dimension as -1 (and any other symbolic one)."""
    if not isinstance(value, torch.Tensor):
        raise ExportError(f"{name!r} is not a tensor ({type(value).__name__}); Kiln serves tensor inputs and outputs")
    shape = [d if isinstance(d, int) else -1 for d in value.shape]
    if len(shape) > batch_dim:
        shape[batch_dim] = -1
    return TensorSpec(name=name, datatype=datatype_of(value.dtype), shape=shape)


def signature_of(program: ExportedProgram, batch_dim: int = 0) -> Signature:
    """Named inputs (placeholder names) and outputs (output0, output1, ...), batch dim as -1."""
    inputs = [tensor_spec(n.name, n.meta.get("val"), batch_dim) for n in _user_placeholders(program)]
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    values = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in output_node.args[0]]
    user_outputs = values[-len(program.graph_signature.user_outputs) :] if values else []
    outputs = [tensor_spec(f"output{i}", v, batch_dim) for i, v in enumerate(user_outputs)]
    if not inputs:
        raise ExportError("the exported program has no tensor inputs")
    return Signature(inputs=inputs, outputs=outputs)


def has_dynamic_batch(program: ExportedProgram, batch_dim: int = 0) -> bool:
    """True when dimension `batch_dim` of every input is symbolic already."""
    values = [n.meta.get("val") for n in _user_placeholders(program)]
    return all(
        isinstance(v, torch.Tensor) and v.dim() > batch_dim and not isinstance(v.shape[batch_dim], int) for v in values
    )


def to_device(program: ExportedProgram, device: str) -> tuple[ExportedProgram, str]:
    """The program with parameters and traced constants (aranges, buffers) on `device`."""
    if device == "cpu":
        return program, device
    if device == "cuda":  # one explicit index: export's device checks tell "cuda" and "cuda:0" apart
        device = f"cuda:{torch.cuda.current_device()}"
    from torch.export.passes import move_to_device_pass

    return move_to_device_pass(program, device), device


def with_dynamic_batch(
    program: ExportedProgram, batch_min: int, batch_max: int, device: str, batch_dim: int = 0
) -> ExportedProgram:
    """Re-export so that dimension `batch_dim` of every input ranges over [batch_min, batch_max]."""
    signature = signature_of(program, batch_dim)
    program, device = to_device(program, device)
    return export_module(program.module(), signature.inputs, batch_min, batch_max, device, batch_dim)


def export_module(
    module: torch.nn.Module, inputs: list[TensorSpec], batch_min: int, batch_max: int, device: str, batch_dim: int = 0
) -> ExportedProgram:
    """torch.export a module whose inputs are `inputs`, with the batch dimension in [batch_min, batch_max]."""
    # torch.export specialises sizes 0 and 1, so trace with at least 2 rows.
    trace_batch = min(max(2, batch_min), batch_max)
    args = tuple(example_inputs(Signature(inputs=inputs, outputs=[]), trace_batch, device))
    if batch_max > 1:
        batch = Dim("batch", min=batch_min, max=batch_max)
        dynamic: tuple[dict[int, Dim], ...] | None = tuple({batch_dim: batch} for _ in args)
    else:
        dynamic = None
    try:
        return torch.export.export(module, args, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ExportError(
            f"cannot export with the batch dimension {batch_dim} dynamic in [{batch_min}, {batch_max}]: {first} "
            f"(the model must accept any batch size along dimension {batch_dim})"
        ) from exc
