"""numpy ↔ torch for the loaders and compile steps that import torch.

Serve path, torch side (of kiln.runtime.tensors). Arrays cross without copies where
torch allows it (torch.from_numpy / Tensor.numpy share memory); BF16 crosses as its bits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from kiln.manifest import Signature
from kiln.runtime.loader import ArrayFn
from kiln.runtime.tensors import example_arrays

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "FP32": torch.float32,
    "FP64": torch.float64,
}
BY_TORCH: dict[torch.dtype, str] = {t: name for name, t in TORCH_DTYPES.items()}

TensorFn = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]


def datatype_of(dtype: torch.dtype) -> str:
    try:
        return BY_TORCH[dtype]
    except KeyError as exc:
        raise ValueError(f"dtype {dtype} has no Open Inference Protocol datatype") from exc


def to_torch(array: np.ndarray, datatype: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if datatype == "BF16" else tensor


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def example_inputs(signature: Signature, sizes: Mapping[str, int], device: str, seed: int = 0) -> list[torch.Tensor]:
    """kiln.runtime.tensors.example_arrays as torch tensors on `device`."""
    arrays = example_arrays(signature, sizes, seed)
    return [to_torch(a, s.datatype).to(device) for a, s in zip(arrays, signature.inputs, strict=True)]


def on_arrays(fn: TensorFn, signature: Signature, device: str) -> ArrayFn:
    """A torch model function called with and returning numpy arrays (results on the host)."""
    datatypes = [s.datatype for s in signature.inputs]

    def run(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            inputs = [to_torch(a, d).to(device) for a, d in zip(arrays, datatypes, strict=True)]
            return [to_numpy(o) for o in fn(inputs)]

    return run
