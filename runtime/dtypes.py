"""Open Inference Protocol datatypes and the numpy dtype of their bytes on the wire.

Serve path, numpy only: the C shim (kiln.runtime.aoti_shim) needs these before kiln-serve's
pydantic models are imported; kiln.runtime.tensors re-exports them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DATATYPES"]

# v2 datatype → numpy dtype of its bytes on the wire (numpy has no bfloat16: its raw bits).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "BF16": np.dtype(np.uint16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
