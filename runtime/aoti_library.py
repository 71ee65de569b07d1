"""Call an AOTInductor library through its C interface, without holding the GIL.

Serve path (torch). torch's runner classes (`torch._C._aoti.AOTIModelContainerRunner*`)
hold the GIL for the whole call: on a CPU the whole forward pass, on a GPU the kernel
launches and, once a batch is already in flight, the wait for it to finish. kiln-serve's
event loop then stops reading requests while the model runs (py-spy on the H100: the model
thread sat in `run` for a third of the samples at concurrency 64). The library's own C
functions (`AOTInductorModelContainerCreateWithDevice`, `...Run`) called through ctypes
release the GIL for the call; tensors cross as AtenTensorHandles made by torch's own
helpers. Libraries that need torch's proxy executor (a `.json` beside the `.so`, for
operators outside the C shim) keep the runner class.

Releasing the GIL has a price: getting it back can wait for another thread's turn. A CPU
model whose call takes microseconds (the MLP: 7 µs) lost a third of its HTTP throughput
to that on a 2-core machine, so on a CPU a call that took under a millisecond last time
keeps the GIL this time.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from pathlib import Path

import torch

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype, _capsule_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
_capsule = ctypes.pythonapi.PyCapsule_New
_capsule.restype, _capsule.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
QUICK_SECONDS = 1e-3  # CPU calls shorter than this keep the GIL
_RUN_ARGS = [ctypes.c_void_p] * 2 + [ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_void_p] * 2


class AotiLibrary:
    """One model container of a compiled library; `num_models` instances let calls queue on a GPU."""

    def __init__(self, so: Path, device: str, num_models: int = 1) -> None:
        if so.with_suffix(".json").exists():
            raise RuntimeError(f"{so.name} needs torch's proxy executor")
        self.lib = ctypes.CDLL(str(so))
        self.device = device
        create = self.lib.AOTInductorModelContainerCreateWithDevice
        create.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_char_p, ctypes.c_char_p]
        self.handle = ctypes.c_void_p()
        cubins = str(so.parent).encode() if device == "cuda" else None
        _check(create(ctypes.byref(self.handle), num_models, device.encode(), cubins), "create the model container")
        outputs = ctypes.c_size_t()
        _check(self.lib.AOTInductorModelContainerGetNumOutputs(self.handle, ctypes.byref(outputs)), "count outputs")
        self.outputs = outputs.value
        self._releasing = self.lib.AOTInductorModelContainerRun
        self._holding = ctypes.PyDLL(str(so)).AOTInductorModelContainerRun  # same library, GIL kept
        self._releasing.argtypes = self._holding.argtypes = _RUN_ARGS
        self.quick = False  # the last CPU call took under QUICK_SECONDS

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        aoti = torch._C._aoti
        # New handles, each owning a reference to its tensor; the run takes them over.
        handles = aoti.unsafe_alloc_void_ptrs_from_tensors([t.contiguous() for t in inputs])
        given = (ctypes.c_void_p * len(handles))(*[_capsule_pointer(h, None) for h in handles])
        taken = (ctypes.c_void_p * self.outputs)()
        stream = torch.cuda.current_stream().cuda_stream if self.device == "cuda" else None
        run = self._holding if self.quick else self._releasing
        start = time.perf_counter()
        _check(run(self.handle, given, len(handles), taken, self.outputs, stream, None), "run the model")
        self.quick = self.device == "cpu" and time.perf_counter() - start < QUICK_SECONDS
        return list(aoti.alloc_tensors_by_stealing_from_void_ptrs([_capsule(p, None, None) for p in taken]))


def _check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"the AOTInductor library could not {what} (error {code}); see the log above")
