"""Call an AOTInductor library through its C interface, without holding the GIL, on torch tensors.

Serve path, torch side: the runner the lean loader falls back to (kiln.runtime.aoti_shim holds
the container; here torch makes the tensor handles). torch's runner classes
(`torch._C._aoti.AOTIModelContainerRunner*`) hold the GIL for the whole call: on a CPU the
whole forward pass, on a GPU the kernel launches and, once a batch is already in flight, the
wait for it to finish. kiln-serve's event loop then stops reading requests while the model
runs (py-spy on the H100: the model thread sat in `run` for a third of the samples at
concurrency 64). The library's own C functions (`AOTInductorModelContainerCreateWithDevice`,
`...Run`) called through ctypes release the GIL for the call; tensors cross as
AtenTensorHandles made by torch's own helpers. Libraries that need torch's proxy executor (a
`.json` beside the `.so`, for operators outside the C shim) keep the runner class.

Releasing the GIL has a price: getting it back can wait for another thread's turn. A CPU
model whose call takes microseconds (the MLP: 7 µs) lost a third of its HTTP throughput to
that on a 2-core machine, so on a CPU a call that took under a millisecond last time keeps
the GIL this time."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

import torch

from kiln.runtime.aoti_shim import Container

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype, _capsule_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
_capsule = ctypes.pythonapi.PyCapsule_New
_capsule.restype, _capsule.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class AotiLibrary:
    """One model container of a compiled library; `num_models` instances let calls queue on a GPU."""

    def __init__(self, so: Path, device: str, num_models: int = 1) -> None:
        self.container = Container(so, device, num_models)
        self.device = device

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        aoti = torch._C._aoti
        # New handles, each owning a reference to its tensor; the run takes them over.
        handles = aoti.unsafe_alloc_void_ptrs_from_tensors([t.contiguous() for t in inputs])
        given = [int(_capsule_pointer(h, None)) for h in handles]
        stream = torch.cuda.current_stream().cuda_stream if self.device == "cuda" else None
        taken = self.container.run(given, stream)
        return list(aoti.alloc_tensors_by_stealing_from_void_ptrs([_capsule(p, None, None) for p in taken]))
