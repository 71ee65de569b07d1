"""Host↔GPU transfers for torch's loaders on a GPU, overlapped with the model's own work.

Serve path, torch side (no HTTP); the lean loader does the same with CUDA's
runtime (kiln.runtime.aoti_shim.LeanCuda). Inputs go up on a copy stream of their own, so
the next batch's copies run while the GPU still computes the previous one; results come
down into pinned host memory right behind the model's kernels, and only the thread that
answers waits for them (docs/benchmarks.md §2: the GPU idled while one thread copied,
computed and waited in turn).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kiln.manifest import Signature
from kiln.runtime.torch_arrays import TensorFn, to_numpy, to_torch


@dataclass
class OnTheWay:
    """Results of one model call, being copied to the host."""

    outputs: list[torch.Tensor]
    copied: torch.cuda.Event

    def wait(self) -> list[np.ndarray]:
        self.copied.synchronize()  # releases the GIL while the GPU finishes
        return [to_numpy(o) for o in self.outputs]


class CudaTransfers:
    """The copy stream and the steps of a model call on a CUDA device (kiln.runtime.loader.Pipeline)."""

    def __init__(self, device: str, fn: TensorFn, signature: Signature) -> None:
        self.device = torch.device(device)
        self.fn = fn
        self.datatypes = [s.datatype for s in signature.inputs]
        self.copies = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]

    def upload(self, requests: list[list[np.ndarray]], dim: int) -> list[torch.Tensor]:
        """Each request's inputs copied up on the copy stream, joined on the GPU along `dim`.

        Joining on the host was the model thread's biggest cost once (64 inputs of 602 KB)."""
        with torch.cuda.stream(self.copies):
            parts = [
                [to_torch(a, d).to(self.device, non_blocking=True) for a, d in zip(inputs, self.datatypes, strict=True)]
                for inputs in requests
            ]
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.copies)
        for inputs in parts:
            for t in inputs:
                t.record_stream(compute)  # memory allocated on the copy stream, read on this one
        if len(parts) == 1:
            return parts[0]
        return [torch.cat(joined, dim) for joined in zip(*parts, strict=True)]

    def launch(self, inputs: list[torch.Tensor]) -> OnTheWay:
        """Queue the model call and the copy of its results to pinned host memory; wait for neither."""
        with torch.inference_mode():
            outputs = [o.to("cpu", non_blocking=True) for o in self.fn(inputs)]
        copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
        copied.record(torch.cuda.current_stream(self.device))
        return OnTheWay(outputs, copied)

    def finish(self, launched: OnTheWay) -> list[np.ndarray]:
        return launched.wait()

    def pin(self, address: int, size: int) -> bool:
        return bool(torch.cuda.cudart().cudaHostRegister(address, size, 0) == 0)  # type: ignore[no-untyped-call]

    def unpin(self, address: int) -> None:
        torch.cuda.cudart().cudaHostUnregister(address)  # type: ignore[no-untyped-call]
