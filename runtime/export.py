"""ExportedProgram handling: load an archive, keep its dynamic dimensions (batch among them), read its signature.

Compile path (torch). Archives are loaded with torch.export.load, which reads
weights without unpickling arbitrary objects. Every dimension the program declares
dynamic stays dynamic, with its range: re-exporting with only the batch dynamic
would fix the others at the example inputs' sizes (a sequence length, say) and
refuse every other size at serve time.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import sympy
import torch
from torch.export import Dim, ExportedProgram

from kiln.manifest import BATCH, DimRange, Signature, TensorSpec
from kiln.runtime.errors import ArchiveError, ExportError
from kiln.runtime.torch_arrays import datatype_of, example_inputs

log = logging.getLogger(__name__)

# The upper end of a dimension declared without one (export's default is unbounded): the
# artifact is validated at its maximum, so it must be a size a model can run at.
DEFAULT_DIM_MAX = 4096


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


def _tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ExportError(f"{name!r} is not a tensor ({type(value).__name__}); Kiln serves tensor inputs and outputs")
    return value


def tensor_spec(name: str, value: object, dim_names: Sequence[str | None]) -> TensorSpec:
    """A tensor's name, datatype and shape, -1 (and its name) for each dynamic dimension: symbolic or named."""
    tensor = _tensor(name, value)
    shape = [d if isinstance(d, int) and n is None else -1 for d, n in zip(tensor.shape, dim_names, strict=True)]
    dims = [n if s == -1 else None for s, n in zip(shape, dim_names, strict=True)]
    return TensorSpec(name=name, datatype=datatype_of(tensor.dtype), shape=shape, dims=dims)


def _symbol_or_none(size: object) -> sympy.Symbol | None:
    """The symbol of a size; None for static sizes and expressions (outputs may have those)."""
    expr = None if isinstance(size, int) else size.node.expr  # type: ignore[attr-defined]
    return expr if isinstance(expr, sympy.Symbol) else None


def _input_symbol(name: str, index: int, size: object) -> sympy.Symbol | None:
    """An input size's symbol (None: static); a size derived from others is refused."""
    symbol = _symbol_or_none(size)
    expr = None if isinstance(size, int) else size.node.expr  # type: ignore[attr-defined]
    if symbol is None and expr is not None and not isinstance(expr, sympy.Integer):
        raise ExportError(
            f"dimension {index} of input {name!r} is derived from others ({expr}); Kiln serves inputs whose "
            "dynamic dimensions are sizes of their own: export with independent Dims"
        )
    return symbol


def _range(program: ExportedProgram, symbol: sympy.Symbol) -> DimRange:
    found = program.range_constraints.get(symbol)
    low = int(found.lower) if found is not None and found.lower.is_finite else 0
    high = int(found.upper) if found is not None and found.upper.is_finite else DEFAULT_DIM_MAX
    return DimRange(min=low, max=high)


def dynamic_dims(program: ExportedProgram, batch_dim: int) -> dict[sympy.Symbol, tuple[str, DimRange]]:
    """Each symbolic size of the inputs: its name (batch at `batch_dim`, else `<input>.<dim>` where
    first seen; torch.export does not keep the names its Dims had) and its declared range."""
    found: dict[sympy.Symbol, tuple[str, DimRange]] = {}
    for node in _user_placeholders(program):
        for index, size in enumerate(_tensor(node.name, node.meta.get("val")).shape):
            symbol = _input_symbol(node.name, index, size)
            if symbol is None:
                continue
            name = BATCH if index == batch_dim else found.get(symbol, (f"{node.name}.{index}", None))[0]
            if symbol not in found or name == BATCH:
                found[symbol] = (name, _range(program, symbol))
    return found


def output_names(program: ExportedProgram, count: int, declared: Sequence[str] = ()) -> list[str]:
    """Names users can rely on: those declared, else the model's own (dict keys, namedtuple fields), else outputN."""
    if declared:
        if len(declared) != count:
            raise ExportError(f"{len(declared)} output names declared ({list(declared)}), the model returns {count}")
        return list(declared)
    spec = program.call_spec.out_spec
    keys: list[str] = []
    if spec is not None and spec.num_leaves == count and spec.num_children == count:
        if spec.type is dict:
            keys = [str(k) for k in spec.context]
        elif hasattr(spec.type, "_fields"):  # a namedtuple
            keys = list(spec.type._fields)
    if len(set(keys)) == count and all(re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", k) for k in keys):
        return keys
    return [f"output{i}" for i in range(count)]


def signature_of(
    program: ExportedProgram, batch_dim: int = 0, batch: DimRange | None = None, outputs: Sequence[str] = ()
) -> Signature:
    """Named inputs (placeholder names) and outputs, every dynamic dimension named and ranged.

    `batch` overrides the batch's range (the compile spec's dynamicBatch)."""
    symbols = dynamic_dims(program, batch_dim)
    names = {symbol: name for symbol, (name, _) in symbols.items()}

    def spec(name: str, value: object) -> TensorSpec:
        shape = _tensor(name, value).shape
        return tensor_spec(name, value, [names.get(_symbol_or_none(d)) for d in shape])  # type: ignore[arg-type]

    inputs = [spec(n.name, n.meta.get("val")) for n in _user_placeholders(program)]
    if not inputs:
        raise ExportError("the exported program has no tensor inputs")
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    values = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in output_node.args[0]]
    user_outputs = values[-len(program.graph_signature.user_outputs) :] if values else []
    labels = output_names(program, len(user_outputs), outputs)
    dims = {name: rng for name, rng in symbols.values()}
    if batch is not None and BATCH in dims:
        dims[BATCH] = batch
    return Signature(inputs=inputs, outputs=[spec(n, v) for n, v in zip(labels, user_outputs, strict=True)], dims=dims)


def to_device(program: ExportedProgram, device: str) -> tuple[ExportedProgram, str]:
    """The program with parameters and traced constants (aranges, buffers) on `device`."""
    if device == "cpu":
        return program, device
    if device == "cuda":  # one explicit index: export's device checks tell "cuda" and "cuda:0" apart
        device = f"cuda:{torch.cuda.current_device()}"
    from torch.export.passes import move_to_device_pass

    return move_to_device_pass(program, device), device


def with_dynamic_dims(
    program: ExportedProgram, batch: DimRange, device: str, batch_dim: int = 0, outputs: Sequence[str] = ()
) -> ExportedProgram:
    """The program on `device` with dimension `batch_dim` of every input dynamic over `batch`, and every
    other dynamic dimension it declares kept with its range.

    A program whose batch is dynamic over a range covering `batch` already is used as exported (the
    server bounds requests to `batch`); re-exporting a program's module is a second trace that not
    every model survives (torch.nn.MultiheadAttention on CUDA, for one)."""
    have = next((rng for name, rng in dynamic_dims(program, batch_dim).values() if name == BATCH), None)
    if has_dynamic_batch(program, batch_dim) and have is not None and have.min <= batch.min <= batch.max <= have.max:
        return to_device(program, device)[0]
    signature = signature_of(program, batch_dim, batch, outputs)
    for spec in signature.inputs:  # an input exported with a static batch gets a dynamic one
        if len(spec.shape) > batch_dim:
            spec.shape[batch_dim], spec.dims[batch_dim] = -1, BATCH
    signature.dims[BATCH] = batch
    program, device = to_device(program, device)
    return export_module(program.module(), signature, device)


def trace_sizes(dims: Mapping[str, DimRange]) -> dict[str, int]:
    """A size inside each range to trace at: at least 2 (torch.export specialises 0 and 1) and
    different from the other dimensions' sizes, so that no two look equal to the tracer."""
    taken: set[int] = set()
    sizes = {}
    for name, rng in dims.items():
        size = max(2, rng.min)
        while size in taken and size < rng.max:
            size += 1
        sizes[name] = min(size, rng.max)
        taken.add(sizes[name])
    return sizes


def export_module(
    module: torch.nn.Module, signature: Signature, device: str, outputs: Sequence[str] = ()
) -> ExportedProgram:
    """torch.export a module whose inputs are `signature.inputs`, each named dimension dynamic in its range."""
    args = tuple(example_inputs(signature, trace_sizes(signature.dims), device))
    objects = {
        name: Dim(re.sub(r"\W", "_", name), min=rng.min, max=rng.max)
        for name, rng in signature.dims.items()
        if rng.min < rng.max
    }
    dynamic = tuple(
        {i: objects[n] for i, n in enumerate(spec.dim_names()) if n in objects} for spec in signature.inputs
    )
    declared = signature.describe_dims()
    try:
        program = torch.export.export(module, args, dynamic_shapes=dynamic if objects else None, strict=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ExportError(
            f"cannot export with the dynamic dimensions {declared}: {first} "
            "(the model must accept every size in each range; narrow a range or fix the dimension)"
        ) from exc
    batch_dim = next((s.dim_names().index(BATCH) for s in signature.inputs if BATCH in s.dim_names()), 0)
    _check_kept(signature, signature_of(program, batch_dim, outputs=outputs))
    return program


def _check_kept(declared: Signature, exported: Signature) -> None:
    """A dimension export made static is a failure that names it, never a silent change."""
    for want, got in zip(declared.inputs, exported.inputs, strict=True):
        for index, name in enumerate(want.dim_names()):
            rng = declared.dims.get(name) if name else None
            if rng is not None and rng.min < rng.max and got.shape[index] != -1:
                raise ExportError(
                    f"dimension {index} of input {want.name!r} ({name}, declared {rng}) was fixed at "
                    f"{got.shape[index]} by torch.export: the model specialises it"
                )


def has_dynamic_batch(program: ExportedProgram, batch_dim: int = 0) -> bool:
    """True when dimension `batch_dim` of every input is symbolic already."""
    values = [n.meta.get("val") for n in _user_placeholders(program)]
    return all(
        isinstance(v, torch.Tensor) and v.dim() > batch_dim and not isinstance(v.shape[batch_dim], int) for v in values
    )
