"""Run an AOTInductor library without torch's Python package: its C interface, the C shim, CUDA's runtime.

Serve path, lean loader (no torch import). `import torch` takes seconds (4.1-4.7 s on the
H200, shared/notes/gpu-findings.md); the compiled library needs only torch's shared
libraries, which load in about half a second. Tensors are made and read with the
`aoti_torch_*` functions libtorch exports (torch/csrc/inductor/aoti_torch/c/shim.h);
host data stays in numpy arrays. On a GPU, inputs go up on a copy stream with CUDA's
runtime, the library runs on a compute stream that waits for them, and the answering
thread copies the results down: the model thread is already launching the next batch.
ctypes releases the GIL during every foreign call, except a CPU run whose last call took under
QUICK_SECONDS. Per call only what changes is made: ctypes sizes and strides are kept per shape,
and a CPU library's output layouts per input shapes, so after the first call at a shape only
each output's address is read and a contiguous result is copied out with one memmove. A CPU
call's OpenMP thread count is chosen per input shapes too (ThreadChoice): one thread where a
sub-millisecond call was faster on one, else all.
Anything missing (a symbol, the CUDA runtime, a library needing torch's proxy executor)
raises LeanUnavailable with the reason; the loader then takes torch's path and says why.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.runtime.dtypes import DATATYPES
from kiln.runtime.preload import LeanUnavailable, cudart_path

# The shim function naming torch's code for each datatype (aoti_torch_dtype_<name>).
SHIM_NAMES = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "BF16": "bfloat16",
    "FP32": "float32",
    "FP64": "float64",
}
QUICK_SECONDS = 1e-3  # CPU calls shorter than this keep the GIL (see aoti_library's docstring)
H2D, D2H = 1, 2  # cudaMemcpyKind
NON_BLOCKING, NO_TIMING = 1, 2  # cudaStreamNonBlocking, cudaEventDisableTiming
CC_MAJOR, CC_MINOR = 75, 76  # cudaDevAttrComputeCapabilityMajor/Minor
RELEASE_THRESHOLD = 4  # cudaMemPoolAttrReleaseThreshold
_Int64s = ctypes.POINTER(ctypes.c_int64)
# Shapes whose ctypes sizes and strides are kept for the next call (batch sizes x dynamic dimensions).
MAX_LAYOUTS = 4096
# Model instances per container: on a GPU two, so one batch runs while the next is launched.
MODELS_PER_CONTAINER = {"cpu": 1, "cuda": 2}
# A CPU call at some input shapes that takes under TRY_ONE_S on all threads is also timed on one, TRIALS
# calls each way: OpenMP's threads sleep between calls (OMP_WAIT_POLICY=PASSIVE), and waking them cost a
# tiny model more than they saved (MLP, 2 cores, c=8: 25-30% more requests a second on one thread).
TRY_ONE_S, TRIALS = 1e-3, 5
Shapes = tuple[tuple[int, ...], ...]


def set_openmp_threads(threads: int) -> None:
    """OpenMP's thread count for a compiled CPU library's parallel loops (the pod's CPU limit)."""
    omp = getattr(ctypes.CDLL(None), "omp_set_num_threads", None)
    if threads and omp is not None:
        omp(threads)


def openmp_threads() -> int:
    """The threads a compiled CPU library's parallel loops use (OpenMP's maximum); 0: unknown."""
    get = getattr(ctypes.CDLL(None), "omp_get_max_threads", None)
    return int(get()) if get is not None else 0


class ThreadChoice:
    """OpenMP threads for each CPU call by its input shapes: all of them, or one where one was faster.

    Set before every call: OpenMP keeps the count per calling thread, and both the event loop's thread
    and the model thread call the model (kiln.runtime.batching)."""

    def __init__(self, threads: int) -> None:
        self.all = threads
        self.set = getattr(ctypes.CDLL(None), "omp_set_num_threads", None)
        self.chosen: dict[Shapes, int] = {}
        self.timed: dict[Shapes, tuple[list[float], list[float]]] = {}  # seconds on all threads, on one

    def pick(self, key: Shapes) -> int:
        threads = self.chosen.get(key)
        if threads is None:
            timed = self.timed.get(key)
            if timed is None:
                if self.all <= 1 or self.set is None or len(self.chosen) + len(self.timed) >= MAX_LAYOUTS:
                    return self.all  # nothing to choose, or too many shapes to time: all, as OpenMP was set
                timed = self.timed[key] = ([], [])
            threads = 1 if len(timed[1]) < len(timed[0]) else self.all  # alternated
        if self.set is not None and self.all > 1:
            self.set(threads)
        return threads

    def record(self, key: Shapes, threads: int, seconds: float) -> None:
        timed = self.timed.get(key)
        if timed is None:
            return
        on_all, on_one = timed
        (on_one if threads == 1 and self.all > 1 else on_all).append(seconds)
        if threads == self.all and seconds >= TRY_ONE_S:  # long enough for every thread to earn its wake-up
            self.chosen[key] = self.all
        elif len(on_one) >= TRIALS:
            faster = sorted(on_one)[TRIALS // 2] < sorted(on_all)[len(on_all) // 2]  # medians
            self.chosen[key] = 1 if faster else self.all
        else:
            return
        del self.timed[key]


def _check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"could not {what} (error {code})")


class Shim:
    """The `aoti_torch_*` functions Kiln uses, and torch's dtype and device codes."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(None)  # everything loaded with RTLD_GLOBAL
        try:
            self.codes = {name: getattr(lib, f"aoti_torch_dtype_{fn}")() for name, fn in SHIM_NAMES.items()}
            self.cpu, self.cuda = lib.aoti_torch_device_type_cpu(), lib.aoti_torch_device_type_cuda()
            self.from_blob = lib.aoti_torch_create_tensor_from_blob
            self.data_ptr, self.dim = lib.aoti_torch_get_data_ptr, lib.aoti_torch_get_dim
            self.sizes, self.strides = lib.aoti_torch_get_sizes, lib.aoti_torch_get_strides
            self.dtype, self.delete = lib.aoti_torch_get_dtype, lib.aoti_torch_delete_tensor_object
        except AttributeError as exc:
            raise LeanUnavailable(f"this torch's C shim lacks a symbol Kiln uses: {exc}") from exc
        self.from_blob.argtypes = [
            ctypes.c_void_p, ctypes.c_int64, _Int64s, _Int64s, ctypes.c_int64,
            ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p),
        ]  # fmt: skip
        for fn in (self.data_ptr, self.dim, self.sizes, self.strides, self.dtype):
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.delete.argtypes = [ctypes.c_void_p]
        self.datatypes = {code: name for name, code in self.codes.items()}
        # ctypes sizes and strides by shape: building them took a third of a small CPU call's Python
        self.layouts: dict[tuple[int, ...], tuple[Any, Any]] = {}

    def tensor(self, pointer: int, shape: Sequence[int], datatype: str, device_type: int) -> int:
        """A new, non-owning tensor handle over contiguous memory at `pointer`."""
        key = tuple(shape)
        layout = self.layouts.get(key)
        if layout is None:
            ndim = len(key)
            layout = (ctypes.c_int64 * ndim)(*key), (ctypes.c_int64 * ndim)(*_contiguous_strides(key))
            if len(self.layouts) < MAX_LAYOUTS:
                self.layouts[key] = layout  # the tensor copies them: one pair serves every call
        sizes, strides = layout
        handle = ctypes.c_void_p()
        code = self.from_blob(
            pointer, len(key), sizes, strides, 0, self.codes[datatype], device_type, 0, ctypes.byref(handle)
        )
        _check(code, "make a tensor from a buffer")
        return int(handle.value or 0)

    def address(self, handle: int) -> int:
        ptr = ctypes.c_void_p()
        _check(self.data_ptr(handle, ctypes.byref(ptr)), "read a result's address")
        return int(ptr.value or 0)

    def describe(self, handle: int) -> tuple[int, list[int], list[int], str]:
        """(data pointer, shape, strides in elements, datatype) of an output handle."""
        ndim, dtype = ctypes.c_int64(), ctypes.c_int32()
        sizes, strides = _Int64s(), _Int64s()
        _check(self.dim(handle, ctypes.byref(ndim)), "read a result's rank")
        _check(self.sizes(handle, ctypes.byref(sizes)), "read a result's shape")
        _check(self.strides(handle, ctypes.byref(strides)), "read a result's strides")
        _check(self.dtype(handle, ctypes.byref(dtype)), "read a result's dtype")
        n = ndim.value
        datatype = self.datatypes.get(dtype.value)
        if datatype is None:
            raise RuntimeError(f"the model returned a tensor of torch dtype code {dtype.value}, which Kiln cannot send")
        return self.address(handle), sizes[:n], strides[:n], datatype


def _contiguous_strides(shape: Sequence[int]) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return strides[::-1]


def _span(shape: Sequence[int], strides: Sequence[int]) -> int:
    """Elements from the first to one past the last element a strided view reaches."""
    if any(s == 0 for s in shape):
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(shape, strides, strict=True))


def host_copy(source: np.ndarray, shape: Sequence[int], strides: Sequence[int], copy: bool) -> np.ndarray:
    """A contiguous array of a strided view of `source` (elements from its start); `copy`: never `source`'s memory."""
    item = source.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(source, shape, [s * item for s in strides])
    return np.array(view, order="C", copy=True) if copy else np.ascontiguousarray(view)


class Container:
    """An AOTInductor model container: create it, count its outputs, run it on handles."""

    def __init__(self, so: Path, device: str, num_models: int) -> None:
        if so.with_suffix(".json").exists():
            raise LeanUnavailable(f"{so.name} calls operators outside the C shim (torch's proxy executor)")
        self.lib = ctypes.CDLL(str(so))
        create = self.lib.AOTInductorModelContainerCreateWithDevice
        create.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_char_p, ctypes.c_char_p]
        self.handle = ctypes.c_void_p()
        cubins = str(so.parent).encode() if device == "cuda" else None
        _check(create(ctypes.byref(self.handle), num_models, device.encode(), cubins), "create the model container")
        count = ctypes.c_size_t()
        _check(self.lib.AOTInductorModelContainerGetNumOutputs(self.handle, ctypes.byref(count)), "count outputs")
        self.outputs = count.value
        pointer, size = ctypes.c_void_p, ctypes.c_size_t
        run_args: list[Any] = [pointer, pointer, size, pointer, size, pointer, pointer]
        self._releasing = self.lib.AOTInductorModelContainerRun
        self._holding = ctypes.PyDLL(str(so)).AOTInductorModelContainerRun  # same function, GIL kept
        self._releasing.argtypes = self._holding.argtypes = run_args
        self.cpu = device == "cpu"
        self.quick = False  # the last CPU call took under QUICK_SECONDS: keep the GIL for the next

    def run(self, handles: Sequence[int], stream: int | None = None) -> list[int]:
        """Run on input handles (the container takes them over); new output handles."""
        given = (ctypes.c_void_p * len(handles))(*handles)
        taken = (ctypes.c_void_p * self.outputs)()
        run = self._holding if self.quick else self._releasing
        start = time.perf_counter()
        _check(run(self.handle, given, len(handles), taken, self.outputs, stream, None), "run the model")
        self.quick = self.cpu and time.perf_counter() - start < QUICK_SECONDS
        return [int(p or 0) for p in taken]


class LeanCpu:
    """A compiled CPU library called on numpy arrays: inputs used where they lie, results copied out."""

    def __init__(
        self, so: Path, datatypes: Sequence[str], container: Container | None = None, threads: int = 0
    ) -> None:
        self.shim = Shim()
        self.container = container or Container(so, "cpu", MODELS_PER_CONTAINER["cpu"])
        self.datatypes = list(datatypes)
        # The outputs' (shape, strides, datatype) by the inputs' shapes: compiled code derives them from
        # those alone, so after the first call at a shape only each output's address is read.
        self.layouts: dict[Shapes, list[tuple[list[int], list[int], str]]] = {}
        self.threads = ThreadChoice(threads or openmp_threads())

    def __call__(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        arrays = [np.ascontiguousarray(a) for a in arrays]  # alive until the run returns
        handles = [
            self.shim.tensor(a.__array_interface__["data"][0], a.shape, d, self.shim.cpu)
            for a, d in zip(arrays, self.datatypes, strict=True)
        ]
        key = tuple(a.shape for a in arrays)
        threads = self.threads.pick(key)
        start = time.perf_counter()
        outputs = self.container.run(handles)
        self.threads.record(key, threads, time.perf_counter() - start)
        try:
            layouts = self.layouts.get(key)
            if layouts is None:
                described = [self.shim.describe(h) for h in outputs]
                layouts = [(shape, strides, datatype) for _, shape, strides, datatype in described]
                if len(self.layouts) < MAX_LAYOUTS:
                    self.layouts[key] = layouts
            return [self._copy(self.shim.address(h), *layout) for h, layout in zip(outputs, layouts, strict=True)]
        finally:
            for handle in outputs:
                self.shim.delete(handle)

    @staticmethod
    def _copy(ptr: int, shape: list[int], strides: list[int], datatype: str) -> np.ndarray:
        """A result in memory of its own (the library's goes with the handle)."""
        dtype = DATATYPES[datatype]
        span = _span(shape, strides)
        if not span:
            return np.empty(shape, dtype)
        if strides == _contiguous_strides(shape):
            out = np.empty(shape, dtype)
            ctypes.memmove(out.__array_interface__["data"][0], ptr, out.nbytes)
            return out
        memory: Any = (ctypes.c_char * (span * dtype.itemsize)).from_address(ptr)
        return host_copy(np.frombuffer(memory, dtype=dtype), shape, strides, copy=True)


class CudaRuntime:
    """The CUDA runtime functions the GPU path uses (libcudart, as libtorch_cuda loaded it)."""

    def __init__(self) -> None:
        path = cudart_path()
        if path is None:
            raise LeanUnavailable("libcudart is not loaded by libtorch_cuda")
        self.lib = ctypes.CDLL(path)
        for name in ("cudaStreamCreateWithFlags", "cudaEventCreateWithFlags"):
            getattr(self.lib, name).argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]
        self.lib.cudaMallocAsync.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_void_p]
        self.lib.cudaFreeAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.lib.cudaMemcpyAsync.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_void_p,
        ]
        self.lib.cudaEventRecord.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.lib.cudaStreamWaitEvent.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
        self.lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        for name in ("cudaEventSynchronize", "cudaEventDestroy", "cudaStreamSynchronize", "cudaHostUnregister"):
            getattr(self.lib, name).argtypes = [ctypes.c_void_p]
        _check(self.lib.cudaSetDevice(0), "select GPU 0")

    def capability(self) -> str:
        major, minor = ctypes.c_int(), ctypes.c_int()
        _check(self.lib.cudaDeviceGetAttribute(ctypes.byref(major), CC_MAJOR, 0), "read the GPU's capability")
        _check(self.lib.cudaDeviceGetAttribute(ctypes.byref(minor), CC_MINOR, 0), "read the GPU's capability")
        return f"{major.value}.{minor.value}"

    def stream(self) -> int:
        handle = ctypes.c_void_p()
        _check(self.lib.cudaStreamCreateWithFlags(ctypes.byref(handle), NON_BLOCKING), "create a CUDA stream")
        return int(handle.value or 0)

    def event(self, stream: int) -> int:
        handle = ctypes.c_void_p()
        _check(self.lib.cudaEventCreateWithFlags(ctypes.byref(handle), NO_TIMING), "create a CUDA event")
        _check(self.lib.cudaEventRecord(handle, stream), "record a CUDA event")
        return int(handle.value or 0)

    def keep_pool(self) -> None:
        """Freed stream-ordered memory stays in the pool for the next batch instead of going back to the driver."""
        pool, most = ctypes.c_void_p(), ctypes.c_uint64(2**64 - 1)
        if self.lib.cudaDeviceGetDefaultMemPool(ctypes.byref(pool), 0) == 0:
            self.lib.cudaMemPoolSetAttribute(pool, RELEASE_THRESHOLD, ctypes.byref(most))


@dataclass
class Launched:
    """One batch on the GPU: its output handles and the event that marks them computed."""

    outputs: list[int]
    computed: int


class LeanCuda:
    """A compiled CUDA library called on numpy arrays, in three steps the batcher overlaps:
    `upload` (copy stream), `launch` (compute stream), `finish` (the answering thread)."""

    def __init__(self, so: Path, datatypes: Sequence[str], container: Container | None = None) -> None:
        self.cuda = CudaRuntime()
        self.shim = Shim()
        self.container = container or Container(so, "cuda", MODELS_PER_CONTAINER["cuda"])
        self.datatypes = list(datatypes)
        self.copies, self.compute, self.downloads = self.cuda.stream(), self.cuda.stream(), self.cuda.stream()
        self.cuda.keep_pool()

    def upload(self, requests: list[list[np.ndarray]], dim: int) -> list[tuple[int, tuple[int, ...]]]:
        """Each input of the batch in device memory (allocated on the copy stream): (pointer, shape)."""
        uploaded = []
        lib = self.cuda.lib
        for index in range(len(self.datatypes)):
            parts = [np.ascontiguousarray(r[index]) for r in requests]
            if dim != 0 and len(parts) > 1:
                parts = [np.ascontiguousarray(np.concatenate(parts, dim))]
            shape = list(parts[0].shape)
            shape[dim] = sum(p.shape[dim] for p in parts)
            size = sum(p.nbytes for p in parts)
            pointer = ctypes.c_void_p()
            _check(lib.cudaMallocAsync(ctypes.byref(pointer), max(size, 1), self.copies), "allocate GPU memory")
            offset = 0
            for part in parts:
                code = lib.cudaMemcpyAsync(
                    (pointer.value or 0) + offset, part.ctypes.data, part.nbytes, H2D, self.copies
                )
                _check(code, "copy inputs to the GPU")
                offset += part.nbytes
            uploaded.append((int(pointer.value or 0), tuple(shape)))
        return uploaded

    def launch(self, uploaded: list[tuple[int, tuple[int, ...]]]) -> Launched:
        """Queue the model behind the uploads; the inputs' memory is freed in stream order after it."""
        lib = self.cuda.lib
        ready = self.cuda.event(self.copies)
        _check(lib.cudaStreamWaitEvent(self.compute, ready, 0), "order the model after its inputs")
        lib.cudaEventDestroy(ready)
        handles = [
            self.shim.tensor(ptr, shape, d, self.shim.cuda)
            for (ptr, shape), d in zip(uploaded, self.datatypes, strict=True)
        ]
        try:
            outputs = self.container.run(handles, self.compute)
        finally:
            for ptr, _ in uploaded:
                lib.cudaFreeAsync(ptr, self.compute)
        return Launched(outputs, self.cuda.event(self.compute))

    def finish(self, launched: Launched) -> list[np.ndarray]:
        """Wait for the batch and copy its results to the host (runs in the answering thread)."""
        lib = self.cuda.lib
        try:
            _check(lib.cudaStreamWaitEvent(self.downloads, launched.computed, 0), "order the copy after the model")
            results = []
            for handle in launched.outputs:
                ptr, shape, strides, datatype = self.shim.describe(handle)
                dtype = DATATYPES[datatype]
                span = _span(shape, strides)
                host = np.empty(span, dtype)
                if span:
                    _check(lib.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, D2H, self.downloads), "copy results")
                results.append((host, shape, strides))
            _check(lib.cudaStreamSynchronize(self.downloads), "wait for the results")
            return [host_copy(h, shape, strides, copy=False) for h, shape, strides in results]
        finally:
            lib.cudaEventDestroy(launched.computed)
            for handle in launched.outputs:
                self.shim.delete(handle)

    def __call__(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One synchronous call (warm-up and validation)."""
        return self.finish(self.launch(self.upload([list(arrays)], 0)))

    def pin(self, address: int, size: int) -> bool:
        return bool(self.cuda.lib.cudaHostRegister(address, size, 0) == 0)

    def unpin(self, address: int) -> None:
        self.cuda.lib.cudaHostUnregister(address)


def capability() -> str:
    """The GPU's compute capability, through CUDA's runtime (torch's libraries loaded first)."""
    return CudaRuntime().capability()
