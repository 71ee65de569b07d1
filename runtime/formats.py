"""Archive formats → what an engine builds from: an ExportedProgram with its dynamic dimensions, or TorchScript.

Compile path (torch). module-and-weights and TorchServe .mar archives run the user's
model.py: that is code execution, and it happens only here, in the compile Job —
never in the operator, and never in serving pods, which load the result. Weights
are read with `torch.load(weights_only=True)`: a pickle that is more than tensors
is refused.
"""

from __future__ import annotations

import importlib.util
import pickle
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.export import ExportedProgram

from kiln.api import ArchiveFormat, DynamicBatch
from kiln.manifest import BATCH, DimRange, Signature
from kiln.runtime import bundle
from kiln.runtime.errors import ArchiveError
from kiln.runtime.export import export_module, load_exported, signature_of, tensor_spec, trace_sizes, with_dynamic_dims
from kiln.runtime.torch_arrays import example_inputs
from kiln.runtime.unpack import Limits, kind_of, unpack


@dataclass(frozen=True)
class Source:
    """A model ready for an engine: `program` (ExportedProgram, batch dynamic) or `script` (TorchScript file)."""

    signature: Signature
    program: ExportedProgram | None = None
    script: Path | None = None


def prepare(archive: Path, fmt: ArchiveFormat, work: Path, batch: DynamicBatch, device: str, limits: Limits) -> Source:
    if fmt == ArchiveFormat.exported_program:
        batch_range = DimRange(min=batch.min, max=batch.max)
        program = with_dynamic_dims(load_exported(archive), batch_range, device, batch.dim)
        return Source(signature_of(program, batch.dim, batch_range), program=program)
    if fmt == ArchiveFormat.torchscript:
        return _torchscript(archive, work, batch, limits)
    if kind_of(archive) is None:
        raise ArchiveError(f"a {fmt.value} archive must be a .tar.gz or .zip, and {archive.name} is neither")
    folder = unpack(archive, work / "unpacked", limits)
    found = bundle.mar_bundle(folder) if fmt == ArchiveFormat.torchserve_mar else bundle.module_bundle(folder)
    declared = found.config.signature(batch)
    module = load_module(found).to(device)
    program = export_module(module, declared, device, found.config.outputs)
    return Source(
        _with_declared_names(signature_of(program, batch.dim, outputs=found.config.outputs), declared), program=program
    )


def _with_declared_names(exported: Signature, declared: Signature) -> Signature:
    """The exported signature with kiln.yaml's dimension names and ranges (export numbers its own)."""
    renamed = {}
    for got, want in zip(exported.inputs, declared.inputs, strict=True):
        for old, new in zip(got.dim_names(), want.dim_names(), strict=True):
            if old is not None and new is not None:
                renamed[old] = new
    for spec in [*exported.inputs, *exported.outputs]:
        spec.dims = [renamed.get(n, n) if n else None for n in spec.dim_names()]
    return exported.model_copy(update={"dims": {n: r for n, r in declared.dims.items() if n in renamed.values()}})


def _import(path: Path) -> object:
    spec = importlib.util.spec_from_file_location("kiln_user_model", path)
    if spec is None or spec.loader is None:
        raise ArchiveError(f"cannot import {path.name}")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # model.py may import files beside it
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ArchiveError(f"{path.name} failed to import: {exc.__class__.__name__}: {exc}") from exc
    finally:
        sys.path.remove(str(path.parent))
    return module


def _module_class(module: object, path: Path, wanted: str | None) -> type[nn.Module]:
    classes = {
        name: value
        for name, value in vars(module).items()
        if isinstance(value, type) and issubclass(value, nn.Module) and value.__module__ == "kiln_user_model"
    }
    if wanted is not None:
        if wanted not in classes:
            raise ArchiveError(f"{path.name} defines no nn.Module subclass {wanted!r} (it defines {sorted(classes)})")
        return classes[wanted]
    if len(classes) != 1:
        raise ArchiveError(
            f"{path.name} must define exactly one torch.nn.Module subclass, it defines {sorted(classes)}: "
            f"name the one to serve with 'class:' in {bundle.CONFIG_NAME}"
        )
    return next(iter(classes.values()))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict, read without unpickling anything but tensors and plain containers."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise ArchiveError(
            f"{path.name} is not a plain state dict: torch.load(weights_only=True) refused it ({first}); "
            "save weights with torch.save(model.state_dict(), ...)"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # checkpoints that wrap the state dict
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArchiveError(f"{path.name} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def load_module(found: bundle.ModuleBundle) -> nn.Module:
    cls = _module_class(_import(found.module), found.module, found.config.class_name)
    try:
        model = cls(**found.config.kwargs)
    except Exception as exc:
        raise ArchiveError(
            f"{cls.__name__}(**{found.config.kwargs}) failed: {exc.__class__.__name__}: {exc} "
            f"(constructor arguments go in 'kwargs:' of {bundle.CONFIG_NAME})"
        ) from exc
    if found.weights is not None:
        result = model.load_state_dict(load_weights(found.weights), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ArchiveError(
                f"{found.weights.name} does not fit {cls.__name__}: missing {result.missing_keys[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
    return model.eval()


def _script_files(archive: Path, work: Path, limits: Limits) -> bundle.ScriptBundle:
    """A bare torch.jit.save file (kiln.yaml inside as an extra file), or a bundle holding one."""
    kind = kind_of(archive)
    if kind == "zip":
        with zipfile.ZipFile(archive) as z:
            # A TorchScript file is itself a zip: one whose members sit under <name>/code, <name>/data.pkl.
            if any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist()):
                return bundle.ScriptBundle(archive, None)
    if kind is None:
        raise ArchiveError(f"{archive.name} is neither a TorchScript file nor a .tar.gz/.zip holding one")
    return bundle.script_bundle(unpack(archive, work / "unpacked", limits))


def _torchscript(archive: Path, work: Path, batch: DynamicBatch, limits: Limits) -> Source:
    found = _script_files(archive, work, limits)
    extra = {bundle.CONFIG_NAME: ""}
    try:
        script = torch.jit.load(str(found.script), map_location="cpu", _extra_files=extra)
    except Exception as exc:
        raise ArchiveError(
            f"not a TorchScript file written by torch.jit.save: {exc.__class__.__name__}: {exc}"
        ) from exc
    config = found.config or bundle.parse_config(extra[bundle.CONFIG_NAME])
    declared = config.signature(batch)
    with torch.inference_mode():
        probe = example_inputs(declared, trace_sizes(declared.dims), "cpu")
        try:
            out = script(*probe)
        except Exception as exc:
            raise ArchiveError(f"the TorchScript module fails on inputs shaped as kiln.yaml says: {exc}") from exc
    own = list(out) if isinstance(out, dict) else []  # a dict's keys are the module's own output names
    leaves = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (tuple, list)) else [out]
    names = config.outputs or own or [f"output{i}" for i in range(len(leaves))]
    if len(names) != len(leaves):
        raise ArchiveError(f"{bundle.CONFIG_NAME} names {len(names)} outputs, the module returns {len(leaves)}")
    # The batch is the one output dimension known to follow the inputs; TorchScript records no more.
    outputs = [
        tensor_spec(n, v, [BATCH if i == batch.dim else None for i in range(v.dim())])
        for n, v in zip(names, leaves, strict=True)
    ]
    return Source(declared.model_copy(update={"outputs": outputs}), script=found.script)
