"""Tensors on the wire: Open Inference Protocol datatypes, JSON data and binary data.

Runtime layer 2 (after protocol): converts between wire tensors and torch tensors.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from kiln.manifest import Signature
from kiln.runtime.errors import InvalidInput
from kiln.runtime.protocol import RequestInput, ResponseOutput

# v2 datatype → (torch dtype, numpy dtype used for bytes on the wire).
DATATYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "BOOL": (torch.bool, np.dtype(np.bool_)),
    "UINT8": (torch.uint8, np.dtype(np.uint8)),
    "INT8": (torch.int8, np.dtype(np.int8)),
    "INT16": (torch.int16, np.dtype(np.int16)),
    "INT32": (torch.int32, np.dtype(np.int32)),
    "INT64": (torch.int64, np.dtype(np.int64)),
    "FP16": (torch.float16, np.dtype(np.float16)),
    "BF16": (torch.bfloat16, np.dtype(np.uint16)),  # numpy has no bfloat16: its raw bits
    "FP32": (torch.float32, np.dtype(np.float32)),
    "FP64": (torch.float64, np.dtype(np.float64)),
}
BY_TORCH: dict[torch.dtype, str] = {t: name for name, (t, _) in DATATYPES.items()}
# Binary tensors this well aligned in a writable body buffer are used where they lie (no copy).
ALIGNMENT = 64


def datatype_of(dtype: torch.dtype) -> str:
    try:
        return BY_TORCH[dtype]
    except KeyError as exc:
        raise ValueError(f"dtype {dtype} has no Open Inference Protocol datatype") from exc


def from_rest(inp: RequestInput, binary: bytes | memoryview | None) -> torch.Tensor:
    """A request tensor as torch, from JSON `data` or from its binary slice."""
    if inp.datatype not in DATATYPES:
        raise InvalidInput(
            f"input {inp.name!r}: unknown datatype {inp.datatype!r}; expected one of {sorted(DATATYPES)}"
        )
    _, np_dtype = DATATYPES[inp.datatype]
    count = int(np.prod(inp.shape)) if inp.shape else 1
    if binary is not None:
        if len(binary) != count * np_dtype.itemsize:
            raise InvalidInput(
                f"input {inp.name!r}: {len(binary)} bytes of binary data, expected "
                f"{count * np_dtype.itemsize} for shape {inp.shape} {inp.datatype}"
            )
        array = np.frombuffer(binary, dtype=np_dtype.newbyteorder("<"))
    else:
        if inp.data is None:
            raise InvalidInput(f"input {inp.name!r} has neither 'data' nor binary_data_size")
        try:  # numpy reads flat or nested lists in C: no Python loop over the values
            array = np.asarray(inp.data, dtype=np_dtype) if inp.datatype != "BF16" else bf16_bits(inp.data)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"input {inp.name!r}: data is not {inp.datatype} (or is ragged): {exc}") from exc
        if array.size != count:
            raise InvalidInput(f"input {inp.name!r}: {array.size} values for shape {inp.shape}, expected {count}")
    if not array.flags.writeable or array.ctypes.data % ALIGNMENT:
        array = array.copy()  # read-only bytes, or a start that kernels' vector loads may not like
    tensor = torch.from_numpy(array.reshape(inp.shape))
    return tensor.view(torch.bfloat16) if inp.datatype == "BF16" else tensor


def bf16_bits(data: object) -> np.ndarray:
    """JSON numbers as bfloat16 bit patterns, rounded to nearest even as torch rounds."""
    bits = np.asarray(data, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return np.where(np.isnan(bits.view(np.float32)), 0x7FC0, rounded).astype(np.uint16)


def bf16_values(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns as float32 values (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def to_rest(name: str, tensor: torch.Tensor, binary: bool) -> tuple[ResponseOutput, bytes | None]:
    """A result tensor as a wire output, with its raw bytes when binary is asked for."""
    tensor = tensor.detach().cpu().contiguous()
    datatype = datatype_of(tensor.dtype)
    array = tensor.view(torch.int16).numpy().view(np.uint16) if datatype == "BF16" else tensor.numpy()
    if binary:
        raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        out = ResponseOutput(
            name=name, datatype=datatype, shape=list(array.shape), parameters={"binary_data_size": len(raw)}
        )
        return out, raw
    values = bf16_values(array) if datatype == "BF16" else array
    return ResponseOutput(name=name, datatype=datatype, shape=list(array.shape), data=values.reshape(-1).tolist()), None


def example_inputs(signature: Signature, sizes: Mapping[str, int], device: str, seed: int = 0) -> list[torch.Tensor]:
    """Random inputs matching the signature, each dynamic dimension at its size in `sizes` (else its minimum)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for spec in signature.inputs:
        shape = signature.shape_at(spec, sizes)
        dtype = DATATYPES[spec.datatype][0]
        if dtype.is_floating_point:
            t = torch.randn(shape, generator=gen).to(dtype)
        elif dtype == torch.bool:
            t = torch.randint(0, 2, shape, generator=gen).bool()
        else:
            t = torch.randint(0, 100, shape, generator=gen).to(dtype)
        out.append(t.to(device))
    return out
