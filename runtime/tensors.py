"""Tensors on the wire: Open Inference Protocol datatypes, JSON data and binary data, as numpy arrays.

Serve path, tensors (above protocol), no torch: the serve path holds host data in numpy
arrays, so a replica that calls its compiled library through the C shim never imports
torch's Python package (kiln.runtime.torch_arrays converts for the loaders that do).
BF16 arrays hold the bit patterns as uint16; the signature says which are BF16.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from kiln.manifest import Signature
from kiln.runtime.dtypes import DATATYPES
from kiln.runtime.errors import InvalidInput
from kiln.runtime.protocol import RequestInput, ResponseOutput

# Binary tensors this well aligned in a writable body buffer are used where they lie (no copy).
ALIGNMENT = 64


def from_rest(inp: RequestInput, binary: bytes | memoryview | None) -> np.ndarray:
    """A request tensor as a numpy array, from JSON `data` or from its binary slice."""
    if inp.datatype not in DATATYPES:
        raise InvalidInput(
            f"input {inp.name!r}: unknown datatype {inp.datatype!r}; expected one of {sorted(DATATYPES)}"
        )
    np_dtype = DATATYPES[inp.datatype]
    count = math.prod(inp.shape)
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
    if not array.flags.writeable or array.__array_interface__["data"][0] % ALIGNMENT:
        array = array.copy()  # read-only bytes, or a start that kernels' vector loads may not like
    return array.reshape(inp.shape)


def bf16_bits(data: object) -> np.ndarray:
    """Numbers as bfloat16 bit patterns, rounded to nearest even as torch rounds."""
    bits = np.asarray(data, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return np.where(np.isnan(bits.view(np.float32)), 0x7FC0, rounded).astype(np.uint16)


def bf16_values(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns as float32 values (exact)."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def raw_bytes(array: np.ndarray) -> bytes:
    """An output's bytes as the binary tensor extension sends them: row-major, little-endian."""
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def to_rest(name: str, datatype: str, array: np.ndarray, binary: bool) -> tuple[ResponseOutput, bytes | None]:
    """A result array (of the signature's `datatype`: BF16 arrays hold bits) as a wire output, with its raw
    bytes when binary is asked for."""
    array = np.ascontiguousarray(array)
    if binary:
        raw = raw_bytes(array)
        out = ResponseOutput(
            name=name, datatype=datatype, shape=list(array.shape), parameters={"binary_data_size": len(raw)}
        )
        return out, raw
    values = bf16_values(array) if datatype == "BF16" else array
    return ResponseOutput(name=name, datatype=datatype, shape=list(array.shape), data=values.reshape(-1).tolist()), None


def zero_arrays(signature: Signature, sizes: Mapping[str, int]) -> list[np.ndarray]:
    """Zeros matching the signature (warm-up calls: no random numbers to draw for a batch of 64 images)."""
    return [np.zeros(signature.shape_at(spec, sizes), DATATYPES[spec.datatype]) for spec in signature.inputs]


def example_arrays(signature: Signature, sizes: Mapping[str, int], seed: int = 0) -> list[np.ndarray]:
    """Random inputs matching the signature, each dynamic dimension at its size in `sizes` (else its minimum)."""
    rng = np.random.default_rng(seed)
    out = []
    for spec in signature.inputs:
        shape = signature.shape_at(spec, sizes)
        if spec.datatype in ("FP16", "FP32", "FP64"):
            array = rng.standard_normal(shape, dtype=np.float32).astype(DATATYPES[spec.datatype])
        elif spec.datatype == "BF16":
            array = bf16_bits(rng.standard_normal(shape, dtype=np.float32))
        elif spec.datatype == "BOOL":
            array = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            array = rng.integers(0, 100, shape).astype(DATATYPES[spec.datatype])
        out.append(array)
    return out
